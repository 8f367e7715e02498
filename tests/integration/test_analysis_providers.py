"""The `web` and `job` metric providers with the operator on the real control plane.

web: a local HTTP server answers JSON; the namespace's administrator allows its address; the operator GETs it per
measurement with the candidate's version in the url and judges the JSONPath's value. job: the operator creates one
Job per measurement from the metric's pod template, with the candidate's own Service and version in its env; KWOK
finishes the Job's pod as the template's test annotations say (hack/kwok/analysis-job-outcome.yaml: the exit code and
the termination message a real `shipyard-runtime evaluate` would leave), and the operator reads the verdict back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kopf.testing import KopfRunner

from tests.integration.conftest import Cluster, wait_until
from tests.integration.test_operator_rollout import condition, get, model, names, replicas, wait_status

pytestmark = pytest.mark.integration


class QualityServer:
    """A local JSON endpoint: GET /score?version=<v> answers {"data": {"score": score(v)}}."""

    def __init__(self) -> None:
        self.score: Callable[[str], float] = lambda version: 0.97
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                version = parse_qs(url.query).get("version", [""])[0]
                outer.requests.append(self.path)
                data = json.dumps({"data": {"score": outer.score(version)}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def quality(cluster: Cluster, namespace: str) -> Iterator[QualityServer]:
    server = QualityServer()
    cluster.kubectl("annotate", "namespace", namespace, f"shipyard.dev/allowed-prometheus-addresses={server.address}")
    yield server
    server.close()


def web_analysis(address: str) -> dict[str, Any]:
    return {"interval": "1s", "failureLimit": 0, "minSamples": 2,
            "metrics": [{"name": "quality", "min": 0.9, "web": {
                "url": f"{address}/score?version={{{{version}}}}&model={{{{name}}}}",
                "jsonPath": "$.data.score", "headers": [{"name": "Accept", "value": "application/json"}]}}]}


def test_a_web_metric_promotes_a_good_candidate_and_rolls_back_a_worse_one(
        cluster: Cluster, operator: KopfRunner, namespace: str, quality: QualityServer) -> None:
    quality.score = lambda version: 0.5 if version == "1.2.0" else 0.97
    cluster.apply(model("web", "1.0.0", replicas=2, rollout={"analysis": web_analysis(quality.address)}), namespace)
    wait_status(cluster, namespace, "web", lambda m: (m.get("status") or {}).get("phase") == "Healthy",
                message="1.0.0 Healthy")
    cluster.apply(model("web", "1.1.0", replicas=2, rollout={"analysis": web_analysis(quality.address)}), namespace)
    md = wait_status(cluster, namespace, "web", lambda m: (m.get("status") or {}).get("stableVersion") == "1.1.0"
                     and (m.get("status") or {}).get("phase") == "Healthy", timeout=90, message="1.1.0 promoted")
    result = md["status"]["analysis"]["metrics"][0]
    assert (result["provider"], result["verdict"], result["lastValue"]) == ("web", "Successful", 0.97)
    assert result["successes"] >= 2
    assert any("version=1.1.0&model=web" in r for r in quality.requests)  # templated, URL-encoded values
    assert result["query"].startswith(f"GET {quality.address}/score?version=1.1.0")

    cluster.apply(model("web", "1.2.0", replicas=2, rollout={"analysis": web_analysis(quality.address)}), namespace)
    md = wait_status(cluster, namespace, "web", lambda m: (m.get("status") or {}).get("phase") == "RolledBack",
                     timeout=90, message="1.2.0 rolled back")
    assert condition(md, "Stalled") == ("True", "AnalysisFailed")
    result = md["status"]["analysis"]["metrics"][0]
    assert (result["verdict"], result["lastValue"]) == ("Failed", 0.5)
    assert "0.5 < min 0.9" in md["status"]["message"]
    assert replicas(cluster, namespace) == {"1.0.0": 0, "1.1.0": 2, "1.2.0": 0}


def test_a_web_address_off_the_allow_list_gets_no_request(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    server = QualityServer()  # not allowed for this namespace
    try:
        spec = {"analysis": web_analysis(server.address) | {"consecutiveErrorLimit": 1}}
        cluster.apply(model("refused", "1.0.0", replicas=1, rollout=spec), namespace)
        wait_status(cluster, namespace, "refused", lambda m: (m.get("status") or {}).get("phase") == "Healthy",
                    message="1.0.0 Healthy")
        cluster.apply(model("refused", "1.1.0", replicas=1, rollout=spec), namespace)
        md = wait_status(cluster, namespace, "refused", lambda m: (m.get("status") or {}).get("phase") == "RolledBack",
                         timeout=90, message="rolled back: the provider stayed refused past consecutiveErrorLimit")
        result = md["status"]["analysis"]["metrics"][0]
        assert result["verdict"] == "Error" and "is not an allowed web metric address" in result["message"]
        assert "spec.rollout.analysis.metrics[0].web.url" in result["message"]
        assert server.requests == []
    finally:
        server.close()


def evaluate_template(exit_code: int, message: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {"shipyard.dev/test-exit-code": str(exit_code),
                                         "shipyard.dev/test-message": message}},
            "spec": {"containers": [{"name": "evaluate", "image": "registry.example/acme/digits-model:1.1.0",
                                     "command": ["shipyard-runtime", "evaluate", "--dataset", "builtin:digits"]}]}}


def job_analysis(exit_code: int, message: str) -> dict[str, Any]:
    return {"interval": "1s", "failureLimit": 0, "consecutiveErrorLimit": 1, "minSamples": 2,
            "metrics": [{"name": "accuracy", "min": 0.9, "job": {"template": evaluate_template(exit_code, message)}}]}


def test_a_job_metric_measures_the_candidate_through_its_own_service_and_promotes_it(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    good = {"analysis": job_analysis(0, "accuracy 0.9756 on 450 samples [value=0.9756]")}
    cluster.apply(model("jobbed", "1.0.0", replicas=2, rollout=good), namespace)
    wait_status(cluster, namespace, "jobbed", lambda m: (m.get("status") or {}).get("phase") == "Healthy",
                message="Healthy")
    cluster.apply(model("jobbed", "1.1.0", replicas=2, rollout=good), namespace)
    jobs = wait_until(lambda: [j for j in json.loads(cluster.kubectl(
        "get", "jobs", "-n", namespace, "-l", "shipyard.dev/component=analysis", "-o", "json").stdout)["items"]],
        60, message="an analysis Job")
    job = jobs[0]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHIPYARD_ENDPOINT"] == f"http://jobbed-1-1-0.{namespace}.svc:8080"
    assert env["SHIPYARD_REFERENCE_ENDPOINT"] == f"http://jobbed-1-0-0.{namespace}.svc:8080"
    assert (env["SHIPYARD_MODEL_VERSION"], env["SHIPYARD_STABLE_VERSION"], env["SHIPYARD_METRIC_NAME"]) == (
        "1.1.0", "1.0.0", "accuracy")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False  # the template did not ask
    assert job["metadata"]["ownerReferences"][0]["name"] == "jobbed"
    # The Services the Job reaches: the candidate's and the stable's own, next to the model's.
    assert {"jobbed", "jobbed-1-1-0", "jobbed-1-0-0"} <= set(names(cluster, "services", namespace))
    service = json.loads(cluster.kubectl("get", "service", "jobbed-1-1-0", "-n", namespace, "-o", "json").stdout)
    assert service["spec"]["selector"] == {"shipyard.dev/model": "jobbed", "shipyard.dev/version": "1.1.0",
                                           "shipyard.dev/component": "serving"}
    md = wait_status(cluster, namespace, "jobbed", lambda m: (m.get("status") or {}).get("stableVersion") == "1.1.0"
                     and (m.get("status") or {}).get("phase") == "Healthy", timeout=90, message="1.1.0 promoted")
    result = md["status"]["analysis"]["metrics"][0]
    assert (result["provider"], result["verdict"], result["lastValue"]) == ("job", "Successful", 0.9756)
    assert result["successes"] >= 2 and result["measurements"] >= 2
    # Once promoted, the version Services and the analysis Jobs are gone.
    wait_until(lambda: names(cluster, "services", namespace) == ["jobbed"] and not [
        j for j in names(cluster, "jobs", namespace)], 60, message="version Services and analysis Jobs deleted")


@pytest.mark.parametrize(("exit_code", "message", "verdict", "says"), [
    pytest.param(0, "accuracy 0.4200 on 450 samples [value=0.42]", "Failed", "0.42 < min 0.9",
                 id="accuracy-below-min"),
    pytest.param(1, "accuracy 0.42 below the minimum 0.9", "Failed", "exit code 1: accuracy 0.42 below the minimum",
                 id="exit-1"),
    pytest.param(2, "could not reach http://x: connection refused", "Error", "the Job could not measure (exit code 2)",
                 id="could-not-measure"),
])
def test_a_failing_job_metric_rolls_the_candidate_back(cluster: Cluster, operator: KopfRunner, namespace: str,
                                                       exit_code: int, message: str, verdict: str,
                                                       says: str) -> None:
    good = {"analysis": job_analysis(0, "[value=0.97]")}
    bad = {"analysis": job_analysis(exit_code, message)}
    cluster.apply(model("worse", "1.0.0", replicas=2, rollout=good), namespace)
    wait_status(cluster, namespace, "worse", lambda m: (m.get("status") or {}).get("phase") == "Healthy",
                message="Healthy")
    cluster.apply(model("worse", "1.1.0", replicas=2, rollout=bad), namespace)
    md = wait_status(cluster, namespace, "worse", lambda m: (m.get("status") or {}).get("phase") == "RolledBack",
                     timeout=90, message="rolled back")
    assert condition(md, "Stalled") == ("True", "AnalysisFailed")
    result = get(cluster, namespace, "worse")["status"]["analysis"]["metrics"][0]
    assert result["verdict"] == verdict and says in result["message"], result
    assert replicas(cluster, namespace) == {"1.0.0": 2, "1.1.0": 0}

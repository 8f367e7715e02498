"""The e2e scenarios of the examples and of a third-party runtime, each in a namespace of its own on the e2e stack:

6. examples/recommender.yaml applied as a user would (``kubectl apply -f``): its compression Job, its pods, and
   inferences through its Service scored against the synthetic interactions' labels;
7. examples/sentence-encoder.yaml on a cluster without GPUs: the user's CPU variant (``kubectl patch --local`` drops
   the GPU limit, the GPU tolerations and maxSurgeGPUs), compressed and served; it takes sentences (OIP ``BYTES``)
   and answers OpenAI's client on ``/v1/embeddings``;
8. examples/torchserve.yaml: TorchServe (Java frontend, Python workers) as the runtime; a good tag is promoted
   through its canary steps, a bad tag (its handler fails half of its batches with a 5xx) is rolled back on
   TorchServe's own request metrics;
9. Shipyard's server with gRPC only (``spec.serving.grpc.http: false``): its pods become Ready on Kubernetes' gRPC
   probes (grpc.health.v1), the Service exposes port grpc (h2c) alone, and Triton's gRPC client infers through it.

Each scenario deletes its namespace at the end, so that the pods of one do not load the machine under the next.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.e2e import manifests
from tests.e2e.conftest import E2E, compression_job, job_outcome, record
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def in_namespace(e2e: E2E, namespace: str) -> E2E:
    """The stack seen from a namespace of the scenario's own, with the artifacts PVC the examples name."""
    e2e.cluster.kubectl("create", "namespace", namespace)
    scoped = dataclasses.replace(e2e, namespace=namespace)
    volume = stack.load_hack_module("node_agent").build_local_volume(
        namespace, manifests.ARTIFACTS_PVC, str(e2e.workdir / "pvc" / namespace / manifests.ARTIFACTS_PVC))
    for obj in volume:
        e2e.cluster.apply(obj)
    return scoped


def delete_namespace(e2e: E2E) -> None:
    e2e.cluster.kubectl("delete", "namespace", e2e.namespace, "--wait=false", check=False)


def job_message(e2e: E2E, name: str) -> str:
    """The termination message of the compression Job's succeeded pod (its one-line summary)."""
    job = compression_job(e2e, name)
    assert job is not None
    out = e2e.cluster.kubectl("get", "pods", "-n", e2e.namespace, "-l", f"job-name={job['metadata']['name']}",
                              "-o", "json")
    for pod in json.loads(out.stdout)["items"]:
        for status in pod["status"].get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0:
                return str(terminated.get("message", ""))
    raise AssertionError(f"no succeeded pod of the compression Job of {name}")


def pod_logs(e2e: E2E, prefix: str) -> str:
    logs = sorted((e2e.workdir / "logs").glob(f"{e2e.namespace}_{prefix}*"))
    return "\n".join(f"{p.name}:\n{p.read_text(errors='replace')[-2000:]}" for p in logs)


def ready(e2e: E2E, name: str) -> dict[str, Any] | None:
    """The ModelDeployment once its status is current and Ready (kstatus' Current)."""
    md = e2e.md(name)
    status = md.get("status") or {}
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if status.get("observedGeneration") == md["metadata"]["generation"] and conds.get("Ready") == "True" \
            and conds.get("Reconciling") != "True":
        return md
    return None


def compress_and_serve(e2e: E2E, name: str, job_timeout: float, ready_timeout: float) -> dict[str, float]:
    """Waits for the compression Job and then for the ModelDeployment to be Ready; their durations (s)."""
    started = time.time()
    job = wait_until(lambda: compression_job(e2e, name), timeout=60, message=f"the compression Job of {name}")
    job_name = job["metadata"]["name"]
    outcome = wait_until(lambda: job_outcome(e2e, job_name), timeout=job_timeout, interval=1,
                         message=f"Job {job_name} to finish")
    compressed = time.time()
    assert outcome == "Complete", pod_logs(e2e, job_name)
    wait_until(lambda: ready(e2e, name), timeout=ready_timeout, interval=1,
               message=f"ModelDeployment {name} to become Ready\n{pod_logs(e2e, name)}")
    return {"apply -> compression Job complete (s)": round(compressed - started, 1),
            "Job complete -> Ready (s)": round(time.time() - compressed, 1)}


def post_json(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {"raw": error.read()[:500].decode(errors="replace")}


# ---------------------------------------------------------------------------------------------------- scenarios


def test_6_recommender_example_compressed_served_and_scored(e2e: E2E) -> None:
    name = "6 example: recommender"
    from shipyard.runtime import datasets, evaluate  # torch: only the test process, never the operator

    scoped = in_namespace(e2e, "e2e-recommender")
    try:
        e2e.cluster.kubectl("apply", "-n", scoped.namespace, "-f", str(EXAMPLES / "recommender.yaml"))
        timings = compress_and_serve(scoped, "recommender", job_timeout=600, ready_timeout=300)
        md = scoped.md("recommender")
        assert md["status"]["stableVersion"] == "1.0.0"
        (artifact,) = md["status"]["artifacts"]
        port = scoped.service_port("recommender")
        data = datasets.load_recsys_synthetic()
        users, items = (t[:2000].tolist() for t in data.eval_inputs)
        labels = data.eval_labels[:2000]
        status, body = post_json(port, "/v2/models/recommender/infer", {"inputs": [
            {"name": "user_ids", "datatype": "INT64", "shape": [len(users)], "data": users},
            {"name": "item_ids", "datatype": "INT64", "shape": [len(items)], "data": items}]})
        assert status == 200, body
        assert body["model_name"] == "recommender" and body["model_version"] == "1.0.0"
        (output,) = body["outputs"]
        assert output["name"] == "score" and output["shape"] == [len(users), 1]
        import torch

        served = evaluate.evaluate_metrics("binary", torch.tensor(output["data"]).reshape(-1, 1), labels)
        # The Job measured ROC AUC on the whole eval split; the first 2,000 of it, served, score alike.
        # status.artifacts keeps accuracy figures only for the accuracy metric: the Job's AUC is in its message.
        gated = float(re.search(r"\bauc [0-9.]+ -> ([0-9.]+)", job_message(scoped, "recommender")).group(1))
        assert served["auc"] >= 0.65, served
        assert abs(served["auc"] - gated) <= 0.03, (served, gated)
        record(name, outcome="passed", timings=timings, facts={
            "bytes before -> after": f"{artifact['sourceBytes']} -> {artifact['compressedBytes']}",
            "AUC (Job, eval split) / served (2,000 pairs via Service)": f"{gated:.4f} / {served['auc']:.4f}",
        })
    finally:
        delete_namespace(scoped)


def kubectl_patch_local(e2e: E2E, path: Path, patch: list[dict[str, Any]]) -> str:
    """``kubectl patch --local -f PATH --type json -p PATCH -o yaml``: the user's variant of an example."""
    out = e2e.cluster.kubectl("patch", "--local", "-f", str(path), "--type", "json", "-p", json.dumps(patch),
                              "-o", "yaml")
    return out.stdout


SENTENCE_ENCODER_CPU = [
    {"op": "remove", "path": "/spec/serving/resources/limits/nvidia.com~1gpu"},
    {"op": "remove", "path": "/spec/serving/tolerations"},
    {"op": "remove", "path": "/spec/rollout/maxSurgeGPUs"},
]
TEXT_INPUT = "text"  # the BYTES input the model declares with its tokenizer
SENTENCES = [
    "The compression Job quantizes the encoder to int8.",
    "A canary receives a share of the traffic before promotion.",
    "The int8 encoder is produced by a compression Job.",
    "Rollbacks happen on their own when the error rate climbs.",
]


def test_7_sentence_encoder_example_on_cpu_takes_sentences_and_answers_openai(e2e: E2E) -> None:
    name = "7 example: sentence encoder (CPU variant)"
    import numpy as np
    from openai import OpenAI

    scoped = in_namespace(e2e, "e2e-sentences")
    try:
        variant = kubectl_patch_local(e2e, EXAMPLES / "sentence-encoder.yaml", SENTENCE_ENCODER_CPU)
        assert "nvidia.com/gpu" not in variant
        e2e.cluster.kubectl("apply", "-n", scoped.namespace, "-f", "-", input=variant)
        timings = compress_and_serve(scoped, "sentence-encoder", job_timeout=1200, ready_timeout=600)
        md = scoped.md("sentence-encoder")
        (artifact,) = md["status"]["artifacts"]
        port = scoped.service_port("sentence-encoder")

        # Sentences in, over the Open Inference Protocol: a BYTES input the server tokenizes before batching.
        status, body = post_json(port, "/v2/models/minilm/infer", {"inputs": [
            {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [len(SENTENCES)], "data": SENTENCES}]})
        assert status == 200, body
        (output,) = body["outputs"]
        oip = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        assert oip.shape == (len(SENTENCES), 384)
        assert np.allclose(np.linalg.norm(oip, axis=1), 1.0, atol=1e-3)  # the encoder L2-normalises
        similarity = oip @ oip.T
        # The two sentences about the compression Job are each other's nearest neighbour.
        assert int(np.argsort(-similarity[0])[1]) == 2 and int(np.argsort(-similarity[2])[1]) == 0, similarity

        # The same sentences through OpenAI's own client on /v1/embeddings.
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        response = client.embeddings.create(model="minilm", input=SENTENCES)
        openai = np.asarray([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)
        assert openai.shape == oip.shape and np.allclose(openai, oip, atol=1e-4)
        assert response.usage.prompt_tokens > len(SENTENCES)
        record(name, outcome="passed", timings=timings, facts={
            "bytes before -> after": f"{artifact['sourceBytes']} -> {artifact['compressedBytes']}",
            "fidelity to fp32 (Job's gate)": "; ".join(re.findall(r"(?:cosine|nn_agreement) [0-9.]+ -> [0-9.]+",
                                                                  job_message(scoped, "sentence-encoder"))[:2]),
            "/v1/embeddings (OpenAI client)": f"{len(response.data)} embeddings of {openai.shape[1]}, "
                                              f"{response.usage.prompt_tokens} prompt tokens",
        })
    finally:
        delete_namespace(scoped)


TORCHSERVE = "digits-torchserve"
TS_IMAGE = "registry.example/shipyard/digits-torchserve"
TS_GOOD, TS_NEXT, TS_BAD = "1.0.0", "1.1.0", "1.2.0-bad"
TS_PATH = "/predictions/digits"  # TorchServe's own inference route; the handler takes OIP v2 JSON
TS_RATE = 10.0  # requests per second under load, each on a new connection through the Service proxy


def torchserve_variant(e2e: E2E, tag: str) -> str:
    """examples/torchserve.yaml at `tag`, with the e2e tier's pace (as the digits scenarios shorten theirs): 2
    replicas, pauses of 5 s, analysis every 2 s; the metrics and their thresholds are the example's."""
    patch = {"spec": {"image": f"{TS_IMAGE}:{tag}",
                      "serving": {"replicas": 2},
                      "rollout": {"steps": [{"weight": 25, "pause": "5s"}, {"weight": 50, "pause": "5s"}],
                                  "analysis": {"interval": "2s"}}}}
    out = e2e.cluster.kubectl("patch", "--local", "-f", str(EXAMPLES / "torchserve.yaml"), "--type", "merge",
                              "-p", json.dumps(patch), "-o", "yaml")
    return out.stdout


def wait_phase(e2e: E2E, name: str, predicate: Any, timeout: float, message: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        md = e2e.md(name)
        return md if predicate(md.get("status") or {}) else None

    found: dict[str, Any] = wait_until(check, timeout=timeout, interval=0.5,
                                       message=f"{message}\n{pod_logs(e2e, name)[-3000:]}")
    return found


def test_8_torchserve_runtime_canary_promoted_then_bad_tag_rolled_back_on_its_own_metrics(e2e: E2E) -> None:
    name = "8 TorchServe runtime: canary + rollback"
    from tests.e2e import loadgen
    from tests.e2e.test_rollout import LABELS, SAMPLES

    scoped = in_namespace(e2e, "e2e-torchserve")
    try:
        started = time.time()
        e2e.cluster.kubectl("apply", "-n", scoped.namespace, "-f", "-", input=torchserve_variant(e2e, TS_GOOD))
        wait_until(lambda: ready(scoped, TORCHSERVE), timeout=300, interval=1,
                   message=f"{TORCHSERVE} to become Ready\n{pod_logs(scoped, TORCHSERVE)[-3000:]}")
        first_ready = time.time()
        port = scoped.service_port(TORCHSERVE)
        status, body = post_json(port, TS_PATH, {"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [50, 64], "data": [v for r in SAMPLES[:50] for v in r]}]})
        assert status == 200, body
        assert body["model_version"] == TS_GOOD  # SHIPYARD_MODEL_VERSION, set by the operator, read by the handler
        predictions = loadgen.parse_predictions(body)
        accuracy = sum(p == y for p, y in zip(predictions, LABELS[:50], strict=True)) / 50
        assert accuracy >= 0.9, accuracy

        load = loadgen.LoadGenerator(port, "digits", SAMPLES, LABELS, rate=TS_RATE, max_seconds=600,
                                     path=TS_PATH).start()
        try:
            time.sleep(2)
            e2e.cluster.kubectl("apply", "-n", scoped.namespace, "-f", "-", input=torchserve_variant(e2e, TS_NEXT))
            wait_phase(scoped, TORCHSERVE, lambda s: s.get("stableVersion") == TS_NEXT
                       and not s.get("candidateVersion"), 300, f"the promotion of {TS_NEXT}")
            promoted_at = time.time()
            good = list(load.results)
            e2e.cluster.kubectl("apply", "-n", scoped.namespace, "-f", "-", input=torchserve_variant(e2e, TS_BAD))
            rolled_back = wait_phase(scoped, TORCHSERVE, lambda s: s.get("phase") == "RolledBack", 300,
                                     f"the rollback of {TS_BAD}")
            rolled_back_at = time.time()
            time.sleep(3)
        finally:
            results = load.stop()
        status_ = rolled_back["status"]
        assert status_["stableVersion"] == TS_NEXT
        assert status_["history"][-1]["version"] == TS_BAD
        good_failed = [r for r in good if r.failed]
        bad_window = [r for r in results if r.started >= promoted_at]
        failed = [r for r in bad_window if r.failed]
        # Every failure of the bad window is TorchServe's answer to an injected fault (a 5xx), none a refused or
        # dropped connection; the versions of the 200s are the stable's or the canary's.
        assert all(r.status >= 500 and "Prediction failed" in (r.error or "") for r in failed), failed[:3]
        assert {r.version for r in bad_window if not r.failed} <= {TS_NEXT, TS_BAD}
        assert failed, "the bad TorchServe version served no failing request: the scenario showed nothing"
        # The analysis read TorchServe's own counters (the message names the metric and the value it saw).
        analysis = json.dumps(status_.get("analysis") or {}) + json.dumps(status_["history"][-1])
        assert "error-rate" in analysis, analysis
        record(name, outcome="passed", timings={
            "apply 1.0.0 -> Ready (TorchServe pods up) (s)": round(first_ready - started, 1),
            "apply -> promoted (s)": round(promoted_at - first_ready, 1),
            "promoted -> bad tag RolledBack (s)": round(rolled_back_at - promoted_at, 1),
        }, requests={
            f"{TS_GOOD}->{TS_NEXT} (good canary)": {"served": len(good) - len(good_failed),
                                                    "failed": len(good_failed)},
            f"{TS_BAD} window": {"served": len(bad_window) - len(failed), "failed": len(failed)},
        }, facts={
            "served accuracy (50 eval digits, v1.0.0)": f"{accuracy:.2f}",
            "rollback": f"{status_['phase']}: {status_.get('message')}",
        })
        assert not good_failed, good_failed[:3]
    finally:
        delete_namespace(scoped)


def test_9_grpc_only_pods_are_probed_over_grpc_and_answer_tritons_client_through_the_service(e2e: E2E) -> None:
    name = "9 gRPC only: probes and Service"
    import numpy as np
    import tritonclient.grpc as triton_grpc

    from tests.e2e.test_rollout import LABELS, SAMPLES

    scoped = in_namespace(e2e, "e2e-grpc")
    md = {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "digits-grpc"},
          "spec": {"image": f"{manifests.IMAGE_REPOSITORY}:1.0.0",
                   "model": {"path": "/models/digits", "name": "digits"},
                   "serving": {"replicas": 2, "grpc": {"port": 9000, "http": False},
                               "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}}}
    try:
        started = time.time()
        scoped.cluster.apply(md, scoped.namespace)
        wait_until(lambda: ready(scoped, "digits-grpc"), timeout=300, interval=1,
                   message=f"digits-grpc to become Ready\n{pod_logs(scoped, 'digits-grpc')[-3000:]}")
        became_ready = time.time()
        deployment = scoped.cluster.get("deployment", "digits-grpc-1-0-0", scoped.namespace)
        assert deployment is not None
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["grpc"]["port"] == 9000, container["readinessProbe"]
        assert [p["name"] for p in container["ports"]] == ["grpc"]
        service = scoped.cluster.get("service", "digits-grpc", scoped.namespace)
        assert service is not None
        assert [(p["name"], p["port"], p.get("appProtocol")) for p in service["spec"]["ports"]] == [
            ("grpc", 9000, "kubernetes.io/h2c")]

        # Triton's gRPC client through the Service proxy: ready, metadata, an inference of 50 digits.
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{scoped.service_port('digits-grpc', 'grpc')}")
        try:
            assert client.is_server_ready() and client.is_model_ready("digits")
            metadata = client.get_model_metadata("digits", as_json=True)
            (first,) = metadata["inputs"]
            rows = np.asarray(SAMPLES[:50], dtype=np.float32)
            tensor = triton_grpc.InferInput(first["name"], list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            result = client.infer("digits", [tensor])
            logits = result.as_numpy(metadata["outputs"][0]["name"])
            assert result.get_response(as_json=True)["model_version"] == "1.0.0"
        finally:
            client.close()
        accuracy = float(np.mean(np.argmax(logits, axis=1) == np.asarray(LABELS[:50])))
        assert accuracy >= 0.9, accuracy
        record(name, outcome="passed", timings={"apply -> Ready on gRPC probes (s)": round(became_ready - started, 1)},
               facts={"Service ports": "grpc 9000 (h2c), no http",
                      "Triton gRPC client, 50 eval digits via the Service": f"accuracy {accuracy:.2f}"})
    finally:
        delete_namespace(scoped)

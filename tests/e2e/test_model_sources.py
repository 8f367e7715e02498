"""The e2e scenarios of downloaded models (docs/model-sources.md), with real pod processes whose init container runs
``shipyard-runtime fetch`` against real servers on 127.0.0.1, in a namespace of their own:

14. a model in S3 (the stack's versitygw; credentials in a Secret that only the download step gets): the digits
    model served by the runtime image (no model inside) from ``s3://models/<prefix>/`` with its digest pinned, 4
    replicas on the one node -> each object downloaded once (counted in the server's access log), 3 pods served from
    the node cache; a new version by a new URI and digest rolls out as a canary; ``shipyard.dev/rollback-to`` the
    first version (scaled to 0) -> its pods start from the node cache: 0 downloads; a wrong digest -> the candidate is
    Stalled (ModelFetchFailed, "digest mismatch"), never served, the stable keeps answering; a wrong secret key ->
    Stalled with "access denied (403) to s3://..." and the secret in no status, Event or log.
15. a model behind HTTPS (a server with a CA this test makes, trusted through spec.model.caBundle), as a tar.gz,
    compressed in a Job (its init container downloads the archive and extracts it) and served.
16. the sentence encoder pushed with oras to the stack's registry (distribution, TLS with its own CA) as an OCI
    artifact: served from ``oci://`` by a download step (the registry counts each file once), and mounted as an image
    volume (``mount: imageVolume``, pinned by digest: no download step in the pod, the node agent pulls it); both
    answer sentence embeddings.
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import loadgen, manifests
from tests.e2e.conftest import E2E, RUNTIME_IMAGE, record
from tests.e2e.s3model import build_secret, catalogue_model_dir, print_digest, upload
from tests.e2e.test_autoscaling import in_own_namespace
from tests.e2e.test_examples import post_json, ready
from tests.e2e.test_rollout import LABELS, SAMPLES
from tests.integration.conftest import wait_until
from tests.integration.test_fetch_https import Site, _handler, make_ca, make_server_cert
from tests.registry import Registry
from tests.s3server import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "e2e-sources"
BUCKET = "e2e-models"  # not the demo's: the session's server is shared
MODEL = "digits-s3"


def build_md(name: str, model: dict[str, Any], replicas: int = 4, image: str = RUNTIME_IMAGE,
             compression: bool = False) -> dict[str, Any]:
    md = manifests.build_digits("1.0.0", NAMESPACE)
    md["metadata"]["name"] = name
    spec = md["spec"]
    spec["image"] = image
    spec["model"] = {"name": "digits", **model}
    if compression:  # one quick step: the scenario is the download, not the recipe
        spec["compression"]["steps"] = [{"quantize": {"scheme": "int8-dynamic"}}]
    else:
        del spec["compression"]
    spec["serving"]["replicas"] = replicas
    spec["serving"]["resources"] = {"requests": {"cpu": "50m", "memory": "256Mi"},
                                    "limits": {"cpu": "500m", "memory": "1Gi"}}
    spec["rollout"]["steps"] = [{"weight": 50, "pause": "2s"}]
    return md


def predictions_right(port: int, rows: int = 16) -> int:
    body = loadgen.build_request("digits", SAMPLES[:rows])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        predicted = loadgen.parse_predictions(json.loads(response.read()))
    return sum(int(p == label) for p, label in zip(predicted, LABELS[:rows], strict=True))


def events(e2e: E2E, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    out = e2e.cluster.kubectl("get", "events", "-n", e2e.namespace, "-o", "json")
    return [e for e in json.loads(out.stdout)["items"]
            if e["involvedObject"].get("name") == name and (reason is None or e.get("reason") == reason)]


def stalled(e2e: E2E, name: str, reason: str) -> dict[str, Any] | None:
    md = e2e.md(name)
    cond = next((c for c in (md.get("status") or {}).get("conditions") or [] if c["type"] == "Stalled"), {})
    return md if cond.get("status") == "True" and cond.get("reason") == reason else None


@pytest.fixture(scope="module")
def sources(e2e: E2E) -> Iterator[E2E]:
    yield from in_own_namespace(e2e, NAMESPACE)


@pytest.fixture(scope="module")
def digits_dir() -> Path:
    return catalogue_model_dir()


def test_14_a_model_in_s3_is_downloaded_once_per_node_and_versions_by_its_uri(
        sources: E2E, s3_server: S3Server, digits_dir: Path, tmp_path: Path) -> None:
    e2e, s3 = sources, s3_server
    s3.make_bucket(BUCKET)
    # v2 is the same weights with one more file: other content, so another digest (the node cache is keyed by content:
    # the same bytes under another URI would be a cache hit, and the count below would show no download)
    v2_dir = tmp_path / "v2"
    shutil.copytree(digits_dir, v2_dir)
    (v2_dir / "NOTES.txt").write_text("digits, re-uploaded as v2\n")
    keys = {"v1": upload(s3, digits_dir, BUCKET, "digits/v1"), "v2": upload(s3, v2_dir, BUCKET, "digits/v2")}
    digest, digest_v2 = print_digest(digits_dir), print_digest(v2_dir)
    e2e.cluster.apply(build_secret(s3), e2e.namespace)
    source = {"digest": digest, "credentials": {"secretName": "model-storage"},
              "s3": {"endpoint": s3.endpoint, "region": s3.region}}

    def counts(version: str) -> list[int]:
        return [s3.downloads(BUCKET, k) for k in keys[version]]

    started = time.monotonic()
    e2e.cluster.apply(build_md(MODEL, {"uri": f"s3://{BUCKET}/digits/v1/", **source}), e2e.namespace)
    md = wait_until(lambda: ready(e2e, MODEL), timeout=300, interval=1, message="the S3 model Ready")
    first_ready_s = time.monotonic() - started
    v1 = md["status"]["stableVersion"]
    fetch = md["status"]["modelFetch"]
    assert counts("v1") == [1] * len(keys["v1"]), "4 replicas on one node download each object once"
    assert (fetch["version"], fetch["downloads"], fetch["cacheHits"], fetch["digest"]) == (v1, 1, 3, digest), fetch
    told = events(e2e, MODEL, "ModelFetched")
    assert len(told) >= 4 and sum("cache hit" in e["message"] for e in told) >= 3, [e["message"] for e in told]
    port = e2e.service_port(MODEL)
    assert predictions_right(port) >= 14

    # A new version: the same model under a new URI (and so a new version), rolled out as a canary under load (its
    # analysis judges the candidate's error rate and latency).
    load = loadgen.LoadGenerator(port, "digits", SAMPLES, LABELS, rate=10, max_seconds=600).start()
    started = time.monotonic()
    e2e.cluster.apply(build_md(MODEL, {"uri": f"s3://{BUCKET}/digits/v2/", **source, "digest": digest_v2}),
                      e2e.namespace)
    saw_canary = wait_until(lambda: (e2e.md(MODEL).get("status") or {}).get("candidateVersion"), timeout=120,
                            interval=0.5, message="the new URI's canary")
    md = wait_until(lambda: (m := ready(e2e, MODEL)) and m["status"]["stableVersion"] != v1 and m, timeout=300,
                    interval=1, message="the new URI promoted")
    canary_s = time.monotonic() - started
    results = load.stop()
    failed = [r for r in results if r.failed]
    assert results and not failed, loadgen.build_summary(results)
    v2 = md["status"]["stableVersion"]
    assert saw_canary == v2 and v2 != v1
    assert any(h["version"] == v2 and h["outcome"] == "Promoted" for h in md["status"]["history"])
    assert counts("v2") == [1] * len(keys["v2"])
    assert predictions_right(port) >= 14

    # rollback-to the first version (kept, scaled to 0): its pods start from the node cache.
    before = counts("v1")
    started = time.monotonic()
    e2e.cluster.kubectl("annotate", "md", MODEL, "-n", e2e.namespace, f"shipyard.dev/rollback-to={v1}",
                        "--overwrite")
    md = wait_until(lambda: (m := e2e.md(MODEL)) and (m.get("status") or {}).get("stableVersion") == v1
                    and not m["status"].get("restoring") and m, timeout=300, interval=1, message="rolled back to v1")
    rollback_s = time.monotonic() - started
    assert counts("v1") == before, "a rollback to a cached version downloads nothing"
    fetch = md["status"]["modelFetch"]
    assert (fetch["version"], fetch["downloads"]) == (v1, 0) and fetch["cacheHits"] >= 1, fetch
    assert predictions_right(port) >= 14

    # A wrong digest: the candidate never gets a model, the stable keeps answering.
    wrong = "sha256:" + "0" * 64
    e2e.cluster.apply(build_md(MODEL, {"uri": f"s3://{BUCKET}/digits/v1/", **source, "digest": wrong}),
                      e2e.namespace)
    md = wait_until(lambda: stalled(e2e, MODEL, "ModelFetchFailed"), timeout=180, interval=1,
                    message="the wrong digest Stalled")
    digest_message = md["status"]["message"]
    assert "digest mismatch" in digest_message and f"version {v1} keeps serving" in digest_message, digest_message
    assert md["status"]["stableVersion"] == v1 and predictions_right(port) >= 14

    # A wrong secret key: access denied, named, and the secret nowhere.
    denied_secret = "wrong-" + secrets.token_hex(12)
    e2e.cluster.apply(build_secret(s3, "wrong-storage", denied_secret), e2e.namespace)
    e2e.cluster.apply(build_md("digits-denied", {"uri": f"s3://{BUCKET}/digits/v1/", **source,
                                                 "credentials": {"secretName": "wrong-storage"}}, replicas=1),
                      e2e.namespace)
    md = wait_until(lambda: stalled(e2e, "digits-denied", "ModelFetchFailed"), timeout=180, interval=1,
                    message="the wrong secret Stalled")
    message = md["status"]["message"]
    assert f"access denied (403) to s3://{BUCKET}/digits/v1/" in message, message
    seen = json.dumps(md) + json.dumps(events(e2e, "digits-denied")) + \
        (e2e.workdir.parent / "operator.log").read_text(errors="replace")
    assert denied_secret not in seen and s3.secret_key not in seen
    record("14-model-in-s3", firstReadySeconds=round(first_ready_s, 1), objects=len(keys["v1"]),
           downloadsPerObjectWith4Replicas=1, canaryPromotedSeconds=round(canary_s, 1),
           canaryRequests=len(results), canaryFailedRequests=len(failed),
           rollbackToCachedSeconds=round(rollback_s, 1), rollbackDownloads=0, wrongDigest=digest_message[:300],
           wrongSecret=message[:300], outcome="passed")


@pytest.fixture(scope="module")
def https_site(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder / "ca", "shipyard-e2e-ca")
    cert, key = make_server_cert(folder, ca)
    archive = folder / "digits.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(digits_dir, arcname=".")
    site = Site(files={"/models/digits.tar.gz": archive.read_bytes()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/models/digits.tar.gz", ca[0]
    finally:
        server.shutdown()
        server.server_close()


def test_15_a_model_behind_https_is_compressed_and_served(sources: E2E, https_site: tuple[str, Path]) -> None:
    e2e, (url, ca) = sources, https_site
    e2e.cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "models-ca"},
                       "data": {"ca.crt": ca.read_text()}}, e2e.namespace)
    started = time.monotonic()
    e2e.cluster.apply(build_md("digits-https", {"uri": url, "caBundle": {"configMapName": "models-ca"}}, replicas=1,
                               compression=True), e2e.namespace)
    md = wait_until(lambda: ready(e2e, "digits-https"), timeout=600, interval=1, message="the HTTPS model Ready")
    artifact = md["status"]["artifacts"][-1]
    assert artifact["phase"] == "Succeeded" and artifact["compressedBytes"] < artifact["sourceBytes"], artifact
    told = [e["message"] for e in events(e2e, "digits-https", "ModelFetched")]
    assert any(m.startswith("Job ") and "digest sha256:" in m for m in told), told  # the Job downloaded it
    assert predictions_right(e2e.service_port("digits-https")) >= 14
    record("15-model-behind-https", readySeconds=round(time.monotonic() - started, 1),
           sourceBytes=artifact["sourceBytes"], compressedBytes=artifact["compressedBytes"], outcome="passed")


SENTENCES = ["Shipyard compresses the model in a Job.", "The weather is sunny today.",
             "A Kubernetes Job compresses the model before it is served."]


def embed(port: int) -> Any:
    import numpy as np

    status, body = post_json(port, "/v2/models/minilm/infer", {"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [len(SENTENCES)], "data": SENTENCES}]})
    assert status == 200, body
    (output,) = body["outputs"]
    vectors = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    similarity = vectors @ vectors.T
    assert similarity[0, 2] > similarity[0, 1], similarity  # the two sentences about compression are neighbours
    return vectors


def test_16_a_model_in_an_oci_registry_is_served_downloaded_and_as_an_image_volume(
        sources: E2E, oci_registry: Registry) -> None:
    e2e, registry = sources, oci_registry
    model = catalogue_model_dir("minilm")
    started = time.monotonic()
    digest = registry.push_artifact("models/minilm:1.0", {p.name: p for p in sorted(model.iterdir())})
    push_s = time.monotonic() - started
    e2e.cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "registry-ca"},
                       "data": {"ca.crt": registry.ca.read_text()}}, e2e.namespace)
    uri = f"oci://{registry.address}/models/minilm:1.0"
    timings: dict[str, float] = {}
    for name, extra in (("encoder-oci", {"caBundle": {"configMapName": "registry-ca"}}),
                        ("encoder-volume", {"mount": "imageVolume", "digest": digest})):
        md = build_md(name, {"uri": uri, **extra}, replicas=1)
        md["spec"]["model"]["name"] = "minilm"
        md["spec"]["serving"]["resources"]["limits"]["memory"] = "2Gi"
        before = registry.pulls("models/minilm")
        started = time.monotonic()
        e2e.cluster.apply(md, e2e.namespace)
        ready_md = wait_until(lambda n=name: ready(e2e, n), timeout=300, interval=1, message=f"{name} Ready")
        timings[name] = round(time.monotonic() - started, 1)
        embed(e2e.service_port(name))
        if name == "encoder-oci":
            fetch = ready_md["status"]["modelFetch"]
            assert (fetch["digest"], fetch["downloads"]) == (digest, 1), fetch
            assert registry.pulls("models/minilm") - before == 3, "each of the artifact's 3 files once"
        else:  # the kubelet's (the node agent's) image volume: no download step in the pod
            pod = json.loads(e2e.cluster.kubectl("get", "pods", "-n", e2e.namespace, "-l",
                                                 f"shipyard.dev/model={name}", "-o", "json").stdout)["items"][0]
            assert not pod["spec"].get("initContainers")
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-source")
            assert volume["image"]["reference"] == f"{registry.address}/models/minilm:1.0@{digest}", volume
    record("16-model-in-an-oci-registry", pushSeconds=round(push_s, 1), readySeconds=timings,
           artifactDigest=digest, outcome="passed")

"""Models downloaded from s3://, https:// and oci:// (docs/model-sources.md): the spec's rules, the version and
artifact identity of a downloaded model, the download step in the pods and the compression Job, what the shell
reads back from the pods (``observed.build_fetch_view``) and what the planner makes of it (Stalled, Events,
status.modelFetch). Pure: no cluster."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from shipyard import contract
from shipyard.operator import objects, observed, planning, spec
from shipyard.operator.spec import SpecError
from tests.plansim import COMPRESSION, IMAGE, Sim, md

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
S3 = {"uri": "s3://models/digits/v3/", "digest": DIGEST, "credentials": {"secretName": "model-storage"},
      "s3": {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1", "addressing": "path"}}
RUNTIME = {"name": "custom", "modelMountPath": "/mnt/models", "ports": {"http": 8080},
           "probes": {"readiness": {"path": "/ready"}}}


def parse(model: dict[str, Any], **extra: Any) -> spec.ModelDeployment:
    body = md("1.0.0", model=model, **extra)
    return spec.parse_model_deployment(body)


def problem(model: dict[str, Any], **extra: Any) -> str:
    with pytest.raises(SpecError) as e:
        parse(model, **extra)
    return str(e.value)


# --- the spec ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "extra", "expected"), [
    ({"path": "/models/digits", "digest": DIGEST}, {}, "spec.model.digest: only allowed with a s3:// or https:// or "
                                                       "oci:// uri"),
    ({"uri": "pvc://claim/d", "digest": DIGEST}, {}, "spec.model.digest: only allowed"),
    ({"uri": "https://h.example/m.tar.gz", "credentials": {"secretName": "s"}}, {},
     "spec.model.credentials: only allowed with a s3:// or oci:// uri: https:// takes no credentials"),
    ({"uri": "oci://r.example/m:1", "s3": {"region": "x"}}, {}, "spec.model.s3: only allowed with a s3:// uri"),
    ({"uri": "s3://b/k", "mount": "imageVolume"}, {}, "spec.model.mount: only allowed with a oci:// uri"),
    ({"uri": "s3://b/k", "path": "/m"}, {}, "must set only one of path and uri (both only for an oci:// image"),
    ({"uri": "s3://b/k", "credentials": {}}, {}, "spec.model.credentials: must set secretName or serviceAccountName"),
    ({"uri": "s3://b/k", "digest": "sha256:XYZ"}, {}, "spec.model.digest: String should match pattern"),
    ({"uri": "oci://r.example/m:1", "mount": "imageVolume"}, {"compression": COMPRESSION},
     "spec.compression: reads the model in a Job: an image volume"),
    ({"uri": "s3://b/k", "caBundle": {"configMapName": "Bad_Name"}}, {}, "spec.model.caBundle.configMapName"),
], ids=["digest-path", "digest-pvc", "https-secret", "s3-on-oci", "mount-on-s3", "path-with-s3", "empty-credentials",
        "bad-digest", "image-volume-compressed", "bad-ca-name"])
def test_bad_model_sources_name_the_field(model: dict[str, Any], extra: dict[str, Any], expected: str) -> None:
    assert expected in problem(model, **extra)


@pytest.mark.parametrize("model", [
    S3,
    {"uri": "s3://models/digits.pt"},
    {"uri": "https://models.example/digits.tar.gz", "digest": DIGEST, "caBundle": {"configMapName": "ca"}},
    {"uri": "oci://registry.example:5000/models/digits:1.0", "credentials": {"secretName": "regcred"}},
    {"uri": "oci://registry.example/models/minilm@" + DIGEST, "mount": "imageVolume", "path": "/models/minilm"},
    {"uri": "s3://models/digits/", "credentials": {"serviceAccountName": "model-reader"}},
], ids=["s3-full", "s3-object", "https-ca", "oci-secret", "oci-image-volume", "s3-irsa"])
def test_good_model_sources_parse(model: dict[str, Any]) -> None:
    assert parse(model).spec.model.remote


@pytest.mark.parametrize(("model", "version"), [
    ({"path": "/models/digits"}, "1.0.0"),
    ({"uri": "pvc://claim/digits"}, "1.0.0"),
    ({"uri": "s3://models/digits/"}, "1.0.0-m"),
    ({"uri": "oci://r.example/m:1"}, "1.0.0-m"),
])
def test_a_downloaded_model_is_part_of_the_version(model: dict[str, Any], version: str) -> None:
    got = parse(model).spec.version
    assert got.startswith(version) and (len(got) == len(version) + 8 if version.endswith("-m") else got == version)


def test_a_new_uri_or_digest_is_a_new_version_and_a_new_artifact() -> None:
    base = parse(S3, compression=COMPRESSION).spec
    moved = parse({**S3, "uri": "s3://models/digits/v4/"}, compression=COMPRESSION).spec
    repinned = parse({**S3, "digest": OTHER_DIGEST}, compression=COMPRESSION).spec
    assert len({base.version, moved.version, repinned.version}) == 3
    assert COMPRESSION["steps"] and base.compression is not None
    keys = {objects.build_artifact_key(s.image, base.compression.build_recipe(), s.model)
            for s in (base, moved, repinned)}
    assert len(keys) == 3
    in_image = parse({"path": "/models/digits"}, compression=COMPRESSION).spec
    assert in_image.compression is not None
    # models in the image keep the key they always had (no recompression after an operator upgrade)
    assert objects.build_artifact_key(in_image.image, in_image.compression.build_recipe(), in_image.model) == \
        objects.build_artifact_key(in_image.image, in_image.compression.build_recipe())


# --- the download step ----------------------------------------------------------------------------------------------

def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def pod_spec_of(model: dict[str, Any], fetch: objects.FetchSettings | None = None, **extra: Any) -> dict[str, Any]:
    parsed = parse(model, **extra)
    meta = objects.Meta("digits", "ml", "uid-1", 1)
    deployment = objects.build_deployment(meta, parsed, parsed.spec.version, parsed.spec.image, 2, fetch=fetch)
    return deployment["spec"]["template"]["spec"]


def test_an_s3_model_is_downloaded_by_an_init_container_with_only_its_secret() -> None:
    pod = pod_spec_of(S3, objects.FetchSettings(cache_path="/var/lib/shipyard/models"))
    (fetch,) = pod["initContainers"]
    (server,) = pod["containers"]
    env = env_of(fetch)
    assert fetch["command"] == ["shipyard-runtime", "fetch"] and fetch["image"] == f"{IMAGE}:1.0.0"
    assert env == {"SHIPYARD_FETCH_URI": "s3://models/digits/v3/", "SHIPYARD_FETCH_DEST": "/model-source",
                   "SHIPYARD_FETCH_DIGEST": DIGEST, "SHIPYARD_FETCH_CACHE": "/var/cache/shipyard",
                   "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
                   "SHIPYARD_FETCH_S3_ADDRESSING": "path"}
    assert fetch["envFrom"] == [{"secretRef": {"name": "model-storage"}}]
    assert "envFrom" not in server and "model-storage" not in str(server)  # the server never sees the Secret
    assert env_of(server)[contract.ENV_ARTIFACT_PATH] == "/model-source"
    assert {"name": "model-source", "mountPath": "/model-source", "readOnly": True} in server["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-source"] == {"name": "model-source", "emptyDir": {}}
    assert volumes["model-cache"]["hostPath"] == {"path": "/var/lib/shipyard/models", "type": "DirectoryOrCreate"}
    assert fetch["securityContext"]["runAsUser"] == objects.SERVING_USER
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False


def test_without_a_node_cache_no_host_path_is_mounted() -> None:
    pod = pod_spec_of(S3)
    assert "SHIPYARD_FETCH_CACHE" not in env_of(pod["initContainers"][0])
    assert not any("hostPath" in v for v in pod["volumes"])


def test_workload_identity_runs_the_pod_as_the_service_account_with_its_token() -> None:
    pod = pod_spec_of({"uri": "s3://models/digits/", "credentials": {"serviceAccountName": "model-reader"}})
    assert pod["serviceAccountName"] == "model-reader" and pod["automountServiceAccountToken"] is True
    assert "envFrom" not in pod["initContainers"][0]


def test_an_https_model_trusts_the_ca_bundle_of_its_config_map() -> None:
    pod = pod_spec_of({"uri": "https://models.example/digits.tar.gz", "caBundle": {"configMapName": "models-ca",
                                                                                   "key": "root.pem"}})
    fetch = pod["initContainers"][0]
    assert env_of(fetch)["SHIPYARD_FETCH_CA_BUNDLE"] == "/etc/shipyard/model-ca/root.pem"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-ca"]["configMap"] == {"name": "models-ca", "items": [{"key": "root.pem",
                                                                                "path": "root.pem"}]}


def test_an_oci_model_gets_its_registry_secret_as_a_file_and_its_path() -> None:
    pod = pod_spec_of({"uri": "oci://registry.example/models/encoder:1", "path": "/models/minilm",
                       "credentials": {"secretName": "regcred"}})
    fetch = pod["initContainers"][0]
    env = env_of(fetch)
    assert env["SHIPYARD_FETCH_PATH"] == "/models/minilm"
    assert env["SHIPYARD_FETCH_REGISTRY_CONFIG"] == "/etc/shipyard/registry/.dockerconfigjson"
    assert "envFrom" not in fetch
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["registry-auth"]["secret"]["secretName"] == "regcred"


def test_an_oci_image_volume_is_mounted_without_a_download_step() -> None:
    pod = pod_spec_of({"uri": "oci://registry.example/models/encoder:1", "digest": DIGEST, "mount": "imageVolume",
                       "path": "/models/minilm", "credentials": {"secretName": "regcred"}})
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-source"]["image"] == {"reference": f"registry.example/models/encoder:1@{DIGEST}",
                                                "pullPolicy": "IfNotPresent"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert env_of(pod["containers"][0])[contract.ENV_ARTIFACT_PATH] == "/model-source/models/minilm"


def test_another_runtime_downloads_with_the_operators_fetch_image_into_its_model_mount() -> None:
    pod = pod_spec_of({"uri": "s3://models/digits/"}, objects.FetchSettings(image="shipyard/runtime:0.1.0-cpu"),
                      serving={"replicas": 2, "runtime": RUNTIME})
    assert pod["initContainers"][0]["image"] == "shipyard/runtime:0.1.0-cpu"
    server = pod["containers"][0]
    assert {"name": "model-source", "mountPath": "/mnt/models", "readOnly": True} in server["volumeMounts"]
    assert env_of(server)[contract.ENV_MODEL_PATH] == "/mnt/models"


def test_the_compression_job_downloads_first() -> None:
    parsed = parse(S3, compression=COMPRESSION)
    meta = objects.Meta("digits", "ml", "uid-1", 1)
    assert parsed.spec.compression is not None
    key = objects.build_artifact_key(parsed.spec.image, parsed.spec.compression.build_recipe(), parsed.spec.model)
    config_map, job = objects.build_compression_objects(parsed, meta, parsed.spec.version, key,
                                                        fetch=objects.FetchSettings(cache_path="/var/cache/m"))
    pod = job["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == parsed.spec.image and fetch["envFrom"] == [{"secretRef": {"name": "model-storage"}}]
    assert '"source": "/model-source"' in config_map["data"][contract.COMPRESSION_CONFIG_FILE]
    assert {v["name"] for v in pod["volumes"]} >= {"model-source", "model-cache"}


# --- what the pods report -------------------------------------------------------------------------------------------

SUMMARY = ("Fetched s3://models/digits/v3/ into /model-source: 3 files, 1.2 MB in 0.4 s (3.0 MB/s), digest "
           f"{DIGEST}, cache miss [bytes=1200000 files=3 seconds=0.4 downloadedBytes=1200000 digest={DIGEST} "
           "cacheHit=false]")


def pod(name: str, version: str, state: dict[str, Any], last: dict[str, Any] | None = None,
        restarts: int = 0) -> dict[str, Any]:
    status = {"name": "fetch", "state": state, "restartCount": restarts}
    if last is not None:
        status["lastState"] = last
    return {"metadata": {"name": name, "labels": {"shipyard.dev/version": version}},
            "status": {"initContainerStatuses": [status]}}


@pytest.mark.parametrize(("body", "state", "message"), [
    (pod("p", "v", {"terminated": {"exitCode": 0, "message": SUMMARY}}), "done", SUMMARY),
    (pod("p", "v", {"terminated": {"exitCode": 1, "message": "access denied (403) to s3://b/k"}}), "failed",
     "access denied (403) to s3://b/k"),
    (pod("p", "v", {"waiting": {"reason": "CrashLoopBackOff"}},
         {"terminated": {"exitCode": 1, "message": "not found (404): s3://b/k"}}, restarts=3), "failed",
     "not found (404): s3://b/k"),
    (pod("p", "v", {"running": {}}, {"terminated": {"exitCode": 1, "message": "digest mismatch"}}), "failed",
     "digest mismatch"),
    (pod("p", "v", {"running": {}}), "running", ""),
    (pod("p", "v", {"waiting": {"reason": "PodInitializing"}}), "waiting", ""),
], ids=["done", "failed", "back-off", "retrying", "running", "waiting"])
def test_fetch_view_of_a_pod(body: dict[str, Any], state: str, message: str) -> None:
    view = observed.build_fetch_view(body)
    assert view is not None and (view.state, view.message, view.version) == (state, message, "v")


def test_what_a_download_step_said_is_redacted_before_status_and_events() -> None:
    said = "access denied (403) to https://b.example/m.tar.gz?X-Amz-Signature=s3cret&X-Amz-Credential=AKIA"
    view = observed.build_fetch_view(pod("p", "v", {"terminated": {"exitCode": 1, "message": said}}))
    assert view is not None and "s3cret" not in view.message and "AKIA" not in view.message
    sim = s3_sim()
    version = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    sim.broken.add(version)
    sim.fetches = {version: (view,)}
    sim.step()  # the Deployment is created; the next pass lists its pods
    plan = sim.step()
    assert "s3cret" not in json.dumps(sim.status) and "s3cret" not in json.dumps([e.message for e in plan.events])
    assert sim.condition("Stalled") == ("True", "ModelFetchFailed")


def test_a_pod_without_a_download_step_has_no_fetch_view() -> None:
    assert observed.build_fetch_view({"metadata": {"name": "p"}, "status": {}}) is None


def test_a_compression_jobs_download_is_read_from_its_init_container() -> None:
    job = {"metadata": {"name": "j", "labels": {}}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    pods = {"p": {"metadata": {"name": "p", "labels": {"job-name": "j"}}, "status": {"initContainerStatuses": [
        {"name": "fetch", "state": {"terminated": {"exitCode": 1, "finishedAt": "2026-12-03T00:00:00Z",
                                                   "message": "access denied (403) to s3://b/k: InvalidAccessKeyId"}}}],
        "containerStatuses": [{"name": "compress", "state": {"waiting": {"reason": "PodInitializing"}}}]}}}
    view = observed.build_job_view(job, pods)
    assert view.phase == "Failed" and view.message == "access denied (403) to s3://b/k: InvalidAccessKeyId"


# --- the planner ----------------------------------------------------------------------------------------------------

def fetch_view(name: str, version: str, state: str, message: str = "", restarts: int = 0) -> observed.FetchView:
    return observed.FetchView(pod=name, version=version, state=state, message=message, restarts=restarts)


def s3_sim() -> Sim:
    body = md("1.0.0", model=copy.deepcopy(S3))
    return Sim(body)


def test_each_finished_download_is_told_once_and_counted() -> None:
    sim = s3_sim()
    version = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    sim.fetches = {version: (fetch_view("p1", version, "done", SUMMARY),
                             fetch_view("p2", version, "done", SUMMARY.replace("cacheHit=false", "cacheHit=true")
                                        .replace("downloadedBytes=1200000", "downloadedBytes=0")))}
    sim.settle()
    told = [e for p in sim.plans for e in p.events if e.reason == "ModelFetched"]
    assert [e.message.split(":")[0] for e in told] == [f"Pod p1 (version {version})", f"Pod p2 (version {version})"]
    fetch = sim.status["modelFetch"]
    assert (fetch["version"], fetch["pods"], fetch["downloads"], fetch["cacheHits"], fetch["downloadedBytes"],
            fetch["bytes"], fetch["digest"]) == (version, ["p1", "p2"], 1, 1, 1200000, 1200000, DIGEST)
    assert sim.status["phase"] == "Healthy"


def test_a_failing_download_stalls_the_candidate_and_the_stable_keeps_serving() -> None:
    sim = s3_sim().settle()
    stable = sim.status["stableVersion"]
    sim.body["spec"]["model"]["digest"] = OTHER_DIGEST
    sim.set_spec()
    candidate = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    assert candidate != stable
    sim.broken.add(candidate)
    message = f"digest mismatch: s3://models/digits/v3/ has sha256:{'ef' * 32}, spec.model.digest is {OTHER_DIGEST}"
    sim.fetches = {candidate: (fetch_view("c1", candidate, "failed", message, restarts=2),)}
    sim.step()
    sim.step()
    assert sim.condition("Stalled") == ("True", "ModelFetchFailed")
    assert sim.status["message"] == (f"Version {candidate} cannot fetch its model (3 tries, retried with back-off): "
                                     f"{message}; version {stable} keeps serving")
    assert sim.status["modelFetch"]["failure"] == message
    assert sim.replicas()[stable] == 4 and sim.status["stableVersion"] == stable
    assert [e.reason for p in sim.plans[-2:] for e in p.events].count("ModelFetchFailed") == 1
    # the object is fixed: the pods' retry succeeds, the rollout goes on
    sim.broken.discard(candidate)
    sim.deployments[candidate] = sim._ready(candidate, sim.deployments[candidate].replicas)
    sim.fetches = {candidate: (fetch_view("c1", candidate, "done", SUMMARY),)}
    sim.run(lambda s: s.status.get("stableVersion") == candidate)


def test_the_shell_lists_pods_only_while_a_version_fetches() -> None:
    sim = s3_sim()
    parsed = planning.parse(sim.body)
    assert not isinstance(parsed, SpecError)
    version = parsed.spec.version
    sim.step()
    assert planning.plan_fetch_checks(parsed, sim.status, sim.observed()) == (version,)  # nothing told yet
    sim.fetches = {version: tuple(fetch_view(f"p{i}", version, "done", SUMMARY) for i in range(4))}
    sim.settle()
    assert planning.plan_fetch_checks(parsed, sim.status, sim.observed()) == ()  # at rest: no request
    in_image = planning.parse(md("1.0.0"))
    assert not isinstance(in_image, SpecError)
    assert planning.plan_fetch_checks(in_image, {}, sim.observed()) == ()


def test_another_runtime_without_a_fetch_image_is_stalled_naming_the_flag() -> None:
    sim = Sim(md("1.0.0", model={"uri": "s3://models/digits/"}, serving={"replicas": 1, "runtime": RUNTIME}))
    plan = sim.step()
    assert sim.condition("Stalled") == ("True", "UnsupportedModelSource")
    assert "--fetch-image" in sim.status["message"] and plan.apply == ()
    sim.fetch_settings = objects.FetchSettings(image="shipyard/runtime:0.1.0-cpu")
    sim.run(lambda s: s.status.get("phase") == "Healthy")


def test_a_rollback_to_a_cached_version_is_counted_for_it_and_nothing_is_told_twice() -> None:
    sim = s3_sim()
    v1 = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    hit = SUMMARY.replace("cacheHit=false", "cacheHit=true").replace("downloadedBytes=1200000", "downloadedBytes=0")
    sim.fetches = {v1: tuple(fetch_view(f"a{i}", v1, "done", SUMMARY if i == 0 else hit) for i in range(4))}
    sim.settle()
    sim.body["spec"]["model"]["digest"] = OTHER_DIGEST
    sim.set_spec()
    v2 = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    sim.fetches[v2] = tuple(fetch_view(f"b{i}", v2, "done", SUMMARY if i == 0 else hit) for i in range(4))
    sim.run(lambda s: s.status.get("stableVersion") == v2 and s.status.get("phase") == "Healthy")
    sim.fetches[v1] = tuple(fetch_view(f"c{i}", v1, "done", hit) for i in range(4))  # the kept version's new pods
    sim.annotate("rollback-to", v1)
    sim.run(lambda s: s.status.get("stableVersion") == v1 and not s.status.get("restoring"))
    sim.settle()
    fetch = sim.status["modelFetch"]
    assert (fetch["version"], fetch["downloads"], fetch["cacheHits"]) == (v1, 0, 4), fetch
    told = [e.message.split(" ")[1] for p in sim.plans for e in p.events if e.reason == "ModelFetched"]
    assert sorted(told) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)] +
                                  [f"c{i}" for i in range(4)])


def test_a_candidate_whose_download_never_succeeds_is_rolled_back_with_what_fetch_said() -> None:
    sim = s3_sim().settle()
    sim.body["spec"]["model"]["digest"] = OTHER_DIGEST
    sim.body["spec"]["rollout"] = {"startupTimeoutSeconds": 60}
    sim.set_spec()
    candidate = planning.parse(sim.body).spec.version  # type: ignore[union-attr]
    sim.broken.add(candidate)
    said = "access denied (403) to s3://models/digits/v3/: SignatureDoesNotMatch"
    sim.fetches = {candidate: (fetch_view("c1", candidate, "failed", said, restarts=4),)}
    sim.run(lambda s: s.status.get("phase") == "RolledBack")
    entry = sim.status["history"][-1]
    assert (entry["version"], entry["reason"]) == (candidate, "StartupTimeout")
    assert entry["message"].endswith(f"; its download step failed: {said}"), entry

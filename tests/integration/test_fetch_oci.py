"""`shipyard-runtime fetch --uri oci://...` from the stack's real OCI registry (CNCF distribution over TLS with a CA of
its own, tests/registry.py), run as the init container runs it: a process of its own, its exit code, stdout line and
termination message. Artifacts are pushed with the oras CLI, as users push them; images are OCI image layouts built here
and copied in with `oras cp`.

An artifact file, an artifact directory, an image with `--path` (layers and whiteouts), an image index (this platform
chosen), a pinned digest, a wrong digest, a missing tag and a missing repository, the node cache (a second fetch of a
tag costs one manifest GET and no blob, counted in the registry's access log; four fetchers at once download once),
basic auth (refused without or with wrong credentials, never echoed; accepted from a Docker config file), the
bearer-token flow against a stand-in registry (distribution's token auth needs a token server with signing keys: the
stand-in plays both, and lets its first token expire), and the registry killed mid-download and restarted (retried,
never a partial model). The suite's `oci_registry` is shared: every test pushes to a repository of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shipyard import contract
from shipyard.runtime.fetch import digests
from tests.integration.test_fetch_https import Run, run_fetch  # one way to run fetch as a process
from tests.registry import build_layer

if TYPE_CHECKING:
    from tests.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def fetch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHIPYARD_", "DOCKER_"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "HOME": str(tmp_path / "home"),
                "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("contract", "runtime")),
                contract.ENV_TERMINATION_LOG: str(tmp_path / f"termination-{secrets.token_hex(4)}")})
    env.update(extra)
    return env


def fetch(registry: Registry, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 300) -> Run:
    return run_fetch(env or fetch_env(tmp_path), *args, "--ca-bundle", str(registry.ca), timeout=timeout)


def repo() -> str:
    return f"models/t-{secrets.token_hex(5)}"


def test_an_artifact_file(oci_registry: Registry, tmp_path: Path) -> None:
    name, data = repo(), os.urandom(3 * MiB + 5)
    digest = oci_registry.push_artifact(f"{name}:v1", {"model.safetensors": data})
    uri = f"oci://{oci_registry.address}/{name}:v1"
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "m"))
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".shipyard-fetch.json", "model.safetensors"]
    assert run.termination == run.line
    assert run.line.startswith(f"Fetched {uri} into {tmp_path / 'm'}: 1 file, ")
    fields = contract.parse_fetch_summary_fields(run.line)
    assert (fields["digest"], fields["files"], fields["bytes"], fields["cacheHit"]) == (digest, 1, len(data), False)
    record = json.loads((tmp_path / "m" / ".shipyard-fetch.json").read_text())
    assert record["digest"] == digest
    assert record["contentDigest"] == digests.compute_digest(tmp_path / "m")
    assert oci_registry.pulls(name) == 1


def test_an_artifact_directory_and_path_selection(oci_registry: Registry, tmp_path: Path) -> None:
    name = repo()
    local = tmp_path / "digits"
    (local / "tokenizer").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(os.urandom(MiB))
    (local / "shipyard-model.json").write_text('{"format": 1}')
    (local / "tokenizer" / "tokenizer.json").write_text('{"v": 1}')
    oci_registry.push_artifact(f"{name}:v1", {"digits": local, "README.md": b"# digits"})
    uri = f"oci://{oci_registry.address}/{name}:v1"
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "all"))
    assert run.code == 0, run.log
    assert digests.compute_digest(tmp_path / "all" / "digits") == digests.compute_digest(local)
    assert (tmp_path / "all" / "README.md").read_text() == "# digits"
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "sel"), "--path", "/digits")
    assert run.code == 0, run.log
    assert digests.compute_digest(tmp_path / "sel") == digests.compute_digest(local)
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "none"), "--path", "/weights")
    assert run.code == 2
    assert "--path /weights: no such file or directory in the artifact" in run.line
    assert "README.md, digits" in run.line
    assert not (tmp_path / "none").exists()


def test_an_image_with_path_applies_layers_and_whiteouts(oci_registry: Registry, tmp_path: Path) -> None:
    name, weights = repo(), os.urandom(2 * MiB)
    layers = [
        build_layer({"etc/os-release": b"ID=debian", "models/digits/old.bin": b"old",
                     "models/digits/model.safetensors": b"v0"}, dirs=["models", "models/digits"]),
        build_layer({"models/digits/old.bin": None, "models/digits/model.safetensors": weights,
                     "models/digits/shipyard-model.json": b'{"format": 1}', "usr/bin/python3": b"elf"}),
    ]
    digest = oci_registry.push_image(f"{name}:v1", layers)
    uri = f"oci://{oci_registry.address}/{name}:v1"
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "m"), "--path", "/models/digits")
    assert run.code == 0, run.log
    files = sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*"))
    assert files == [".shipyard-fetch.json", "model.safetensors", "shipyard-model.json"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert contract.parse_fetch_summary_fields(run.line)["digest"] == digest
    assert oci_registry.pulls(name) == 2
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "nopath"))
    assert run.code == 2
    assert f"{uri} is a container image: --path must name the model's directory" in run.line
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "missing"), "--path", "/models/x")
    assert run.code == 1
    assert f"{uri}: nothing at /models/x in the image's filesystem" in run.line
    assert not (tmp_path / "missing").exists()


def test_an_index_picks_this_platform(oci_registry: Registry, tmp_path: Path) -> None:
    name = repo()
    digest = oci_registry.push_image(f"{name}:v1", [], platforms={
        "arm64": [build_layer({"models/m/model.txt": b"arm64"})],
        "amd64": [build_layer({"models/m/model.txt": b"amd64"})],
    })
    run = fetch(oci_registry, tmp_path, "--uri", f"oci://{oci_registry.address}/{name}:v1", "--dest",
                str(tmp_path / "m"), "--path", "/models/m")
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.txt").read_text() == "amd64"
    assert contract.parse_fetch_summary_fields(run.line)["digest"] == digest, "the index's digest"
    assert "is an index: fetching its manifest sha256:" in run.log and "(linux/amd64)" in run.log
    assert oci_registry.pulls(name) == 1


def test_a_pinned_digest_and_a_wrong_one(oci_registry: Registry, tmp_path: Path) -> None:
    name, data = repo(), os.urandom(MiB)
    digest = oci_registry.push_artifact(f"{name}:v1", {"model.bin": data})
    oci_registry.push_artifact(f"{name}:v2", {"model.bin": b"another model"})
    pinned = f"oci://{oci_registry.address}/{name}@{digest}"
    run = fetch(oci_registry, tmp_path, "--uri", pinned, "--dest", str(tmp_path / "pinned"))
    assert run.code == 0, run.log
    assert (tmp_path / "pinned" / "model.bin").read_bytes() == data
    run = fetch(oci_registry, tmp_path, "--uri", f"oci://{oci_registry.address}/{name}:v1", "--dest",
                str(tmp_path / "checked"), "--digest", digest)
    assert run.code == 0, run.log
    before = oci_registry.pulls(name)
    uri = f"oci://{oci_registry.address}/{name}:v2"
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "wrong"), "--digest", digest)
    assert run.code == 1
    assert run.line.startswith(f"Fetch of {uri} failed: digest mismatch: expected {digest}, got sha256:")
    assert not (tmp_path / "wrong").exists()
    assert oci_registry.pulls(name) == before, "a manifest of the wrong digest must not cost a blob download"


@pytest.mark.parametrize(("what", "message"), [
    ("tag", "not found (404): {uri}: manifest unknown"),
    ("repository", "not found (404): {uri}: manifest unknown"),  # distribution v3 answers MANIFEST_UNKNOWN for both
], ids=["missing-tag", "missing-repository"])
def test_missing_is_named_and_not_retried(oci_registry: Registry, tmp_path: Path, what: str, message: str) -> None:
    name = repo()
    if what == "tag":
        oci_registry.push_artifact(f"{name}:v1", {"model.bin": b"x"})
    uri = f"oci://{oci_registry.address}/{name}:v9"
    before = oci_registry.manifest_requests(name)  # oras push asks too
    run = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "m"))
    assert run.code == 1
    assert run.line == f"Fetch of {uri} failed: " + message.format(uri=uri)
    assert oci_registry.manifest_requests(name) == before + 1
    assert not (tmp_path / "m").exists()


def test_the_cache_costs_one_manifest_get_and_no_blob(oci_registry: Registry, tmp_path: Path) -> None:
    name, data = repo(), os.urandom(4 * MiB)
    digest = oci_registry.push_artifact(f"{name}:v1", {"model.bin": data, "config.json": b"{}"})
    uri = f"oci://{oci_registry.address}/{name}:v1"
    cache = tmp_path / "cache"
    pushed = oci_registry.manifest_requests(name)  # oras push asks too
    first = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "a"), "--cache", str(cache))
    assert first.code == 0, first.log
    assert (oci_registry.pulls(name), oci_registry.manifest_requests(name) - pushed) == (2, 1)
    second = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "b"), "--cache", str(cache))
    assert second.code == 0, second.log
    assert (oci_registry.pulls(name), oci_registry.manifest_requests(name) - pushed) == (2, 2)
    fields = contract.parse_fetch_summary_fields(second.line)
    assert (fields["cacheHit"], fields["digest"], fields["downloadedBytes"]) == (True, digest, 0)
    assert (tmp_path / "b" / "model.bin").read_bytes() == data
    assert os.stat(tmp_path / "b" / "model.bin").st_ino == os.stat(tmp_path / "a" / "model.bin").st_ino
    pinned = fetch(oci_registry, tmp_path, "--uri", f"oci://{oci_registry.address}/{name}@{digest}", "--dest",
                   str(tmp_path / "c"), "--cache", str(cache))
    assert pinned.code == 0, pinned.log
    assert (oci_registry.pulls(name), oci_registry.manifest_requests(name) - pushed) == (2, 3), \
        "a pinned hit asks for the manifest (the pod's access checked) and no blob"
    again = fetch(oci_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "c"), "--digest", digest)
    assert again.code == 0, again.log
    assert "already holds" in again.line
    assert oci_registry.manifest_requests(name) - pushed == 3, "a destination that holds the digest asks nothing"


def test_concurrent_fetchers_of_one_tag_download_once(oci_registry: Registry, tmp_path: Path) -> None:
    name, data = repo(), os.urandom(8 * MiB)
    oci_registry.push_artifact(f"{name}:v1", {"model.bin": data})
    cache = tmp_path / "cache"
    env = fetch_env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri",
                               f"oci://{oci_registry.address}/{name}:v1", "--dest", str(tmp_path / f"m{i}"),
                               "--cache", str(cache), "--ca-bundle", str(oci_registry.ca)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outs]
    hits = [contract.parse_fetch_summary_fields(out.strip())["cacheHit"] for out, _ in outs]
    assert sorted(hits) == [False, True, True, True]
    assert oci_registry.pulls(name) == 1
    for i in range(4):
        assert (tmp_path / f"m{i}" / "model.bin").read_bytes() == data


# -- basic auth: a registry of this module's own ----------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from tests.registry import start_registry

    registry = start_registry(tmp_path_factory.mktemp("auth-registry"), htpasswd=True)
    try:
        yield registry
    finally:
        registry.stop()


def _docker_config(path: Path, registry: str, user: str, password: str, form: str) -> Path:
    if form == "auth":
        entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    else:
        entry = {"username": user, "password": password}
    path.write_text(json.dumps({"auths": {registry: entry}}))
    return path


@pytest.mark.parametrize("form", ["auth", "username-password"])
def test_basic_auth_from_a_docker_config(auth_registry: Registry, tmp_path: Path, form: str) -> None:
    name, data = repo(), os.urandom(MiB)
    user, password = auth_registry.login()
    auth_registry.push_artifact(f"{name}:v1", {"model.bin": data})
    uri = f"oci://{auth_registry.address}/{name}:v1"
    secret = tmp_path / "secret"  # a kubernetes.io/dockerconfigjson Secret mounted as files
    secret.mkdir()
    config = _docker_config(secret / ".dockerconfigjson", auth_registry.address, user, password, form)
    run = fetch(auth_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "m"), "--registry-config",
                str(config))
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.bin").read_bytes() == data
    assert f"Registry {auth_registry.address}: credentials from {config}" in run.log
    assert password not in run.log + run.line
    home_config = tmp_path / "docker"
    home_config.mkdir()
    _docker_config(home_config / "config.json", auth_registry.address, user, password, form)
    run = fetch(auth_registry, tmp_path, "--uri", uri, "--dest", str(tmp_path / "m2"),
                env=fetch_env(tmp_path, DOCKER_CONFIG=str(home_config)))
    assert run.code == 0, run.log


@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_basic_auth_refused_without_echoing(auth_registry: Registry, tmp_path: Path, credentials: str) -> None:
    name = repo()
    auth_registry.push_artifact(f"{name}:v1", {"model.bin": b"x"})
    uri = f"oci://{auth_registry.address}/{name}:v1"
    wrong = "Wr0ng" + secrets.token_hex(8)
    args = ["--uri", uri, "--dest", str(tmp_path / "m")]
    if credentials == "wrong":
        config = _docker_config(tmp_path / "config.json", auth_registry.address, "shipyard", wrong, "auth")
        args += ["--registry-config", str(config)]
    run = fetch(auth_registry, tmp_path, *args)
    assert run.code == 1
    assert run.line == f"Fetch of {uri} failed: access denied (401) to {uri}: authentication required"
    assert run.termination == run.line
    assert wrong not in run.log + run.line
    assert base64.b64encode(f"shipyard:{wrong}".encode()).decode() not in run.log
    assert not (tmp_path / "m").exists()


# -- the registry killed mid-download ---------------------------------------------------------------------------

def test_the_registry_killed_mid_download_and_restarted(tmp_path: Path) -> None:
    from tests.registry import start_registry

    registry = start_registry(tmp_path / "registry")
    try:
        name = repo()
        files = {f"shard-{i:03d}.bin": os.urandom(2 * MiB) for i in range(100)}
        digest = registry.push_artifact(f"{name}:v1", files)
        dest = tmp_path / "m"
        env = fetch_env(tmp_path)
        # one blob at a time: 100 GETs in a row, so that the kill lands mid-download
        proc = subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri",
                                 f"oci://{registry.address}/{name}:v1", "--dest", str(dest), "--ca-bundle",
                                 str(registry.ca), "--parallelism", "1", "--timeout", "5"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while registry.pulls(name) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        registry.stop()
        killed_after = registry.pulls(name)
        assert proc.poll() is None, "the fetch ended before the registry was killed"
        assert not dest.exists(), "a partial model at --dest"
        time.sleep(1.5)
        assert not dest.exists()
        registry.restart()
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert contract.parse_fetch_summary_fields(out.strip())["digest"] == digest
        for rel, data in files.items():
            assert (dest / rel).read_bytes() == data
        assert 5 <= killed_after < 100
        assert "Attempt 1/6 (blob) failed" in err or "Attempt 1/6 (manifest) failed" in err
        print(f"\nkilled after {killed_after} of 100 blobs; {out.strip()}")
    finally:
        registry.stop()


# -- the bearer-token flow: a stand-in registry and token server -------------------------------------------------

class _BearerRegistry(BaseHTTPRequestHandler):
    """`/v2/m/x/...` answers only `Bearer <the latest token>`, else 401 with a Bearer challenge; `/token` issues a new
    token for basic `u:p` (and for nobody else); the first token expires after one use."""

    protocol_version = "HTTP/1.1"
    files: dict[str, tuple[str, bytes]] = {}  # path -> (content type, body)
    tokens: list[str] = []
    token_auth: list[str | None] = []
    uses = 0
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        cls = type(self)
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if self.path.startswith("/token?"):
            with cls.lock:
                cls.token_auth.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"u:p").decode():
                    return self._send(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}')
                cls.tokens.append(secrets.token_hex(8))
                cls.uses = 0
                return self._send(200, json.dumps({"token": cls.tokens[-1]}).encode())
        with cls.lock:
            good = bool(cls.tokens) and self.headers.get("Authorization") == f"Bearer {cls.tokens[-1]}"
            expired = len(cls.tokens) == 1 and cls.uses >= 1
            if good and not expired:
                cls.uses += 1
        if not good or expired:
            challenge = (f'Bearer realm="http://{host}/token",service="stand-in",'
                         'scope="repository:m/x:pull"')
            return self._send(401, b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}',
                              headers={"WWW-Authenticate": challenge})
        found = cls.files.get(self.path)
        if found is None:
            return self._send(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}')
        self._send(200, found[1], found[0])


def test_the_bearer_token_flow_with_an_expiring_token(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    layer = "sha256:" + hashlib.sha256(data).hexdigest()
    empty = b"{}"
    config = "sha256:" + hashlib.sha256(empty).hexdigest()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
                           "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": len(data),
                                       "annotations": {"org.opencontainers.image.title": "model.bin"}}]}).encode()
    _BearerRegistry.files = {"/v2/m/x/manifests/v1": ("application/vnd.oci.image.manifest.v1+json", manifest),
                             f"/v2/m/x/blobs/{layer}": ("application/octet-stream", data)}
    _BearerRegistry.tokens, _BearerRegistry.token_auth = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BearerRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        uri = f"oci://{address}/m/x:v1"
        config_file = _docker_config(tmp_path / "config.json", address, "u", "p", "auth")
        run = run_fetch(fetch_env(tmp_path), "--uri", uri, "--dest", str(tmp_path / "m"), "--allow-http",
                        "--registry-config", str(config_file), timeout=120)
        assert run.code == 0, run.log
        assert (tmp_path / "m" / "model.bin").read_bytes() == data
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert contract.parse_fetch_summary_fields(run.line)["digest"] == digest
        assert len(_BearerRegistry.tokens) == 2, "the expired token is replaced by a new one"
        assert set(_BearerRegistry.token_auth) == {"Basic " + base64.b64encode(b"u:p").decode()}
        for token in _BearerRegistry.tokens:
            assert token not in run.log + run.line
        wrong = _docker_config(tmp_path / "wrong.json", address, "u", "nope", "auth")
        run = run_fetch(fetch_env(tmp_path), "--uri", uri, "--dest", str(tmp_path / "w"), "--allow-http",
                        "--registry-config", str(wrong), timeout=120)
        assert run.code == 1
        assert run.line == f"Fetch of {uri} failed: access denied (401) to {uri} (token endpoint)"
        anonymous = run_fetch(fetch_env(tmp_path), "--uri", uri, "--dest", str(tmp_path / "a"), "--allow-http",
                              timeout=120)
        assert anonymous.code == 1
        assert anonymous.line == f"Fetch of {uri} failed: access denied (401) to {uri} (token endpoint)"
    finally:
        server.shutdown()
        server.server_close()

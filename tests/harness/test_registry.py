"""The stack's OCI registry (hack/registry.py: CNCF distribution on 127.0.0.1 over TLS, tests/registry.py) does what the
oci:// fetch tests rely on: it starts with a CA of its own (a client trusting only that CA connects; one trusting the
system's does not), `oras push` and `oras pull` round-trip an artifact, `push_image` lands an image whose manifest
digest is the one the layout holds, the access log counts blob GETs, htpasswd mode refuses anonymous and wrong
credentials, `status` tells running from stopped, and `stop` leaves no process behind.

Each test here but the last uses a registry of this module's own (the last checks the suite's `oci_registry`), so the
counts start from zero. ``hack/build-binaries.sh`` builds the registry and oras by default.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import stack
from tests.registry import Registry, build_layer, registry_mod, start_registry

pytestmark = [pytest.mark.harness, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shipyard-registry-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(base: Path) -> Iterator[Registry]:
    registry = start_registry(base / "registry")  # RuntimeError naming hack/build-binaries.sh when not built
    try:
        yield registry
    finally:
        registry.stop()


def _get(url: str, ca: Path | None) -> int:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_tls_with_its_own_ca(registry: Registry) -> None:
    assert _get(f"https://{registry.address}/v2/", registry.ca) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(f"https://{registry.address}/v2/", None)
    assert registry.address.startswith("127.0.0.1:")


def test_push_pull_round_trip_and_blob_count(registry: Registry, base: Path) -> None:
    data = os.urandom(1 << 20)
    digest = registry.push_artifact("models/roundtrip:v1", {"model.bin": data})
    assert digest.startswith("sha256:")
    assert registry.pulls("models/roundtrip") == 0
    out = base / "pulled"
    out.mkdir()
    registry.oras("pull", f"{registry.address}/models/roundtrip:v1", "-o", str(out))
    assert (out / "model.bin").read_bytes() == data
    assert registry.pulls("models/roundtrip") == 1  # the one layer (the empty config is not fetched by pull)
    resolved = registry.oras("resolve", f"{registry.address}/models/roundtrip:v1").strip()
    assert resolved == digest


def test_push_image_keeps_the_layout_digest(registry: Registry, base: Path) -> None:
    digest = registry.push_image("models/image:v1", [build_layer({"models/m/a.bin": b"a"})])
    manifest = json.loads(registry.oras("manifest", "fetch", f"{registry.address}/models/image:v1"))
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert registry.oras("resolve", f"{registry.address}/models/image:v1").strip() == digest


def test_access_log_lines_parse() -> None:
    line = '127.0.0.1 - - [03/Dec/2026:04:00:25 +0000] "GET /v2/m/blobs/sha256:ab HTTP/2.0" 200 5 "" "oras/1.3.6"\n'
    parsed = registry_mod.parse_access_log_line(line)
    assert parsed is not None
    assert (parsed["method"], parsed["uri"], parsed["status"], parsed["size"], parsed["agent"]) == \
        ("GET", "/v2/m/blobs/sha256:ab", 200, 5, "oras/1.3.6")
    assert registry_mod.parse_access_log_line('time="x" level=info msg="response completed"') is None
    assert registry_mod.parse_access_log(line + line[:20]) == [parsed]


def test_htpasswd_mode(base: Path) -> None:
    registry = start_registry(base / "auth", htpasswd=True)
    try:
        assert _get(f"https://{registry.address}/v2/", registry.ca) == 401
        user, password = registry.login()
        assert len(password) >= 20
        assert password not in (base / "auth" / "htpasswd").read_text()
        assert (base / "auth" / "htpasswd").read_text().startswith(f"{user}:$2")
        assert oct((base / "auth" / "credentials.json").stat().st_mode & 0o777) == "0o600"
        registry.push_artifact("models/secret:v1", {"model.bin": b"x"})  # with the credentials
        anonymous = Registry(registry.address, registry.ca, registry.log, registry.state_dir, registry.pid)
        with pytest.raises(RuntimeError, match="basic credential not found"):  # oras' words for a 401
            anonymous.oras("manifest", "fetch", f"{registry.address}/models/secret:v1")
        wrong = urllib.request.Request(f"https://{registry.address}/v2/", headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:not-{password}".encode()).decode()})
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(wrong, timeout=5, context=ssl.create_default_context(cafile=str(registry.ca)))
    finally:
        registry.stop()


def test_status_and_stop_leave_nothing(base: Path) -> None:
    state = base / "lifecycle"
    registry = start_registry(state)
    status = registry_mod.status(state)
    assert status is not None and status["running"] and status["pid"] == registry.pid
    registry.stop()
    assert not stack.proc.alive(registry.pid)
    assert registry_mod.status(state) is None
    restarted = start_registry(state)  # same CA, same data
    try:
        assert restarted.ca == registry.ca
    finally:
        restarted.stop()
    assert not stack.proc.alive(restarted.pid)


def test_the_suite_fixture(oci_registry: Registry) -> None:
    before = oci_registry.pulls("harness/fixture")
    oci_registry.push_artifact("harness/fixture:v1", {"a.txt": b"a"})
    assert oci_registry.pulls("harness/fixture") == before
    assert _get(f"https://{oci_registry.address}/v2/", oci_registry.ca) == 200

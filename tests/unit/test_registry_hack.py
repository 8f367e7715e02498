"""hack/registry.py's pure parts: distribution's configuration (bound to 127.0.0.1, TLS from the state directory,
filesystem storage there, the access log on, htpasswd only when asked) and the access-log parser on lines
distribution v3.1.2 wrote (HTTP/1.1 and HTTP/2.0, a 401, an upload URI with its query), other lines left out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.modules import load_file

REGISTRY = load_file("shipyard_hack_registry_unit", Path(__file__).parents[2] / "hack" / "registry.py")

BLOB = '127.0.0.1 - - [03/Dec/2026:04:00:25 +0000] "GET /v2/models/m/blobs/sha256:ab HTTP/2.0" 200 5000 "" "oras/1.3.6"'
DENIED = '127.0.0.1 - - [03/Dec/2026:04:00:24 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "Python-urllib/3.11"'
UPLOAD = ('127.0.0.1 - - [03/Dec/2026:04:00:25 +0000] "PUT /v2/models/m/blobs/uploads/01a2?_state=AO0g'
          '&digest=sha256%3A58 HTTP/2.0" 201 0 "" "oras/1.3.6"')
LOGRUS = ('time="2026-12-03T04:00:25.35Z" level=info msg="response completed" http.request.method=GET '
          'http.request.uri=/v2/models/m/blobs/sha256:ab http.response.status=200')


@pytest.mark.parametrize(("line", "expected"), [
    (BLOB, {"method": "GET", "uri": "/v2/models/m/blobs/sha256:ab", "status": 200, "size": 5000, "agent": "oras/1.3.6",
            "user": None}),
    (DENIED, {"method": "GET", "uri": "/v2/", "status": 401, "size": 87, "agent": "Python-urllib/3.11"}),
    (UPLOAD, {"method": "PUT", "status": 201, "size": 0,
              "uri": "/v2/models/m/blobs/uploads/01a2?_state=AO0g&digest=sha256%3A58"}),
], ids=["blob-get-http2", "denied-http1", "upload-with-query"])
def test_parse_access_log_line(line: str, expected: dict[str, Any]) -> None:
    parsed = REGISTRY.parse_access_log_line(line + "\n")
    assert parsed is not None
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize("line", [LOGRUS, "", "--- 2026-12-03T04:00:24 /bin/registry serve config.yml"],
                         ids=["logrus", "empty", "spawn-header"])
def test_other_lines_are_not_requests(line: str) -> None:
    assert REGISTRY.parse_access_log_line(line) is None


def test_a_line_being_written_is_left_out() -> None:
    assert [r["status"] for r in REGISTRY.parse_access_log(f"{LOGRUS}\n{BLOB}\n{DENIED}\n{BLOB[:30]}")] == [200, 401]


@pytest.mark.parametrize("htpasswd", [None, Path("/d/htpasswd")], ids=["anonymous", "htpasswd"])
def test_build_config(htpasswd: Path | None) -> None:
    config = json.loads(REGISTRY.build_config(Path("/d"), 5000, htpasswd))  # JSON is YAML
    assert config["http"]["addr"] == "127.0.0.1:5000"
    assert config["http"]["tls"] == {"certificate": "/d/tls/server.pem", "key": "/d/tls/server.key"}
    assert config["storage"]["filesystem"] == {"rootdirectory": "/d/data"}
    assert config["log"]["accesslog"] == {"disabled": False}
    assert len(config["http"]["secret"]) == 32
    if htpasswd is None:
        assert "auth" not in config
    else:
        assert config["auth"] == {"htpasswd": {"realm": REGISTRY.REALM, "path": "/d/htpasswd"}}


def test_bcrypt_hash_is_bcrypt() -> None:
    hashed = REGISTRY.bcrypt_hash("pw")
    assert hashed.startswith("$2") and "pw" not in hashed

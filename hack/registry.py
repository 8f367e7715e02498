#!/usr/bin/env python3
"""Start and stop a real OCI registry (CNCF distribution's ``registry``, built by hack/build-binaries.sh) on
127.0.0.1 over TLS, for model sources in ``oci://`` repositories.

    python3 hack/registry.py start --dir D [--port P] [--htpasswd]   # prints one JSON line (see `start`)
    python3 hack/registry.py status --dir D                          # the recorded registry; exit 1 when not running
    python3 hack/registry.py stop --dir D

The state directory holds everything: ``tls/`` (a CA generated on the first start with the openssl CLI,
``tls/ca.pem``, and the registry's certificate for IP 127.0.0.1 and DNS localhost signed by it; reused by a later
start, as the data is), ``data/`` (the filesystem storage driver's root), ``config.yml`` (written at every start),
``htpasswd`` and ``credentials.json`` (with ``--htpasswd``: one user with a random password, bcrypt-hashed with the C
library's crypt(3) through Python's ``crypt`` module, as distribution accepts only bcrypt; the password in
credentials.json, mode 0600), ``registry.log`` (its output: logrus lines and one access-log line per request in
Apache's combined format, see `parse_access_log_line`) and ``registry.json`` (pid, address, no secret). `stop` ends
the process (SIGTERM, SIGKILL after a grace period) and keeps the data.

Without ``--htpasswd`` the registry is anonymous (pull and push); with it every request needs HTTP basic auth
(distribution's htpasswd access controller answers 401 with ``WWW-Authenticate: Basic``). The token (bearer) flow
needs a separate token server and is not started here.

``OTEL_TRACES_EXPORTER=none`` is set for the process: distribution always starts an OpenTelemetry exporter, whose
default (OTLP to localhost:4318) would dial out. Readiness is a GET of ``/v2/`` (200, or 401 with auth), made with the
generated CA. Standard library only, with hack/proc.py for the process (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import cluster  # noqa: E402
import proc  # noqa: E402

STATE_FILE = "registry.json"
CREDENTIALS_FILE = "credentials.json"
SERVER_LOG = "registry.log"
CONFIG_FILE = "config.yml"
HTPASSWD_FILE = "htpasswd"
USER = "shipyard"
REALM = "shipyard-registry"


def log(msg: str) -> None:
    print(f"[registry] {msg}", file=sys.stderr, flush=True)


def version() -> str:
    return str(cluster.read_versions()["DISTRIBUTION_VERSION"])


def binary() -> Path:
    """The registry hack/build-binaries.sh builds (``SHIPYARD_REGISTRY`` overrides); RuntimeError when not built."""
    return cluster.built_binary("DISTRIBUTION_VERSION", "registry", "registry", "SHIPYARD_REGISTRY", "distribution")


def build_config(state_dir: Path, port: int, htpasswd: Path | None) -> str:
    """distribution's configuration (YAML; JSON is YAML, so it is written with json, pure): filesystem storage under
    data/, TLS with tls/server.*, deletes allowed, the access log on, basic auth when `htpasswd` is given."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(state_dir / "data")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                 "tls": {"certificate": str(state_dir / "tls" / "server.pem"),
                         "key": str(state_dir / "tls" / "server.key")},
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
    return json.dumps(config, indent=2) + "\n"


# One access-log line (gorilla/handlers' combined format):
#   127.0.0.1 - - [03/Dec/2026:04:01:02 +0000] "GET /v2/m/blobs/sha256:ab.. HTTP/1.1" 200 123 "" "oras/1.3.6"
# distribution writes it to stdout after the response (a blob GET's line comes once its body was sent).
_ACCESS = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]*)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-)(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?\s*$')


def parse_access_log_line(line: str) -> dict[str, Any] | None:
    """One request of the registry's access log (pure), or None for any other line of its output (logrus lines).
    Keys: remote, user (the basic-auth user, None when anonymous), time, method, uri, status (int), size (response
    body bytes, int), agent."""
    m = _ACCESS.match(line.rstrip("\n"))
    if m is None:
        return None
    size = m["size"]
    return {"remote": m["remote"], "user": None if m["user"] == "-" else m["user"], "time": m["time"],
            "method": m["method"], "uri": m["uri"], "status": int(m["status"]),
            "size": 0 if size == "-" else int(size), "agent": m["agent"]}


def parse_access_log(text: str) -> list[dict[str, Any]]:
    """Every request in the log's text, in order (pure); a last line without its newline is left out."""
    out = []
    for line in text.split("\n")[:-1]:
        parsed = parse_access_log_line(line)
        if parsed is not None:
            out.append(parsed)
    return out


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"openssl {args[0]} failed: {e.stderr.decode(errors='replace')[-500:]}") from None


def ensure_tls(tls: Path) -> Path:
    """A CA (ca.pem, ca.key) and a server certificate for 127.0.0.1 and localhost signed by it, made once with the
    openssl CLI (EC P-256, 10 years: a test registry's data outlives no CA change); returns ca.pem."""
    tls.mkdir(parents=True, exist_ok=True)
    if (tls / "ca.pem").exists() and (tls / "server.pem").exists() and (tls / "server.key").exists():
        return tls / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650", "-subj", "/CN=shipyard-registry-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=tls)
    (tls / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                 "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=tls)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "3650", "-extfile", "ext.cnf", cwd=tls)
    os.chmod(tls / "ca.key", 0o600)
    os.chmod(tls / "server.key", 0o600)
    return tls / "ca.pem"


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash of `password` ($2b$) from the C library's crypt(3) (libxcrypt); RuntimeError where that has no
    bcrypt, or Python no longer has the crypt module (3.13 removed it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 10))
    except (ImportError, AttributeError, ValueError) as e:
        raise RuntimeError(f"no bcrypt for --htpasswd here ({e}): distribution accepts bcrypt hashes only") from None
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("crypt(3) made no bcrypt hash for --htpasswd: distribution accepts bcrypt hashes only")
    return str(hashed)


def ensure_htpasswd(state_dir: Path) -> dict[str, str]:
    """The one user of ``--htpasswd`` (credentials.json, 0600, generated once) and its htpasswd file."""
    path = state_dir / CREDENTIALS_FILE
    if path.exists():
        creds = json.loads(path.read_text())
    else:
        creds = {"username": USER, "password": secrets.token_urlsafe(18)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(creds, out)
            out.write("\n")
    (state_dir / HTPASSWD_FILE).write_text(f"{creds['username']}:{bcrypt_hash(creds['password'])}\n")
    return {"username": str(creds["username"]), "password": str(creds["password"])}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(address: str, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://{address}/v2/", timeout=1, context=context) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as e:
        return e.code == 401
    except (urllib.error.URLError, OSError):
        return False


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def start(state_dir: Path, port: int | None = None, htpasswd: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """Starts the registry on 127.0.0.1 (`port`, else a free one) with TLS and waits until it answers. Returns what
    `start` prints: address (host:port), ca (the CA's PEM), pid, log (the access log is in it), config, and with
    `htpasswd` credentials (the file holding username and password). Raises RuntimeError (with its log's tail) when
    it is not built, already runs for this directory, exits or is not ready within `timeout`."""
    path = binary()
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    running = read_state(state_dir)
    if running is not None and proc.alive(int(running["pid"])):
        raise RuntimeError(f"a registry already runs for {state_dir} (pid {running['pid']}, {running['address']}): "
                           f"`python3 hack/registry.py stop --dir {state_dir}` first")
    (state_dir / "data").mkdir(exist_ok=True)
    ca = ensure_tls(state_dir / "tls")
    if htpasswd:
        ensure_htpasswd(state_dir)
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    config = state_dir / CONFIG_FILE
    config.write_text(build_config(state_dir, port, state_dir / HTPASSWD_FILE if htpasswd else None))
    os.chmod(config, 0o600)  # holds the http secret
    server_log = state_dir / SERVER_LOG
    argv = [str(path), "serve", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "OTEL_"))}
    env["OTEL_TRACES_EXPORTER"] = "none"
    server = proc.spawn(argv, server_log, env=env,
                        header=f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
    info: dict[str, Any] = {"address": address, "ca": str(ca), "pid": server.pid, "log": str(server_log),
                            "config": str(config), "version": version()}
    if htpasswd:
        info["credentials"] = str(state_dir / CREDENTIALS_FILE)
    (state_dir / STATE_FILE).write_text(json.dumps(info) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            (state_dir / STATE_FILE).unlink()
            tail = server_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the registry exited with {server.returncode}:\n{tail}")
        if ready(address, ca):
            return info
        time.sleep(0.1)
    stop(state_dir)
    raise RuntimeError(f"the registry was not ready within {timeout:.0f} s (see {server_log})")


def stop(state_dir: Path, timeout: float = 15.0) -> None:
    """Stops the registry that `start` recorded (proc.stop: SIGTERM, SIGKILL after `timeout`, waited for until
    gone). Keeps the data, the CA, the credentials and the log."""
    state = read_state(state_dir)
    if state is not None:
        proc.stop(int(state["pid"]), timeout)
        (state_dir / STATE_FILE).unlink()


def status(state_dir: Path) -> dict[str, Any] | None:
    """The recorded registry with ``running``, or None when none was started here."""
    state = read_state(state_dir)
    if state is None:
        return None
    return {**state, "running": proc.alive(int(state["pid"])) and ready(str(state["address"]), Path(state["ca"]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, required=True, help="state directory (data, CA, config, log, pid)")
    parser.add_argument("--port", type=int, help="start: the port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--htpasswd", action="store_true", help="start: require HTTP basic auth (one user)")
    args = parser.parse_args(argv)
    if args.command == "start":
        try:
            info = start(args.dir, args.port, htpasswd=args.htpasswd)
        except RuntimeError as e:
            log(str(e))
            return 1
        print(json.dumps(info), flush=True)
        return 0
    if args.command == "status":
        state = status(args.dir)
        print(json.dumps(state if state is not None else {"running": False}))
        return 0 if state is not None and state["running"] else 1
    stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

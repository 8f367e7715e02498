#!/usr/bin/env python3
"""Start and stop a real S3-compatible server (versitygw, posix backend, built by hack/build-binaries.sh) on
127.0.0.1, for model sources in ``s3://`` buckets.

    python3 hack/s3.py start --dir D [--port P]   # prints one JSON line: endpoint, keys, region, access log, pid
    python3 hack/s3.py status --dir D             # prints the recorded server (no secret); exit 1 when not running
    python3 hack/s3.py stop --dir D

The state directory holds everything: ``data/`` (one subdirectory per bucket, one file per object), ``meta/``
(object metadata as sidecar files, so the backend does not depend on xattr support where D lives), ``iam/``
(versitygw's internal IAM service: no user but root unless one is added), ``credentials.json`` (the root access
key and secret, mode 0600; generated at random on the first start and reused by a later start on the same
directory, as the data is), ``access.log`` (one line per S3 request, in the field order of AWS's server access
logs: see `parse_access_log_line`), ``versitygw.log`` (its own output: a line per request with the real HTTP
status, query secrets redacted) and ``s3.json`` (pid, endpoint, no secret). `stop` ends the process (SIGTERM,
SIGKILL after a grace period) and keeps the data.

The server runs with ``--keep-alive`` (versitygw closes every connection after one response unless told otherwise;
AWS keeps them open) and path-style addressing only (no ``--virtual-domain``: clients must use
``http://127.0.0.1:PORT/bucket/key``, e.g. boto3 with ``addressing_style: path``). The keys go to the process in
its environment, not on its command line (readable by any user in /proc), and the variables versitygw reads as
flag defaults (VGW_*, ROOT_*, ADMIN_*, AWS_*, AZ_*, LOGFILE, WEBHOOK) are dropped from what it inherits.
Readiness is a GET on a health path outside the S3 namespace (not a valid bucket name, and not in the access log).
Standard library only, with hack/proc.py for the process (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import string
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import cluster  # noqa: E402
import proc  # noqa: E402

REGION = "us-east-1"
HEALTH_PATH = "/_shipyard_health"  # '_' is not allowed in a bucket name: no bucket is shadowed
STATE_FILE = "s3.json"
CREDENTIALS_FILE = "credentials.json"
ACCESS_LOG = "access.log"
SERVER_LOG = "versitygw.log"
# Environment variables versitygw (urfave/cli) reads as defaults of its flags: none may leak in from the caller.
ENV_DROPPED_PREFIXES = ("VGW_", "ROOT_", "ADMIN_", "AWS_", "AZ_")
ENV_DROPPED = ("LOGFILE", "WEBHOOK")


def log(msg: str) -> None:
    print(f"[s3] {msg}", file=sys.stderr, flush=True)


def version() -> str:
    return str(cluster.read_versions()["VERSITYGW_VERSION"])


def binary() -> Path:
    """The versitygw hack/build-binaries.sh builds (``SHIPYARD_VERSITYGW`` overrides); RuntimeError when not built."""
    return cluster.built_binary("VERSITYGW_VERSION", "versitygw", "versitygw", "SHIPYARD_VERSITYGW", "versitygw")


def build_argv(binary: Path, port: int, state_dir: Path, region: str = REGION) -> list[str]:
    """versitygw's command line (pure; the keys go in the environment, see `child_env`): the S3 API on
    127.0.0.1:`port` only, the posix backend rooted at data/ with its metadata in the sidecar directory meta/, and
    the internal IAM service in iam/ (without one, versitygw's single-account mode answers a request signed with
    an unknown access key 404 XAdminUserNotFound; with it, 403 InvalidAccessKeyId as AWS does)."""
    return [str(binary), "--port", f"127.0.0.1:{port}", "--region", region,
            "--access-log", str(state_dir / ACCESS_LOG), "--iam-dir", str(state_dir / "iam"),
            "--health", HEALTH_PATH, "--keep-alive",
            "posix", "--sidecar", str(state_dir / "meta"), str(state_dir / "data")]


def child_env(base: Mapping[str, str], access_key: str, secret_key: str) -> dict[str, str]:
    """The server's environment: `base` without the variables versitygw would read as flags, plus the root
    user's keys (pure)."""
    env = {k: v for k, v in base.items() if not (k.startswith(ENV_DROPPED_PREFIXES) or k in ENV_DROPPED)}
    env["ROOT_ACCESS_KEY_ID"] = access_key
    env["ROOT_SECRET_ACCESS_KEY"] = secret_key
    return env


def generate_credentials() -> dict[str, str]:
    """A random root user in AWS's shapes: a 20-character access key, a 40-character secret."""
    alphabet = string.ascii_uppercase + string.digits
    access = "SY" + "".join(secrets.choice(alphabet) for _ in range(18))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return {"accessKey": access, "secretKey": secret}


def load_or_create_credentials(path: Path) -> dict[str, str]:
    if path.exists():
        creds = json.loads(path.read_text())
        return {"accessKey": str(creds["accessKey"]), "secretKey": str(creds["secretKey"])}
    creds = generate_credentials()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(creds, out)
        out.write("\n")
    return creds


# One access-log line (s3log/file.go): 26 space-separated fields, nothing quoted. The time is "[02/January/2006:
# 15:04:05 -0700]" (one space inside the brackets); the key, the user agent and the ARN may hold spaces: the key is
# what lies between the operation and the request URI (which starts with '/' and is percent-encoded), the user agent
# what lies between the referer and the fixed tail (version id, host id, "SigV4", cipher, "AuthHeader", host
# header, TLS version, ARN, "Yes").
_LINE = re.compile(
    r"^(?P<bucket_owner>\S+) (?P<bucket>\S+) \[(?P<time>[^\]]*)\] (?P<remote_ip>\S+) (?P<requester>\S+) "
    r"(?P<request_id>\S+) (?P<operation>\S+) (?P<key>.*?) (?P<request_uri>/\S*|-) (?P<status>\d{3}) "
    r"(?P<error_code>\S+) (?P<bytes_sent>-|\d+) (?P<object_size>-|-?\d+) (?P<total_time_ms>-|\d+) "
    r"(?P<turnaround_time_ms>-|\d+) (?P<referer>\S+) (?P<rest>.*)$")
_TAIL = re.compile(  # versitygw writes "SigV4" and "AuthHeader" whatever the request's authentication was
    r"^(?P<user_agent>.*?) (?P<version_id>\S+) (?P<host_id>\S+) SigV4 (?P<cipher_suite>\S+) AuthHeader "
    r"(?P<host_header>\S+) (?P<tls_version>\S+) (?P<arn>arn:.*) (?P<acl_required>\S+)$")


def _dash(value: str) -> str | None:
    return None if value == "-" else value


def _int(value: str) -> int | None:
    return None if value == "-" else int(value)


def parse_access_log_line(line: str) -> dict[str, Any] | None:
    """One request of versitygw's access log (pure); None for its "log starts ..." lines. Raises ValueError on a
    line of any other shape (a format change must not read as "no requests").

    Keys: bucket_owner, bucket, time, remote_ip, requester (the access key the request was signed with, a
    presigned URL's included; None when anonymous), request_id, operation (``s3_GetObject``, ``s3_PutObject``,
    ``s3_UploadPart``, ``s3_HeadObject``, ...), key (decoded; None for a bucket or service request), request_uri
    (as sent: percent-encoded, with its query, a presigned URL's signature included), status (int), error_code
    (``NoSuchKey``, ``AccessDenied``, ``SignatureDoesNotMatch``, ...; None on success), bytes_sent and
    object_size (ints), total_time_ms, turnaround_time_ms, referer, user_agent.

    What versitygw v1.8.0 writes differs from AWS's logs: `status` is 200 for every request that succeeded, a
    ranged GetObject's 206 included (the HTTP response is 206; versitygw.log's own request lines show it), and
    the Range header is not logged, so a ranged GET looks like a whole one; `bytes_sent` is the length of the
    XML/JSON body versitygw built, 0 for a GetObject (its body is streamed); `object_size` is the request's
    Content-Length for a PutObject or UploadPart, 0 for a GetObject; the line is written when the response
    headers are, before a GetObject's body is sent."""
    line = line.rstrip("\n")
    if line.startswith("log starts "):
        return None
    m = _LINE.match(line)
    if m is None:
        raise ValueError(f"not a versitygw access-log line: {line!r}")
    fields = m.groupdict()
    tail = _TAIL.match(fields.pop("rest"))
    return {
        "bucket_owner": _dash(fields["bucket_owner"]),
        "bucket": _dash(fields["bucket"]),
        "time": fields["time"],
        "remote_ip": _dash(fields["remote_ip"]),
        "requester": _dash(fields["requester"]),
        "request_id": _dash(fields["request_id"]),
        "operation": fields["operation"],
        "key": _dash(fields["key"]),
        "request_uri": fields["request_uri"],
        "status": int(fields["status"]),
        "error_code": _dash(fields["error_code"]),
        "bytes_sent": _int(fields["bytes_sent"]),
        "object_size": _int(fields["object_size"]),
        "total_time_ms": _int(fields["total_time_ms"]),
        "turnaround_time_ms": _int(fields["turnaround_time_ms"]),
        "referer": _dash(fields["referer"]),
        "user_agent": _dash(tail["user_agent"]) if tail else None,
    }


def parse_access_log(text: str) -> list[dict[str, Any]]:
    """Every request in an access log's text, in order (pure). A last line without its newline is a write in
    progress and is left out."""
    lines = text.split("\n")
    complete = lines[:-1]  # after the last "\n": "" for a complete log, else a partial line
    out = []
    for line in complete:
        if line.strip():
            parsed = parse_access_log_line(line)
            if parsed is not None:
                out.append(parsed)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}{HEALTH_PATH}", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def start(state_dir: Path, port: int | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Starts versitygw on 127.0.0.1 (`port`, else a free one) and waits until it answers. Returns what `start`
    prints: endpoint, accessKey, secretKey, region, accessLog, pid. Raises RuntimeError (with its log's tail) when
    it is not built, already runs for this directory, exits or is not ready within `timeout`."""
    path = binary()
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    running = read_state(state_dir)
    if running is not None and proc.alive(int(running["pid"])):
        raise RuntimeError(f"an S3 server already runs for {state_dir} (pid {running['pid']}, "
                           f"{running['endpoint']}): `python3 hack/s3.py stop --dir {state_dir}` first")
    for sub in ("data", "meta", "iam"):
        (state_dir / sub).mkdir(exist_ok=True)
    creds = load_or_create_credentials(state_dir / CREDENTIALS_FILE)
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    access_log = state_dir / ACCESS_LOG
    server_log = state_dir / SERVER_LOG
    argv = build_argv(path, port, state_dir)
    server = proc.spawn(argv, server_log, env=child_env(os.environ, creds["accessKey"], creds["secretKey"]),
                        header=f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
    info = {"endpoint": endpoint, "accessKey": creds["accessKey"], "secretKey": creds["secretKey"],
            "region": REGION, "accessLog": str(access_log), "pid": server.pid}
    (state_dir / STATE_FILE).write_text(json.dumps(
        {"pid": server.pid, "endpoint": endpoint, "region": REGION, "accessLog": str(access_log),
         "accessKey": creds["accessKey"], "version": version()}) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            (state_dir / STATE_FILE).unlink()
            tail = server_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"versitygw exited with {server.returncode}:\n{tail}")
        if ready(endpoint):
            return info
        time.sleep(0.1)
    stop(state_dir)
    raise RuntimeError(f"versitygw was not ready within {timeout:.0f} s (see {server_log})")


def stop(state_dir: Path, timeout: float = 15.0) -> None:
    """Stops the server that `start` recorded in the state directory (proc.stop: SIGTERM, SIGKILL after `timeout`,
    waited for until gone). Keeps the data, the credentials and the logs."""
    state = read_state(state_dir)
    if state is not None:
        proc.stop(int(state["pid"]), timeout)
        (state_dir / STATE_FILE).unlink()


def status(state_dir: Path) -> dict[str, Any] | None:
    """The recorded server (no secret) with ``running``, or None when none was started here."""
    state = read_state(state_dir)
    if state is None:
        return None
    return {**state, "running": proc.alive(int(state["pid"])) and ready(str(state["endpoint"]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, required=True, help="state directory (data, credentials, logs, pid)")
    parser.add_argument("--port", type=int, help="start: the port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    if args.command == "start":
        try:
            info = start(args.dir, args.port)
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

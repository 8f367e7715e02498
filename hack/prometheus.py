#!/usr/bin/env python3
"""Start and stop a real Prometheus (Debian's package) that scrapes the e2e node agent's pods (process and file I/O).

    python3 hack/prometheus.py start --dir D --targets <agent workdir>/prometheus-targets.json   # prints the URL
    python3 hack/prometheus.py stop --dir D

The configuration scrapes every second through file-based discovery (the node agent writes the targets file,
labels ``namespace`` and ``pod``), so the operator's builtin queries (which select on namespace, model and version)
find the runtime's series. Listens on 127.0.0.1 only; its TSDB, log and pid live in the state directory.
Standard library only (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BINARY = os.environ.get("SHIPYARD_PROMETHEUS", "/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"


def build_config(targets: Path) -> str:
    """prometheus.yml for the agent's file_sd targets (pure)."""
    return f"""global:
  scrape_interval: {SCRAPE_INTERVAL}
  scrape_timeout: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
scrape_configs:
  - job_name: shipyard-pods
    file_sd_configs:
      - files: [{json.dumps(str(targets))}]
        refresh_interval: 5s
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(state_dir: Path, targets: Path, timeout: float = 60.0) -> tuple[int, str]:
    """Starts Prometheus; returns (pid, base URL). Raises RuntimeError with its log's tail when it fails."""
    if not Path(BINARY).exists():
        raise RuntimeError(f"{BINARY} not found: install Debian's package (apt-get install -y prometheus)")
    state_dir.mkdir(parents=True, exist_ok=True)
    if not targets.exists():
        targets.write_text("[]\n")
    config = state_dir / "prometheus.yml"
    config.write_text(build_config(targets.resolve()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(state_dir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [BINARY, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={state_dir / 'data'}", "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    (state_dir / "prometheus.json").write_text(json.dumps({"pid": proc.pid, "url": url}) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / "prometheus.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{tail}")
        if ready(url):
            return proc.pid, url
        time.sleep(0.2)
    stop(state_dir)
    raise RuntimeError(f"prometheus was not ready within {timeout:.0f} s (see {state_dir / 'prometheus.log'})")


def stop(state_dir: Path, timeout: float = 15.0, remove: bool = True) -> None:
    info = state_dir / "prometheus.json"
    if info.exists():
        pid = int(json.loads(info.read_text())["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        info.unlink()
    if remove:
        shutil.rmtree(state_dir / "data", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="state directory (config, TSDB, log, pid)")
    parser.add_argument("--targets", type=Path, help="start: the node agent's prometheus-targets.json")
    args = parser.parse_args(argv)
    if args.command == "start":
        if args.targets is None:
            parser.error("start needs --targets")
        _, url = start(args.dir, args.targets)
        print(url)
        return 0
    stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Start and stop a real Prometheus (Debian's package) that scrapes the e2e node agent's pods (process and file I/O).

    python3 hack/prometheus.py start --dir D --targets <agent workdir>/prometheus-targets.json   # prints the URL
    python3 hack/prometheus.py stop --dir D

The configuration scrapes every second through file-based discovery (the node agent writes the targets file,
labels ``namespace`` and ``pod``), so the operator's builtin queries (which select on namespace, model and version)
find the runtime's series. Listens on 127.0.0.1 only; its TSDB, log and pid live in the state directory.
Standard library only, with hack/proc.py for the process (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import proc  # noqa: E402

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
    server = proc.spawn(
        [BINARY, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={state_dir / 'data'}", "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle",
         "--log.level=warn"], state_dir / "prometheus.log")
    (state_dir / "prometheus.json").write_text(json.dumps({"pid": server.pid, "url": url}) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = (state_dir / "prometheus.log").read_text(errors="replace")[-2000:]
            (state_dir / "prometheus.json").unlink()
            raise RuntimeError(f"prometheus exited with {server.returncode}:\n{tail}")
        if ready(url):
            return server.pid, url
        time.sleep(0.2)
    stop(state_dir)
    raise RuntimeError(f"prometheus was not ready within {timeout:.0f} s (see {state_dir / 'prometheus.log'})")


def stop(state_dir: Path, timeout: float = 15.0, remove: bool = True) -> None:
    """Stops the Prometheus that `start` recorded in the state directory (proc.stop: SIGTERM, SIGKILL after
    `timeout`, waited for until gone); removes its TSDB unless `remove` is false."""
    info = state_dir / "prometheus.json"
    if info.exists():
        proc.stop(int(json.loads(info.read_text())["pid"]), timeout)
        info.unlink()
    if remove:
        shutil.rmtree(state_dir / "data", ignore_errors=True)


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

"""`shipyard-runtime serve` as a subprocess of a test (does process I/O): its stderr pumped into a log, the HTTP and
gRPC ports it reports ("Listened on ...", "Listened for gRPC ... on ..."), and when it became ready."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SERVE = [sys.executable, "-m", "shipyard.runtime.cli", "serve"]
_HTTP = re.compile(r"Listened on 127\.0\.0\.1:(\d+)")
_GRPC = re.compile(r"Listened for gRPC .* on 127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    listening: threading.Event = field(default_factory=threading.Event)  # the gRPC port (last to open) is known
    ready: threading.Event = field(default_factory=threading.Event)  # "Became ready", or the process ended

    def output(self) -> str:
        return "\n".join(self.log)

    def stop(self, grace_s: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(args: Sequence[str], env: Mapping[str, str] | None = None) -> ServerProcess:
    """Starts ``serve`` with ``args`` (which should include ``--grpc-port 0``: its line marks the server listening)
    and OMP_NUM_THREADS=1 unless ``env`` says otherwise."""
    process = subprocess.Popen([*SERVE, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                               stderr=subprocess.PIPE, text=True)
    server = ServerProcess(process)

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.log.append(line.rstrip())
            if match := _HTTP.search(line):
                server.ports["http"] = int(match.group(1))
            if match := _GRPC.search(line):
                server.ports["grpc"] = int(match.group(1))
                server.listening.set()
            if "Became ready" in line:
                server.ready.set()
        server.ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return server

"""A test harness: an inference server on its own event loop in a background thread (unit tests, benches).

The real `Server` (`shipyard.runtime.server.lifecycle`) without the process around it: no signal handlers, no
garbage-collector freeze; `stop` starts the same graceful drain SIGTERM does. Starts threads and listens on a
socket.
"""

from __future__ import annotations

import asyncio
import threading
import time

from shipyard.runtime.server import endpoints, lifecycle, loading, settings


class ServerThread:
    """A server on its own event loop in a background thread."""

    def __init__(self, config: settings.ServerConfig, loader: loading.Loader | None = None) -> None:
        self.server = lifecycle.Server(config, loader)
        self._thread = threading.Thread(target=self._run, name="shipyard-server", daemon=True)
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.server.run())
        except BaseException as error:
            self.error = error
            self.server.started.set()

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self.server.started.wait(timeout) or self.error is not None:
            raise RuntimeError(f"the server did not start: {self.error}")
        return self

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def app(self) -> endpoints.App:
        return self.server.app

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.app.ready:
                return
            if not self._thread.is_alive():
                raise RuntimeError(f"the server exited with {self.exit_code}: {self.error}")
            time.sleep(0.01)
        raise TimeoutError("the server did not become ready")

    def join(self, timeout: float = 30.0) -> int | None:
        """Wait for the server to exit on its own (e.g. after its model failed to load); its exit code."""
        self._thread.join(timeout)
        return self.exit_code

    def stop(self, timeout: float = 30.0) -> int | None:
        self.server.request_drain()
        self._thread.join(timeout)
        return self.exit_code

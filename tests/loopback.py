"""Starting and stopping a real uvicorn server on 127.0.0.1, shared by the server and hardening tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """``app`` served by uvicorn in a daemon thread; ``url`` is valid once the constructor returns."""

    def __init__(self, app, start_timeout: float = 60.0):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + start_timeout
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def ask_to_stop(self) -> None:
        self._server.should_exit = True

    def stop(self, timeout: float = 15.0) -> None:
        self.ask_to_stop()
        self._thread.join(timeout)

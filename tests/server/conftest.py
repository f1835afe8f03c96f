"""Real uvicorn servers on loopback for the API and browser tests.

The model is the default one, difusi-mini, when its weights are in the package; until then a tiny
random SD1 checkpoint (`write_tiny_checkpoint`) stands in. Either way a second tiny checkpoint is
in the models folder so model switching can be tested.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from difusi.models import default_model_path
from difusi.server.app import create_app


@dataclass
class Models:
    folder: Path
    default: Path
    other: Path


@dataclass
class Running:
    url: str
    outputs: Path
    app: object

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tests share 2 CPU cores with other work; one intra-op thread avoids OpenMP spin contention
    (measured: a tiny-model step went from ~1 s to ~0.2 s under load). Restored after each test so other
    test folders run with their usual thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    from difusi.models.synthetic import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("models")
    shipped = default_model_path()
    if shipped.exists():
        default = shipped
    else:
        default = folder / "tiny-default.safetensors"
        write_tiny_checkpoint(default, "sd1", seed=0)
    other = folder / "tiny-other.safetensors"
    write_tiny_checkpoint(other, "sd1", seed=1)
    return Models(folder=folder, default=default, other=other)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def start_server(models, tmp_path_factory) -> Iterator[Callable[..., Running]]:
    """Factory: start_server(**create_app kwargs) -> Running; every server is stopped at the end."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**kwargs) -> Running:
        outputs = tmp_path_factory.mktemp("outputs")
        options = {"models_dir": models.folder, "outputs_dir": outputs, "checkpoint": str(models.default)}
        options.update(kwargs)
        app = create_app(**options)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        servers.append((server, thread))
        return Running(url=f"http://127.0.0.1:{port}", outputs=outputs, app=app)

    yield start
    for server, _ in servers:
        server.should_exit = True
    for _, thread in servers:
        thread.join(15)


@pytest.fixture(scope="session")
def server(start_server) -> Running:
    """The shared open server (no auth, queue size 32)."""
    return start_server()


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http

"""Real uvicorn servers on loopback for the API and browser tests.

The model is the default one, difusi-mini, when its weights are in the package; until then a tiny
random SD1 checkpoint (`write_tiny_checkpoint`) stands in. Either way a second tiny checkpoint is
in the models folder so model switching can be tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from difusi.models import default_model_path
from difusi.server.app import create_app
from loopback import LoopbackServer


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
def _one_thread_per_test(one_torch_thread) -> None:
    """See the root conftest: these tests share the CPU with a live server."""


VAE_FILE = "mini-alt.safetensors"
"""A VAE file in the test models folder (the default model's VAE, every weight scaled by 1.01)."""


def _write_alternative_vae(checkpoint, target) -> None:
    from safetensors.torch import save_file

    from difusi.models import load_model

    target.parent.mkdir(parents=True, exist_ok=True)
    state = load_model(checkpoint).vae.state_dict()
    save_file({key: (value.float() * 1.01).contiguous() for key, value in state.items()}, target)


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
    _write_alternative_vae(default, folder / "VAE" / VAE_FILE)
    return Models(folder=folder, default=default, other=other)


@pytest.fixture(scope="session")
def start_server(models, tmp_path_factory) -> Iterator[Callable[..., Running]]:
    """Factory: start_server(**create_app kwargs) -> Running; every server is stopped at the end."""
    servers: list[LoopbackServer] = []

    def start(**kwargs) -> Running:
        outputs = tmp_path_factory.mktemp("outputs")
        options = {"models_dir": models.folder, "outputs_dir": outputs, "checkpoint": str(models.default)}
        options.update(kwargs)
        app = create_app(**options)
        server = LoopbackServer(app, start_timeout=30)
        servers.append(server)
        return Running(url=server.url, outputs=outputs, app=app)

    yield start
    for server in servers:  # ask them all first so they wind down in parallel
        server.ask_to_stop()
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Running:
    """The shared open server (no auth, queue size 32)."""
    return start_server()


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http

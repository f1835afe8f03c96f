"""Fresh tiny checkpoints per test module: these tests switch modules between eager and fast paths,
so they never share the pipeline tests' session models."""

import pytest

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before Hugging Face imports)
from difusi.models.synthetic import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed-checkpoints")
    paths = {}

    def get(family: str):
        if family not in paths:
            paths[family] = folder / f"tiny-{family}.safetensors"
            write_tiny_checkpoint(paths[family], family, "safetensors")
        return paths[family]

    return get

"""Tiny random checkpoints, loaded once per session through the public loader."""

import pytest

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before Hugging Face imports)
from difusi.models import load_model
from difusi.models.synthetic import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-checkpoints")
    cache = {}

    def get(family: str):
        if family not in cache:
            path = folder / f"tiny-{family}.safetensors"
            write_tiny_checkpoint(path, family, "safetensors")
            cache[family] = load_model(path)
        return cache[family]

    return get

"""Tiny random checkpoints and difusi-mini, loaded once per session through the public loader."""

import pytest

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before Hugging Face imports)
from difusi.models import default_model_path, load_model
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


@pytest.fixture(scope="session")
def mini():
    """difusi-mini, the shipped default model (its jobs merge LoRAs only for their own duration)."""
    path = default_model_path()
    if not path.exists():
        pytest.skip(f"difusi-mini is not shipped in this checkout ({path})")
    return load_model(path)

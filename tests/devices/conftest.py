"""Tiny random checkpoints for the device, precision and offload tests (written once per session)."""

from __future__ import annotations

import pytest

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before Hugging Face imports)
from difusi.models.synthetic import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`get(family) -> Path` of a tiny random checkpoint of that family."""
    folder = tmp_path_factory.mktemp("device-checkpoints")
    made = {}

    def get(family: str = "sd1"):
        if family not in made:
            made[family] = write_tiny_checkpoint(folder / f"tiny-{family}.safetensors", family).path
        return made[family]

    return get

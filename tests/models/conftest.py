"""Shared synthesized checkpoints (written once per session; each takes ~0.5 s to build)."""

from __future__ import annotations

import pytest

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before any Hugging Face import)
from difusi.models.synthetic import SyntheticCheckpoint, write_tiny_checkpoint

SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": ""}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """`make(family, fmt, **kw) -> SyntheticCheckpoint`, cached per (family, fmt, kw)."""
    made: dict[tuple, SyntheticCheckpoint] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(family: str, fmt: str = "safetensors", **kw) -> SyntheticCheckpoint:
        key = (family, fmt, tuple(sorted(kw.items(), key=str)))
        if key not in made:
            name = f"{family}-{fmt}-{len(made)}{SUFFIX[fmt]}"
            made[key] = write_tiny_checkpoint(root / name, family, fmt, **kw)
        return made[key]

    return make


def assert_same_weights(reference, loaded) -> None:
    """Every tensor of `loaded` equals `reference`'s under the same name (and no name is missing)."""
    import torch

    ref, got = reference.state_dict(), loaded.state_dict()
    assert set(ref) == set(got), set(ref) ^ set(got)
    for key, value in ref.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key

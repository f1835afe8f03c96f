"""Checkpoint files: safe reading, hashing, architecture detection, LDM <-> diffusers conversion, loading.

Public API: `load_model`, `LoadedModel`, `default_model_path`, `ModelCache`, `list_checkpoints`,
`known_checkpoints`, the one checkpoint resolver (`resolve_checkpoint` for paths and names,
`find_checkpoint` over a listing, `CheckpointNotFoundError` / `AmbiguousCheckpointError`),
`CheckpointInfo`, and the model-family table (`FAMILIES`, `FamilySpec`, `family_spec`).
Test helpers: `difusi.models.synthetic.write_tiny_checkpoint`.
"""

from difusi.models.cache import ModelCache
from difusi.models.catalog import (
    AmbiguousCheckpointError,
    CheckpointInfo,
    CheckpointNotFoundError,
    find_checkpoint,
    known_checkpoints,
    list_checkpoints,
    resolve_checkpoint,
)
from difusi.models.families import FAMILIES, FamilySpec, family_spec
from difusi.models.loader import LoadedModel, default_model_path, load_model

__all__ = [
    "FAMILIES",
    "AmbiguousCheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "FamilySpec",
    "LoadedModel",
    "ModelCache",
    "default_model_path",
    "family_spec",
    "find_checkpoint",
    "known_checkpoints",
    "list_checkpoints",
    "load_model",
    "resolve_checkpoint",
]

"""Checkpoint files: safe reading, hashing, architecture detection, LDM <-> diffusers conversion, loading.

Public API: `load_model`, `LoadedModel`, `default_model_path`, `ModelCache`, `list_checkpoints`,
`resolve_checkpoint`, `CheckpointInfo`. Test helpers: `difusi.models.synthetic.write_tiny_checkpoint`.
"""

from difusi.models.cache import ModelCache
from difusi.models.catalog import CheckpointInfo, list_checkpoints, resolve_checkpoint
from difusi.models.loader import LoadedModel, default_model_path, load_model

__all__ = [
    "CheckpointInfo",
    "LoadedModel",
    "ModelCache",
    "default_model_path",
    "list_checkpoints",
    "load_model",
    "resolve_checkpoint",
]

"""Upscaler model files: finding them (`difusi.models.folders` kind "upscaler") and reading them safely.

Files are `.pth` / `.pt` pickles or `.safetensors`. Pickles go through difusi's safe loader
(`torch.load(weights_only=True)`, see `difusi.models.files`): a pickle that names any callable is refused and
nothing in it runs. Detection reads key names and shapes only (safetensors: the header; pickles: the memory-mapped
tensors' shapes), so listing a folder reads no weights of safetensors files.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difusi.errors import CheckpointError, ParamError
from difusi.models import files as checkpoint_files
from difusi.models.folders import kind_folders
from difusi.upscalers.arch import ModelSpec, NotAnUpscaler, build_model, detect, unwrap_state_dict

SUFFIXES = (".pth", ".pt", ".safetensors")


def model_files(models_dir: Path | None) -> list[Path]:
    """Every upscaler-suffixed file under the upscaler folders, in folder order then path order (recursive)."""
    found: list[Path] = []
    for folder in kind_folders("upscaler", models_dir):
        found += sorted(path for path in folder.rglob("*") if path.suffix.lower() in SUFFIXES and path.is_file())
    return found


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, unwrapped (`params_ema`, `params`, `state_dict`, `module.`), safe loader only."""
    try:
        loaded = checkpoint_files._torch_load(path)
    except Exception:
        # difusi's loader words every failure (code in the pickle, HTML page, truncated file, ...): raise its error.
        checkpoint_files.read_pickle_state_dict(path)
        raise
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a model: the pickle holds a {type(loaded).__name__}, not a state dict")
    state = unwrap_state_dict(loaded)
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model file, reading no tensor data from safetensors files."""
    if path.suffix.lower() == ".safetensors":
        reader = checkpoint_files.CheckpointFile(path)
        try:
            return dict(unwrap_state_dict(reader.shapes))
        finally:
            reader.close()
    return {key: tuple(value.shape) for key, value in _read_pickle(path).items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model file (unwrapped), through difusi's safe readers."""
    if path.suffix.lower() == ".safetensors":
        reader = checkpoint_files.CheckpointFile(path)
        try:
            return unwrap_state_dict({key: reader.tensor(key) for key in reader.keys()})
        finally:
            reader.close()
    return _read_pickle(path)


def not_an_upscaler(path: Path, field: str, error: Exception) -> ParamError:
    """The ParamError of a file that cannot be used as an upscaler (wrong kind, unsafe or unreadable)."""
    if isinstance(error, NotAnUpscaler):
        return ParamError(field, f"{path.name} is not an upscaler model: {error}")
    return ParamError(field, f"{path.name} cannot be used as an upscaler model: {error}")


def inspect_file(path: Path, field: str = "hr_upscaler") -> ModelSpec:
    """The architecture of a model file from its keys and shapes; ParamError(field) when it is no upscaler."""
    try:
        return detect(read_shapes(path))
    except (NotAnUpscaler, CheckpointError) as error:
        raise not_an_upscaler(path, field, error) from None


@dataclass(frozen=True)
class LoadedUpscaler:
    module: nn.Module
    spec: ModelSpec


_CACHE: OrderedDict[tuple[str, int, int], LoadedUpscaler] = OrderedDict()
_CACHE_SIZE = 2
_LOCK = threading.Lock()
_SPECS: dict[tuple[str, int, int], ModelSpec | str] = {}


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def cached_spec(path: Path) -> ModelSpec | str:
    """`inspect_file`'s answer, or the error message, cached by path, size and mtime (listing runs often)."""
    key = _key(path)
    if key not in _SPECS:
        try:
            _SPECS[key] = inspect_file(path)
        except ParamError as error:
            _SPECS[key] = error.message
    return _SPECS[key]


def load_upscaler(path: Path, field: str = "hr_upscaler") -> LoadedUpscaler:
    """The module for a model file, float32 on the CPU; the last `_CACHE_SIZE` files stay loaded (a hires fix or
    an extras batch reuses its upscaler for every image). ParamError(field) when it is no upscaler."""
    key = _key(path)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        module, spec = build_model(read_state_dict(path))
    except (NotAnUpscaler, CheckpointError) as error:
        raise not_an_upscaler(path, field, error) from None
    loaded = LoadedUpscaler(module, spec)
    with _LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded

"""ModelCache: keep one loaded model; reloading the same unchanged file costs nothing.

A checkpoint is identified by its resolved path, size and mtime (as A1111's checkpoint cache
does), so replacing a file on disk is noticed. Switching to another model first drops every
reference the cache holds to the previous one and collects garbage, so two models never sit in
memory together (provided callers do not keep their own references to the old one).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import torch

from difusi.errors import CheckpointError
from difusi.models.loader import LoadedModel, load_model


def file_identity(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns) of a file, or of a diffusers folder's newest file."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class ModelCache:
    """Holds at most one `LoadedModel`; thread-safe `get(path, device, dtype)`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: LoadedModel | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model held now, if any."""
        return self._model

    def get(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
        """The model at `path`: the cached one if file, device and dtype are unchanged, else a fresh load."""
        key = (*file_identity(path), str(torch.device(device)), str(dtype))
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model
            self._release()
            model = load_model(path, device=device, dtype=dtype)
            self._key, self._model = key, model
            return model

    def clear(self) -> None:
        """Forget the held model and free its memory."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        # Only drop our references: a caller still using the old model keeps a working object.
        self._model, self._key = None, None
        gc.collect()

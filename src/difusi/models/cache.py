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

from difusi.devices import Precision, check_offload, resolve_device, resolve_precision
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
    """Holds at most one `LoadedModel`; thread-safe `get(path, device, precision, offload)`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: LoadedModel | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model held now, if any."""
        return self._model

    def get(self, path: str | Path, device: str | torch.device = "auto", precision: str = "auto", offload: str = "none",
            dtype: torch.dtype | None = None) -> LoadedModel:
        """The model at `path`: the cached one if the file and the resolved device, precision (or `dtype`) and offload
        mode are unchanged, else a fresh load (`load_model`'s arguments; the old model is freed first).

        A changed device, precision or offload reloads from the file rather than moving the modules: it costs one
        read, but a model converted in place (fp16 -> fp32, hooks installed) would otherwise carry the rounding or the
        hooks of its previous placement."""
        target = resolve_device(device)  # bad names fail here, before the file is touched
        chosen = Precision.uniform(dtype) if dtype is not None else resolve_precision(precision, target)
        check_offload(offload)
        key = (*file_identity(path), str(target), chosen, offload)
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model
            self._release()
            model = load_model(path, device=target, precision=precision, offload=offload, dtype=dtype)
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

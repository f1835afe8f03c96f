"""Reading checkpoint files safely: safetensors (memory-mapped), `.ckpt`/`.pt` pickles, diffusers folders.

Pickled checkpoints are read with `torch.load(weights_only=True)`, whose unpickler only builds
tensors and plain containers; a file whose pickle names any other callable (the classic
`__reduce__` payload) is refused with `CheckpointError` and nothing in it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from difusi.errors import CheckpointError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_INDEX = "model_index.json"
# safetensors dtype names (format spec, little-endian) -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

_CAST_CHUNK_BYTES = 1 << 20
"""Stored bytes converted per piece when a tensor is cast while reading (fits in L2: read, then cast from cache)."""


def is_diffusers_folder(path: Path) -> bool:
    """True for a folder in diffusers' pipeline layout (model_index.json + component subfolders)."""
    return path.is_dir() and (path / DIFFUSERS_INDEX).is_file()


class CheckpointFile:
    """A single-file checkpoint opened for reading: `shapes` without reading tensors, `tensor(key)` on demand.

    safetensors: `safe_open` validates the file (header, offsets, size) and gives the metadata; each
    tensor is then read with one `readinto` straight into its own 64-byte-aligned buffer. A tensor
    asked for in another floating dtype (fp16 file -> float32 modules) is read through a small
    reused scratch buffer, 1 MiB at a time, each piece cast straight into the final tensor: no
    stored-dtype copy of the whole tensor is ever allocated (that temporary cost a page fault per
    4 KiB and ~15% of the load). Measured on a 2 GB fp16 SD 1.5 file (bench/load_checkpoint.py,
    bench/startup.py) this beats reading through the memory map: the map's touched pages count
    towards RSS on top of the copy, and tensors taken from the map sit at unaligned offsets (slower
    kernels, different rounding). Pickles (`.ckpt`) are memory-mapped by `torch.load(mmap=True)`,
    which aligns its records.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint file")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path}: is a folder but not a diffusers model (no {DIFFUSERS_INDEX})")
        self.metadata: dict[str, str] = {}
        self._handle: Any = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._data_start = 0
        self._scratch: torch.Tensor | None = None
        self._state: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors" or _looks_like_safetensors(self.path):
            self._open_safetensors()
            self.shapes = {k: tuple(e["shape"]) for k, e in self._entries.items()}
        else:
            self._state = read_pickle_state_dict(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def _open_safetensors(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as validated:
                self.metadata = dict(validated.metadata() or {})
            self._handle = self.path.open("rb")
            length = int.from_bytes(self._handle.read(8), "little")
            header = json.loads(self._handle.read(length))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc
        header.pop("__metadata__", None)
        unknown = {e["dtype"] for e in header.values()} - set(_SAFETENSORS_DTYPES)
        if unknown:
            raise CheckpointError(f"{self.path}: tensor dtypes difusi cannot read: {sorted(unknown)}")
        self._entries = header
        self._data_start = 8 + length

    def keys(self) -> Iterator[str]:
        return iter(self.shapes)

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, cast to `dtype` (floating tensors only) if given."""
        if self._state is None:
            return self._tensor_with(key, dtype, None)
        value = self._state[key]
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    def tensors(self, wanted: dict[str, torch.dtype | None], threads: int | None = None) -> dict[str, torch.Tensor]:
        """Several tensors at once (`{key: dtype or None}`, as `tensor`), read by `threads` threads (default: torch's
        intra-op thread count, at most 4). Positional reads (`os.preadv`) release the GIL, so two cores copy from the
        page cache in parallel as safetensors' own loader does; each thread has its own cast buffer."""
        if self._state is not None or len(wanted) < 2:
            return {key: self.tensor(key, dtype) for key, dtype in wanted.items()}
        count = max(1, min(threads or torch.get_num_threads(), 4, len(wanted)))
        if count == 1:
            return {key: self.tensor(key, dtype) for key, dtype in wanted.items()}
        # Balance the threads by bytes: biggest tensors first, each to the least loaded thread.
        groups: list[list[str]] = [[] for _ in range(count)]
        loads = [0] * count
        for key in sorted(wanted, key=lambda k: -self._size(k)):
            lightest = loads.index(min(loads))
            groups[lightest].append(key)
            loads[lightest] += self._size(key)

        def read_group(keys: list[str]) -> dict[str, torch.Tensor]:
            scratch = torch.empty(_CAST_CHUNK_BYTES, dtype=torch.uint8)
            return {key: self._tensor_with(key, wanted[key], scratch) for key in keys}

        with ThreadPoolExecutor(count) as pool:
            parts = list(pool.map(read_group, groups))
        merged = {key: value for part in parts for key, value in part.items()}
        return {key: merged[key] for key in wanted}

    def _size(self, key: str) -> int:
        start, end = self._entries[key]["data_offsets"]
        return end - start

    def _tensor_with(self, key: str, dtype: torch.dtype | None, scratch: torch.Tensor | None) -> torch.Tensor:
        """One safetensors tensor; a cast goes through `scratch` (the reader's own buffer when None)."""
        stored = _SAFETENSORS_DTYPES[self._entries[key]["dtype"]]
        if dtype is not None and stored.is_floating_point and stored != dtype:
            return self._read_cast(key, stored, dtype, scratch)
        return self._read(key)

    def _pread(self, view: memoryview, offset: int, key: str) -> None:
        """Fill `view` from file offset `offset` (positional: safe from several threads at once)."""
        done = 0
        while done < len(view):
            got = os.preadv(self._handle.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
            done += got

    def _read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self._pread(memoryview(buffer.numpy()), self._data_start + start, key)
        return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def _read_cast(self, key: str, stored: torch.dtype, dtype: torch.dtype, scratch: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Tensor `key` converted from its stored dtype to `dtype`, read piece by piece through a scratch buffer
        (the same values as reading it whole and calling `.to(dtype)`: element-wise casts do not depend on
        how the elements are grouped)."""
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        itemsize = stored.itemsize
        out = torch.empty((end - start) // itemsize, dtype=dtype)
        if scratch is None:
            if self._scratch is None:
                self._scratch = torch.empty(_CAST_CHUNK_BYTES, dtype=torch.uint8)
            scratch = self._scratch
        view = memoryview(scratch.numpy())
        per_chunk = _CAST_CHUNK_BYTES // itemsize
        for first in range(0, out.numel(), per_chunk):
            count = min(per_chunk, out.numel() - first)
            self._pread(view[: count * itemsize], self._data_start + start + first * itemsize, key)
            out[first : first + count].copy_(scratch[: count * itemsize].view(stored))
        return out.reshape(entry["shape"])

    def close(self) -> None:
        """Close the file / drop loaded tensors."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._scratch = None
        self._state = None


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length followed by '{'."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt` state dict via `torch.load(weights_only=True)`; memory-mapped for zip-format files.

    Lightning checkpoints wrap the weights in `{"state_dict": ...}`; that wrapper is removed. Every failure is a
    CheckpointError in difusi's words: what the file is and why it is refused. torch's own text is not passed on:
    it is cut off mid-sentence at the first line, asks users to file issues with PyTorch, and advises
    `weights_only=False`, i.e. running whatever code an untrusted file contains.
    """
    try:
        loaded = _torch_load(path)
    except pickle.UnpicklingError as exc:
        needed = _GLOBAL_NAME.search(str(exc))
        if needed is not None:
            raise CheckpointError(
                f"{path}: refused to load: this pickle asks to run code while loading ({needed.group(1)}: a "
                f"function or class, not tensor data); it was NOT executed. difusi reads only the tensors of a "
                f"pickled checkpoint, so a file that needs more cannot be used: get a .safetensors version of "
                f"this model instead"
            ) from exc
        raise CheckpointError(f"{path}: {_describe_unreadable(path)}") from exc
    except Exception as exc:  # the unpickler raises anything (IndexError, KeyError, ...) on bytes that are not a pickle
        raise CheckpointError(f"{path}: {_describe_unreadable(path)}") from exc
    return _unwrap_state_dict(path, loaded)


_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")
"""The callable a refused pickle names, in torch's weights-only refusal ("... GLOBAL posix.system ...")."""


def _describe_unreadable(path: Path) -> str:
    """What a file that is not a loadable torch pickle is, judged from its first bytes (torch's error only says
    which byte its safe unpickler stopped at): "not a checkpoint" for another kind of file, "not a readable
    checkpoint" for one that may be a damaged checkpoint (empty, truncated, corrupt)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        return f"not a readable checkpoint: cannot read it ({exc.strerror or exc})"
    lowered = head.lstrip().lower()
    if size == 0:
        return "not a readable checkpoint: the file is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "not a checkpoint: it is a Git LFS pointer (a small text stub), not the weights; fetch them with " \
               "`git lfs pull`"
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "not a checkpoint: it is an HTML page (a failed or blocked download?), not model weights"
    if head.startswith(b"PK\x03\x04"):
        return "not a readable checkpoint: it is a zip archive, but not a complete torch checkpoint (truncated or corrupt)"
    if _is_text(head):
        return "not a checkpoint: it is a text file, not model weights (neither a safetensors file nor a torch pickle)"
    return (f"not a readable checkpoint: neither a safetensors file nor a torch pickle that difusi's safe loader can "
            f"read ({size} bytes; truncated, corrupt, or another kind of file)")


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # a multi-byte character cut at the end of the sample is still text
            return False
        text = head[: exc.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\r\n" for char in text)


def _torch_load(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with warnings.catch_warnings():
        # A legacy file pickled with protocol > 2 makes torch warn "please file an issue": torch's words to its own
        # developers, not to a user; whether the file loads or is refused is what difusi reports.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format cannot be mmapped


def _unwrap_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint: the pickle holds a {type(loaded).__name__}, not a state dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint: the pickle holds no tensors")
    return tensors


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_component_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of one diffusers component folder (`*.safetensors` preferred, else `*.bin` via weights_only)."""
    candidates = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    candidates = [c for c in candidates if ".fp16." not in c.name] or candidates
    if not candidates:
        raise CheckpointError(f"{folder}: no weights file (*.safetensors or *.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in candidates:
        if file.name.endswith(".index.json"):
            continue
        reader = CheckpointFile(file)
        state.update({k: reader.tensor(k) for k in reader.keys()})
        reader.close()
    return state

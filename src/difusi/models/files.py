"""Reading checkpoint files safely: safetensors (memory-mapped), `.ckpt`/`.pt` pickles, diffusers folders.

Pickled checkpoints are read with `torch.load(weights_only=True)`, whose unpickler only builds
tensors and plain containers; a file whose pickle names any other callable (the classic
`__reduce__` payload) is refused with `CheckpointError` and nothing in it runs.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator
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


def is_diffusers_folder(path: Path) -> bool:
    """True for a folder in diffusers' pipeline layout (model_index.json + component subfolders)."""
    return path.is_dir() and (path / DIFFUSERS_INDEX).is_file()


class CheckpointFile:
    """A single-file checkpoint opened for reading: `shapes` without reading tensors, `tensor(key)` on demand.

    safetensors: `safe_open` validates the file (header, offsets, size) and gives the metadata; each
    tensor is then read with one `readinto` straight into its own 64-byte-aligned buffer and cast
    right away. Measured on a 2 GB fp16 SD 1.5 file (bench/load_checkpoint.py) this beats reading
    through the memory map: the map's touched pages count towards RSS on top of the copy, and
    tensors taken from the map sit at unaligned offsets (slower kernels, different rounding).
    Pickles (`.ckpt`) are memory-mapped by `torch.load(mmap=True)`, which aligns its records.
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
        value = self._state[key] if self._state is not None else self._read(key)
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    def _read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self._handle.seek(self._data_start + start)
        got = self._handle.readinto(memoryview(buffer.numpy()))
        if got != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
        return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        """Close the file / drop loaded tensors."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._state = None


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length followed by '{'."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt` state dict via `torch.load(weights_only=True)`; memory-mapped for zip-format files.

    Lightning checkpoints wrap the weights in `{"state_dict": ...}`; that wrapper is removed.
    """
    try:
        loaded = _torch_load(path)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text and ("GLOBAL" in text or "global" in text):
            raise CheckpointError(
                f"{path}: refused to load: this pickle needs code to be run to load it (e.g. a custom class or "
                f"function); it was NOT executed. Convert it to .safetensors with a tool you trust. Detail: "
                f"{_unpickler_detail(text)}"
            ) from exc
        raise CheckpointError(f"{path}: not a checkpoint (not a safetensors file or a torch pickle): {_unpickler_detail(text)}") from exc
    except Exception as exc:  # the unpickler raises anything (IndexError, KeyError, ...) on bytes that are not a pickle
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a torch pickle, or truncated/corrupt): {type(exc).__name__}: "
            f"{_first_line(str(exc))}"
        ) from exc
    return _unwrap_state_dict(path, loaded)


def _torch_load(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def _unpickler_detail(text: str) -> str:
    """torch's weights-only refusal starts with advice about `weights_only` that does not apply to a file that is
    not a pickle at all; the useful part is the `WeightsUnpickler error: ...` line."""
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip()[:300]
    return _first_line(text)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else text[:300]


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

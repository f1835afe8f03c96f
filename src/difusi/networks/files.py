"""LoRA / LyCORIS files on disk: listing, A1111 names and hashes, reading (safely) and caching what was read.

A1111 (`extensions-builtin/Lora/networks.py list_available_networks`, `network.py NetworkOnDisk`) names a LoRA by
its file stem, lets the prompt use the alias from its metadata (`ss_output_name`) too, and hashes a safetensors
LoRA over its tensor data only (`modules/hashes.py addnet_hash_safetensors`: sha256 of everything after the
header, so editing the metadata keeps the hash); the infotext's `Lora hashes` holds the first 12 hex digits.
difusi adds the sub-folder form `styles/ink`, and a name two files share is an error naming both (A1111 silently
takes one).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difusi.errors import CheckpointError, NetworkError
from difusi.models.files import CheckpointFile
from difusi.models.folders import kind_folders
from difusi.models.hashing import cached_digest

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
"""What A1111 lists as a LoRA (`list_available_networks`)."""
PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.webp", ".webp")
"""Thumbnails next to a network file, A1111's order (`ui_extra_networks.find_preview`)."""
SHORT_HASH = 12
"""A1111's `NetworkOnDisk.shorthash` length."""


@dataclass(frozen=True)
class NetworkFile:
    """One LoRA / LyCORIS file found on disk (nothing but its header read)."""

    name: str
    """File stem: what `<lora:NAME:...>` uses (A1111's name)."""
    relative: str
    """Path inside its folder without the suffix ("styles/ink"); also accepted in prompts."""
    path: Path
    metadata: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def alias(self) -> str:
        """The name from the file's training metadata (`ss_output_name`), else the file name, as A1111."""
        return self.metadata.get("ss_output_name") or self.name

    @property
    def sha256(self) -> str:
        """A1111's LoRA hash: of the tensor data for safetensors, of the whole file otherwise (cached on disk)."""
        return network_hash(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORT_HASH]

    @property
    def preview(self) -> Path | None:
        """`NAME.preview.png` (or `NAME.png`, ...) next to the file, A1111's thumbnail."""
        stem = self.path.with_suffix("")
        return next((found for suffix in PREVIEW_SUFFIXES if (found := Path(f"{stem}{suffix}")).is_file()), None)

    def to_a1111(self) -> dict[str, object]:
        """The entry of A1111's `GET /sdapi/v1/loras`: name, alias, path, metadata."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": dict(self.metadata)}

    @property
    def base_model(self) -> str | None:
        """`ss_base_model_version` of kohya's metadata ("sd_v1", "sdxl_base_v1-0", ...), when present."""
        return self.metadata.get("ss_base_model_version")


_CONTEXT_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
"""Cross-attention context width -> family (CLIP-L; OpenCLIP-H; CLIP-L + bigG)."""


def lora_family(file: NetworkFile) -> str:
    """The model family ("sd1", "sd2", "sdxl" or "unknown") a LoRA file was made for, from its header alone."""
    try:
        reader = CheckpointFile(file.path)
    except CheckpointError:
        return "unknown"
    try:
        return guess_family(reader.shapes, file.metadata)
    finally:
        reader.close()


def guess_family(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str]) -> str:
    """kohya's `ss_base_model_version`, else SDXL's two text-encoder prefixes, else the input width of the
    cross-attention keys' LoRA (768 / 1024 / 2048, the text encoders' context width); "unknown" otherwise."""
    base = str(metadata.get("ss_base_model_version", "")).lower()
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith(("sd_v1", "sd_v2")):
        return "sd1" if base.startswith("sd_v1") else "sd2"
    if any(key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for key in shapes):
        return "sdxl"
    for key, shape in shapes.items():
        if ("attn2_to_k" in key or "attn2.to_k" in key) and ("down" in key or "lora_A" in key) and len(shape) >= 2:
            return _CONTEXT_FAMILIES.get(int(shape[1]), "unknown")
    return "unknown"


def network_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (after the 8-byte length and the JSON header), else of the file."""
    return cached_digest(path, "addnet", _addnet_digest)


def _addnet_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(handle.read(8), "little")
            handle.seek(8 + header)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_loras(models_dir: Path | None) -> list[NetworkFile]:
    """Every LoRA / LyCORIS file in the models folder's LoRA folders (and difusi-mini's shipped ones), by name."""
    found: list[NetworkFile] = []
    for folder in kind_folders("lora", models_dir):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in LORA_SUFFIXES:
                relative = path.relative_to(folder).with_suffix("").as_posix()
                found.append(NetworkFile(path.stem, relative, path, _metadata(path)))
    return sorted(found, key=lambda item: (item.name.lower(), item.relative))


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        reader = CheckpointFile(path)
    except CheckpointError:
        return {}  # listed anyway: using it reports what is wrong with it
    try:
        return dict(reader.metadata)
    finally:
        reader.close()


def find_lora(query: str, files: Sequence[NetworkFile]) -> NetworkFile:
    """The LoRA a prompt tag names: "sub/name", then the file name, then the metadata alias; several different files
    on the first rule that matches -> NetworkError naming them; nothing -> NetworkError listing what exists."""
    text = query.strip().replace("\\", "/")
    rules = (lambda item: item.relative == text, lambda item: item.name == text, lambda item: item.alias == text)
    for rule in rules:
        hits = [item for item in files if rule(item)]
        if len(hits) > 1:
            listed = ", ".join(item.relative for item in hits)
            raise NetworkError(query, f"names several LoRA files ({listed}); write the one you mean as sub/name")
        if hits:
            return hits[0]
    known = ", ".join(item.relative for item in files) or "none"
    raise NetworkError(query, f"no such LoRA in the LoRA folders (Lora/, LyCORIS/, loras/); available: {known}")


@dataclass(frozen=True)
class NetworkTensors:
    """The tensors of one LoRA file, as read (float32 on the CPU), and its metadata."""

    file: NetworkFile
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)


class NetworkReader:
    """Reads LoRA files and keeps the last `capacity` of them (A1111's "LoRA cache in memory"), keyed by path, size
    and mtime, so switching back and forth between a few LoRAs reads each once."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int, int], NetworkTensors] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, file: NetworkFile) -> NetworkTensors:
        stat = file.path.stat()
        key = (str(file.path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        loaded = read_network_file(file)
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return loaded


def read_network_file(file: NetworkFile) -> NetworkTensors:
    """All tensors of a LoRA file as float32 (safetensors, or a pickle through the safe loader: nothing in it runs).

    A file that cannot be read (truncated, not tensors, a pickle that wants to run code) -> NetworkError naming it.
    """
    try:
        reader = CheckpointFile(file.path)
        try:
            tensors = {key: _as_float(reader.tensor(key)) for key in reader.keys()}
            metadata = dict(reader.metadata)
        finally:
            reader.close()
    except CheckpointError as exc:
        reason = str(exc).removeprefix(f"{file.path}: ")
        raise NetworkError(file.name, f"LoRA file {file.path} cannot be used: {reason}") from exc
    if not tensors:
        raise NetworkError(file.name, f"LoRA file {file.path} holds no tensors")
    return NetworkTensors(file, tensors, metadata)


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor

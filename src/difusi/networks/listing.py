"""One listing of every extra-network file of a models folder, for `difusi networks` and the Python API.

Each row: kind ("lora" | "embedding" | "vae"), name (what the prompt or `sd_vae` uses), alias, hash (A1111's short
hash of that kind: 12 hex of the tensor-data sha256 for a LoRA, 12 of the file's sha256 for an embedding, 10 for a
VAE), family (what the file was made for, read from its header), path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from difusi.errors import CheckpointError
from difusi.models.files import CheckpointFile
from difusi.models.folders import kind_folders
from difusi.models.hashing import file_sha256, short_hash
from difusi.models.vae_files import list_vae_files
from difusi.networks.embeddings import scan_embeddings
from difusi.networks.files import list_loras, lora_family

_EMBEDDING_FAMILIES = {768: "sd1", 1024: "sd2"}
KINDS = ("lora", "embedding", "vae")


@dataclass(frozen=True)
class NetworkInfo:
    """One extra-network file (see the module docstring for each field)."""

    kind: str
    name: str
    alias: str
    hash: str
    family: str
    path: Path
    vectors: int | None = None
    """Token positions an embedding takes (embeddings only)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def list_networks(models_dir: str | Path | None = None, kind: str | None = None) -> list[NetworkInfo]:
    """The LoRA, embedding and VAE files of a models folder (and difusi-mini's shipped ones), in that order; `kind`
    ("lora", "embedding" or "vae") keeps one kind."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = None if models_dir is None else Path(models_dir)
    rows: list[NetworkInfo] = []
    if kind in (None, "lora"):
        rows += [NetworkInfo("lora", item.relative, item.alias, item.shorthash, lora_family(item), item.path)
                 for item in list_loras(folder)]
    if kind in (None, "embedding"):
        rows += [NetworkInfo("embedding", item.name, item.name, item.shorthash, _embedding_family(item.vectors),
                             item.path, item.vector_count)
                 for item in scan_embeddings(kind_folders("embedding", folder)).embeddings]
    if kind in (None, "vae"):
        rows += [NetworkInfo("vae", path.name, path.name, short_hash(file_sha256(path)), _vae_family(path), path)
                 for path in list_vae_files(kind_folders("vae", folder), kind_folders("checkpoint", folder))]
    return rows


def _embedding_family(vectors: dict[str, Any]) -> str:
    if "clip_l" in vectors or "clip_g" in vectors:
        return "sdxl"
    width = next(iter(vectors.values())).shape[-1]
    return _EMBEDDING_FAMILIES.get(int(width), f"width {width}")


def _vae_family(path: Path) -> str:
    """SD 1.x, 2.x and SDXL share one VAE architecture (4 latent channels); other latent widths are named."""
    try:
        reader = CheckpointFile(path)
    except CheckpointError:
        return "unknown"
    try:
        shapes = reader.shapes
    finally:
        reader.close()
    for key, shape in shapes.items():
        if key.endswith("post_quant_conv.weight") and len(shape) == 4:
            return "sd" if shape[1] == 4 else f"{shape[1]}-channel"
    return "unknown"

"""One listing of every extra-network file of a models folder, for `difusi networks` and the Python API.

Each row: kind ("lora" | "embedding" | "vae"), name (what the prompt or `sd_vae` uses), alias, hash (A1111's short
hash of that kind: 12 hex of the tensor-data sha256 for a LoRA, 12 of the file's sha256 for an embedding, 10 for a
VAE), family (what the file was made for, read from its header), path.
"""

from __future__ import annotations

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


def list_networks(models_dir: str | Path | None, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows (see the module docstring) of the LoRA, embedding and VAE files, in that order; `kind` keeps one."""
    folder = None if models_dir is None else Path(models_dir)
    rows: list[dict[str, Any]] = []
    if kind in (None, "lora"):
        rows += [{"kind": "lora", "name": item.relative, "alias": item.alias, "hash": item.shorthash,
                  "family": lora_family(item), "path": str(item.path)} for item in list_loras(folder)]
    if kind in (None, "embedding"):
        scan = scan_embeddings(kind_folders("embedding", folder))
        rows += [{"kind": "embedding", "name": item.name, "alias": item.name, "hash": item.shorthash,
                  "family": _embedding_family(item.vectors), "vectors": item.vector_count, "path": str(item.path)}
                 for item in scan.embeddings]
    if kind in (None, "vae"):
        rows += [{"kind": "vae", "name": path.name, "alias": path.name, "hash": short_hash(file_sha256(path)),
                  "family": _vae_family(path), "path": str(path)}
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

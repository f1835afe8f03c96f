"""The on-disk cache of exported UNet graphs: one folder per (checkpoint, exporter, backend), LRU-evicted.

Layout: `<difusi cache folder>/graph/<sha256[:16]>-<key[:12]>/` (`difusi.models.hashing.cache_dir`:
`$DIFUSI_CACHE_DIR`, else `$XDG_CACHE_HOME/difusi`, else `~/.cache/difusi`), holding the graph (`unet.onnx` +
`unet.onnx.data` for ONNX Runtime; `unet.xml` + `unet.bin` + `weights.json` for OpenVINO) and `entry.json`, written
last (after an atomic rename of the whole folder), which records the key's facts and every file's size. The key hashes:
the checkpoint file's sha256 (so a changed file is a new entry), the UNet config (shape-relevant facts: channels, 9-channel
inpainting input, SDXL's added conditioning, cross-attention width), the exporter (torch version, opset), the
backend and its version (a new OpenVINO / ONNX Runtime never reads an entry an older one was checked with).

An entry is valid when `entry.json` parses, names the same key and every recorded file has its recorded size;
anything else (a crash mid-write, a truncated or edited file) is removed and rebuilt. A graph that fails to load
is treated the same way by the caller (`remove` then convert again, once).

Size cap: `DIFUSI_GRAPH_CACHE_GB` (default 20; SD 1.5 takes 3.4 GB, SDXL 10 GB per entry); after each new entry the
least recently used entries (folder mtime, touched on every use) are removed until the total fits, never the entry
just written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difusi.speed.graph.convert import GRAPH_FILE, OPSET, OV_GRAPH_FILE

ENTRY_FILE = "entry.json"
CAP_ENV = "DIFUSI_GRAPH_CACHE_GB"
DEFAULT_CAP_GB = 20.0


def cache_root() -> Path:
    from difusi.models.hashing import cache_dir

    return cache_dir() / "graph"


def cap_bytes() -> int:
    try:
        return int(float(os.environ.get(CAP_ENV, DEFAULT_CAP_GB)) * 1e9)
    except ValueError:
        return int(DEFAULT_CAP_GB * 1e9)


def key_facts(model: Any, backend: str, backend_version: str, precision: str = "fp32") -> dict[str, Any]:
    """The facts the entry's key hashes. An int8-compressed graph (`difusi.speed.graph.precision`) adds
    `precision` and the NNCF version, so it is its own entry; fp32 and bf16 (a compile hint) share the f32 entry and
    their facts (and keys) are those of before the precision option existed."""
    config = dict(getattr(model.unet, "config", {}) or {})
    facts = {
        "checkpoint_sha256": model.sha256,
        "unet_config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "exporter": f"torch {torch.__version__} onnx opset {OPSET}",
        "backend": backend,
        "backend_version": backend_version,
        "format": 1,
    }
    if precision == "int8":
        from difusi.speed.graph.precision import nncf_version

        facts.update({"precision": "int8", "compression": f"nncf {nncf_version()} INT8_ASYM"})
    return facts


@dataclass
class Entry:
    folder: Path
    facts: dict[str, Any]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.facts, sort_keys=True).encode()).hexdigest()

    @property
    def graph_path(self) -> Path:
        """The graph file the backend reads: unet.xml (OpenVINO IR) or unet.onnx."""
        return self.folder / (OV_GRAPH_FILE if self.facts.get("backend") == "openvino" else GRAPH_FILE)


def entry_for(model: Any, backend: str, backend_version: str, precision: str = "fp32") -> Entry:
    facts = key_facts(model, backend, backend_version, precision)
    probe = Entry(cache_root(), facts)
    return Entry(cache_root() / f"{model.sha256[:16]}-{probe.key[:12]}", facts)


def is_valid(entry: Entry) -> bool:
    try:
        record = json.loads((entry.folder / ENTRY_FILE).read_text())
        if record.get("key") != entry.key:
            return False
        return all((entry.folder / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def remove(entry: Entry) -> None:
    shutil.rmtree(entry.folder, ignore_errors=True)


def touch(entry: Entry) -> None:
    try:
        os.utime(entry.folder)
    except OSError:
        pass


def staging_folder(entry: Entry) -> Path:
    """A fresh temporary folder next to the entry (same filesystem, so publishing is a rename)."""
    folder = entry.folder.parent / f".tmp-{entry.folder.name}-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    return folder


def publish(entry: Entry, staged: Path, facts: dict[str, Any]) -> None:
    """Record sizes, write entry.json, rename the staged folder into place, then evict to the size cap."""
    files = {path.name: path.stat().st_size for path in staged.iterdir() if path.is_file()}
    record = {"key": entry.key, "facts": entry.facts, "files": files, "created": time.time(), "conversion": facts}
    (staged / ENTRY_FILE).write_text(json.dumps(record, indent=1))
    remove(entry)
    os.replace(staged, entry.folder)
    evict(keep=entry.folder)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def evict(keep: Path | None = None, cap: int | None = None) -> list[Path]:
    """Remove least recently used entries until the cache fits `cap` bytes; returns the folders removed."""
    root = cache_root()
    cap = cap_bytes() if cap is None else cap
    if not root.exists():
        return []
    entries = [(folder.stat().st_mtime, folder) for folder in root.iterdir() if folder.is_dir()]
    stale = [folder for mtime, folder in entries if folder.name.startswith(".tmp-") and time.time() - mtime > 86400]
    for folder in stale:  # a conversion that died a day ago
        shutil.rmtree(folder, ignore_errors=True)
    entries = sorted((mtime, folder) for mtime, folder in entries if not folder.name.startswith(".tmp-"))
    sizes = {folder: folder_bytes(folder) for _, folder in entries}
    total = sum(sizes.values())
    removed = []
    for _, folder in entries:
        if total <= cap:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        removed.append(folder)
    return removed

"""Checkpoint hashes: full sha256 and A1111's short hash (first 10 hex digits), cached.

Hashing a 2-7 GB file takes seconds to a minute, so results are cached in
`<cache dir>/hashes.json`, keyed by absolute path and valid while size and mtime are unchanged.
The cache dir is `$DIFUSI_CACHE_DIR`, else `$XDG_CACHE_HOME/difusi`, else `~/.cache/difusi`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

SHORT_HASH_LENGTH = 10
_CHUNK = 1 << 20
_lock = threading.Lock()


def cache_dir() -> Path:
    """difusi's cache folder (created on demand by writers): the one rule every cache of difusi lives under."""
    if os.environ.get("DIFUSI_CACHE_DIR"):
        return Path(os.environ["DIFUSI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "difusi"


def short_hash(sha256: str) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return sha256[:SHORT_HASH_LENGTH]


def _digest_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    """The files whose bytes define a model: the file itself, or a diffusers folder's weights and configs (sorted)."""
    if path.is_file():
        return [path]
    keep = (".safetensors", ".bin", ".json", ".txt")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in keep and p.name != "difusi.json")


def _fingerprint(files: list[Path]) -> list[list[int | str]]:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _load_cache(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _store_cache(file: Path, cache: dict) -> None:
    """Write via temp file + rename so concurrent readers never see half a file."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".hashes-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(cache, handle)
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only cache dir only costs speed


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a checkpoint file (or of a diffusers folder's files in sorted order), cached by size+mtime."""
    return cached_digest(Path(path), "", lambda resolved: _digest_files(_weight_files(resolved)))


def cached_digest(path: Path, kind: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)` (a hex digest of the file's bytes), cached in hashes.json by path, `kind` and the files' size
    and mtime; `kind` tells digests of one file apart (A1111's LoRA hash covers only a safetensors file's data)."""
    path = Path(path).resolve()
    fingerprint = _fingerprint(_weight_files(path))
    key = f"{kind}:{path}" if kind else str(path)
    cache_file = cache_dir() / "hashes.json"
    with _lock:
        cache = _load_cache(cache_file)
        entry = cache.get(key)
        if entry and entry.get("fingerprint") == fingerprint:
            return entry["sha256"]
    value = compute(path)
    with _lock:
        cache = _load_cache(cache_file)
        cache[key] = {"fingerprint": fingerprint, "sha256": value}
        _store_cache(cache_file, cache)
    return value

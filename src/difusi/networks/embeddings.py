"""Textual-inversion embeddings, loaded, matched to a model and triggered the way A1111 does it.

Reference: AUTOMATIC1111/stable-diffusion-webui ``modules/textual_inversion/textual_inversion.py``
(``EmbeddingDatabase``, ``Embedding``), ``modules/sd_hijack_clip.py`` (``tokenize_line``,
``PromptChunkFix``, the "TI hashes" note in ``forward``), ``modules/sd_hijack.py``
(``EmbeddingsWithFixes``) and ``modules/api/api.py`` (``get_embeddings``).

Flow for one job::

    database = EmbeddingDatabase([Path("embeddings")])
    embeddings = database.for_model(model)          # .loaded / .skipped / .failed
    with attach(model, embeddings) as use:          # every text encoder sees the embeddings
        cond = encode_prompt_schedule(model.text_encoders, prompt, steps, clip_skip)
    use.used, use.ti_hashes()                        # what the prompts triggered, for the infotext

Files (``load_embedding``): ``.pt`` / ``.bin`` are read with ``torch.load(weights_only=True)`` only, so a
pickle that needs code is refused, never run; ``.safetensors`` with safetensors. Accepted layouts, in
A1111's order: ``{"string_to_param": {"*": [n, D]}, "step", ...}`` (A1111 / original TI), an SDXL dict with
``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``, and a dict with exactly one tensor ``[D]`` or ``[n, D]``
(diffusers ``{token: tensor}``, kohya's ``emb_params``). The name is the file's stem, as in A1111
(``os.path.splitext(filename)``), not the ``name`` stored inside. Not supported: embeddings hidden in PNG
images (A1111 reads those; a ``.preview.png`` is never an embedding in either).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difusi.errors import NetworkError
from difusi.prompts.tokens import CHUNK_TOKENS

__all__ = [
    "EMBEDDING_SUFFIXES",
    "SDXL_KEYS",
    "SINGLE_KEY",
    "Embedding",
    "SkippedEmbedding",
    "FailedEmbedding",
    "EmbeddingScan",
    "EmbeddingSet",
    "EmbeddingDatabase",
    "EmbeddingUse",
    "load_embedding",
    "scan_embeddings",
    "list_embeddings",
    "embedding_set",
    "fit_reason",
    "attach",
    "format_ti_hashes",
    "embeddings_response",
]

log = logging.getLogger("difusi.networks")

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
"""File types read as embeddings (A1111 also reads embeddings stored inside PNG/WEBP images)."""

SDXL_KEYS = ("clip_l", "clip_g")
"""Keys of an SDXL embedding, in the order of SDXL's text encoders (A1111 ``textual_inversion_key``)."""

SINGLE_KEY = ""
"""The key of the one vector set of an SD1/SD2 embedding in :attr:`Embedding.vectors`."""

SHORTHASH_LENGTH = 12
"""A1111 ``Embedding.set_hash``: ``shorthash = hash[0:12]`` of the file's sha256."""

MAX_FILE_BYTES = 64 << 20
"""Larger files are not read: real embeddings are a few KB (a 75x1280+75x768 SDXL one is under 1 MB)."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file, loaded.

    Attributes:
        name: the file's stem; what a prompt writes to trigger it (A1111 ``Embedding.name``).
        path: where it was read from.
        vectors: ``{"": [n, D]}`` for an SD1/SD2 file, ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for
            an SDXL file; float32 on the CPU.
        vector_count: n, the prompt positions it takes (A1111 ``Embedding.vectors``).
        shape: D of a single-width file, None for an SDXL file (see :attr:`a1111_shape`).
        step: training step stored in the file, if any.
        sha256: of the file's bytes.
        sd_checkpoint / sd_checkpoint_name: the training checkpoint's hash / name stored in A1111 files.
    """

    name: str
    path: Path
    vectors: Mapping[str, Tensor] = field(repr=False)
    vector_count: int
    shape: int | None
    step: int | None
    sha256: str
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shorthash(self) -> str:
        """First 12 hex digits of the file's sha256, A1111's ``Embedding.shorthash`` (used in "TI hashes")."""
        return self.sha256[:SHORTHASH_LENGTH]

    @property
    def is_sdxl(self) -> bool:
        """Whether the file holds separate ``clip_l`` / ``clip_g`` vectors."""
        return SINGLE_KEY not in self.vectors

    @property
    def a1111_shape(self) -> int:
        """A1111's ``Embedding.shape``: D, or ``clip_g`` width + ``clip_l`` width for an SDXL file."""
        return sum(int(vectors.shape[-1]) for vectors in self.vectors.values())

    def widths(self) -> dict[str, int]:
        """Feature width of each vector set, by key."""
        return {key: int(vectors.shape[-1]) for key, vectors in self.vectors.items()}


@dataclass(frozen=True)
class SkippedEmbedding:
    """A readable embedding that does not fit the model (A1111 ``skipped_embeddings``); ``reason`` says why."""

    embedding: Embedding
    reason: str


@dataclass(frozen=True)
class FailedEmbedding:
    """A file in an embeddings folder that could not be used: unreadable, unsafe, of no known layout, or
    a second file with a name already taken. A1111 only logs these; they are not in ``skipped``."""

    path: Path
    name: str
    reason: str


@dataclass(frozen=True)
class EmbeddingScan:
    """What :func:`scan_embeddings` found: embeddings sorted by name, and the files that failed."""

    embeddings: tuple[Embedding, ...]
    failed: tuple[FailedEmbedding, ...]


# ----------------------------------------------------------------------------- loading one file


def load_embedding(path: str | Path) -> Embedding:
    """Read one ``.pt`` / ``.bin`` / ``.safetensors`` embedding (layouts in the module docstring).

    Raises:
        NetworkError: missing, too large, truncated or corrupt, a pickle that would run code (refused
            without running it), or a layout that is no embedding; the error's name is the file's stem.
    """
    path = Path(path)
    name = _embedding_name(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise NetworkError(name, f"{path}: not an embedding file (expected one of {', '.join(EMBEDDING_SUFFIXES)})")
    data_bytes = _read_bytes(path, name)
    data = _parse_safetensors(data_bytes, path, name) if suffix == ".safetensors" else _parse_pickle(data_bytes, path, name)
    vectors = _vectors_from_data(data, path, name)
    return Embedding(
        name=name,
        path=path,
        vectors=vectors,
        vector_count=int(next(iter(vectors.values())).shape[0]),
        shape=int(vectors[SINGLE_KEY].shape[-1]) if SINGLE_KEY in vectors else None,
        step=_optional_int(data.get("step")),
        sha256=hashlib.sha256(data_bytes).hexdigest(),
        sd_checkpoint=_optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(data.get("sd_checkpoint_name")),
    )


def _embedding_name(path: Path) -> str:
    """A1111 ``load_from_file``: ``name, ext = os.path.splitext(filename)``, so ``a.b.pt`` is named ``a.b``."""
    return os.path.splitext(path.name)[0]


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise NetworkError(name, f"{path}: {size >> 20} MiB is too large for an embedding; not read")
        return path.read_bytes()
    except OSError as error:
        raise NetworkError(name, f"{path}: cannot be read ({error.strerror or error})") from error


def _parse_safetensors(data: bytes, path: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load

    try:
        return dict(load(data))
    except Exception as error:  # safetensors raises its own SafetensorError and others on bad headers
        raise NetworkError(name, f"{path}: not a valid safetensors file, truncated or corrupt ({error})") from error


def _parse_pickle(data: bytes, path: Path, name: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt; anything that needs
    a class or function is refused by torch's restricted unpickler before it is ever called."""
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise NetworkError(name, f"{path}: not a plain tensor file (it would run code); refused") from error
        raise NetworkError(name, f"{path}: not a valid torch file, truncated or corrupt ({error})") from error
    except Exception as error:  # zip reader errors, EOF, bad magic numbers
        raise NetworkError(name, f"{path}: not a valid torch file, truncated or corrupt ({error})") from error
    if not isinstance(loaded, dict):
        raise NetworkError(name, f"{path}: holds a {type(loaded).__name__}, not an embedding dict")
    return loaded


def _vectors_from_data(data: Mapping[str, Any], path: Path, name: str) -> dict[str, Tensor]:
    """A1111 ``load_from_file``'s three layouts, tried in its order."""
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise NetworkError(name, f"{path}: string_to_param must hold exactly one tensor (A1111 rule)")
        return {SINGLE_KEY: _as_matrix(next(iter(params.values())), path, name, "string_to_param")}
    if "clip_l" in data and "clip_g" in data:  # SDXL
        vectors = {key: _as_matrix(data[key], path, name, key) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise NetworkError(name, f"{path}: clip_l and clip_g have different vector counts")
        return vectors
    tensors = [value for value in data.values() if isinstance(value, Tensor)]
    if len(data) == 1 and len(tensors) == 1:  # diffusers {token: tensor}, kohya {"emb_params": tensor}
        return {SINGLE_KEY: _as_matrix(tensors[0], path, name, next(iter(data)))}
    raise NetworkError(name, f"{path}: neither a textual inversion embedding nor a diffusers concept")


def _as_matrix(value: Any, path: Path, name: str, key: str) -> Tensor:
    """``[n, D]`` float32 CPU copy; a ``[D]`` vector is one vector (A1111 ``emb.unsqueeze(0)``)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise NetworkError(name, f"{path}: {key} is not a floating-point tensor")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[1] == 0:
        raise NetworkError(name, f"{path}: {key} has shape {tuple(value.shape)}, expected [vectors, width]")
    matrix = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    if not bool(torch.isfinite(matrix).all()):
        raise NetworkError(name, f"{path}: {key} contains NaN or infinite values")
    return matrix


def _optional_int(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------- folders


_file_cache: dict[Path, tuple[int, int, Embedding | NetworkError]] = {}
_file_cache_lock = threading.Lock()


def _load_cached(path: Path) -> Embedding:
    """:func:`load_embedding`, remembered per file while its (mtime, size) stay the same; failures too."""
    stat = path.stat()
    key = path.resolve()
    with _file_cache_lock:
        entry = _file_cache.get(key)
    if entry is not None and entry[:2] == (stat.st_mtime_ns, stat.st_size):
        result = entry[2]
    else:
        try:
            result = load_embedding(path)
        except NetworkError as error:
            result = error
        with _file_cache_lock:
            _file_cache[key] = (stat.st_mtime_ns, stat.st_size, result)
    if isinstance(result, NetworkError):
        raise result
    return result


def _embedding_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursive, links followed like A1111's ``os.walk(followlinks=True)``), sorted.

    Empty files are left out silently, as A1111 does (``st_size == 0: continue``).
    """
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for file in sorted(files):
            path = Path(root) / file
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.stat().st_size > 0:
                found.append(path)
    return found


def scan_embeddings(folders: Sequence[str | Path]) -> EmbeddingScan:
    """Load every embedding file under ``folders`` (missing folders are ignored).

    Files that fail go to ``failed`` with their reason, not into an exception: one bad file must not hide
    the others (A1111 ``load_from_dir`` reports and continues). Names are unique: when two files have the
    same stem, the first one found (folders in the order given, then sorted paths) is used and the other
    is listed as failed. A1111 lets the later one replace the earlier; a fixed, visible rule is kinder.
    """
    by_name: dict[str, Embedding] = {}
    failed: list[FailedEmbedding] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in _embedding_files(folder):
            name = _embedding_name(path)
            if name in by_name:
                failed.append(FailedEmbedding(path, name, f"another embedding named {name!r} is used: {by_name[name].path}"))
                continue
            try:
                by_name[name] = _load_cached(path)
            except NetworkError as error:
                failed.append(FailedEmbedding(path, name, error.message))
            except OSError as error:  # vanished between listing and reading
                failed.append(FailedEmbedding(path, name, f"{path}: cannot be read ({error.strerror or error})"))
    for item in failed:
        log.warning("embedding %s not loaded: %s", item.name, item.reason)
    return EmbeddingScan(tuple(sorted(by_name.values(), key=_sort_key)), tuple(failed))


def list_embeddings(folders: Sequence[str | Path]) -> list[Embedding]:
    """The embeddings under ``folders`` sorted by name (case-insensitive); failed files are logged and left
    out (use :func:`scan_embeddings` to see them)."""
    return list(scan_embeddings(folders).embeddings)


def _sort_key(embedding: Embedding) -> tuple[str, str]:
    """A1111 re-sorts ``word_embeddings`` by ``e.name.lower()`` after loading."""
    return embedding.name.lower(), embedding.name


# ----------------------------------------------------------------------------- fitting a model


def _token_embedding_width(encoder: Any) -> int:
    """Width of the encoder's token embeddings, what an embedding's vectors replace."""
    return int(encoder.model.get_input_embeddings().weight.shape[1])


def _encoder_keys(encoder_count: int) -> tuple[str, ...]:
    """Which vector set each encoder reads: SDXL's two encoders read ``clip_l`` and ``clip_g``
    (A1111 ``sd_hijack.py``: ``EmbeddingsWithFixes(..., textual_inversion_key='clip_l' / 'clip_g')``)."""
    return SDXL_KEYS if encoder_count == 2 else (SINGLE_KEY,) * encoder_count


def fit_reason(embedding: Embedding, encoders: Sequence[Any]) -> str | None:
    """Why ``embedding`` cannot be used with these text encoders, or None when it fits.

    A1111 (``load_from_file``) registers an embedding when its ``shape`` equals ``get_expected_shape()``,
    the width of ``encode_embedding_init_text`` (SDXL: both encoders' widths concatenated, 768 + 1280), and
    skips it otherwise. So an SD1 file (768) is skipped on SDXL (2048), an SDXL file (2048) on SD1 (768).
    Checked here per encoder instead of by the sum (a sum can match while the parts do not, and A1111 would
    then fail inside the encoder), plus: more than 75 vectors never fit one chunk.
    """
    widths = [_token_embedding_width(encoder) for encoder in encoders]
    keys = _encoder_keys(len(encoders))
    have = embedding.widths()
    if embedding.vector_count > CHUNK_TOKENS:
        return f"{embedding.vector_count} vectors do not fit in one {CHUNK_TOKENS}-token chunk"
    want = dict(zip(keys, widths, strict=True))
    if have != want:
        plural = "s" if len(widths) > 1 else ""
        return f"{_describe(have)} does not fit this model's text encoder{plural} ({_describe(want)})"
    return None


def _describe(widths: Mapping[str, int]) -> str:
    if set(widths) == {SINGLE_KEY}:
        return f"width {widths[SINGLE_KEY]}"
    return " + ".join(f"{key} {width}" for key, width in widths.items())


class EmbeddingSet:
    """The embeddings one model can use (``loaded``) and those it cannot (``skipped``), with A1111's lookup.

    Build it with :func:`embedding_set` or :meth:`EmbeddingDatabase.for_model`. ``find_at`` is A1111's
    ``EmbeddingDatabase.find_embedding_at_position``: names are tokenized (no BOS/EOS) with the first
    encoder's tokenizer, indexed by their first token id, and at a prompt position the longest name whose ids
    follow wins; among equally long ones, the first in name order.
    """

    def __init__(self, loaded: Mapping[str, Embedding], skipped: Mapping[str, SkippedEmbedding],
                 failed: Sequence[FailedEmbedding], encoders: Sequence[Any]):
        self.loaded = dict(loaded)
        self.skipped = dict(skipped)
        self.failed = tuple(failed)
        self.keys = _encoder_keys(len(encoders))
        self.widths = tuple(_token_embedding_width(encoder) for encoder in encoders)
        self._lookup: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        tokenizer = encoders[0].tokenizer if encoders else None
        for embedding in self.loaded.values():
            ids = tuple(tokenizer(embedding.name, add_special_tokens=False, truncation=False)["input_ids"])
            self._lookup.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self._lookup.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)  # stable: name order among equals

    def __len__(self) -> int:
        return len(self.loaded)

    def find_at(self, tokens: Sequence[int], offset: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at ``tokens[offset]``, and how many tokens the name covers."""
        for ids, embedding in self._lookup.get(int(tokens[offset]), ()):
            if tuple(tokens[offset : offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None


def embedding_set(
    embeddings: Sequence[Embedding], encoders: Sequence[Any], failed: Sequence[FailedEmbedding] = ()
) -> EmbeddingSet:
    """Split ``embeddings`` into those that fit ``encoders`` (a model's ``text_encoders``) and the skipped.

    A name that tokenizes to nothing (only characters CLIP drops) cannot be triggered and is skipped too.
    """
    loaded: dict[str, Embedding] = {}
    skipped: dict[str, SkippedEmbedding] = {}
    tokenizer = encoders[0].tokenizer if encoders else None
    for embedding in sorted(embeddings, key=_sort_key):
        reason = fit_reason(embedding, encoders) if encoders else "the model has no text encoder"
        if reason is None and not tokenizer(embedding.name, add_special_tokens=False)["input_ids"]:
            reason = "its name has no tokens, so no prompt can trigger it"
        if reason is None:
            loaded[embedding.name] = embedding
        else:
            skipped[embedding.name] = SkippedEmbedding(embedding, reason)
    return EmbeddingSet(loaded, skipped, failed, encoders)


class EmbeddingDatabase:
    """Embedding folders, scanned on demand; files are re-read only when their mtime or size changed.

    A1111 keeps one database per process and re-checks the folders' mtimes before each job; here
    :meth:`for_model` rescans (cheap: unchanged files come from the cache) and splits for that model.
    """

    def __init__(self, folders: Sequence[str | Path]):
        self.folders = tuple(Path(folder) for folder in folders)

    def scan(self) -> EmbeddingScan:
        """Every embedding under the folders, and the files that failed."""
        return scan_embeddings(self.folders)

    def for_model(self, model: Any) -> EmbeddingSet:
        """The loaded / skipped split for ``model`` (a ``LoadedModel`` or anything with ``text_encoders``)."""
        scan = self.scan()
        return embedding_set(scan.embeddings, model.text_encoders, scan.failed)


# ----------------------------------------------------------------------------- one job


class EmbeddingUse:
    """What the prompts of one job triggered, recorded as the text encoders ran.

    ``events`` has one entry per encoder batch that used embeddings (A1111: one per
    ``FrozenCLIPEmbedderWithCustomWordsBase.forward``, so SDXL records each prompt twice: CLIP-L, then bigG).
    """

    def __init__(self) -> None:
        self.events: list[tuple[int, tuple[Embedding, ...]]] = []

    def record(self, encoder_index: int, embeddings: Sequence[Embedding]) -> None:
        self.events.append((encoder_index, tuple(embeddings)))

    @property
    def used(self) -> list[Embedding]:
        """Every embedding triggered, once each, in order of first use."""
        seen: dict[str, Embedding] = {}
        for _, embeddings in self.events:
            for embedding in embeddings:
                seen.setdefault(embedding.name, embedding)
        return list(seen.values())

    def ti_hashes(self) -> str | None:
        """The infotext's "TI hashes" value as A1111 writes it (see :func:`format_ti_hashes`)."""
        return format_ti_hashes([embeddings for _, embeddings in self.events])


class _EncoderEmbeddings:
    """What one ``ClipTextEncoder`` sees of an :class:`EmbeddingSet` (``conditioning.EncoderEmbeddings``)."""

    def __init__(self, embeddings: EmbeddingSet, key: str, index: int, use: EmbeddingUse):
        self._embeddings = embeddings
        self._key = key
        self._index = index
        self._use = use

    def find_at(self, tokens: Sequence[int], offset: int) -> tuple[Embedding, int] | None:
        return self._embeddings.find_at(tokens, offset)

    def vectors_for(self, embedding: Embedding) -> Tensor:
        return embedding.vectors[self._key]

    def record_used(self, embeddings: Sequence[Embedding]) -> None:
        self._use.record(self._index, embeddings)


@contextmanager
def attach(model: Any, embeddings: EmbeddingSet) -> Iterator[EmbeddingUse]:
    """Let ``model``'s text encoders trigger ``embeddings`` inside the ``with`` block; yields the job's record.

    ``model`` is a ``LoadedModel`` (or a list of ``ClipTextEncoder``). The encoders are left exactly as
    before on exit, also after an error; the set must have been built for these encoders. Not for two jobs at
    once on the same model (the encoders are shared).
    """
    encoders = list(getattr(model, "text_encoders", model))
    widths = tuple(_token_embedding_width(encoder) for encoder in encoders)
    if widths != embeddings.widths:
        raise ValueError(f"this embedding set was built for encoder widths {embeddings.widths}, not {widths}")
    use = EmbeddingUse()
    previous = [encoder.embeddings for encoder in encoders]
    try:
        for index, (encoder, key) in enumerate(zip(encoders, embeddings.keys, strict=True)):
            encoder.embeddings = _EncoderEmbeddings(embeddings, key, index, use)
        yield use
    finally:
        for encoder, before in zip(encoders, previous, strict=True):
            encoder.embeddings = before


def format_ti_hashes(events: Sequence[Sequence[Embedding]]) -> str | None:
    """A1111's "TI hashes" infotext value, ``"name: shorthash, name: shorthash"``, or None if nothing was used.

    A1111 ``sd_hijack_clip.py forward``: each encoder call lists its used embeddings (once each), names
    without ``:`` and ``,``, and puts them *before* what earlier calls wrote. Its duplicates are kept: SDXL
    lists every embedding twice (once per encoder), and one used in both prompts appears once per prompt.
    A1111 encodes the negative prompt first (``setup_conds``: ``uc`` then ``c``), so to get its exact string,
    encode the negative prompt before the positive one.
    """
    text: str | None = None
    for embeddings in events:
        parts = [f"{_infotext_name(embedding.name)}: {embedding.shorthash}" for embedding in embeddings]
        if not parts:
            continue
        text = ", ".join(parts if text is None else [*parts, text])
    return text


def _infotext_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def embeddings_response(embeddings: EmbeddingSet) -> dict[str, dict[str, dict[str, Any]]]:
    """The body of A1111's ``GET /sdapi/v1/embeddings`` (``api.py get_embeddings``) for one model.

    ``{"loaded": {name: {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}}, "skipped": {...}}``
    with ``shape`` A1111's (width; clip_g + clip_l widths for SDXL) and ``vectors`` the vector count.
    """

    def entry(embedding: Embedding) -> dict[str, Any]:
        return {
            "step": embedding.step,
            "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name,
            "shape": embedding.a1111_shape,
            "vectors": embedding.vector_count,
        }

    return {
        "loaded": {name: entry(embedding) for name, embedding in embeddings.loaded.items()},
        "skipped": {name: entry(item.embedding) for name, item in embeddings.skipped.items()},
    }

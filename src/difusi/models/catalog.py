"""Finding checkpoints in a models folder and resolving what users type: the one resolver every front end uses.

A1111 shows a checkpoint as its title "name [short hash]" and accepts the title, the name (with or
without extension, with its sub-folder), the file name, the 10-hex short hash or the full sha256;
`find_checkpoint` implements exactly those rules over a listing, most specific form first, so an
exact file name or title beats a bare name that a.ckpt and a.safetensors share, and only a genuine
tie is an error (`AmbiguousCheckpointError`, listing the candidates). A1111's old 8-hex hashes (of
a 64 KiB slice, before 2023) are not sha256 prefixes: they never match anything.

`resolve_checkpoint` adds paths for the trusted callers (Python API, CLI); the server resolves
requests with `find_checkpoint` over its listing only, so a request can never name a file outside
its models folder. The shipped difusi-mini is always a candidate (`known_checkpoints`). Only the
header of each file is read (to detect its family), and hashes come from the on-disk hash cache
after the first time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from difusi.errors import CheckpointError
from difusi.models.detect import detect_family
from difusi.models.families import detect_diffusers
from difusi.models.files import SINGLE_FILE_SUFFIXES, CheckpointFile, is_diffusers_folder, read_json
from difusi.models.folders import is_excluded_from_checkpoints, kind_folders
from difusi.models.hashing import SHORT_HASH_LENGTH, file_sha256, short_hash
from difusi.models.sidecar import read_sidecar

LISTED_SUFFIXES = (".safetensors", ".ckpt")


ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_NAME = "difusi-mini"


def default_model_path() -> Path:
    """The shipped default model, difusi-mini (an SD1-layout single file; its family record needs no sidecar)."""
    return ASSETS_DIR / "models" / f"{DEFAULT_MODEL_NAME}.safetensors"


def format_title(name: str, short: str | None) -> str:
    """A1111's checkpoint title, "name [short hash]" (just the name when the hash is unknown): the one title builder,
    used by `CheckpointInfo.title` and `LoadedModel.title` so listings, options and loaded models always agree."""
    return f"{name} [{short}]" if short else name


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint found on disk. `family` is "sd1"/"sd2"/"sdxl", or "unknown: <why>" for unusable files.

    `filename` is the path relative to the models folder with its extension ("sub/beta.ckpt"; the bare file name
    for a checkpoint outside it), the form A1111 also accepts.
    """

    name: str
    path: Path
    short_hash: str
    sha256: str
    family: str
    filename: str = ""

    @property
    def title(self) -> str:
        """A1111's title, "name [short hash]" (`format_title`)."""
        return format_title(self.name, self.short_hash)

    @property
    def relative_name(self) -> str:
        """`filename`, or the file name when the listing did not set it."""
        return self.filename or self.path.name


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint answers to the name; `available` is what could have been named."""

    def __init__(self, query: str, available: Sequence[CheckpointInfo], where: str, message: str | None = None):
        titles = ", ".join(info.title for info in available) or "none"
        super().__init__(message or f"checkpoint {query!r} not found in {where}; available: {titles}")
        self.query = query
        self.available = list(available)


class AmbiguousCheckpointError(CheckpointError):
    """Several different checkpoints answer equally well to the name; `candidates` lists them."""

    def __init__(self, query: str, candidates: Sequence[CheckpointInfo]):
        listed = ", ".join(f"{info.title} ({info.relative_name})" for info in candidates)
        super().__init__(f"checkpoint {query!r} is ambiguous: it names {listed}; give its title or file name")
        self.query = query
        self.candidates = list(candidates)


def _candidates(models_dir: Path) -> list[Path]:
    found: list[Path] = []
    for path in sorted(models_dir.rglob("*")):
        if any(parent in found for parent in path.parents) or is_excluded_from_checkpoints(path, models_dir):
            continue  # inside a diffusers folder already listed, or in a LoRA / VAE / embeddings folder
        if path.is_file() and path.suffix.lower() in LISTED_SUFFIXES and not _inside_diffusers(path, models_dir):
            found.append(path)
        elif is_diffusers_folder(path):
            found.append(path)
    return found


def _inside_diffusers(path: Path, root: Path) -> bool:
    return any(is_diffusers_folder(parent) for parent in path.parents if parent != root and root in parent.parents)


def _family_of(path: Path) -> str:
    """The architecture name from the family table (header / configs only), or "unknown: <why>"."""
    try:
        if path.is_dir():
            unet = path / "unet" / "config.json"
            unet_config = read_json(unet) if unet.is_file() else {}
            return detect_diffusers(path, read_json(path / "model_index.json"), unet_config).family
        reader = CheckpointFile(path)
        try:
            return detect_family(reader.shapes)
        finally:
            reader.close()
    except CheckpointError as exc:
        return f"unknown: {exc}"


def checkpoint_name(path: Path, models_dir: Path | None = None) -> str:
    """Display name: the sidecar's `name`, else the path relative to the models folder without suffix (A1111 style)."""
    sidecar = read_sidecar(path) if path.exists() else {}
    if sidecar.get("name"):
        return str(sidecar["name"])
    rel = path.relative_to(models_dir) if models_dir and models_dir in path.parents else Path(path.name)
    return str(rel.with_suffix("")) if path.suffix.lower() in SINGLE_FILE_SUFFIXES else str(rel)


def _relative_file(path: Path, models_dir: Path | None) -> str:
    if models_dir is not None and models_dir in path.parents:
        return path.relative_to(models_dir).as_posix()
    return path.name


def describe_checkpoint(path: str | Path, models_dir: str | Path | None = None) -> CheckpointInfo:
    """The CheckpointInfo of one file or diffusers folder (hashed; named relative to `models_dir` when inside it)."""
    path = Path(path)
    root = Path(models_dir).expanduser() if models_dir is not None else None
    sha = file_sha256(path)
    return CheckpointInfo(checkpoint_name(path, root), path, short_hash(sha), sha, _family_of(path),
                          _relative_file(path, root))


def list_checkpoints(models_dir: str | Path) -> list[CheckpointInfo]:
    """Every .safetensors/.ckpt file and diffusers folder in the checkpoint folders of `models_dir` (recursive;
    `difusi.models.folders`: A1111's `Stable-diffusion/`, ComfyUI's `checkpoints/`, else the folder itself without
    its LoRA / VAE / embeddings folders), named relative to its checkpoint folder, sorted by name."""
    infos = [describe_checkpoint(path, folder)
             for folder in kind_folders("checkpoint", Path(models_dir)) for path in _candidates(folder)]
    return sorted(infos, key=lambda info: info.name.lower())


def known_checkpoints(models_dir: str | Path | None) -> list[CheckpointInfo]:
    """What a user can name: the shipped difusi-mini first (when present), then the models folder's checkpoints."""
    listed = list_checkpoints(models_dir) if models_dir is not None else []
    default = default_model_path()
    if not default.exists() or any(_same_file(info.path, default) for info in listed):
        return listed
    return [describe_checkpoint(default), *listed]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- the resolver

_HEX = re.compile(r"[0-9a-fA-F]+")
_TITLE = re.compile(r"^(?P<name>.*\S)\s*\[(?P<hash>[^\[\]]*)\]$")
FULL_HASH_LENGTH = 64


def _hash_query(text: str) -> str | None:
    """The hash in "0123456789", "[0123456789]" or a full sha256, lower-cased; None for anything else.

    Only A1111's current forms count: 10 hex digits (sha256 prefix) or all 64. An 8-hex "old" A1111 hash is a
    hash of a 64 KiB slice, not a sha256 prefix, so it is not a hash query at all (and cannot match by chance).
    """
    bare = text.strip().removeprefix("[").removesuffix("]").strip()
    if len(bare) in (SHORT_HASH_LENGTH, FULL_HASH_LENGTH) and _HEX.fullmatch(bare):
        return bare.lower()
    return None


def _tiers(text: str) -> list[Callable[[CheckpointInfo], bool]]:
    """Match rules, most specific first: the first rule that any checkpoint passes decides."""
    slashed = text.replace("\\", "/")
    hashed = _hash_query(text)
    titled = _TITLE.match(text)
    stale_name = titled.group("name") if titled else None

    def exact(info: CheckpointInfo) -> bool:  # the listed path, the title, "sub/name.ext" or A1111's "sub/name.ext [hash]"
        relative = info.relative_name
        return text in (str(info.path), info.title, f"{relative} [{info.short_hash}]") or slashed == relative

    def named(info: CheckpointInfo) -> bool:  # "sub/name": the display name, or the relative path without extension
        return text == info.name or slashed == _without_suffix(info.relative_name)

    def file_name(info: CheckpointInfo) -> bool:  # "name.safetensors" of a file in a sub-folder
        return slashed == info.path.name

    def stem(info: CheckpointInfo) -> bool:  # "name" of a file in a sub-folder
        return slashed == _without_suffix(info.path.name)

    def by_hash(info: CheckpointInfo) -> bool:
        return hashed is not None and hashed in (info.short_hash.lower(), info.sha256.lower())

    def by_stale_title(info: CheckpointInfo) -> bool:  # "name [other hash]": A1111 falls back to the name too
        return stale_name is not None and any(rule(info) for rule in _tiers(stale_name)[:4])

    return [exact, named, file_name, stem, by_hash, by_stale_title]


def _without_suffix(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.lower().endswith(SINGLE_FILE_SUFFIXES) else name


def find_by_hash(model_hash: str, infos: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
    """The checkpoint whose 10-hex short hash or full sha256 is `model_hash` (an infotext's "Model hash"), else None.

    Only hashes: a hash that is no sha256 form (A1111's old 8-hex hashes) matches nothing, never a file name.
    """
    hashed = _hash_query(model_hash)
    if hashed is None:
        return None
    return next((info for info in infos if hashed in (info.short_hash.lower(), info.sha256.lower())), None)


def find_checkpoint(query: str, infos: Sequence[CheckpointInfo], where: str = "the models folder") -> CheckpointInfo:
    """The checkpoint in `infos` that `query` names, by A1111's rules (see the module docstring); never a path lookup.

    Raises CheckpointNotFoundError (listing `infos`) or AmbiguousCheckpointError (listing the tied candidates).
    Candidates with the same sha256 are the same model (e.g. a copy of difusi-mini): the first one is taken.
    """
    text = str(query).strip()
    if text:
        for rule in _tiers(text):
            hits = [info for info in infos if rule(info)]
            if hits:
                if len({info.sha256 or str(info.path) for info in hits}) > 1:
                    raise AmbiguousCheckpointError(text, hits)
                return hits[0]
    raise CheckpointNotFoundError(text, infos, where)


def resolve_checkpoint(query: str | Path, models_dir: str | Path | None = None) -> Path:
    """The checkpoint a user means: an existing path, else anything `find_checkpoint` accepts among
    `known_checkpoints(models_dir)` (difusi-mini and the models folder).

    For trusted callers only (Python API, CLI): a request from the network must go through `find_checkpoint`
    over a listing, never here, since this accepts any path. Raises CheckpointError (exactly that type, as the
    API documents), caused by the CheckpointNotFoundError / AmbiguousCheckpointError that lists the checkpoints.
    """
    text = str(query).strip()
    direct = Path(text).expanduser()
    try:
        if text and direct.exists():
            return direct
    except (OSError, ValueError):  # a name no file system accepts (NUL byte, too long): not a path
        pass
    where = str(models_dir) if models_dir is not None else "the shipped models (no models folder given)"
    try:
        return find_checkpoint(text, known_checkpoints(models_dir), where).path
    except CheckpointNotFoundError as missing:
        message = str(missing)
        if models_dir is None and (direct.suffix or "/" in text):  # meant as a path: say so
            titles = ", ".join(info.title for info in missing.available) or "none"
            message = f"{text}: no such checkpoint file (nor a checkpoint name; known: {titles})"
        # The API's documented type is CheckpointError itself; the detailed error stays reachable as __cause__.
        raise CheckpointError(message) from missing
    except AmbiguousCheckpointError as tie:
        raise CheckpointError(str(tie)) from tie

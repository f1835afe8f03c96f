"""Finding checkpoints in a models folder and resolving what users type (A1111 names and hashes).

A1111 shows a checkpoint as its title "name [short hash]" and accepts the title, the name, the
file stem or the short hash; we accept those plus a path. Only the header of each file is read
(to detect its family), and hashes come from the on-disk hash cache after the first time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difusi.errors import CheckpointError
from difusi.models.detect import detect_family
from difusi.models.files import SINGLE_FILE_SUFFIXES, CheckpointFile, is_diffusers_folder, read_json
from difusi.models.hashing import file_sha256, short_hash
from difusi.models.sidecar import read_sidecar

LISTED_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint found on disk. `family` is "sd1"/"sd2"/"sdxl", or "unknown: <why>" for unusable files."""

    name: str
    path: Path
    short_hash: str
    sha256: str
    family: str

    @property
    def title(self) -> str:
        """A1111's title, "name [short hash]"."""
        return f"{self.name} [{self.short_hash}]"


def _candidates(models_dir: Path) -> list[Path]:
    found: list[Path] = []
    for path in sorted(models_dir.rglob("*")):
        if any(parent in found for parent in path.parents):
            continue  # inside a diffusers folder already listed
        if path.is_file() and path.suffix.lower() in LISTED_SUFFIXES and not _inside_diffusers(path, models_dir):
            found.append(path)
        elif is_diffusers_folder(path):
            found.append(path)
    return found


def _inside_diffusers(path: Path, root: Path) -> bool:
    return any(is_diffusers_folder(parent) for parent in path.parents if parent != root and root in parent.parents)


def _family_of(path: Path) -> str:
    try:
        if path.is_dir():
            index = read_json(path / "model_index.json")
            return "sdxl" if "XL" in str(index.get("_class_name", "")) else _folder_family(path)
        reader = CheckpointFile(path)
        try:
            return detect_family(reader.shapes)
        finally:
            reader.close()
    except CheckpointError as exc:
        return f"unknown: {exc}"


def _folder_family(path: Path) -> str:
    te = path / "text_encoder" / "config.json"
    return "sd2" if te.is_file() and read_json(te).get("hidden_act") == "gelu" else "sd1"


def checkpoint_name(path: Path, models_dir: Path | None = None) -> str:
    """Display name: the sidecar's `name`, else the path relative to the models folder without suffix (A1111 style)."""
    sidecar = read_sidecar(path) if path.exists() else {}
    if sidecar.get("name"):
        return str(sidecar["name"])
    rel = path.relative_to(models_dir) if models_dir and models_dir in path.parents else Path(path.name)
    return str(rel.with_suffix("")) if path.suffix.lower() in SINGLE_FILE_SUFFIXES else str(rel)


def list_checkpoints(models_dir: str | Path) -> list[CheckpointInfo]:
    """Every .safetensors/.ckpt file and diffusers folder under `models_dir` (recursive), sorted by name."""
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        return []
    infos = []
    for path in _candidates(root):
        sha = file_sha256(path)
        infos.append(CheckpointInfo(checkpoint_name(path, root), path, short_hash(sha), sha, _family_of(path)))
    return sorted(infos, key=lambda info: info.name.lower())


def resolve_checkpoint(query: str | Path, models_dir: str | Path | None = None) -> Path:
    """The checkpoint a user means: an existing path, or a title "name [hash]", name, stem or short hash in `models_dir`.

    Raises CheckpointError listing the available titles when nothing matches.
    """
    text = str(query).strip()
    direct = Path(text).expanduser()
    if direct.exists():
        return direct
    if models_dir is None:
        raise CheckpointError(f"{text}: no such checkpoint file")
    infos = list_checkpoints(models_dir)
    for matches in (_by_title, _by_name, _by_hash):
        hit = matches(text, infos)
        if hit is not None:
            return hit.path
    titles = ", ".join(info.title for info in infos) or "none"
    raise CheckpointError(f"checkpoint {text!r} not found in {models_dir}; available: {titles}")


def _by_title(text: str, infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    return next((i for i in infos if i.title == text), None)


def _by_name(text: str, infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    for candidate in (text, text.rsplit(" [", 1)[0]):
        for info in infos:
            if candidate in (info.name, info.path.name, info.path.stem):
                return info
    return None


def _by_hash(text: str, infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    needle = text.strip("[] ").lower()
    if len(needle) < 8 or any(c not in "0123456789abcdef" for c in needle):
        return None
    return next((i for i in infos if i.sha256.startswith(needle)), None)

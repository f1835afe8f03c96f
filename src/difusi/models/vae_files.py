"""Separate VAE files: A1111's "SD VAE" setting, as a library.

A VAE file replaces the weights of the checkpoint's own VAE (the module stays the same object, with its dtype,
device and memory format); "None" puts the checkpoint's own weights back, bit for bit. The rules follow
AUTOMATIC1111 `modules/sd_vae.py`:

- `load_vae_dict`: every key starting with "loss" and the EMA bookkeeping scalars `model_ema.decay` /
  `model_ema.num_updates` (`vae_ignore_keys`) are dropped. difusi drops every `model_ema.` key: A1111 would fail
  its strict `load_state_dict` on the (dot-less) EMA weight copies, which no module has.
- `store_base_vae` / `restore_base_vae`: the checkpoint's own VAE weights are copied once, the first time another
  VAE is loaded, and loaded back for "None".
- `refresh_vae_list`: the VAE folder is searched recursively for `*.ckpt`, `*.pt`, `*.safetensors`; a checkpoints
  folder only for `*.vae.ckpt`, `*.vae.pt`, `*.vae.safetensors`. `vae_dict` is keyed by the file name
  (`get_filename` = `os.path.basename`), names in natural sort order (`shared.natural_sort_key`).
- `get_loaded_vae_hash`: the "VAE hash" of the infotext is the first 10 hex digits of the file's sha256; "VAE" is
  the file name (`get_loaded_vae_name`).
- `find_vae_near_checkpoint`: A1111 up to 1.5 (and SD.Next today) looks for `<checkpoint>.vae.pt`, `.vae.ckpt`,
  `.vae.safetensors` next to the checkpoint, in that order; A1111 1.6+ takes the first listed VAE whose file name
  *starts with* the checkpoint's name (so also one in the VAE folder). difusi does the first, then a listed VAE
  whose name without extension (and without `.vae`) *equals* the checkpoint's name: a bare prefix match would give
  "sd.safetensors" the "sdxl_vae.safetensors" of another family.
- `resolve_vae`: "None" -> the checkpoint's own VAE; "Automatic" (or the old config value "auto") -> the VAE near
  the checkpoint, else its own; a name -> that VAE (a named VAE overrides one near the checkpoint, A1111's default
  `sd_vae_overrides_per_model_preferences`). An unknown name is an error here (A1111 prints a line and uses None).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from difusi.errors import CheckpointError, NetworkError
from difusi.models.convert import VAE_PREFIX, vae_ldm_to_diffusers
from difusi.models.families import UNET_PREFIX
from difusi.models.files import CheckpointFile
from difusi.models.hashing import file_sha256, short_hash

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

AUTOMATIC = "Automatic"
NONE = "None"
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
"""Files a VAE folder may hold (A1111 `refresh_vae_list`; no `.sft`, no `.bin`)."""
NEAR_CHECKPOINT_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")
"""A VAE next to a checkpoint, in A1111's search order (`find_vae_near_checkpoint`)."""

_IGNORED_KEYS = ("loss", "model_ema.")
_WHOLE_CHECKPOINT_PREFIXES = {
    UNET_PREFIX: "UNet",
    "cond_stage_model.": "text encoder",  # SD1 CLIP, SD2 OpenCLIP
    "conditioner.": "text encoder",  # SDXL's embedders
}
# diffusers' deprecated VAE attention names (files saved before diffusers 0.14) -> today's.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class VaeInfo:
    """The VAE file a model decodes with now: `name` (its file name: A1111's infotext "VAE"), path and sha256."""

    name: str
    path: Path | None = None
    sha256: str | None = None

    @property
    def short_hash(self) -> str | None:
        """A1111's "VAE hash": the first 10 hex digits of the file's sha256."""
        return short_hash(self.sha256) if self.sha256 else None


# ----------------------------------------------------------------------------- reading


def _error(name: str, message: str) -> NetworkError:
    """A VAE problem: front ends point at the job's `sd_vae` field."""
    return NetworkError(name, message, field="sd_vae")


def read_vae_file(path: str | Path, expected: Any | None = None) -> StateDict:
    """A diffusers `AutoencoderKL` state dict from a VAE file, in the file's own dtype.

    Accepts `.safetensors`, `.pt` and `.ckpt` (pickles only through the safe loader: one that needs code is refused
    and nothing in it runs; a `{"state_dict": ...}` wrapper is removed), in the LDM layout (`encoder.down.0...`,
    bare or under `first_stage_model.`, e.g. an A1111 `.vae.pt`) or diffusers' (`encoder.down_blocks.0...`, a
    `diffusion_pytorch_model.safetensors`). With `expected` (the model's `AutoencoderKL`) every tensor must fit it.
    Every failure is a `NetworkError` naming the file.
    """
    path = Path(path).expanduser()
    name = path.name
    state = {k: v for k, v in _read_tensors(path, name).items() if not k.startswith(_IGNORED_KEYS)}
    _refuse_whole_checkpoint(name, state)
    state = _strip_vae_prefix(state)
    state = _to_diffusers_layout(name, state)
    if expected is not None:
        state = _fit(name, state, expected)
    return state


def _read_tensors(path: Path, name: str) -> StateDict:
    if path.is_dir():
        raise _error(name, f"{path} is a folder; a VAE is one file (.safetensors, .pt or .ckpt)")
    try:
        reader = CheckpointFile(path)
        try:
            return {key: reader.tensor(key) for key in reader.keys()}
        finally:
            reader.close()
    except CheckpointError as exc:
        raise _error(name, f"cannot read the VAE file: {exc}") from exc


def _refuse_whole_checkpoint(name: str, state: Mapping[str, Tensor]) -> None:
    found = sorted({what for prefix, what in _WHOLE_CHECKPOINT_PREFIXES.items() if any(k.startswith(prefix) for k in state)})
    if found:
        raise _error(name, f"this file is a whole checkpoint, not a VAE: it holds {' and '.join(found)} weights "
                                 f"too; put it in the checkpoints folder")


def _strip_vae_prefix(state: StateDict) -> StateDict:
    """LDM keys without `first_stage_model.` (a VAE cut out of a checkpoint keeps it); other keys stay as they are."""
    if not any(k.startswith(VAE_PREFIX) for k in state):
        return state
    return {k.removeprefix(VAE_PREFIX): v for k, v in state.items()}


def _is_diffusers_layout(state: Mapping[str, Tensor]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state)


def _is_ldm_layout(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in state)


def _to_diffusers_layout(name: str, state: StateDict) -> StateDict:
    if _is_diffusers_layout(state):
        return {_modern_attention_name(k): v for k, v in state.items()}
    if not _is_ldm_layout(state):
        sample = sorted(state)[:3]
        raise _error(name, f"not a VAE: its tensors are not an autoencoder's (e.g. {sample})")
    try:
        return vae_ldm_to_diffusers(state, _ldm_layout(state))
    except CheckpointError as exc:
        raise _error(name, f"not a VAE difusi can read: {exc}") from exc


def _modern_attention_name(key: str) -> str:
    head, dot, last = key.rpartition(".")
    owner, _, module = head.rpartition(".")
    if ".attentions." in key and module in _OLD_ATTENTION:
        return f"{owner}.{_OLD_ATTENTION[module]}{dot}{last}"
    return key


def _indices(state: Mapping[str, Tensor], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in state if (m := regex.match(k))}


def _ldm_layout(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the LDM -> diffusers key table needs: the number of levels and resnets per level, from the key names."""
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    per = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    if not levels:  # a decoder-only file: the decoder has one resnet more per level
        levels = _indices(state, r"decoder\.up\.(\d+)\.")
        per = len(_indices(state, r"decoder\.up\.0\.block\.(\d+)\.")) - 1
    return {"block_out_channels": [0] * len(levels), "layers_per_block": max(per, 0)}


def _fit(name: str, state: StateDict, expected: Any) -> StateDict:
    """`state` with the model's tensor shapes (1x1-conv attention matrices flattened), or NetworkError saying what
    does not fit."""
    target = expected.state_dict()
    fitted: StateDict = {}
    for key, value in state.items():
        want = target.get(key)
        if want is not None and value.ndim == 4 and want.ndim == 2 and tuple(value.shape[2:]) == (1, 1):
            value = value[:, :, 0, 0]
        fitted[key] = value
    missing = sorted(set(target) - set(fitted))
    unexpected = sorted(set(fitted) - set(target))
    wrong = [k for k in target if k in fitted and tuple(fitted[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        raise _error(name, f"this VAE does not fit the loaded model's VAE: {_describe_misfit(fitted, target)}"
                                 f"{_list_misfit(fitted, target, missing, unexpected, wrong)}")
    return fitted


def _architecture(state: Mapping[str, Any]) -> str:
    """A one-line summary of a diffusers-layout VAE state dict: per-level channels and latent channels."""
    levels = sorted(_indices(state, r"encoder\.down_blocks\.(\d+)\."))
    channels = [tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape)[0] for i in levels
                if f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in state]
    latent = state.get("decoder.conv_in.weight")
    latent_text = f", {tuple(latent.shape)[1]} latent channels" if latent is not None else ""
    return f"block channels {channels}{latent_text}"


def _describe_misfit(fitted: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    mine, theirs = _architecture(fitted), _architecture(target)
    if mine != theirs:
        return f"the file's VAE has {mine}, the model's has {theirs} (a VAE of another model family?)"
    return "its tensors differ from the model's VAE"


def _list_misfit(fitted: Mapping[str, Tensor], target: Mapping[str, Tensor], missing: list[str],
                 unexpected: list[str], wrong: list[str]) -> str:
    parts = []
    if wrong:
        shown = ", ".join(f"{k} {tuple(fitted[k].shape)} vs {tuple(target[k].shape)}" for k in wrong[:3])
        parts.append(f"{len(wrong)} tensor(s) of another shape, e.g. {shown}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown tensor(s), e.g. {unexpected[:3]}")
    return "; " + "; ".join(parts)


# ----------------------------------------------------------------------------- swapping


@dataclass
class _Record:
    base: StateDict
    """The checkpoint's own VAE weights: one CPU copy in the VAE's dtype, taken at the first swap."""
    info: VaeInfo | None = None


_records: weakref.WeakKeyDictionary[torch.nn.Module, _Record] = weakref.WeakKeyDictionary()
"""Per VAE module (not per LoadedModel: a reloaded model has a new VAE with its own weights); dies with the module."""


def loaded_vae(model: Any) -> VaeInfo | None:
    """The VAE file `model` decodes with now, or None for the checkpoint's own VAE."""
    record = _records.get(model.vae) if model.vae is not None else None
    return record.info if record is not None else None


def set_vae(model: Any, state: Mapping[str, Tensor] | None, *, name: str | None = None, path: str | Path | None = None,
            sha256: str | None = None) -> None:
    """Put the weights of a VAE file (`read_vae_file`'s state dict) into `model.vae` in place, or with `state=None`
    the checkpoint's own weights back, bit for bit.

    The module stays the same object with its dtype, device and memory format (channels_last stays); the checkpoint
    is not read again. `name` defaults to the file name of `path`; `sha256` is computed from `path` (cached) when not
    given. Setting the VAE already loaded (same sha256, or same path when there is no hash) changes nothing.
    """
    vae = model.vae
    record = _records.get(vae)
    if state is None:
        if record is not None and record.info is not None:
            _write(model, record.base, "the checkpoint's VAE")
            record.info = None
        return
    info = _info(name, path, sha256)
    if record is not None and record.info is not None and _same_file(record.info, info):
        record.info = info
        return
    fitted = _fit(info.name, dict(state), vae)
    if record is None:
        record = _Record(base=_cpu_copy(vae))
        _records[vae] = record
    _write(model, fitted, info.name)
    record.info = info


def load_vae_file(model: Any, path: str | Path, name: str | None = None) -> VaeInfo:
    """Read the VAE file at `path` and swap it into `model` (nothing is read when it is the VAE loaded already)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _error(name or path.name, f"no such VAE file: {path}")
    sha256 = file_sha256(path)
    current = loaded_vae(model)
    if current is not None and current.sha256 == sha256:
        return current
    state = read_vae_file(path, expected=model.vae)
    set_vae(model, state, name=name, path=path, sha256=sha256)
    info = loaded_vae(model)
    assert info is not None
    return info


def apply_vae_setting(model: Any, choice: str, vae_files: Sequence[Path]) -> VaeInfo | None:
    """A1111's "SD VAE" setting on a loaded model: resolve `choice` (`resolve_vae`) and load or restore; returns
    the VAE file in use afterwards (None: the checkpoint's own)."""
    path = resolve_vae(choice, Path(model.path) if model.path is not None else None, vae_files)
    if path is None:
        set_vae(model, None)
        return None
    return load_vae_file(model, path)


def _info(name: str | None, path: str | Path | None, sha256: str | None) -> VaeInfo:
    file = Path(path).expanduser() if path is not None else None
    if sha256 is None and file is not None and file.is_file():
        sha256 = file_sha256(file)
    return VaeInfo(name=name or (file.name if file is not None else "VAE"), path=file, sha256=sha256)


def _same_file(a: VaeInfo, b: VaeInfo) -> bool:
    if a.sha256 is not None and b.sha256 is not None:
        return a.sha256 == b.sha256
    return a.path is not None and b.path is not None and a.path.resolve() == b.path.resolve()


def _cpu_copy(vae: torch.nn.Module) -> StateDict:
    return {k: v.detach().to("cpu", copy=True) for k, v in vae.state_dict().items()}


def _write(model: Any, state: Mapping[str, Tensor], what: str) -> None:
    """Copy `state` into the VAE's own tensors (casting to their dtype and device; their strides are kept)."""
    _park_offloaded_vae(model)
    target = model.vae.state_dict()
    if set(target) != set(state):
        raise _error(what, "internal error: the VAE's tensors changed since its weights were saved")
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(state[key])


def _park_offloaded_vae(model: Any) -> None:
    """With an offload mode (`difusi.models.offload`) the VAE's tensors have CPU master copies, and a unit that is
    on the device points at device copies that the next unload drops: unload the VAE's units first, so the copy
    lands in the masters."""
    hooks = getattr(model, "offload_hooks", None)
    if hooks is not None:
        hooks.park()


# ----------------------------------------------------------------------------- finding files


def natural_sort_key(text: str) -> list[int | str]:
    """A1111's `shared.natural_sort_key`: digit runs compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"([0-9]+)", text)]


def list_vae_files(folders: Sequence[Path], checkpoint_folders: Sequence[Path] = ()) -> list[Path]:
    """VAE files, searched recursively: every `.safetensors` / `.pt` / `.ckpt` in `folders` (the VAE folders), and
    only `*.vae.safetensors` / `.vae.pt` / `.vae.ckpt` in `checkpoint_folders` (A1111 `refresh_vae_list`).

    Folder by folder in the order given, each in natural order of its relative paths; a file found twice is listed
    once.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for roots, suffixes in ((folders, VAE_SUFFIXES), (checkpoint_folders, NEAR_CHECKPOINT_SUFFIXES)):
        for root in roots:
            root = Path(root).expanduser()
            if not root.is_dir():
                continue
            files = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)]
            for file in sorted(files, key=lambda p: natural_sort_key(p.relative_to(root).as_posix())):
                if file.resolve() not in seen:
                    seen.add(file.resolve())
                    found.append(file)
    return found


def vae_dict(vae_files: Sequence[Path]) -> dict[str, Path]:
    """A1111's `vae_dict`: each file name -> its file (the first listed, when two folders share a name)."""
    named: dict[str, Path] = {}
    for file in vae_files:
        named.setdefault(file.name, file)
    return named


def vae_names(vae_files: Sequence[Path]) -> list[str]:
    """The "SD VAE" choices after "Automatic" and "None": the files' names (A1111 `vae_dict` keys), each once."""
    return list(vae_dict(vae_files))


def find_vae_near_checkpoint(checkpoint_path: Path | None, vae_files: Sequence[Path] = ()) -> Path | None:
    """`<checkpoint>.vae.pt` / `.vae.ckpt` / `.vae.safetensors` next to the checkpoint (that order), else a listed
    VAE named like the checkpoint (`<checkpoint>.safetensors` or `<checkpoint>.vae.pt` in the VAE folder)."""
    if checkpoint_path is None:
        return None
    checkpoint_path = Path(checkpoint_path).expanduser()
    stem = checkpoint_path.name if checkpoint_path.is_dir() else checkpoint_path.stem
    for suffix in NEAR_CHECKPOINT_SUFFIXES:
        candidate = checkpoint_path.parent / (stem + suffix)
        if candidate.is_file():
            return candidate
    for file in vae_files:
        if _bare_name(file.name) == stem:
            return file
    return None


def _bare_name(file_name: str) -> str:
    """A VAE file's name without its extension and without a `.vae` before it."""
    base = PurePath(file_name).stem
    return base.removesuffix(".vae")


def resolve_vae(choice: str, checkpoint_path: Path | None, vae_files: Sequence[Path]) -> Path | None:
    """The VAE file the "SD VAE" setting `choice` means for this checkpoint; None for the checkpoint's own VAE.

    "None" -> None; "Automatic" -> `find_vae_near_checkpoint`, else None; anything else -> a listed VAE whose file
    name (or trailing sub-folder/file name) is `choice`, with or without its extension (or `.vae` + extension),
    else `choice` as a path to an existing file; otherwise NetworkError listing the VAEs there are.
    """
    text = choice.strip()
    if text.casefold() == NONE.casefold():
        return None
    if text.casefold() in (AUTOMATIC.casefold(), "auto"):  # "auto": A1111's old config value (`is_automatic`)
        return find_vae_near_checkpoint(checkpoint_path, vae_files)
    found = _find_by_name(text, vae_files)
    if found is not None:
        return found
    as_path = Path(text).expanduser()
    if as_path.is_file():
        return as_path
    names = vae_names(vae_files)
    available = ", ".join(names) if names else "none (no VAE files were found; put them in the VAE folder)"
    raise _error(choice, f"no VAE of that name; choose {AUTOMATIC!r}, {NONE!r} or one of the VAEs there are: "
                               f"{available}")


def _find_by_name(text: str, vae_files: Sequence[Path]) -> Path | None:
    """Exact name (with sub-folders) first, then without extension; each case-sensitively, then ignoring case."""
    parts = PurePath(text.replace("\\", "/")).parts
    if not parts:
        return None
    for fold in (str, str.casefold):
        wanted = [fold(p) for p in parts]
        for exact in (True, False):
            for file in vae_files:
                tail = [fold(p) for p in file.parts[-len(parts):]]
                if len(tail) != len(parts) or tail[:-1] != wanted[:-1]:
                    continue
                names = {tail[-1]} if exact else {fold(PurePath(file.name).stem), fold(_bare_name(file.name))}
                if wanted[-1] in names:
                    return file
    return None

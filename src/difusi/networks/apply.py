"""Merging networks into the loaded model's weights, and taking them out again bit for bit.

A1111's way (`extensions-builtin/Lora/networks.py network_apply_weights`): before sampling, each touched layer's
weight becomes `W0 + sum_i multiplier_i * delta_i` (each network's delta computed on the weight as the networks
before it left it, which matters for DoRA and (IA)^3), so sampling costs nothing extra per step; the original
`W0` of every touched layer is kept and copied back when the set of networks changes. Here:

- the new weights of every touched layer are computed first and only then written, so a network that fails
  (unknown algorithm, wrong shapes) leaves the model exactly as it was;
- only touched layers are saved (one clone each, on the layer's own device and dtype) and restored with `copy_`,
  so removing every network, or going A -> B -> A, gives the original bits back;
- weights are written in place into the layers' own parameter tensors, which is what computes on every path:
  the exact CPU path's `OneDNNLinear` reads `self.weight` on each call, offload hooks move the same tensors;
- the text encoders' cached empty-prompt encoding (`ClipTextEncoder._empty_states`) is dropped whenever their
  weights change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from difusi.errors import NetworkError
from difusi.networks.algorithms import updown
from difusi.networks.files import NetworkTensors, guess_family
from difusi.networks.keys import Target, group_by_module, module_index

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

ATTRIBUTE = "network_state"
"""The LoadedModel attribute holding `MergeState`."""


@dataclass(frozen=True)
class NetworkUse:
    """One network as a job uses it: its tensors, A1111's text-encoder and UNet multipliers, the prompt's name."""

    network: NetworkTensors
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    mentioned_name: str = ""

    @property
    def key(self) -> tuple:
        stat = self.network.file.path.stat()
        return str(self.network.file.path), stat.st_size, stat.st_mtime_ns, self.te_multiplier, self.unet_multiplier


@dataclass
class _Saved:
    target: Target
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class MergeState:
    """What is merged into one loaded model now: the originals of the touched layers and the set's key."""

    index: dict[str, Target]
    saved: dict[int, _Saved] = field(default_factory=dict)
    applied: tuple = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        """Memory held by the saved original weights."""
        return sum(t.numel() * t.element_size() for s in self.saved.values() for t in (s.weight, s.bias) if t is not None)


def merge_state(model: Any) -> MergeState:
    """The model's merge state (created, with the layer-name index, on first use)."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = MergeState(module_index(model))
        setattr(model, ATTRIBUTE, state)
    return state


def apply_networks(model: Any, uses: Sequence[NetworkUse]) -> list[str]:
    """Make `uses` (in order) the networks merged into `model`; [] removes every one. Returns warnings (keys that
    name no layer). Raises NetworkError, leaving the model untouched, for a network that fits no layer or whose
    tensors do not fit the layers they name."""
    state = merge_state(model)
    uses = [use for use in uses if use.te_multiplier != 0 or use.unet_multiplier != 0]  # multiplier 0: disabled
    key = tuple(use.key for use in uses)
    if key == state.applied:
        return list(state.warnings)
    planned, warnings = _plan(model, state, uses)
    _commit(model, state, planned)
    state.applied, state.warnings = key, warnings
    return list(warnings)


def remove_networks(model: Any) -> None:
    """Put back the original weights of every layer a network changed (bit for bit)."""
    if getattr(model, ATTRIBUTE, None) is not None:
        apply_networks(model, [])


def _plan(model: Any, state: MergeState, uses: Sequence[NetworkUse]) -> tuple[dict[int, _Saved], list[str]]:
    """The new (weight, bias) of every touched layer, computed from the original weights; nothing written yet."""
    planned: dict[int, _Saved] = {}
    warnings: list[str] = []
    for use in uses:
        name = use.mentioned_name or use.network.file.name
        _check_family(model, use, name)
        groups, unmatched = group_by_module(use.network.tensors, state.index)
        if not groups:
            raise NetworkError(name, f"matches no layer of the loaded model ({len(unmatched)} keys, e.g. "
                                     f"{', '.join(unmatched[:3])}): it is made for another model family"
                                     f"{_family_hint(use)}")
        misfits: list[str] = []
        for module_key, tensors in groups.items():
            target = state.index[module_key]
            multiplier = use.unet_multiplier if target.is_unet else use.te_multiplier
            if multiplier == 0:
                continue
            current = planned.get(id(target.module)) or _original(state, target)
            try:
                delta_weight, delta_bias = updown(tensors, current.weight, current.bias, module_key)
            except NetworkError as exc:
                if "shape" not in exc.message:
                    raise NetworkError(name, f"layer {module_key}: {exc.message}") from exc
                misfits.append(module_key)
                continue
            planned[id(target.module)] = _Saved(
                target, _add(current.weight, delta_weight, multiplier),
                None if current.bias is None or delta_bias is None else _add(current.bias, delta_bias, multiplier))
        if misfits and len(misfits) == len(groups):
            raise NetworkError(name, f"no layer fits: {len(misfits)} layers have other shapes in the loaded model "
                                     f"(e.g. {misfits[0]}): it is made for another model family{_family_hint(use)}")
        if misfits:
            warnings.append(f"LoRA {name}: {len(misfits)} layers have other shapes than the model's and were left "
                            f"out (e.g. {', '.join(misfits[:3])})")
        if unmatched:
            warnings.append(f"LoRA {name}: {len(unmatched)} keys name no layer of this model and were ignored "
                            f"(e.g. {', '.join(unmatched[:3])})")
    return planned, warnings


def _original(state: MergeState, target: Target) -> _Saved:
    saved = state.saved.get(id(target.module))
    if saved is not None:
        return saved
    bias = getattr(target.module, "bias", None)
    return _Saved(target, target.module.weight.detach(), None if bias is None else bias.detach())


def _add(original: torch.Tensor, delta: torch.Tensor, multiplier: float) -> torch.Tensor:
    merged = original.float() + delta.to(original.device, torch.float32) * multiplier
    return merged.to(original.dtype)


def _commit(model: Any, state: MergeState, planned: dict[int, _Saved]) -> None:
    """Restore the layers no longer touched, save the originals of newly touched ones, write the new weights."""
    text_changed = False
    if getattr(model, "offload_hooks", None) is not None:
        model.offload_hooks.park()  # write into the CPU masters, not into device copies the next unload drops
    with torch.no_grad():
        for module_id in list(state.saved):
            if module_id not in planned:
                saved = state.saved.pop(module_id)
                _write(saved.target.module, saved.weight, saved.bias)
                text_changed |= not saved.target.is_unet
        for module_id, new in planned.items():
            if module_id not in state.saved:
                module = new.target.module
                bias = getattr(module, "bias", None)
                state.saved[module_id] = _Saved(new.target, module.weight.detach().clone(),
                                                None if bias is None else bias.detach().clone())
            _write(new.target.module, new.weight, new.bias)
            text_changed |= not new.target.is_unet
    if text_changed:
        for encoder in model.text_encoders:
            getattr(encoder, "_empty_states", {}).clear()


def _write(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    module.weight.data.copy_(weight)
    if bias is not None and getattr(module, "bias", None) is not None:
        module.bias.data.copy_(bias)


def _check_family(model: Any, use: NetworkUse, name: str) -> None:
    """A file made for another family is refused by name, before any layer is matched: some of SDXL's and SD 1.5's
    layer names coincide, so matching alone could apply half of an SDXL LoRA to an SD 1.5 model."""
    made_for = guess_family({key: tuple(t.shape) for key, t in use.network.tensors.items()}, use.network.metadata)
    family = getattr(model, "family", "unknown")
    if made_for != "unknown" and family in FAMILY_NAMES and made_for != family:
        raise NetworkError(name, f"is a LoRA for {FAMILY_NAMES[made_for]}, and the loaded model is "
                                 f"{FAMILY_NAMES[family]}: it is made for another model family")


def _family_hint(use: NetworkUse) -> str:
    keys = use.network.tensors.keys()
    base = use.network.metadata.get("ss_base_model_version") or use.network.file.base_model
    if base:
        return f" (its metadata says {base})"
    if any(key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for key in keys):
        return " (its keys are SDXL's: two text encoders)"
    return ""

"""Merging networks into the loaded model's weights, and taking them out again bit for bit.

A1111's way (`extensions-builtin/Lora/networks.py network_apply_weights`): before sampling, each touched layer's
weight becomes `W0 + sum_i multiplier_i * delta_i` (each network's delta computed on the weight as the networks
before it left it, which matters for DoRA and (IA)^3), so sampling costs nothing extra per step; the original
`W0` of every touched layer is kept and copied back when the set of networks changes. Here:

- layers are merged one at a time, so the memory held beyond the model is the saved originals of the touched
  layers (one clone each, on the layer's own device and dtype) plus one layer's temporary;
- only touched layers are saved, and restored with `copy_`, so removing every network, or going A -> B -> A, gives
  the original bits back; a saved original is kept in float16 or bfloat16 when that holds it exactly (a float32
  model loaded from a float16 file), halving that memory;
- a network that fails (unknown algorithm, another model family, no layer that fits) leaves the model as it was:
  the layers written so far are restored and the previous set is merged again (the same arithmetic, so the same
  bits);
- weights are written in place into the layers' own parameter tensors, which is what computes on every path: the
  exact CPU path's `OneDNNLinear` reads `self.weight` on each call, its `PackedConv2d` remakes its reordered copy
  when the weight's version counter moved (so writes go through the parameter, never `.data`); offload units are
  parked first so the writes land in their CPU masters;
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
    uses: list[NetworkUse] = field(default_factory=list)
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
    name no layer, layers of other shapes). Raises NetworkError, leaving the model as it was, for a network that is
    made for another family, fits no layer or has tensors no algorithm knows."""
    state = merge_state(model)
    uses = [use for use in uses if use.te_multiplier != 0 or use.unet_multiplier != 0]  # multiplier 0: disabled
    key = tuple(use.key for use in uses)
    if key == state.applied:
        return list(state.warnings)
    plans = [_match(model, state, use) for use in uses]  # names and families first: nothing written yet
    if getattr(model, "offload_hooks", None) is not None:
        model.offload_hooks.park()  # write into the CPU masters, not into device copies the next unload drops
    previous = state.uses
    try:
        warnings = _merge(model, state, plans)
    except NetworkError:
        _merge(model, state, [_match(model, state, use) for use in previous])
        raise
    state.applied, state.uses, state.warnings = key, list(uses), warnings
    return list(warnings)


def remove_networks(model: Any) -> None:
    """Put back the original weights of every layer a network changed (bit for bit)."""
    if getattr(model, ATTRIBUTE, None) is not None:
        apply_networks(model, [])


@dataclass
class _Plan:
    use: NetworkUse
    name: str
    groups: dict[str, dict[str, torch.Tensor]]
    unmatched: list[str]


def _match(model: Any, state: MergeState, use: NetworkUse) -> _Plan:
    """Which layers one network's keys name; a file for another family or one that names no layer is refused."""
    name = use.mentioned_name or use.network.file.name
    _check_family(model, use, name)
    groups, unmatched = group_by_module(use.network.tensors, state.index)
    if not groups:
        raise NetworkError(name, f"matches no layer of the loaded model ({len(unmatched)} keys, e.g. "
                                 f"{', '.join(unmatched[:3])}): it is made for another model family")
    return _Plan(use, name, groups, unmatched)


def _merge(model: Any, state: MergeState, plans: Sequence[_Plan]) -> list[str]:
    """Restore every saved layer, then merge `plans` layer by layer (originals saved on first touch). On a
    NetworkError every layer is back at its original and only the layers still needed stay saved."""
    touched: set[int] = set()
    text_changed = False
    with torch.no_grad():
        for saved in state.saved.values():
            _write(saved.target.module, saved.weight, saved.bias)
            text_changed |= not saved.target.is_unet
        try:
            warnings: list[str] = []
            for plan in plans:
                warnings += _merge_one(state, plan, touched)
                text_changed |= any(not state.index[key].is_unet for key in plan.groups)
        except NetworkError:
            for module_id in touched:
                saved = state.saved[module_id]
                _write(saved.target.module, saved.weight, saved.bias)
            touched.clear()
            raise
        finally:
            for module_id in [module_id for module_id in state.saved if module_id not in touched]:
                del state.saved[module_id]  # restored above and not needed by this set
            if text_changed:
                for encoder in model.text_encoders:
                    getattr(encoder, "_empty_states", {}).clear()
    return warnings


def _merge_one(state: MergeState, plan: _Plan, touched: set[int]) -> list[str]:
    """Merge one network into the layers it names (each on the weight as the networks before it left it)."""
    use, misfits = plan.use, []
    for module_key, tensors in plan.groups.items():
        target = state.index[module_key]
        multiplier = use.unet_multiplier if target.is_unet else use.te_multiplier
        if multiplier == 0:
            continue
        module = target.module
        bias = getattr(module, "bias", None)
        try:
            delta_weight, delta_bias = updown(tensors, module.weight.detach(), None if bias is None else bias.detach(),
                                              module_key)
        except NetworkError as exc:
            if "shape" not in exc.message:
                raise NetworkError(plan.name, f"layer {module_key}: {exc.message}") from exc
            misfits.append(module_key)
            continue
        if id(module) not in state.saved:
            state.saved[id(module)] = _Saved(target, _compact_copy(module.weight.detach()),
                                             None if bias is None else _compact_copy(bias.detach()))
        touched.add(id(module))
        _write(module, _add(module.weight.detach(), delta_weight, multiplier),
               None if bias is None or delta_bias is None else _add(bias.detach(), delta_bias, multiplier))
    if misfits and len(misfits) == len(plan.groups):
        raise NetworkError(plan.name, f"no layer fits: {len(misfits)} layers have other shapes in the loaded model "
                                      f"(e.g. {misfits[0]}): it is made for another model family")
    warnings = []
    if misfits:
        warnings.append(f"LoRA {plan.name}: {len(misfits)} layers have other shapes than the model's and were left "
                        f"out (e.g. {', '.join(misfits[:3])})")
    if plan.unmatched:
        warnings.append(f"LoRA {plan.name}: {len(plan.unmatched)} keys name no layer of this model and were ignored "
                        f"(e.g. {', '.join(plan.unmatched[:3])})")
    return warnings


def _compact_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in the narrowest float dtype that holds every value exactly (float16, then bfloat16), else
    a plain clone. A float32 model loaded from a float16 file (most checkpoints) is exactly float16 inside, so its
    saved originals take half the memory, and `copy_` back restores the same bits."""
    if tensor.dtype == torch.float32:
        for narrow in (torch.float16, torch.bfloat16):
            candidate = tensor.to(narrow)
            if torch.equal(candidate.to(tensor.dtype), tensor):
                return candidate
    return tensor.clone()


def _add(original: torch.Tensor, delta: torch.Tensor, multiplier: float) -> torch.Tensor:
    merged = original.float() + delta.to(original.device, torch.float32) * multiplier
    return merged.to(original.dtype)


def _write(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # Through the parameter, not `.data`: the write must bump the tensor's version counter, which the exact path's
    # reordered convolution weights (`difusi.speed.packed_conv`) check to know they are stale.
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None and getattr(module, "bias", None) is not None:
            module.bias.copy_(bias)


def _check_family(model: Any, use: NetworkUse, name: str) -> None:
    """A file made for another family is refused by name, before any layer is matched: some of SDXL's and SD 1.5's
    layer names coincide, so matching alone could apply half of an SDXL LoRA to an SD 1.5 model."""
    made_for = guess_family({key: tuple(t.shape) for key, t in use.network.tensors.items()}, use.network.metadata)
    family = getattr(model, "family", "unknown")
    if made_for != "unknown" and family in FAMILY_NAMES and made_for != family:
        raise NetworkError(name, f"is a LoRA for {FAMILY_NAMES[made_for]}, and the loaded model is "
                                 f"{FAMILY_NAMES[family]}: it is made for another model family")

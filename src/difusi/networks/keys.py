"""Which layer of the loaded model a LoRA file's key names: kohya, LDM-style, diffusers and PEFT spellings.

Spellings in the wild (all accepted, for the UNet and each text encoder):

- kohya / A1111: `lora_unet_<path with _>` where the path is diffusers' (`down_blocks_0_attentions_0_proj_in`) or
  the original LDM one (`input_blocks_1_1_proj_in`; kohya's SDXL LoRAs always use it), `lora_te_<path>` (SD1/SD2)
  and `lora_te1_` / `lora_te2_` (SDXL's CLIP-L and bigG), the prefixes coming from the family table;
  parameters after the first dot (`.lora_down.weight`, `.alpha`, `.hada_w1_a`, ...);
- diffusers / PEFT: dotted module paths with a component prefix (`unet.`, `text_encoder.`, `text_encoder_2.`; the
  UNet's also bare, as the old attention-processor files), parameters `lora_A.weight` / `lora_B.weight`,
  `lora.down.weight` / `lora.up.weight`, `lora_linear_layer.down.weight`, and the old processor names
  `attn1.processor.to_q_lora.down.weight`.

Parameter names are normalized to kohya's (`lora_down.weight`, `lora_up.weight`) before the algorithms see them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from difusi.models.convert import unet_ldm_module_names
from difusi.models.families import spec_of

TARGET_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
"""Layers a network may change (OneDNNLinear, the exact CPU path's linear, is an nn.Linear)."""

UNET = "unet"

_DOTTED_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "base_model.model.")
_PARAMETER_ALIASES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_A.alpha": "alpha",
}
_DOTTED_PARAMETERS = tuple(sorted((*_PARAMETER_ALIASES, "lora_down.weight", "lora_up.weight", "lora_mid.weight",
                                    "alpha", "dora_scale"), key=len, reverse=True))
"""Parameter names of dotted keys, longest first (the longest one a key ends with decides)."""
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")


@dataclass(frozen=True)
class Target:
    """One layer a network can change: which network it belongs to ("unet", or the text encoder's index) and its
    module path there."""

    component: str | int
    path: str
    module: torch.nn.Module

    @property
    def is_unet(self) -> bool:
        return self.component == UNET


def module_index(model: Any) -> dict[str, Target]:
    """Every name a LoRA file may use for a layer of `model` -> that layer (kohya, LDM and dotted spellings)."""
    spec = spec_of(model)
    index: dict[str, Target] = {}
    unet_layers = {path: module for path, module in model.unet.named_modules() if isinstance(module, TARGET_TYPES)}
    ldm = unet_ldm_module_names(unet_layers, model.unet_config or dict(model.unet.config))
    for path, module in unet_layers.items():
        target = Target(UNET, path, module)
        for name in (path, f"unet.{path}", f"base_model.model.{path}"):
            index[name] = target
        index[spec.lora_unet_prefix + path.replace(".", "_")] = target
        if path in ldm:
            index[spec.lora_unet_prefix + ldm[path].replace(".", "_")] = target
    for number, encoder in enumerate(model.text_encoders):
        prefix = spec.text_encoders[number].lora_prefix if number < len(spec.text_encoders) else f"lora_te{number + 1}_"
        dotted = "text_encoder." if number == 0 else f"text_encoder_{number + 1}."
        for path, module in encoder.model.named_modules():
            if isinstance(module, TARGET_TYPES):
                target = Target(number, path, module)
                # kohya and diffusers name CLIP's layers from `CLIPTextModel.text_model` (transformers 4); the
                # transformers 5 model has no `text_model` level, so both spellings name the same layer.
                full = path if path.startswith("text_model.") else f"text_model.{path}"
                for spelled in {path, full}:
                    index[prefix + spelled.replace(".", "_")] = target
                    index[dotted + spelled] = target
    return index


def split_key(key: str, index: Mapping[str, Target]) -> tuple[str, str] | None:
    """(module name, normalized parameter name) of one file key, or None when no layer of the model has that name.

    kohya keys split at the first dot; dotted keys at the longest module path the model has."""
    if not key.startswith(_DOTTED_PREFIXES) and "." in key and key.split(".", 1)[0] in index:
        module, parameter = key.split(".", 1)
        return module, _PARAMETER_ALIASES.get(parameter, parameter)
    key = _OLD_PROCESSOR.sub(lambda match: f".{match.group(1)}{'.0' if match.group(1) == 'to_out' else ''}.lora.", key)
    for parameter in _DOTTED_PARAMETERS:
        if key.endswith("." + parameter) and (module := key[: -len(parameter) - 1]) in index:
            return module, _PARAMETER_ALIASES.get(parameter, parameter)
    return None


def group_by_module(tensors: Mapping[str, torch.Tensor], index: Mapping[str, Target]
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """File tensors grouped per layer name ({module: {parameter: tensor}}) and the keys that name no layer."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key, index)
        if split is None:
            unmatched.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    return groups, unmatched

"""`GraphUNet`: a compiled UNet graph called exactly like `model.unet`, kept in step with the torch UNet's weights.

Call: `graph(x, t, encoder_hidden_states=..., added_cond_kwargs=None) -> UNetOutput(sample)`, float32 on the CPU,
as diffusers' `UNet2DConditionModel` (SDXL's `added_cond_kwargs={"text_embeds", "time_ids"}`; 9-channel inpainting
inputs are part of the exported config). A call the graph cannot take (a latent side not divisible by the UNet's
downsampling, another dtype or device, extra keyword arguments) runs on the torch module instead, so nothing a job
can do fails on the graph.

Weights: the cached graph holds the checkpoint file's weights. LoRA merges (`difusi.networks.apply`) write into the
torch UNet's parameters in place and record what they changed on `model.network_state` (`MergeState.applied`: the
set's key; `MergeState.saved`: the touched layers). `sync(model)` compares the key with the one the compiled graph was
built for; on a change it rebuilds the runtime's session from the same cached file with the touched layers'
parameters handed over from torch memory (ORT `add_initializer`, OpenVINO `Constant` replacement): no re-export,
and unchanged weights are never re-uploaded (measured cost of a switch: docs/bench/graph-backend.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difusi.speed.graph.backends import Runner, build_runner
from difusi.speed.graph.cache import Entry

NO_NETWORKS: tuple = ()


@dataclass
class UNetOutput:
    sample: torch.Tensor


def weights_key(model: Any) -> tuple:
    """What is merged into the UNet now (`MergeState.applied`), () for the file's own weights."""
    state = getattr(model, "network_state", None)
    return tuple(getattr(state, "applied", ()) or ())


def changed_parameters(model: Any) -> dict[str, torch.Tensor]:
    """Graph initializer name -> the torch parameter, for every UNet layer a merged network changed."""
    state = getattr(model, "network_state", None)
    saved = getattr(state, "saved", None) or {}
    if not saved:
        return {}
    touched = {module_id for module_id, record in saved.items() if getattr(record.target, "is_unet", True)}
    changed = {}
    for path, module in model.unet.named_modules():
        if id(module) in touched:
            for name, parameter in module.named_parameters(recurse=False):
                changed[f"unet.{path}.{name}"] = parameter
    return changed


class GraphUNet:
    """The compiled graph of one model's UNet on one backend (see the module docstring)."""

    def __init__(self, model: Any, backend: str, entry: Entry, precision: str = "fp32"):
        self.torch_unet = model.unet  # not the model itself: no reference cycle keeps a freed model's memory
        self.backend = backend
        self.precision = precision
        """`difusi.speed.graph.precision`: fp32 (exact), bf16 (compile hint) or int8 (compressed weights entry)."""
        self.entry = entry
        self.config = model.unet.config
        self.sdxl = getattr(self.config, "addition_embed_type", None) == "text_time"
        self.factor = 2 ** (len(self.config.block_out_channels) - 1)
        self.runner: Runner | None = None
        self.key: tuple | None = None
        self.overridden: frozenset[str] = frozenset()
        self.builds = 0
        self.torch_calls = 0

    def sync(self, model: Any) -> float:
        """Make the compiled graph compute with the torch UNet's current weights; returns seconds spent (0 if none)."""
        key = weights_key(model)
        if self.runner is not None and key == self.key:
            return 0.0
        changed = changed_parameters(model)
        if self.runner is not None and not changed and not self.overridden:
            self.key = key  # e.g. a LoRA that changed only the text encoders
            return 0.0
        if self.runner is not None:
            print(f"difusi: updating the {self.backend} UNet graph's weights ({len(changed)} tensors)",
                  file=sys.stderr, flush=True)
        self.runner = None  # free the old session before the new one is built
        if changed and self.precision == "int8":
            raise KeyError(f"a merged network changes {len(changed)} UNet weights, which the int8-compressed graph "
                           "cannot take (its weights are compressed constants)")
        self.runner = build_runner(self.backend, self.entry.graph_path, changed, self.precision)
        self.key, self.overridden = key, frozenset(changed)
        self.builds += 1
        return self.runner.build_seconds

    def takes(self, x: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        return (
            not kwargs and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
            and x.shape[2] % self.factor == 0 and x.shape[3] % self.factor == 0
        )

    def __call__(self, x: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor | None = None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> UNetOutput:
        if self.runner is None or not self.takes(x, kwargs) or (self.sdxl and not added_cond_kwargs):
            self.torch_calls += 1
            return self.torch_unet(x, t, encoder_hidden_states=encoder_hidden_states,
                                   added_cond_kwargs=added_cond_kwargs, **kwargs)
        batch = x.shape[0]
        timestep = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        if timestep.numel() != batch:
            timestep = timestep.expand(batch)
        feeds = {"sample": _array(x), "timestep": _array(timestep), "encoder_hidden_states": _array(encoder_hidden_states)}
        if self.sdxl:
            feeds["text_embeds"] = _array(added_cond_kwargs["text_embeds"])
            feeds["time_ids"] = _array(added_cond_kwargs["time_ids"])
        return UNetOutput(torch.from_numpy(self.runner.run(feeds)))

    def parameters(self):
        """The torch UNet's parameters (callers read the dtype and device from the first)."""
        return self.torch_unet.parameters()


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())

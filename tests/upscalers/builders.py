"""Random-weight upscaler state dicts in the file layouts of the real models, built from shapes alone.

Weights are drawn with std 1/sqrt(fan_in) (He-like, scaled down) so activations stay O(1) through deep nets and the
uint8 output is not saturated everywhere: a test comparing two implementations must see real values.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def _conv(state: dict, name: str, out_ch: int, in_ch: int, generator: torch.Generator, gain: float = 1.0) -> None:
    std = gain / math.sqrt(in_ch * 9)
    state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
    state[f"{name}.bias"] = torch.randn(out_ch, generator=generator) * 0.01


def rrdbnet_basicsr(num_feat: int = 16, num_blocks: int = 2, num_grow: int = 32, scale: int = 4, seed: int = 0,
                    num_out: int = 3) -> dict[str, torch.Tensor]:
    """BasicSR / Real-ESRGAN layout (conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2, conv_hr, conv_last).
    scale 4: plain RGB input; 2: pixel-unshuffle 2 (12 input channels); 1: unshuffle 4 (48), as Real-ESRGAN."""
    generator = torch.Generator().manual_seed(seed)
    in_nc = {4: 3, 2: 12, 1: 48, 8: 3}[scale]
    ups = 3 if scale == 8 else 2
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv_first", num_feat, in_nc, generator)
    for block in range(num_blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                out_ch = num_feat if index == 5 else num_grow
                _conv(state, f"body.{block}.rdb{rdb}.conv{index}", out_ch, num_feat + (index - 1) * num_grow, generator)
    _conv(state, "conv_body", num_feat, num_feat, generator)
    for up in range(1, ups + 1):
        _conv(state, f"conv_up{up}", num_feat, num_feat, generator)
    _conv(state, "conv_hr", num_feat, num_feat, generator)
    _conv(state, "conv_last", num_out, num_feat, generator)
    return state


def to_old_esrgan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in the original ESRGAN repository's flattened nn.Sequential names (`model.N`)."""
    blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("body."))
    ups = sorted(int(key[len("conv_up")]) for key in state if key.startswith("conv_up") and key.endswith(".weight"))
    old: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name, kind = key.rsplit(".", 1)
        if name == "conv_first":
            old[f"model.0.{kind}"] = value
        elif name.startswith("body."):
            _, block, rdb, conv = name.split(".")
            old[f"model.1.sub.{block}.RDB{rdb[3:]}.{conv}.0.{kind}"] = value
        elif name == "conv_body":
            old[f"model.1.sub.{blocks}.{kind}"] = value
        elif name.startswith("conv_up"):
            old[f"model.{3 * int(name[7:])}.{kind}"] = value
        elif name == "conv_hr":
            old[f"model.{3 * len(ups) + 2}.{kind}"] = value
        elif name == "conv_last":
            old[f"model.{3 * len(ups) + 4}.{kind}"] = value
    return old


def srvgg_compact(num_feat: int = 16, num_conv: int = 4, scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN compact layout: body.0 conv, body.1 PReLU, ..., body.{2n+2} last conv (3 * scale^2 channels)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "body.0", num_feat, 3, generator)
    state["body.1.weight"] = torch.rand(num_feat, generator=generator) * 0.3
    for index in range(num_conv):
        _conv(state, f"body.{2 * index + 2}", num_feat, num_feat, generator)
        state[f"body.{2 * index + 3}.weight"] = torch.rand(num_feat, generator=generator) * 0.3
    _conv(state, f"body.{2 * num_conv + 2}", 3 * scale * scale, num_feat, generator, gain=0.3)
    return state


def write_model(path: Path, state: dict[str, torch.Tensor], wrap: str | None = None) -> Path:
    """A model file as the real ones are saved: safetensors, or torch.save of a plain (or wrapped) state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path

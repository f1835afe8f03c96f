"""Layers shared by difusi's own Stable Diffusion UNet and VAE (`difusi.models.unet`, `difusi.models.autoencoder`).

The networks are those of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", CompVis `ldm/modules/diffusionmodules/openaimodel.py`, `model.py` and `ldm/modules/attention.py`),
laid out exactly as diffusers lays them out: every class here keeps the attribute names (and so the state-dict
keys) of its diffusers counterpart, named in its docstring, so checkpoints, LDM <-> diffusers key conversion and LoRA
layer names work unchanged. Only `torch` and the standard library are imported: importing diffusers costs seconds.

Attention is PyTorch's fused `F.scaled_dot_product_attention`, as diffusers' `AttnProcessor2_0` computes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("difusi.models")

# diffusers' `get_activation` names (diffusers/models/activations.py ACT2CLS).
_ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU,
                                            "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    """A fresh activation module by diffusers' name ("silu", "swish", "gelu", "mish", "relu")."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation function {name!r}; known: {sorted(_ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------- config


class Config(dict):
    """A read-only config dict whose keys are also attributes (`cfg.in_channels`), like diffusers' `FrozenDict`.

    Missing attributes raise AttributeError, so `hasattr(cfg, "x")` works as with diffusers' configs.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _frozen(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a model config is read-only; use the model's register_to_config(...)")

    __setattr__ = __setitem__ = __delitem__ = __delattr__ = _frozen
    update = pop = popitem = setdefault = clear = _frozen  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:  # copy/deepcopy/pickle rebuild from a plain dict, not item by item
        return (type(self), (dict(self),))


class ConfiguredModule(nn.Module):
    """`nn.Module` with the parts of diffusers' `ModelMixin` + `ConfigMixin` difusi uses: `from_config`, `config`,
    `register_to_config`, `dtype`, `device`.

    Subclasses declare `DEFAULTS` (diffusers' constructor defaults, so `dict(model.config)` has the keys diffusers'
    has), `INERT` (keys accepted but without effect on these modules) and `FIXED` (keys whose only supported value
    is the default: anything else raises instead of silently building a different network).
    """

    DEFAULTS: Mapping[str, Any] = {}
    FIXED: frozenset[str] = frozenset()

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        object.__setattr__(self, "_difusi_config", self._resolve({**(config or {}), **kwargs}))

    @classmethod
    def _resolve(cls, given: Mapping[str, Any]) -> Config:
        merged = dict(cls.DEFAULTS)
        for key, value in given.items():
            if key.startswith("_"):
                continue  # diffusers bookkeeping: _class_name, _diffusers_version, _use_default_values, ...
            if key not in cls.DEFAULTS:
                log.warning("%s: ignoring unknown config key %r (as diffusers does)", cls.__name__, key)
                continue
            if key in cls.FIXED and value != cls.DEFAULTS[key]:
                raise ValueError(f"{cls.__name__}: {key}={value!r} is not supported (only {cls.DEFAULTS[key]!r})")
            merged[key] = value
        return Config(merged)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ConfiguredModule:
        """Build from a config dict (diffusers' `from_config` spelling; unknown and `_`-keys are ignored)."""
        return cls({**config, **overrides})

    @property
    def config(self) -> Config:
        return self._difusi_config

    def register_to_config(self, **values: Any) -> None:
        """Record new config values (e.g. `scaling_factor`); the modules themselves are not rebuilt."""
        object.__setattr__(self, "_difusi_config", Config({**self._difusi_config, **values}))

    @property
    def dtype(self) -> torch.dtype:
        return first_dtype(self)

    @property
    def device(self) -> torch.device:
        return first_device(self)


def first_dtype(module: nn.Module) -> torch.dtype:
    """A module's dtype as diffusers and transformers report it: its first floating-point tensor's
    (diffusers' `get_parameter_dtype`); float32 when it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def first_device(module: nn.Module) -> torch.device:
    """A module's device: its first tensor's (the CPU when it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def per_level(value: Any, levels: int) -> list[Any]:
    """An int (or None) for every level, or a per-level list as given (diffusers broadcasts the same way)."""
    if isinstance(value, Iterable) and not isinstance(value, str):
        value = list(value)
        if len(value) != levels:
            raise ValueError(f"expected {levels} per-level values, got {value}")
        return value
    return [value] * levels


# ----------------------------------------------------------------------------- timesteps


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, float32 [N, dim] (DDPM, Ho et al. 2020).

    Frequencies exp(-ln(max_period) * i / (half - freq_shift)); [sin, cos], or [cos, sin] with `flip_sin_to_cos`
    (LDM's `timestep_embedding`, diffusers' `get_timestep_embedding`: SD uses flip=True, shift=0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else
                    [torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers `embeddings.Timesteps`); returns float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act) (diffusers `embeddings.TimestepEmbedding`, LDM `time_embed`)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", post_act_fn: str | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn else None

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


# ----------------------------------------------------------------------------- convolutional blocks


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, time embedding added between, 1x1 `conv_shortcut` when the width changes.

    LDM's `ResBlock` (UNet) / `ResnetBlock` (VAE); diffusers `resnet.ResnetBlock2D` with `time_embedding_norm`
    "default" (the only kind SD uses). `temb_channels=None` (the VAE) leaves out `time_emb_proj`.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, non_linearity: str = "silu",
                 output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(non_linearity)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None and temb is not None:
            hidden = hidden + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        return (shortcut + hidden) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (LDM `Downsample`; diffusers `downsampling.Downsample2D` with `name="op"`, so the weight is
    `conv`). `padding=0` pads right/bottom by one first, as the LDM VAE does (odd sizes round down there, up in the
    UNet's padding-1 convs)."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `output_size`) then a 3x3 conv (LDM `Upsample`, diffusers `Upsample2D`)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        # diffusers' workarounds: nearest upsampling of non-contiguous input fails for batches >= 64 and for
        # outputs over 2**31 elements in some PyTorch builds.
        scale = 2 if output_size is None else max(f / s for f, s in zip(output_size, hidden_states.shape[-2:], strict=True))
        if hidden_states.shape[0] >= 64 or hidden_states.numel() * scale > 2**31:
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:  # the UNet passes the skip connection's size when the input is not a multiple of 2**levels
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head (cross-)attention with `to_q`/`to_k`/`to_v`/`to_out.0` (diffusers `attention_processor.Attention`
    computed as `AttnProcessor2_0`: `F.scaled_dot_product_attention`, scale 1/sqrt(head width)).

    Used by the UNet's transformer blocks (LDM `CrossAttention`, no q/k/v bias) and, with `norm_num_groups`,
    `residual_connection=True` and biases, as the VAE's single-head spatial self-attention (LDM `AttnBlock`):
    then it takes [B, C, H, W] input, normalises it with `group_norm` and adds the input back. `upcast_attention`
    /`upcast_softmax` are not arguments: the fused kernel accumulates in float32 already, and diffusers'
    AttnProcessor2_0 ignores them too.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, bias: bool = False, out_bias: bool = True, norm_num_groups: int | None = None,
                 eps: float = 1e-5, residual_connection: bool = False, rescale_output_factor: float = 1.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.is_cross_attention = cross_attention_dim is not None
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        query = self.to_q(hidden_states)
        key = self.to_k(context)
        value = self.to_v(context)
        head_dim = key.shape[-1] // self.heads
        query, key, value = (t.view(batch, -1, self.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attention_mask is not None:  # a bias broadcast over heads and queries: [B, 1 or Q, K]
            attention_mask = attention_mask.view(batch, 1, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim).to(query.dtype)
        out = self.to_out[1](self.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): `proj` to twice the width, value * gelu(gate) (LDM and diffusers `GEGLU`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """`net` = [GEGLU, Dropout, Linear], width x4 (LDM `FeedForward(glu=True)`, diffusers `attention.FeedForward`:
    hence the LoRA names `ff.net.0.proj` and `ff.net.2`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (`attn1`), cross-attention on the text (`attn2`), GEGLU feed-forward (`ff`), each
    with a residual; LayerNorms `norm1..3` (LDM `BasicTransformerBlock`, diffusers `attention.BasicTransformerBlock`
    with norm_type "layer_norm"). The class name is diffusers' on purpose: `difusi.speed.tome` finds blocks by it.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, cross_attention_dim: int | None,
                 dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, None, num_attention_heads, attention_head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, cross_attention_dim, num_attention_heads, attention_head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # attn1 is called with the hidden states alone: token merging (difusi.speed.tome) wraps its forward and
        # recognises self-attention by `encoder_hidden_states is None`.
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states,
                                   attention_mask=encoder_attention_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in` (1x1 conv in SD1, linear in SD2/SDXL), `transformer_blocks`, `proj_out`, residual
    (LDM `SpatialTransformer`, diffusers `transformers.transformer_2d.Transformer2DModel` on continuous input)."""

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim, dropout)
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        inner = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, encoder_attention_mask)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual

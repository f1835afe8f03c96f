"""difusi's own Stable Diffusion VAE: a drop-in for diffusers' `AutoencoderKL`, importing nothing but torch.

The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1 and appendix G; CompVis
`ldm/models/autoencoder.py` `AutoencoderKL` with `ldm/modules/diffusionmodules/model.py` `Encoder`/`Decoder`), the
same network SDXL uses with retrained weights (Podell et al. 2023). Module names and nesting follow diffusers
(`diffusers/models/autoencoders/autoencoder_kl.py`, `vae.py`, and the `DownEncoderBlock2D` / `UpDecoderBlock2D` /
`UNetMidBlock2D` blocks), so `state_dict()` keys and shapes are diffusers' for the same config, and the
`encode(x).latent_dist` / `decode(z).sample` interface is diffusers'.

Like diffusers' AutoencoderKL, the model itself is never called: `encode` and `decode` call `encoder`,
`quant_conv`, `post_quant_conv` and `decoder` (the memory-offload hooks of `difusi.models.offload` rely on that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difusi.models.layers import Attention, ConfiguredModule, Downsample2D, ResnetBlock2D, Upsample2D, activation

__all__ = ["AutoencoderKL", "AutoencoderKLOutput", "DecoderOutput", "DiagonalGaussianDistribution"]

_EPS = 1e-6  # every GroupNorm of the LDM VAE (diffusers hard-codes it too)


def randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise as diffusers' `randn_tensor` draws it: on the generator's device (a CPU generator gives the same
    numbers for every target device), one generator per batch element when given a list."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    where = generator.device if generator is not None else device
    if generator is not None and where.type != torch.device(device).type and where.type != "cpu":
        raise ValueError(f"cannot draw a {device} tensor from a {where.type} generator")
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)), log-variance clamped to [-30, 20] (LDM `distributions.py`,
    diffusers `vae.DiagonalGaussianDistribution`)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        noise = randn(tuple(self.mean.shape), generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to `other` (default: the standard normal), summed over C, H, W."""
        if self.deterministic:
            return torch.tensor([0.0])
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])


@dataclass
class AutoencoderKLOutput:
    """`encode`'s result: `.latent_dist`, the posterior."""

    latent_dist: DiagonalGaussianDistribution

    def __getitem__(self, key: int | str) -> DiagonalGaussianDistribution:
        if key in (0, "latent_dist"):
            return self.latent_dist
        raise KeyError(key)


@dataclass
class DecoderOutput:
    """`decode`'s result: `.sample`, images in about [-1, 1]."""

    sample: torch.Tensor

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key in (0, "sample"):
            return self.sample
        raise KeyError(key)


# ----------------------------------------------------------------------------- blocks


class DownEncoderBlock2D(nn.Module):
    """Resnets (no time embedding) then a stride-2 conv padded right/bottom (LDM `Encoder.down[i]`)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, non_linearity=act)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels, padding=0)]) if add_downsample \
            else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """Resnets then nearest-2x + conv (LDM `Decoder.up[i]`, diffusers `UpDecoderBlock2D`)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, non_linearity=act)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, temb: None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, single-head spatial self-attention, resnet (LDM `mid.block_1/attn_1/block_2`; diffusers
    `UNetMidBlock2D` with one layer). `add_attention=False` keeps the `None` placeholder diffusers keeps."""

    def __init__(self, channels: int, groups: int, act: str, add_attention: bool = True):
        super().__init__()
        attention = Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=_EPS,
                              residual_connection=True) if add_attention else None
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=None, groups=groups, eps=_EPS,
                          non_linearity=act)
            for _ in range(2)
        ])

    def forward(self, hidden_states: torch.Tensor, temb: None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, None)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            if attention is not None:
                hidden_states = attention(hidden_states)
            hidden_states = resnet(hidden_states, None)
        return hidden_states


class Encoder(nn.Module):
    """conv_in, down blocks, mid block, GroupNorm-act-conv_out to 2 x latent channels (mean, logvar)
    (LDM `Encoder` with double_z; diffusers `vae.Encoder`)."""

    def __init__(self, in_channels: int, latent_channels: int, channels: list[int], layers_per_block: int,
                 groups: int, act: str, mid_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], layers_per_block, groups, act,
                               add_downsample=i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_act = nn.SiLU()  # diffusers hard-codes SiLU here whatever act_fn says
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (one resnet more per level than the encoder), GroupNorm-act-conv_out
    (LDM `Decoder`; diffusers `vae.Decoder` with norm_type "group")."""

    def __init__(self, latent_channels: int, out_channels: int, channels: list[int], layers_per_block: int,
                 groups: int, act: str, mid_attention: bool):
        super().__init__()
        reverse = channels[::-1]
        self.conv_in = nn.Conv2d(latent_channels, channels[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before the mid block, as in diffusers
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act, mid_attention)
        for i in range(len(channels)):
            self.up_blocks.append(UpDecoderBlock2D(reverse[max(i - 1, 0)], reverse[i], layers_per_block + 1, groups,
                                                   act, add_upsample=i < len(channels) - 1))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, latent_embeds: None = None) -> torch.Tensor:
        sample = self.conv_in(sample)
        sample = self.mid_block(sample)
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


# ----------------------------------------------------------------------------- the autoencoder


class AutoencoderKL(ConfiguredModule):
    """The SD VAE (diffusers `AutoencoderKL`'s module tree and interface): `encode(x).latent_dist` (with `.sample`,
    `.mean`, `.mode()`) and `decode(z).sample`, in unscaled latent units (multiply by `config.scaling_factor` for
    the UNet). `use_slicing` decodes a batch one image at a time; tiling is difusi's own (`difusi.vae`), so
    `use_tiling` is kept False."""

    # diffusers 0.42's AutoencoderKL constructor defaults.
    DEFAULTS: Mapping[str, Any] = {
        "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
        "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
        "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    }

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        channels = list(c.block_out_channels)
        if any(t != "DownEncoderBlock2D" for t in c.down_block_types) or \
                any(t != "UpDecoderBlock2D" for t in c.up_block_types):
            raise ValueError("AutoencoderKL: only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported")
        if not (len(c.down_block_types) == len(c.up_block_types) == len(channels)):
            raise ValueError("AutoencoderKL: block types and block_out_channels must have equal lengths")
        self.encoder = Encoder(c.in_channels, c.latent_channels, channels, c.layers_per_block, c.norm_num_groups,
                               c.act_fn, c.mid_block_add_attention)
        self.decoder = Decoder(c.latent_channels, c.out_channels, channels, c.layers_per_block, c.norm_num_groups,
                               c.act_fn, c.mid_block_add_attention)
        latent = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        activation(c.act_fn)  # fail early on an unknown activation name

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _check_tiling(self) -> None:
        if self.use_tiling:
            raise NotImplementedError("AutoencoderKL: use_tiling is not supported; difusi.vae.decode_latents tiles")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[Any]:
        """Images [B, C, H, W] in [-1, 1] -> the latent posterior."""
        self._check_tiling()
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(piece) for piece in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple[Any]:
        """Unscaled latents [B, latent_channels, h, w] -> images [B, C, 8h, 8w] (for a 4-level VAE)."""
        self._check_tiling()
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(piece) for piece in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[Any]:
        """Encode then decode (diffusers' `AutoencoderKL.forward`): the posterior's mode, or a sample."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

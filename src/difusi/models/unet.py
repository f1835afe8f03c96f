"""difusi's own Stable Diffusion UNet: a drop-in for diffusers' `UNet2DConditionModel` on SD1, SD2, SDXL and
difusi-mini configs, importing nothing but torch.

The network is LDM's conditional UNet (Rombach et al. 2022, CompVis `ldm/modules/diffusionmodules/openaimodel.py`
`UNetModel` with `SpatialTransformer`s), and for SDXL the same UNet with fewer attention levels, deeper transformers
and the size/crop "text_time" added embedding (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis"). Module names, nesting and construction follow diffusers
(`diffusers/models/unets/unet_2d_condition.py` and `unet_2d_blocks.py`) exactly, so `state_dict()` keys and shapes
are diffusers' for the same config dict and every key conversion and LoRA layer name keeps working.

`UNet(config)` (or `UNet.from_config(config)`) takes the config dict difusi's loader builds for diffusers; keys
that would select parts SD never uses (class embeddings, encoder projections, dual attention, ...) raise unless
they have their default value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difusi.models.layers import (
    BasicTransformerBlock,  # noqa: F401  (re-exported: `difusi.speed.tome` finds transformer blocks by this class)
    ConfiguredModule,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Transformer2DModel,
    Upsample2D,
    activation,
    per_level,
)

__all__ = ["UNet", "UNet2DConditionOutput", "BasicTransformerBlock"]


@dataclass
class UNet2DConditionOutput:
    """The UNet's prediction (`.sample`; also `out[0]` / `out["sample"]` as diffusers' BaseOutput allows)."""

    sample: torch.Tensor

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key in (0, "sample"):
            return self.sample
        raise KeyError(key)


# ----------------------------------------------------------------------------- blocks


class _Level(nn.Module):
    """One resolution level: (transformers,) resnets, then a resampler, registered in diffusers' order so that even
    `state_dict()` key order matches. Subclasses with `has_cross_attention` get one transformer per resnet."""

    has_cross_attention = False

    def _add_transformers(self, count: int, channels: int, groups: int, dropout: float, heads: int = 1,
                          depth: Any = 1, context: int | None = None, linear: bool = False) -> None:
        if self.has_cross_attention:
            depths = per_level(depth, count)  # an int for all layers of the level, or one per layer
            self.attentions = nn.ModuleList([
                Transformer2DModel(heads, channels // heads, channels, depths[i], context, groups, linear, dropout)
                for i in range(count)
            ])


class DownBlock2D(_Level):
    """Resnets then a stride-2 downsampler (LDM `input_blocks` without attention; diffusers `DownBlock2D`)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, eps: float,
                 act: str, groups: int, add_downsample: bool, downsample_padding: int, dropout: float,
                 **attention: Any):
        super().__init__()
        self._add_transformers(num_layers, out_channels, groups, dropout, **attention)
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=temb_channels, groups=groups, eps=eps, dropout=dropout, non_linearity=act)
            for i in range(num_layers)
        ])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, downsample_padding)])
                             if add_downsample else None)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        attentions = self.attentions if self.has_cross_attention else [None] * len(self.resnets)
        for resnet, attention in zip(self.resnets, attentions, strict=True):
            hidden_states = resnet(hidden_states, temb)
            if attention is not None:
                hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
            outputs += (hidden_states,)  # skip connections for the up path
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class CrossAttnDownBlock2D(DownBlock2D):
    """Resnet + transformer pairs, then a downsampler (LDM `input_blocks` with `SpatialTransformer`s; diffusers
    `CrossAttnDownBlock2D`)."""

    has_cross_attention = True


class UpBlock2D(_Level):
    """Resnets over [hidden, skip] concatenations, then a nearest-2x upsampler (LDM `output_blocks`; diffusers
    `UpBlock2D`)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, eps: float, act: str, groups: int, add_upsample: bool, dropout: float,
                 **attention: Any):
        super().__init__()
        self._add_transformers(num_layers, out_channels, groups, dropout, **attention)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            own = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(in_channels=own + skip, out_channels=out_channels, temb_channels=temb_channels,
                                         groups=groups, eps=eps, dropout=dropout, non_linearity=act))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: Any = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None) -> torch.Tensor:
        attentions = self.attentions if self.has_cross_attention else [None] * len(self.resnets)
        for resnet, attention in zip(self.resnets, attentions, strict=True):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
            if attention is not None:
                hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """Resnet + transformer pairs over skip concatenations, then an upsampler (diffusers `CrossAttnUpBlock2D`)."""

    has_cross_attention = True


class UNetMidBlock2DCrossAttn(_Level):
    """resnet, (transformer, resnet) x1 at the lowest resolution (LDM `middle_block`; diffusers
    `UNetMidBlock2DCrossAttn`)."""

    has_cross_attention = True

    def __init__(self, channels: int, temb_channels: int, eps: float, act: str, groups: int, heads: int, depth: Any,
                 context: int, linear: bool, dropout: float, output_scale_factor: float):
        super().__init__()
        self._add_transformers(1, channels, groups, dropout, heads, depth, context, linear)
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=temb_channels, groups=groups,
                          eps=eps, dropout=dropout, non_linearity=act, output_scale_factor=output_scale_factor)
            for _ in range(2)
        ])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


_DOWN = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
_UP = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}


# ----------------------------------------------------------------------------- the UNet


class UNet(ConfiguredModule):
    """The conditional denoising UNet of SD1/SD2/SDXL (diffusers `UNet2DConditionModel`'s module tree).

    `unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True)` returns
    `UNet2DConditionOutput(sample=...)` (or a 1-tuple): the predicted noise (or v) for the latents `sample` at
    `timestep` (a number, a 0-d tensor or one per batch element), attending to the text states; SDXL also needs
    `added_cond_kwargs={"text_embeds": pooled text [B, P], "time_ids": size/crop numbers [B, 6]}`.
    """

    # diffusers 0.42's UNet2DConditionModel constructor defaults, so `dict(unet.config)` carries the same keys.
    DEFAULTS: Mapping[str, Any] = {
        "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
        "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
        "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
        "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
        "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
    }
    # Parts of UNet2DConditionModel SD never uses. (Accepted with any value because diffusers' CrossAttn/plain blocks
    # never read them: sample_size, upcast_attention (no effect with SDPA), resnet_skip_time_act,
    # resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention, addition_embed_type_num_heads.)
    FIXED = frozenset({
        "only_cross_attention", "encoder_hid_dim", "encoder_hid_dim_type", "dual_cross_attention", "class_embed_type",
        "num_class_embeds", "resnet_time_scale_shift", "time_embedding_type", "time_cond_proj_dim", "attention_type",
        "class_embeddings_concat",
    })

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        if c.num_attention_heads is not None:  # diffusers refuses it too (its issue #2011)
            raise ValueError("UNet: set heads with attention_head_dim (diffusers' name for the head count)")
        if c.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet: addition_embed_type={c.addition_embed_type!r} is not supported")
        if c.norm_num_groups is None:
            raise ValueError("UNet: norm_num_groups=None is not supported")
        channels = list(c.block_out_channels)
        levels = len(channels)
        if not (len(c.down_block_types) == len(c.up_block_types) == levels):
            raise ValueError("UNet: down_block_types, up_block_types and block_out_channels must have equal lengths")
        # diffusers' historical naming: `attention_head_dim` holds the number of heads per level.
        heads = per_level(c.attention_head_dim, levels)
        context = per_level(c.cross_attention_dim, levels)
        layers = per_level(c.layers_per_block, levels)
        depth = per_level(c.transformer_layers_per_block, levels)
        up_depth = list(c.reverse_transformer_layers_per_block or reversed(depth))
        groups, eps, act = c.norm_num_groups, c.norm_eps, c.act_fn

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2)
        temb = c.time_embedding_dim or channels[0] * 4
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb, act, c.timestep_post_act)
        if c.addition_embed_type == "text_time":  # SDXL: pooled text + Fourier-embedded (size, crop, target size)
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        self.time_embed_act = activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None

        # Both lists are registered before the mid block, as in diffusers (same state_dict key order).
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            if kind not in _DOWN:
                raise ValueError(f"UNet: down block type {kind!r} is not supported (only {sorted(_DOWN)})")
            self.down_blocks.append(_DOWN[kind](
                channels[max(i - 1, 0)], channels[i], temb, layers[i], eps, act, groups, i < levels - 1,
                c.downsample_padding, c.dropout, **self._attention(kind, heads[i], depth[i], context[i])))

        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block: nn.Module | None = UNetMidBlock2DCrossAttn(
                channels[-1], temb, eps, act, groups, heads[-1], depth[-1], context[-1], c.use_linear_projection,
                c.dropout, c.mid_block_scale_factor)
        elif c.mid_block_type is None:
            self.mid_block = None
        else:
            raise ValueError(f"UNet: mid_block_type={c.mid_block_type!r} is not supported")

        rev_channels, rev_heads, rev_context = channels[::-1], heads[::-1], context[::-1]
        rev_layers = layers[::-1]
        self.num_upsamplers = levels - 1
        for i, kind in enumerate(c.up_block_types):
            if kind not in _UP:
                raise ValueError(f"UNet: up block type {kind!r} is not supported (only {sorted(_UP)})")
            self.up_blocks.append(_UP[kind](
                rev_channels[min(i + 1, levels - 1)], rev_channels[max(i - 1, 0)], rev_channels[i], temb,
                rev_layers[i] + 1, eps, act, groups, i < levels - 1, c.dropout,
                **self._attention(kind, rev_heads[i], up_depth[i], rev_context[i])))

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_act = activation(act)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2)

    def _attention(self, kind: str, heads: int, depth: Any, context: int) -> dict[str, Any]:
        """Transformer arguments of a level (none for the plain DownBlock2D / UpBlock2D)."""
        if not kind.startswith("CrossAttn"):
            return {}
        return {"heads": heads, "depth": depth, "context": context, "linear": self.config.use_linear_projection}

    # ------------------------------------------------------------------------- embeddings

    def _time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            # diffusers: float64 for floats, int64 for ints (float32 on MPS, which has no float64)
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        t_emb = self.time_proj(timestep.expand(sample.shape[0]))
        # Timesteps returns float32; the embedding layers may run in half precision.
        return self.time_embedding(t_emb.to(dtype=sample.dtype))

    def _added_embedding(self, emb: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """SDXL's pooled-text + size-conditioning embedding (Podell et al. 2023, section 2.2), added to `emb`."""
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("UNet: addition_embed_type 'text_time' needs added_cond_kwargs text_embeds and time_ids")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        return self.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

    # ------------------------------------------------------------------------- forward

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, class_labels: None = None, timestep_cond: None = None,
                attention_mask: None = None, cross_attention_kwargs: Mapping[str, Any] | None = None,
                added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """diffusers' `UNet2DConditionModel.forward` signature; ControlNet residuals
        (`down_block_additional_residuals` with `mid_block_additional_residual`) are added as there. Class labels,
        timestep conditions, self-attention masks, adapters and attention-processor kwargs are not supported."""
        if any(x is not None for x in (class_labels, timestep_cond, attention_mask,
                                       down_intrablock_additional_residuals)) or cross_attention_kwargs:
            raise NotImplementedError("UNet: class_labels, timestep_cond, attention_mask, adapter residuals and "
                                      "cross_attention_kwargs are not supported")
        controlnet = down_block_additional_residuals is not None and mid_block_additional_residual is not None
        if down_block_additional_residuals is not None and not controlnet:
            raise NotImplementedError("UNet: down_block_additional_residuals need mid_block_additional_residual")
        if encoder_attention_mask is not None:  # 1 = keep, 0 = drop -> additive bias [B, 1, K], as diffusers
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        # Sizes that are no multiple of 2**upsamplers: each upsampler is told its skip connection's size.
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(size % factor for size in sample.shape[-2:])

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embedding(sample, timestep)
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._added_embedding(emb, added_cond_kwargs)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        sample = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if block.has_cross_attention:
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    encoder_attention_mask=encoder_attention_mask)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if controlnet:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=True))

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                    encoder_attention_mask=encoder_attention_mask)
        if controlnet:
            sample = sample + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            res, skips = skips[-count:], skips[:-count]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            if block.has_cross_attention:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
                               encoder_attention_mask=encoder_attention_mask)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

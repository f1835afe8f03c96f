"""Architecture detection: which family a single-file LDM checkpoint is, and its exact sizes.

Everything is read from tensor names and shapes, never from a file name, so non-standard
sizes (tiny test checkpoints, difusi-mini) load through the same path as SD 1.5. The result is
a set of diffusers / transformers config dicts that build modules the checkpoint's tensors fit.

Which family a file is, and what shapes cannot tell (attention head counts, activation
function, native size, scaling factor), come from the family table `difusi.models.families`
(one record per family, following each family's original configs) and can be overridden by a
sidecar file (see `difusi.models.sidecar`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from difusi.errors import CheckpointError, UnsupportedModelError
from difusi.models.convert import UNET_PREFIX, VAE_PREFIX
from difusi.models.families import EOS_TOKEN_ID, FamilySpec, TextEncoderLayout, match_shapes

# Shapes are all detection needs; a dict of key -> shape lets it run before any tensor is read.
Shapes = Mapping[str, tuple[int, ...]]

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
HEAD_DIM = 64  # CLIP ViT-L/14, OpenCLIP ViT-H/14 and bigG/14 all use 64 channels per head


@dataclass
class TextEncoderSpec:
    """One text encoder: its LDM layout kind ("clip"/"openclip"), transformers config kwargs, projection."""

    kind: str
    config: dict[str, Any]
    with_projection: bool


@dataclass
class ModelSpec:
    """Detected architecture of a checkpoint, as config dicts for diffusers / transformers."""

    family: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoders: list[TextEncoderSpec]
    vae_levels: int
    latent_channels: int
    notes: dict[str, Any] = field(default_factory=dict)
    family_spec: FamilySpec | None = None
    """The family record detection chose (`difusi.models.families`); `family` is its architecture name."""


def describe(shapes: Shapes, limit: int = 6) -> str:
    """A short summary of what a state dict holds (key groups with counts, a few example keys with shapes)."""
    counts: Counter[str] = Counter()
    for key in shapes:
        parts = key.split(".")
        # "model.diffusion_model", "conditioner.embedders", "cond_stage_model.transformer": two levels tell more
        counts[".".join(parts[:2]) if parts[0] in ("model", "conditioner", "cond_stage_model") and len(parts) > 2 else parts[0]] += 1
    if not counts:
        return "no tensors"
    top = ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(limit))
    more = f", and {len(counts) - limit} more groups" if len(counts) > limit else ""
    examples = ", ".join(f"{k} {list(v)}" for k, v in list(shapes.items())[:3])
    return f"{len(shapes)} tensors: {top}{more}; e.g. {examples}"


def detect_family(shapes: Shapes) -> str:
    """"sd1", "sd2" or "sdxl"; raises UnsupportedModelError for known other families, CheckpointError for unknown."""
    return detect_family_spec(shapes).family


def detect_family_spec(shapes: Shapes) -> FamilySpec:
    """The family record (`difusi.models.families.FAMILIES`, first match in table order) for a single-file checkpoint.

    Raises UnsupportedModelError for a recognised family difusi does not run, CheckpointError when the file is no
    Stable Diffusion checkpoint at all (saying what it holds instead).
    """
    other = match_shapes(shapes, unet=False)
    if other is not None:
        raise other.unsupported()
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(p) for p in ("down_blocks.", "time_embedding.", "conv_in.", "unet.") for k in shapes):
            raise CheckpointError(
                f"this looks like a diffusers-layout weights file, not a single-file checkpoint ({describe(shapes)}); "
                "load its whole folder (with model_index.json) instead"
            )
        raise CheckpointError(f"not a Stable Diffusion checkpoint: no UNet found at {UNET_PREFIX}*; saw {describe(shapes)}")
    spec = match_shapes(shapes, unet=True)
    if spec is None:
        raise CheckpointError(f"checkpoint has a UNet but no text encoder difusi knows; saw {describe(shapes)}")
    if not spec.supported:
        raise spec.unsupported()
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise CheckpointError(f"checkpoint has no VAE ({VAE_PREFIX}*); saw {describe(shapes)}")
    _check_in_channels(shapes, conv_in[1])
    return spec


def _check_in_channels(shapes: Shapes, in_channels: int) -> None:
    """Input channels the family table does not name (8, 5 are records) must equal the latent's, or the latent's + 5
    (an inpainting UNet: latents, mask, masked-picture latents)."""
    latent = shapes[VAE_PREFIX + "decoder.conv_in.weight"][1] if VAE_PREFIX + "decoder.conv_in.weight" in shapes else 4
    if in_channels not in (latent, latent + 5):
        raise UnsupportedModelError(
            f"not supported yet: detected UNet with {in_channels} input channels for {latent} latent channels")


# ----------------------------------------------------------------------------- UNet


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _transformer_depth(shapes: Shapes, block: str) -> int:
    found = _indices(shapes, re.escape(UNET_PREFIX + block) + r"\.1\.transformer_blocks\.(\d+)\.")
    return max(found) + 1 if found else 0


def detect_unet(shapes: Shapes, spec: FamilySpec, heads_override: int | list[int] | None = None,
                head_dim_override: int | None = None) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` config for the LDM UNet in `shapes`."""
    p = UNET_PREFIX
    conv_in = shapes[p + "input_blocks.0.0.weight"]
    n_input = len(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."))
    levels = len(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    if n_input % levels:
        raise CheckpointError(f"UNet layout not understood: {n_input} input blocks for {levels} levels")
    per = n_input // levels - 1
    channels, depths, attention = [], [], []
    for level in range(levels):
        first = 1 + level * (per + 1)
        channels.append(shapes[f"{p}input_blocks.{first}.0.out_layers.3.weight"][0])
        depth = _transformer_depth(shapes, f"input_blocks.{first}")
        attention.append(depth > 0)
        depths.append(depth)
    mid_depth = _transformer_depth(shapes, "middle_block")
    mid_depth = max(mid_depth, 1)
    depths = [d or 1 for d in depths]  # levels without attention ignore it; keep diffusers' config valid
    if not attention[-1]:
        depths[-1] = mid_depth  # diffusers takes the mid-block depth from the last level's entry
    elif depths[-1] != mid_depth:
        raise UnsupportedModelError(f"not supported yet: mid-block depth {mid_depth} differs from last level's {depths[-1]}")
    attn_key = next(k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    context_dim = shapes[attn_key][1]
    proj_in = next(k for k in shapes if k.startswith(p) and k.endswith(".1.proj_in.weight"))
    heads = _unet_heads(spec, channels, heads_override, head_dim_override)
    config: dict[str, Any] = {
        "sample_size": spec.native_size // spec.vae_scale_factor,
        "in_channels": conv_in[1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "block_out_channels": list(channels),
        "layers_per_block": per,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,  # diffusers' legacy name: this is the number of heads
        "transformer_layers_per_block": depths if max(depths) > 1 else 1,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "upcast_attention": spec.upcast_attention,  # no effect in fp32
        "norm_num_groups": 32,
    }
    if p + "label_emb.0.0.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes[p + "label_emb.0.0.weight"][1]
    if config["transformer_layers_per_block"] == 1:
        del config["transformer_layers_per_block"]
    return config


def _unet_heads(spec: FamilySpec, channels: list[int], heads: int | list[int] | None,
                head_dim: int | None) -> int | list[int]:
    """Sidecar heads, else sidecar head width, else the family's rule (SD1 8 heads everywhere, else 64 per head)."""
    if heads is not None:
        return heads
    if head_dim is None and spec.unet_heads is not None:
        return spec.unet_heads
    dim = head_dim or spec.unet_head_dim
    return [max(1, c // dim) for c in channels]


def add_sdxl_time_embedding(config: dict[str, Any], pooled_dim: int) -> None:
    """SDXL's added embedding = pooled text (pooled_dim) + 6 Fourier-embedded size/crop numbers; solve for their width."""
    total = config["projection_class_embeddings_input_dim"]
    if (total - pooled_dim) % 6 or total <= pooled_dim:
        raise CheckpointError(f"SDXL added-condition width {total} does not fit pooled width {pooled_dim} + 6 size embeddings")
    config["addition_time_embed_dim"] = (total - pooled_dim) // 6


# ----------------------------------------------------------------------------- VAE


def detect_vae(shapes: Shapes, spec: FamilySpec) -> dict[str, Any]:
    """diffusers `AutoencoderKL` config for the LDM VAE in `shapes` (any number of levels)."""
    p = VAE_PREFIX + "encoder.down."
    levels = len(_indices(shapes, re.escape(p) + r"(\d+)\."))
    per = len(_indices(shapes, re.escape(p) + r"0\.block\.(\d+)\."))
    channels = [shapes[f"{p}{i}.block.0.conv1.weight"][0] for i in range(levels)]
    latent = shapes[VAE_PREFIX + "decoder.conv_in.weight"][1]
    return {
        "in_channels": shapes[VAE_PREFIX + "encoder.conv_in.weight"][1],
        "out_channels": shapes[VAE_PREFIX + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": per,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": spec.native_size,
        "scaling_factor": spec.scaling_factor,
    }


# ----------------------------------------------------------------------------- text encoders


def detect_text_encoder(shapes: Shapes, layout: TextEncoderLayout) -> TextEncoderSpec:
    """transformers `CLIPTextConfig` kwargs for the text encoder a family record places at `layout.ldm_prefix`."""
    prefix, kind = layout.ldm_prefix, layout.kind
    if kind == "clip":
        vocab, width = shapes[prefix + "embeddings.token_embedding.weight"]
        positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
        projection = width
    else:
        vocab, width = shapes[prefix + "token_embedding.weight"]
        positions = shapes[prefix + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes[prefix + "text_projection"][1] if prefix + "text_projection" in shapes else width
    config = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": layout.heads or max(1, width // HEAD_DIM),
        "max_position_embeddings": positions,
        "hidden_act": layout.hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": 1,
    }
    return TextEncoderSpec(kind=kind, config=config, with_projection=layout.with_projection)


# ----------------------------------------------------------------------------- everything


def detect(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """The full architecture of an LDM single-file checkpoint given `{key: shape}`.

    `overrides` (from a sidecar) may set `attention_heads`, `attention_head_dim`, `text_encoder_heads`
    and raw config fields under `unet`, `vae`, `text_encoder` (dicts merged into the detected configs).
    """
    overrides = overrides or {}
    spec = detect_family_spec(shapes)
    family = spec.family
    try:
        unet = detect_unet(shapes, spec, overrides.get("attention_heads"), overrides.get("attention_head_dim"))
        vae = detect_vae(shapes, spec)
        texts = [detect_text_encoder(shapes, layout) for layout in spec.text_encoders]
    except (KeyError, StopIteration, IndexError, ValueError) as exc:
        raise CheckpointError(f"{family} checkpoint with an unexpected layout (missing {exc}); saw {describe(shapes)}") from exc
    if spec.size_conditioning:
        pooled = next(t for t, layout in zip(texts, spec.text_encoders, strict=True) if layout.pooled)
        add_sdxl_time_embedding(unet, pooled.config["projection_dim"])
    _apply_overrides(unet, vae, texts, overrides)
    return ModelSpec(
        family=family,
        unet_config=unet,
        vae_config=vae,
        text_encoders=texts,
        vae_levels=len(vae["block_out_channels"]),
        latent_channels=vae["latent_channels"],
        family_spec=spec,
    )


def _apply_overrides(unet: dict, vae: dict, texts: list[TextEncoderSpec], overrides: Mapping[str, Any]) -> None:
    unet.update(overrides.get("unet", {}))
    vae.update(overrides.get("vae", {}))
    for spec in texts:
        if "text_encoder_heads" in overrides:
            spec.config["num_attention_heads"] = overrides["text_encoder_heads"]
        spec.config.update(overrides.get("text_encoder", {}))

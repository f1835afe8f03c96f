"""Key conversion between the original LDM checkpoint layout and diffusers / transformers modules.

Single-file checkpoints (CompVis `ldm`, Stability `sgm`) name their tensors after the original
code (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`); diffusers and transformers
name them after their own modules (`down_blocks.0.resnets.0.norm1.weight`). The UNet and VAE
conversions here are *tables of module prefixes* built from a diffusers config, so the same table
renames both ways and any block layout (levels, layers per block, attention levels) works.

Layouts follow the original code: CompVis latent-diffusion `openaimodel.py` (UNet) and
`model.py` (VAE), OpenAI CLIP / mlfoundations OpenCLIP `model.py` (text encoders).
All functions work on state dicts *without* the checkpoint-level prefix (see the `*_PREFIX`
constants and `split_ldm_checkpoint` / `ldm_checkpoint_from_modules`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from difusi.errors import CheckpointError
from difusi.models.families import (  # noqa: F401  (re-exported: the LDM layout's key prefixes)
    ARCHITECTURES,
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    base_spec,
)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

# Text-encoder (LDM prefix, kind) per architecture name, in pipeline order, from the family table.
TEXT_ENCODER_PREFIXES: dict[str, list[tuple[str, str]]] = {
    family: [(layout.ldm_prefix, layout.kind) for layout in base_spec(family).text_encoders]
    for family in ARCHITECTURES
}

# Sub-module names inside one residual block: LDM name -> diffusers name.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# A prefix table entry: (ldm_prefix, diffusers_prefix, sub-module map or None for "same names inside").
_Entry = tuple[str, str, dict[str, str] | None]


# ----------------------------------------------------------------------------- generic renaming


def _rename(state: Mapping[str, Tensor], table: list[_Entry], reverse: bool, what: str) -> StateDict:
    """Rename every key through the prefix table; unknown keys are an error (they mean a layout we don't model)."""
    lookup: dict[str, tuple[str, dict[str, str] | None]] = {}
    for ldm, diffusers, sub in table:
        if reverse:
            lookup[diffusers] = (ldm, {v: k for k, v in sub.items()} if sub else None)
        else:
            lookup[ldm] = (diffusers, sub)
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in state.items():
        new_key = _rename_key(key, lookup)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} tensor(s) do not fit the detected layout, e.g. {unknown[:3]}")
    return out


def _rename_key(key: str, lookup: dict[str, tuple[str, dict[str, str] | None]]) -> str | None:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest prefix first
        hit = lookup.get(".".join(parts[:n]))
        if hit is None:
            continue
        target, sub = hit
        rest = parts[n:]
        if sub is None:
            return ".".join([target, *rest])
        inner = ".".join(rest[:-1])
        if inner not in sub:
            return None
        return ".".join([target, sub[inner], rest[-1]])
    return None


# ----------------------------------------------------------------------------- UNet


def _unet_table(config: Mapping[str, Any]) -> list[_Entry]:
    """Prefix table for an LDM `UNetModel` <-> diffusers `UNet2DConditionModel` with this config.

    LDM numbers its blocks flatly: input block 0 is conv_in, then per level `layers_per_block`
    (resnet[, transformer]) blocks and one downsampler (except the last level); output blocks mirror
    that with one more resnet per level and the upsampler appended to the level's last block.
    """
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    table: list[_Entry] = [
        ("time_embed.0", "time_embedding.linear_1", None),
        ("time_embed.2", "time_embedding.linear_2", None),
        ("label_emb.0.0", "add_embedding.linear_1", None),
        ("label_emb.0.2", "add_embedding.linear_2", None),
        ("input_blocks.0.0", "conv_in", None),
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
        ("out.0", "conv_norm_out", None),
        ("out.2", "conv_out", None),
    ]
    for level in range(levels):
        for j in range(per):
            n = 1 + level * (per + 1) + j
            table.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if down_attn[level]:
                table.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", None))
        if level < levels - 1:
            n = 1 + level * (per + 1) + per
            table.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", None))
    for level in range(levels):
        for j in range(per + 1):
            n = level * (per + 1) + j
            table.append((f"output_blocks.{n}.0", f"up_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if up_attn[level]:
                table.append((f"output_blocks.{n}.1", f"up_blocks.{level}.attentions.{j}", None))
        if level < levels - 1:
            n = level * (per + 1) + per
            slot = 2 if up_attn[level] else 1
            table.append((f"output_blocks.{n}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv", None))
    return table


def unet_ldm_to_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """LDM UNet keys (without `model.diffusion_model.`) -> diffusers `UNet2DConditionModel` keys."""
    return _rename(state, _unet_table(config), reverse=False, what="UNet")


def unet_diffusers_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """diffusers `UNet2DConditionModel` keys -> LDM UNet keys (without `model.diffusion_model.`)."""
    return _rename(state, _unet_table(config), reverse=True, what="UNet")


# ----------------------------------------------------------------------------- VAE


def _vae_table(config: Mapping[str, Any]) -> list[_Entry]:
    """Prefix table for the LDM `AutoencoderKL` <-> diffusers `AutoencoderKL` (decoder levels run in reverse)."""
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    table: list[_Entry] = [
        ("quant_conv", "quant_conv", None),
        ("post_quant_conv", "post_quant_conv", None),
    ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in", f"{part}.conv_in", None),
            (f"{part}.conv_out", f"{part}.conv_out", None),
            (f"{part}.norm_out", f"{part}.conv_norm_out", None),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
        ]
    for level in range(levels):
        for j in range(per):
            table.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", _VAE_RESNET))
        if level < levels - 1:
            table.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", None))
    for level in range(levels):
        ldm_level = levels - 1 - level
        for j in range(per + 1):
            table.append((f"decoder.up.{ldm_level}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}", _VAE_RESNET))
        if level < levels - 1:
            table.append((f"decoder.up.{ldm_level}.upsample.conv", f"decoder.up_blocks.{level}.upsamplers.0.conv", None))
    return table


def _is_vae_attention_matrix(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith(".weight") and "group_norm" not in key


def vae_ldm_to_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers `AutoencoderKL` keys.

    The LDM mid-block attention uses 1x1 convolutions; diffusers uses linear layers, so those
    weights lose their two trailing unit dimensions.
    """
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # training-only discriminator/LPIPS
    out = _rename(state, _vae_table(config), reverse=False, what="VAE")
    for key, value in out.items():
        if _is_vae_attention_matrix(key) and value.ndim == 4:
            out[key] = value[:, :, 0, 0]
    return out


def vae_diffusers_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """diffusers `AutoencoderKL` keys -> LDM VAE keys (attention matrices back to 1x1 convolutions)."""
    fixed = {k: (v[:, :, None, None] if _is_vae_attention_matrix(k) and v.ndim == 2 else v) for k, v in state.items()}
    return _rename(fixed, _vae_table(config), reverse=True, what="VAE")


# ----------------------------------------------------------------------------- CLIP text encoders

# Buffers some checkpoints carry that no module needs (recomputed at construction).
_CLIP_DROPPED = ("embeddings.position_ids",)


def clip_ldm_to_transformers(state: Mapping[str, Tensor]) -> StateDict:
    """OpenAI CLIP keys as stored by LDM (after `...transformer.text_model.`) -> transformers 5 `CLIPTextModel` keys.

    Both use the transformers names (`encoder.layers.N.self_attn.q_proj`); transformers 5 dropped
    the `text_model.` level from `CLIPTextModel.state_dict()`, which the caller's prefix already removed.
    """
    return {k: v for k, v in state.items() if k not in _CLIP_DROPPED}


def clip_transformers_to_ldm(state: Mapping[str, Tensor]) -> StateDict:
    """transformers `CLIPTextModel` keys (with or without `text_model.`) -> keys under LDM's `...text_model.` prefix."""
    out: StateDict = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key in _CLIP_DROPPED or key.startswith("text_projection"):
            continue
        out[key] = value
    return out


_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_to_transformers(state: Mapping[str, Tensor]) -> StateDict:
    """OpenCLIP text tower keys (after `...model.`) -> transformers `CLIPTextModel[WithProjection]` keys.

    OpenCLIP packs q, k, v into one `in_proj_weight` (nn.MultiheadAttention, in that order) and
    stores `text_projection` as a `[width, proj]` matrix used as `x @ P`; transformers uses separate
    q/k/v linears and a `Linear(width, proj)`, whose weight is `P.T`. `text_projection` is returned
    under that name (not `text_model.`-prefixed) and only if the checkpoint has it.
    """
    out: StateDict = {}
    for key, value in state.items():
        mapped = _openclip_key(key, value)
        out.update(mapped)
    return out


def _openclip_key(key: str, value: Tensor) -> StateDict:
    if key == "token_embedding.weight":
        return {"embeddings.token_embedding.weight": value}
    if key == "positional_embedding":
        return {"embeddings.position_embedding.weight": value}
    if key.startswith("ln_final."):
        return {"final_layer_norm." + key.removeprefix("ln_final."): value}
    if key == "text_projection":
        return {"text_projection.weight": value.T.contiguous()}
    if key in ("logit_scale", "attn_mask"):
        return {}  # training-only scalar / recomputed causal mask
    if not key.startswith("transformer.resblocks."):
        raise CheckpointError(f"OpenCLIP text encoder: unexpected tensor {key!r}")
    layer, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
    base = f"encoder.layers.{layer}."
    if rest.startswith("attn.in_proj_"):
        kind = rest.removeprefix("attn.in_proj_")  # "weight" or "bias"
        q, k, v = value.chunk(3, dim=0)
        return {f"{base}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (q, k, v), strict=True)}
    module, kind = rest.rsplit(".", 1)
    if module not in _OPENCLIP_LAYER:
        raise CheckpointError(f"OpenCLIP text encoder: unexpected tensor {key!r}")
    return {f"{base}{_OPENCLIP_LAYER[module]}.{kind}": value}


def transformers_to_openclip(state: Mapping[str, Tensor]) -> StateDict:
    """transformers `CLIPTextModel[WithProjection]` keys -> OpenCLIP text tower keys (inverse of `openclip_to_transformers`)."""
    reverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    flat = {k.removeprefix("text_model."): v for k, v in state.items() if k.removeprefix("text_model.") not in _CLIP_DROPPED}
    out: StateDict = {}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue  # packed below
            out[f"transformer.resblocks.{layer}.{reverse_layer[module]}.{kind}"] = value
        else:
            raise CheckpointError(f"text encoder: unexpected tensor {key!r}")
    for key in flat:
        if key.startswith("encoder.layers.") and ".self_attn.q_proj." in key:
            layer = key.removeprefix("encoder.layers.").split(".", 1)[0]
            kind = key.rsplit(".", 1)[1]
            parts = [flat[f"encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


# ----------------------------------------------------------------------------- whole checkpoints


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Every key with `prefix` prepended."""
    return {prefix + k: v for k, v in state.items()}


def text_encoder_to_ldm(state: Mapping[str, Tensor], kind: str) -> StateDict:
    """One transformers text-encoder state dict -> the LDM sub-layout of `kind` ("clip" or "openclip")."""
    return clip_transformers_to_ldm(state) if kind == "clip" else transformers_to_openclip(state)


def text_encoder_from_ldm(state: Mapping[str, Tensor], kind: str) -> StateDict:
    """The LDM sub-layout of `kind` ("clip" or "openclip") -> transformers `CLIPTextModel` keys (+ `text_projection.weight`)."""
    return clip_ldm_to_transformers(state) if kind == "clip" else openclip_to_transformers(state)


def ldm_checkpoint_from_modules(family: str, unet: torch.nn.Module, vae: torch.nn.Module, text_encoders: list) -> StateDict:
    """A complete single-file LDM state dict from diffusers/transformers modules (e.g. to save difusi-mini).

    `family` is "sd1", "sd2" or "sdxl" and fixes the text-encoder prefixes; `unet` and `vae` are
    diffusers models (their `.config` drives the key tables); `text_encoders` are transformers CLIP
    text models in pipeline order (SDXL: CLIP-L, then OpenCLIP bigG with projection).
    """
    prefixes = TEXT_ENCODER_PREFIXES[family]
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"{family} needs {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    out = add_prefix(unet_diffusers_to_ldm(unet.state_dict(), unet.config), UNET_PREFIX)
    out.update(add_prefix(vae_diffusers_to_ldm(vae.state_dict(), vae.config), VAE_PREFIX))
    for (prefix, kind), encoder in zip(prefixes, text_encoders, strict=True):
        out.update(add_prefix(text_encoder_to_ldm(encoder.state_dict(), kind), prefix))
    return out


def split_ldm_checkpoint(
    state: Mapping[str, Tensor], family: str, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]
) -> tuple[StateDict, StateDict, list[StateDict]]:
    """(unet, vae, [text encoders]) diffusers/transformers state dicts from a single-file LDM state dict."""
    unet = unet_ldm_to_diffusers(strip_prefix(state, UNET_PREFIX), unet_config)
    vae = vae_ldm_to_diffusers(strip_prefix(state, VAE_PREFIX), vae_config)
    texts = [text_encoder_from_ldm(strip_prefix(state, p), kind) for p, kind in TEXT_ENCODER_PREFIXES[family]]
    return unet, vae, texts


def unet_ldm_module_names(module_paths: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet module path -> the same module's LDM path (`down_blocks.0.attentions.0.proj_in` ->
    `input_blocks.1.1.proj_in`), for modules that have one: kohya LoRAs name layers either way."""
    lookup = {diffusers: (ldm, {v: k for k, v in sub.items()} if sub else None)
              for ldm, diffusers, sub in _unet_table(config)}
    names: dict[str, str] = {}
    for path in module_paths:
        ldm = _rename_key(f"{path}.weight", lookup)
        if ldm is not None:
            names[path] = ldm.removesuffix(".weight")
    return names

"""LDM <-> diffusers key conversion: exact round trips, and agreement with diffusers' own converters."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import single_file_utils as reference

from difusi.models import convert
from difusi.models.synthetic import build_modules, sd15_configs

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def modules(request):
    unet, vae, texts = build_modules(request.param, seed=3)
    return request.param, unet, vae, texts


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_diffusers_ldm_diffusers(modules):
    family, unet, vae, texts = modules
    ldm = convert.ldm_checkpoint_from_modules(family, unet, vae, texts)
    unet_sd, vae_sd, text_sds = convert.split_ldm_checkpoint(ldm, family, unet.config, vae.config)
    _equal(unet_sd, unet.state_dict())
    _equal(vae_sd, vae.state_dict())
    for model, state in zip(texts, text_sds, strict=True):
        flat = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        _equal(state, flat)


def test_round_trip_ldm_diffusers_ldm(modules):
    family, unet, vae, texts = modules
    ldm = convert.ldm_checkpoint_from_modules(family, unet, vae, texts)
    unet_sd, vae_sd, text_sds = convert.split_ldm_checkpoint(ldm, family, unet.config, vae.config)
    again = convert.add_prefix(convert.unet_diffusers_to_ldm(unet_sd, unet.config), convert.UNET_PREFIX)
    again |= convert.add_prefix(convert.vae_diffusers_to_ldm(vae_sd, vae.config), convert.VAE_PREFIX)
    for (prefix, kind), state in zip(convert.TEXT_ENCODER_PREFIXES[family], text_sds, strict=True):
        again |= convert.add_prefix(convert.text_encoder_to_ldm(state, kind), prefix)
    _equal(again, ldm)


def test_unet_and_vae_layout_matches_diffusers_converters(modules):
    """Our LDM output, read back by diffusers' single_file_utils, gives the original modules' weights."""
    family, unet, vae, texts = modules
    ldm = convert.ldm_checkpoint_from_modules(family, unet, vae, texts)
    ref_unet = reference.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    ref_vae = reference.convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    _equal(ref_unet, unet.state_dict())
    expected_vae = vae.state_dict()
    _equal({k: v.reshape(expected_vae[k].shape) for k, v in ref_vae.items()}, expected_vae)


def test_text_encoder_layout_matches_diffusers_converters(modules):
    family, unet, vae, texts = modules
    ldm = convert.ldm_checkpoint_from_modules(family, unet, vae, texts)
    if family in ("sd1", "sdxl"):
        prefix = convert.SD1_CLIP_PREFIX if family == "sd1" else convert.SDXL_CLIP_L_PREFIX
        ref = reference.convert_ldm_clip_checkpoint(ldm, remove_prefix=prefix.removesuffix("text_model."))
        ref = {k.removeprefix("text_model."): v for k, v in ref.items() if not k.endswith("position_ids")}
        _equal(ref, texts[0].state_dict())
    if family in ("sd2", "sdxl"):
        prefix = convert.SD2_OPENCLIP_PREFIX if family == "sd2" else convert.SDXL_OPENCLIP_PREFIX
        ref = reference.convert_open_clip_checkpoint(texts[-1], ldm, prefix=prefix)
        ours = {k.removeprefix("text_model."): v for k, v in texts[-1].state_dict().items()}
        if family == "sd2":
            ref.pop("text_projection.weight", None)  # SD2 uses the un-projected hidden states
        _equal({k.removeprefix("text_model."): v for k, v in ref.items()}, ours)


def test_openclip_in_proj_is_split_in_qkv_order():
    width = 4
    packed = torch.arange(3 * width * width, dtype=torch.float32).reshape(3 * width, width)
    out = convert.openclip_to_transformers({"transformer.resblocks.0.attn.in_proj_weight": packed})
    assert torch.equal(out["encoder.layers.0.self_attn.q_proj.weight"], packed[:width])
    assert torch.equal(out["encoder.layers.0.self_attn.k_proj.weight"], packed[width : 2 * width])
    assert torch.equal(out["encoder.layers.0.self_attn.v_proj.weight"], packed[2 * width :])
    assert torch.equal(convert.transformers_to_openclip(out)["transformer.resblocks.0.attn.in_proj_weight"], packed)


def test_openclip_text_projection_is_transposed():
    projection = torch.randn(6, 3)  # OpenCLIP: x @ P with P [width, proj]
    out = convert.openclip_to_transformers({"text_projection": projection})
    assert torch.equal(out["text_projection.weight"], projection.T)  # nn.Linear weight is [proj, width]
    x = torch.randn(2, 6)
    assert torch.allclose(torch.nn.functional.linear(x, out["text_projection.weight"]), x @ projection)


def test_clip_accepts_both_transformers_key_styles():
    """transformers 5 CLIPTextModel keys have no `text_model.`; CLIPTextModelWithProjection's do. Same LDM result."""
    value = torch.ones(2)
    flat = convert.clip_transformers_to_ldm({"final_layer_norm.weight": value})
    nested = convert.clip_transformers_to_ldm({"text_model.final_layer_norm.weight": value, "text_projection.weight": value})
    assert flat == nested == {"final_layer_norm.weight": value}
    assert convert.clip_ldm_to_transformers({"embeddings.position_ids": value, "final_layer_norm.weight": value}) == {
        "final_layer_norm.weight": value
    }


def test_sd15_key_names_match_real_checkpoints():
    """Spot-check names and shapes every real SD 1.5 file has (v1-5-pruned layout), built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfgs = sd15_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfgs[0]))
    ldm = convert.ldm_checkpoint_from_modules("sd1", unet, vae, [text])
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    for key, shape in expected.items():
        assert tuple(ldm[key].shape) == shape, key
    unet_keys = [k for k in ldm if k.startswith(convert.UNET_PREFIX)]
    vae_keys = [k for k in ldm if k.startswith(convert.VAE_PREFIX)]
    assert (len(unet_keys), len(vae_keys)) == (686, 248)  # one LDM tensor per diffusers tensor (SD 1.5: 686 UNet, 248 VAE)


def test_unknown_key_is_a_clear_error():
    from difusi.errors import CheckpointError

    _, unet, _, _ = ("sd1", *build_modules("sd1"))
    with pytest.raises(CheckpointError, match="do not fit the detected layout"):
        convert.unet_ldm_to_diffusers({"input_blocks.99.0.in_layers.0.weight": torch.ones(1)}, unet.config)

"""Architecture detection from tensor names and shapes only."""

from __future__ import annotations

import pytest
import torch

from difusi.errors import CheckpointError, UnsupportedModelError
from difusi.models import convert
from difusi.models.detect import detect
from difusi.models.synthetic import build_modules, sd15_configs

UNET_FIELDS = ["in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
               "up_block_types", "cross_attention_dim", "use_linear_projection"]
TEXT_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act"]


def _shapes(family, unet, vae, texts):
    ldm = convert.ldm_checkpoint_from_modules(family, unet, vae, texts)
    return {k: tuple(v.shape) for k, v in ldm.items()}


def _heads(config):
    heads = config["attention_head_dim"]
    return list(heads) if isinstance(heads, list | tuple) else [heads] * len(config["block_out_channels"])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_recovers_synthesized_configs(family):
    unet, vae, texts = build_modules(family)
    spec = detect(_shapes(family, unet, vae, texts))
    assert spec.family == family
    for key in UNET_FIELDS:
        assert spec.unet_config[key] == unet.config[key] or list(spec.unet_config[key]) == list(unet.config[key]), key
    assert _heads(spec.unet_config) == _heads(unet.config)
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert list(torch.atleast_1d(torch.tensor(spec.vae_config[key]))) == list(torch.atleast_1d(torch.tensor(vae.config[key])))
    assert len(spec.text_encoders) == len(texts)
    for found, model in zip(spec.text_encoders, texts, strict=True):
        for key in TEXT_FIELDS:
            assert found.config[key] == getattr(model.config, key), key
    if family == "sdxl":
        assert spec.unet_config["addition_time_embed_dim"] == unet.config.addition_time_embed_dim
        assert spec.unet_config["projection_class_embeddings_input_dim"] == unet.config.projection_class_embeddings_input_dim
        assert list(spec.unet_config["transformer_layers_per_block"]) == list(unet.config.transformer_layers_per_block)
        assert spec.text_encoders[1].config["projection_dim"] == texts[1].config.projection_dim


def test_detect_sd15_full_size_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfgs = sd15_configs()
    with torch.device("meta"):
        modules = (UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg),
                   [CLIPTextModel(CLIPTextConfig(**text_cfgs[0]))])
    spec = detect(_shapes("sd1", *modules))
    assert spec.unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert spec.unet_config["attention_head_dim"] == 8
    assert spec.unet_config["cross_attention_dim"] == 768
    assert spec.unet_config["layers_per_block"] == 2
    assert spec.vae_levels == 4 and spec.vae_config["block_out_channels"] == [128, 256, 512, 512]
    text = spec.text_encoders[0].config
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)


def test_sidecar_style_overrides_reach_the_configs():
    unet, vae, texts = build_modules("sd1")
    spec = detect(_shapes("sd1", unet, vae, texts), {"attention_heads": 2, "text_encoder_heads": 4})
    assert spec.unet_config["attention_head_dim"] == 2
    assert spec.text_encoders[0].config["num_attention_heads"] == 4


@pytest.fixture(scope="module")
def sd1_shapes():
    return _shapes("sd1", *build_modules("sd1"))


def test_inpainting_unet_is_its_family(sd1_shapes):
    shapes = dict(sd1_shapes)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    shapes[key] = (shapes[key][0], 9, 3, 3)
    assert detect(shapes).family == "sd1"
    shapes[key] = (shapes[key][0], 7, 3, 3)  # neither the latent's 4 nor an inpainting UNet's 9
    with pytest.raises(UnsupportedModelError, match="7 input channels"):
        detect(shapes)


def test_sdxl_refiner_is_named(sd1_shapes):
    shapes = {k: v for k, v in sd1_shapes.items() if not k.startswith("cond_stage_model.")}
    shapes["conditioner.embedders.0.model.token_embedding.weight"] = (49408, 1280)
    with pytest.raises(UnsupportedModelError, match="SDXL refiner"):
        detect(shapes)


@pytest.mark.parametrize(("key", "name"), [
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux"),
])
def test_other_families_are_named(key, name):
    with pytest.raises(UnsupportedModelError, match=f"not supported yet: detected {name}"):
        detect({key: (3, 3), "vae.encoder.weight": (3,)})


def test_unknown_architecture_says_what_was_seen():
    with pytest.raises(CheckpointError) as info:
        detect({"encoder.layer.0.weight": (4, 4), "encoder.layer.1.weight": (4, 4), "head.bias": (2,)})
    message = str(info.value)
    assert "not a Stable Diffusion checkpoint" in message
    assert "3 tensors: encoder.* (2), head.* (1); e.g. encoder.layer.0.weight [4, 4]" in message


def test_unet_without_text_encoder_says_what_was_seen(sd1_shapes):
    shapes = {k: v for k, v in sd1_shapes.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match=r"no text encoder difusi knows; saw .*first_stage_model\.\* \(\d+\)"):
        detect(shapes)

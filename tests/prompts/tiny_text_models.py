"""Tiny random CLIP text encoders and the diffusers pipelines around them, for reference checks.

The pipelines' UNet/VAE are the smallest that diffusers accepts; only their ``encode_prompt``
(diffusers' own prompt encoding) is used as the reference.
"""

from importlib import resources

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = 49406, 49407


def clip_config(hidden_size: int, layers: int, projection_dim: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=1,
    )


def text_model(hidden_size: int = 32, layers: int = 4, seed: int = 0, projection: bool = False):
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(clip_config(hidden_size, layers)).eval()
    # A freshly initialised LayerNorm (weight 1, bias 0) makes every position's mean exactly 0,
    # which would make the emphasis mean-restoring ratio 0/0; trained CLIP norms are not like that.
    norm = model.text_model.final_layer_norm if projection else model.final_layer_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0.3, 0.2)
    return model


def truncated_copy(model: CLIPTextModel, layers: int) -> CLIPTextModel:
    """The same weights with only the first `layers` transformer layers (diffusers' SD2 layout)."""
    short = CLIPTextModel(clip_config(model.config.hidden_size, layers)).eval()
    missing, _unexpected = short.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return short


def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    folder = resources.files("difusi") / "assets" / "tokenizers" / "clip"
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    )


def sd_pipeline(text_encoder, tok):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(text_encoder, tok, text_encoder_2, tok_2):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=4,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
    )

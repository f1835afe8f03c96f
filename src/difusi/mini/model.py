"""difusi-mini's architecture: Stable Diffusion 1's three parts, shrunk.

* ``AutoencoderKL`` with 3 levels (downsampling 4x): 64x64 RGB <-> 16x16x4 latents.
* ``UNet2DConditionModel`` in SD1's block layout (cross-attention down/up blocks, a plain lowest level,
  ``UNetMidBlock2DCrossAttn``, conv ``proj_in``/``proj_out`` as SD1's ``use_linear_projection=False``), so
  that its weights map one-to-one onto SD1's LDM ``model.diffusion_model.*`` keys.
* ``CLIPTextModel`` with SD1's vocabulary (49408 tokens, the real CLIP BPE tokenizer) and 77 positions, but
  a small width and two layers.

Every channel count is a multiple of 32 because LDM checkpoints use GroupNorm with 32 groups. The noise
schedule is SD's: discrete scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon prediction, so every
sampler and schedule treats difusi-mini exactly as it treats SD1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before diffusers/transformers are imported)

NATIVE_SIZE = 64
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
TOKENIZER_DIR = Path(difusi.__file__).parent / "assets" / "tokenizers" / "clip"
MAX_TOKENS = 77
EOS_TOKEN_ID = 49407

VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": NATIVE_SIZE,
}

TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
    "projection_dim": 128,
}

UNET_ATTENTION_HEADS = 4
UNET_CONFIG: dict = {
    "sample_size": NATIVE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": UNET_ATTENTION_HEADS,  # diffusers' SD1 naming: this is the number of heads
    "use_linear_projection": False,
    "norm_num_groups": 32,
}


@dataclass
class MiniModel:
    """The three trainable parts plus the tokenizer."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object


def build_vae() -> torch.nn.Module:
    """A freshly initialised difusi-mini AutoencoderKL."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> torch.nn.Module:
    """A freshly initialised difusi-mini UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder() -> torch.nn.Module:
    """A freshly initialised difusi-mini CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def load_tokenizer():
    """The real CLIP BPE tokenizer shipped with difusi (no hub access)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, 77), padded with ``<|endoftext|>`` as SD1 does, truncated at 77."""
    return tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """SD1 conditioning: the final layer's hidden states after the final layer norm (B, 77, width)."""
    return text_encoder(input_ids=token_ids).last_hidden_state


def train_alphas_cumprod() -> torch.Tensor:
    """SD's discrete scaled-linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())

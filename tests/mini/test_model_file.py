"""The shipped difusi-mini file: size, layout, sidecar, and that it loads through the real-checkpoint loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from difusi.mini import data
from difusi.mini import model as mini_model
from difusi.mini.export import sidecar_path
from difusi.models.loader import default_model_path, load_model

MAX_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def path():
    return default_model_path()


@pytest.fixture(scope="module")
def loaded(path):
    return load_model(path)


@pytest.fixture(scope="module")
def sidecar(path) -> dict:
    return json.loads(sidecar_path(path).read_text())


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    images, _ = data.make_batch(99, 0, 64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_single_file_is_at_most_30_mb_and_in_sd1_ldm_layout(path):
    assert path.stat().st_size <= MAX_BYTES
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys  # SD1 conv proj (4-D)


def test_sidecar_has_the_documented_keys(sidecar):
    for key in ("name", "native_size", "scaling_factor", "attention_heads", "prediction_type"):
        assert key in sidecar
    assert np.array(sidecar["latent_rgb_factors"]).shape == (4, 3)
    assert np.array(sidecar["latent_rgb_bias"]).shape == (3,)
    assert sidecar["prediction_type"] == "epsilon" and sidecar["native_size"] == mini_model.NATIVE_SIZE


def test_loads_through_the_checkpoint_loader_with_our_architecture(loaded, sidecar):
    assert loaded.family == "sd1" and loaded.prediction_type == "epsilon"
    assert loaded.native_size == 64 and loaded.latent_channels == 4 and loaded.vae_scale_factor == 4
    assert loaded.scaling_factor == pytest.approx(sidecar["scaling_factor"])
    config = loaded.unet.config
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim"):
        assert list(np.atleast_1d(config[key])) == list(np.atleast_1d(mini_model.UNET_CONFIG[key])), key
    assert all(c % 32 == 0 for c in config["block_out_channels"])
    assert loaded.latent_rgb_factors == sidecar["latent_rgb_factors"]


@torch.no_grad()
def test_scaling_factor_gives_unit_std_latents(loaded, pixels):
    latents = loaded.vae.encode(pixels).latent_dist.mean * loaded.scaling_factor
    assert 0.85 <= float(latents.std()) <= 1.15


@torch.no_grad()
def test_vae_reconstructs_procedural_images(loaded, pixels):
    recon = loaded.vae.decode(loaded.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    assert float((recon - pixels).abs().mean()) * 127.5 < 10  # mean error under 10 of 255 grey levels


@torch.no_grad()
def test_latent_rgb_preview_is_the_least_squares_fit(loaded, pixels):
    """The shipped factors do (almost) as well on fresh images as a refit on those very images, and beat a flat guess."""
    from difusi.mini.train import fit_latent_rgb

    latents = loaded.vae.encode(pixels).latent_dist.mean * loaded.scaling_factor
    target = F.avg_pool2d(pixels, 4)

    def mse(factors, bias) -> float:
        preview = torch.einsum("bchw,cr->brhw", latents, torch.tensor(factors)) + torch.tensor(bias).view(1, 3, 1, 1)
        return float((preview - target).pow(2).mean())

    refit = fit_latent_rgb(latents, pixels)
    shipped = mse(loaded.latent_rgb_factors, loaded.latent_rgb_bias)
    assert shipped <= 1.15 * mse(refit["latent_rgb_factors"], refit["latent_rgb_bias"])
    assert shipped < 0.6 * float((target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean())

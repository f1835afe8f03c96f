"""Latent -> RGB preview projection, checked against a per-pixel evaluation of the linear map."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from difusi.models.latent_preview import SD1_FACTORS as SD1_LATENT_RGB_FACTORS
from difusi.models.latent_preview import SDXL_BIAS
from difusi.models.latent_preview import SDXL_FACTORS as SDXL_LATENT_RGB_FACTORS
from difusi.server.preview import (
    preview_image,
    project,
    projection_for,
    to_image,
)


def reference_pixel(latent_vector: list[float], factors: list[list[float]], bias: list[float]) -> list[float]:
    """rgb_r = sum_c latent_c * factors[c][r] + bias_r, mapped from [-1, 1] to [0, 1] and clamped."""
    out = []
    for r in range(3):
        value = sum(latent_vector[c] * factors[c][r] for c in range(len(latent_vector))) + bias[r]
        out.append(min(max((value + 1.0) / 2.0, 0.0), 1.0))
    return out


def test_projection_matches_per_pixel_formula():
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 3, 5)
    bias = [0.1, -0.2, 0.05]
    factors, bias_t = projection_for(SimpleNamespace(latent_rgb_factors=SD1_LATENT_RGB_FACTORS, latent_rgb_bias=bias), 4)
    rgb = project(latents, factors, bias_t)
    assert rgb.shape == (2, 3, 3, 5)
    for b, y, x in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        expected = reference_pixel(latents[b, :, y, x].tolist(), SD1_LATENT_RGB_FACTORS, bias)
        assert rgb[b, :, y, x].tolist() == pytest.approx(expected, abs=1e-6)


def test_factors_given_as_three_rows_are_transposed():
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 2, 2)
    by_channel = projection_for(SimpleNamespace(latent_rgb_factors=SDXL_LATENT_RGB_FACTORS, latent_rgb_bias=None), 4)
    by_colour = projection_for(
        SimpleNamespace(latent_rgb_factors=[list(col) for col in zip(*SDXL_LATENT_RGB_FACTORS, strict=True)],
                        latent_rgb_bias=None), 4)
    assert torch.equal(project(latents, *by_channel), project(latents, *by_colour))


def test_family_fallbacks_and_grey_for_unknown_latent_spaces():
    sd1, sd1_bias = projection_for(SimpleNamespace(family="sd1", latent_rgb_factors=None), 4)
    sdxl, sdxl_bias = projection_for(SimpleNamespace(family="sdxl", latent_rgb_factors=None), 4)
    assert sd1_bias.tolist() == [0.0, 0.0, 0.0] and torch.allclose(sdxl_bias, torch.tensor(SDXL_BIAS))
    assert torch.allclose(sd1, torch.tensor(SD1_LATENT_RGB_FACTORS))
    assert torch.allclose(sdxl, torch.tensor(SDXL_LATENT_RGB_FACTORS))
    none, _ = projection_for(SimpleNamespace(family="sd1", latent_rgb_factors=None), 16)  # 4-ch table, 16-ch model
    assert none is None
    latents = torch.zeros(1, 16, 2, 2)
    latents[0, :, 0, 0] = 1.0  # brightest spot
    grey = project(latents, None, torch.zeros(3))
    assert grey[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] and grey[0, :, 1, 1].tolist() == [0.0, 0.0, 0.0]


def test_batch_is_tiled_into_a_grid_and_upscaled():
    rgb = torch.zeros(3, 3, 2, 2)
    rgb[0, 0] = 1.0  # red
    rgb[1, 1] = 1.0  # green
    rgb[2, 2] = 1.0  # blue
    image = to_image(rgb, scale=2)
    assert image.size == (8, 8)  # 2x2 grid of 2x2 tiles, doubled
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((4, 0)) == (0, 255, 0)
    assert image.getpixel((0, 4)) == (0, 0, 255)
    assert image.getpixel((7, 7)) == (0, 0, 0)  # empty 4th cell


def test_preview_image_scales_to_pixel_size():
    model = SimpleNamespace(family="sd1", latent_rgb_factors=None, latent_rgb_bias=None, vae_scale_factor=8)
    image = preview_image(torch.zeros(1, 4, 8, 8), model)
    assert image.size == (64, 64)


def _disc_pictures(count: int, size: int, seed: int) -> torch.Tensor:
    """Random-coloured discs on random-coloured backgrounds, pixels in [-1, 1] (like difusi-mini's data)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pictures = []
    for _ in range(count):
        background, foreground = torch.rand(2, 3, generator=generator) * 2 - 1
        picture = background.view(3, 1, 1).repeat(1, size, size)
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator).tolist()
        radius = int(torch.randint(size // 10, size // 3, (1,), generator=generator))
        picture[:, (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = foreground.view(3, 1)
        pictures.append(picture)
    return torch.stack(pictures)


def test_difusi_mini_preview_is_informative_about_its_vae():
    """Encode real pictures with difusi-mini's VAE and project: the shipped factors must beat a constant grey
    preview clearly and beat SD1's published factors (which belong to another VAE).

    The bar is modest on purpose: measured mean abs errors (colour in [0, 1]) are about 0.18 for the shipped
    factors, 0.20 for a fresh least-squares fit (held out), 0.23 for constant grey, 0.25 for SD1's factors:
    difusi-mini's small VAE is far from linear in colour, so no linear preview can do much better.
    """
    from difusi.models import default_model_path, load_model
    from difusi.models.latent_preview import SD1_FACTORS

    if not default_model_path().exists():
        pytest.skip("difusi-mini weights are not in the package yet")
    model = load_model(default_model_path())
    pictures = _disc_pictures(16, model.native_size, seed=1)
    with torch.inference_mode():
        latents = model.vae.encode(pictures).latent_dist.mean * model.scaling_factor
    target = ((torch.nn.functional.avg_pool2d(pictures, model.vae_scale_factor) + 1) / 2).clamp(0, 1)
    shipped = (project(latents, *projection_for(model, latents.shape[1])) - target).abs().mean()
    grey = (0.5 - target).abs().mean()
    sd1 = (project(latents, torch.tensor(SD1_FACTORS), torch.zeros(3)) - target).abs().mean()
    assert shipped < 0.85 * grey and shipped < sd1

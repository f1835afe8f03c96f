"""The VAE's float32 fallback (A1111's "revert VAE to 32-bit" / no-half-vae): a half-precision decode that gives
NaN/inf is redone in float32 instead of failing or saving a black image.

The overflow is real, not simulated: one decoder convolution is scaled so that its float16 activations pass
float16's largest value (65504) while float32 holds them easily; torch runs float16 convolutions on the CPU, so
this is the same failure SDXL's original VAE shows in float16 on a GPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from difusi.models import default_model_path, load_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.vae import decode_latents

SCALE = 3e4
"""Large enough that float16 overflows in the decoder, small enough that float32 stays finite (checked below)."""


def _overflowing_model(precision: str):
    model = load_model(default_model_path(), device="cpu", precision=precision)
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(SCALE)
    return model


def test_fp16_overflow_is_redone_in_fp32_with_one_warning(caplog):
    model = _overflowing_model("fp16")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.vae.decode(latents.half() / model.scaling_factor).sample
    assert not torch.isfinite(raw).all()  # the premise: float16 really overflows

    with caplog.at_level(logging.WARNING, logger="difusi.vae"), torch.no_grad():
        decoded = decode_latents(model.vae, latents, model.scaling_factor)
    assert torch.isfinite(decoded).all() and decoded.dtype == torch.float32
    warnings = [r for r in caplog.records if "float32" in r.getMessage()]
    assert len(warnings) == 1 and "float16" in warnings[0].getMessage()
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}  # stays float32, as A1111

    # The fallback is a float32 decode of the same (fp16-rounded) weights, not some repair of the fp16 one.
    with torch.no_grad():
        reference = model.vae.decode(latents / model.scaling_factor).sample
    assert torch.allclose(decoded, reference, atol=1e-5)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difusi.vae"), torch.no_grad():
        decode_latents(model.vae, latents, model.scaling_factor)
    assert not caplog.records  # later decodes go straight to float32: no second warning


def test_fp32_vae_is_never_touched():
    model = load_model(default_model_path(), device="cpu")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    before = model.vae.decoder.conv_in.weight.clone()
    with torch.no_grad():
        decoded = decode_latents(model.vae, latents, model.scaling_factor)
    assert torch.isfinite(decoded).all() and torch.equal(model.vae.decoder.conv_in.weight, before)


def test_pipeline_saves_a_real_image_instead_of_a_black_one():
    params = GenerationParams(prompt="a big red circle", seed=2, steps=3)
    model = _overflowing_model("fp16")
    image = np.asarray(txt2img(model, params).images[0].image)
    reference = _overflowing_model("fp32")
    expected = np.asarray(txt2img(reference, params).images[0].image)
    assert image.std() > 0  # not a flat (black) picture
    # Same weights, VAE decoded in float32 in both; only the fp16 UNet/text encoder differ.
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 3

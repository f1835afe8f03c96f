"""difusi on CUDA equals diffusers' pipelines on the same GPU and the same weights (issue 17 "Prove it").

The same construction as tests/pipeline/test_reference_equality.py, moved to the device: diffusers'
StableDiffusion(XL)Pipeline is built from the very modules difusi loaded (so the weights are identical, dtype
included), both run Euler over the same Karras sigmas from the same CPU-drawn initial noise, and the final
latents are decoded to float pixels. fp32: at most 1e-3 as on the CPU; fp16: at most FP16_TOLERANCE (diffusers
keeps its latents in fp16 between steps, difusi in fp32, so half precision separates them more than rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gpu_helpers import DRY, compare_device, free, load, module_dtype, record

from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.vae import decode_latents

FP16_TOLERANCE = 4 / 255
PRECISIONS = ("fp32",) if DRY else ("fp32", "fp16")


def _params(family: str) -> GenerationParams:
    return GenerationParams(prompt="a photo of a red cat, highly detailed", negative_prompt="blurry, low quality",
                            seed=1234 if family == "sd1" else 77, sampler_name="Euler", scheduler="Karras",
                            steps=6, cfg_scale=6.5, width=64, height=64)


def _difusi_pixels(model: Any, params: GenerationParams) -> np.ndarray:
    """difusi's final latents decoded to float pixels: for Euler the last step's x0 estimate is the result."""
    last: dict[str, torch.Tensor] = {}
    txt2img(model, params, progress=lambda p: last.__setitem__("latents", p.latents))
    with torch.inference_mode():
        decoded = decode_latents(model.vae, last["latents"], model.scaling_factor)
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def _reference(model: Any) -> Any:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type=model.prediction_type,
                                       timestep_spacing="trailing")
    from difusi.models.synthetic import reference_pipeline_for

    return reference_pipeline_for(model, scheduler)


def _reference_pixels(model: Any, params: GenerationParams) -> np.ndarray:
    shape = (1, model.latent_channels, params.height // model.vae_scale_factor, params.width // model.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(params.seed))
    # diffusers takes given latents as they are: they must already be on the UNet's device and in its dtype.
    unet_parameter = next(model.unet.parameters())
    extra = {}
    if model.family == "sdxl":
        extra = {"original_size": (params.height, params.width), "target_size": (params.height, params.width)}
    sigmas = build_sigmas(get_sampler("Euler"), "Karras", params.steps, DiscreteNoiseTable())
    with torch.inference_mode():
        return _reference(model)(
            params.prompt, negative_prompt=params.negative_prompt, height=params.height, width=params.width,
            guidance_scale=params.cfg_scale, sigmas=sigmas.tolist(), output_type="np",
            latents=noise.to(unet_parameter.device, unet_parameter.dtype), **extra,
        ).images


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_difusi_equals_diffusers_on_the_device(checkpoints: dict, family: str, precision: str) -> None:
    model = load(checkpoints[f"tiny-{family}"], compare_device(), precision)
    params = _params(family)
    ours = _difusi_pixels(model, params)
    theirs = _reference_pixels(model, params)
    dtype = str(module_dtype(model.unet))
    free(model)
    error = float(np.abs(ours - theirs).max())
    record(f"diffusers/tiny-{family}/{compare_device()}-{precision}", {"max_abs": error, "unet_dtype": dtype})
    assert ours.shape == theirs.shape
    assert error <= (1e-3 if precision == "fp32" else FP16_TOLERANCE), error

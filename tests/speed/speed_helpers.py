"""Shared helpers of the speed tests: difusi's float pixels and diffusers' reference pixels for one job."""

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.vae import decode_latents

PROMPT = "a photo of a red cat, highly detailed"
NEGATIVE = "blurry, low quality"


def euler_params(**changes) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=99, sampler_name="Euler", scheduler="Karras",
                steps=6, cfg_scale=6.5, width=64, height=64)
    return GenerationParams(**{**base, **changes})


def difusi_pixels(model, params):
    """difusi's final image as float pixels in [0, 1] (Euler's last step lands on its denoised estimate), and the result."""
    last = {}
    result = txt2img(model, params, progress=lambda p: last.__setitem__("latents", p.latents))
    with torch.inference_mode():
        decoded = decode_latents(model.vae, last["latents"], model.scaling_factor)
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), result


def eight_bit(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.float32) / 255


def diffusers_pixels(model, params):
    """diffusers' StableDiffusionPipeline on `model`'s weights, same prompt, Euler sigmas and initial noise."""
    from difusi.models.synthetic import reference_modules

    copies = reference_modules(model)  # diffusers' / transformers' own (eager) classes with the model's weights
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type=model.prediction_type,
                                       timestep_spacing="trailing")
    reference = StableDiffusionPipeline(vae=copies.vae, text_encoder=copies.text_encoders[0],
                                        tokenizer=copies.tokenizers[0], unet=copies.unet, scheduler=scheduler,
                                        safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    sigmas = build_sigmas(get_sampler("Euler"), "Karras", params.steps, DiscreteNoiseTable())
    shape = (1, model.latent_channels, params.height // model.vae_scale_factor, params.width // model.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(params.seed))
    with torch.inference_mode():
        return reference(params.prompt, negative_prompt=params.negative_prompt or None, height=params.height,
                         width=params.width, guidance_scale=params.cfg_scale, sigmas=sigmas.tolist(), latents=noise,
                         output_type="np").images

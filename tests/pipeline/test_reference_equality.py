"""difusi's txt2img equals diffusers' reference pipelines on the same weights, seed and sigmas.

Both run Euler over the same sigmas from the same initial latents; difusi's image must match diffusers'
to 1e-3 (max abs difference of float pixels in [0, 1]). diffusers computes CFG in eps space, difusi in
x0 space; the two are algebraically identical, so only float rounding separates them.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from difusi.models.synthetic import reference_modules
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.vae import decode_latents

PROMPT = "a photo of a red cat, highly detailed"
NEGATIVE = "blurry, low quality"


def _difusi_image(model, params):
    """Run difusi and return its final latents decoded to float pixels in [0, 1]."""
    last = {}

    def keep(progress):
        last["latents"] = progress.latents

    result = txt2img(model, params, progress=keep)
    # For Euler the last step lands exactly on its denoised estimate (sigma_next = 0), so the last
    # progress latents are the final latents; check that claim against the 8-bit image too.
    decoded = decode_latents(model.vae, last["latents"], model.scaling_factor)
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    eight_bit = np.asarray(result.images[0].image, dtype=np.float32) / 255
    assert np.abs(eight_bit - pixels[0]).max() <= 0.5 / 255 + 1e-6
    return pixels


def _euler_scheduler(model):
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=model.prediction_type, timestep_spacing="trailing",
    )


def _sigmas(steps):
    return build_sigmas(get_sampler("Euler"), "Karras", steps, DiscreteNoiseTable())


def _noise(model, params):
    """Unit noise for seed s; diffusers multiplies given latents by init_noise_sigma (= sigma_max when trailing)."""
    shape = (1, model.latent_channels, params.height // model.vae_scale_factor, params.width // model.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(params.seed))


def _reference_text_encoder(encoder, reference_model):
    """diffusers' SD2 layout drops the last text layer (its last hidden state is the penultimate layer + final LN);
    difusi keeps the full model and reads layer -2, as the original checkpoint defines it. Give diffusers its layout."""
    if encoder.hidden_layer == -1:
        return reference_model
    truncated = copy.deepcopy(reference_model)
    keep = len(truncated.encoder.layers) + encoder.hidden_layer + 1
    truncated.encoder.layers = truncated.encoder.layers[:keep]
    truncated.config.num_hidden_layers = keep
    return truncated


def _sd_reference(model):
    # diffusers' and transformers' own classes with difusi's loaded weights: the reference shares no module code.
    copies = reference_modules(model)
    encoder = model.text_encoders[0]
    reference = StableDiffusionPipeline(
        vae=copies.vae, text_encoder=_reference_text_encoder(encoder, copies.text_encoders[0]),
        tokenizer=copies.tokenizers[0], unet=copies.unet,
        scheduler=_euler_scheduler(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.vae.register_to_config(scaling_factor=model.scaling_factor)
    return reference


def _sdxl_reference(model, force_zeros_for_empty_prompt):
    copies = reference_modules(model)
    reference = StableDiffusionXLPipeline(
        vae=copies.vae, text_encoder=copies.text_encoders[0], text_encoder_2=copies.text_encoders[1],
        tokenizer=copies.tokenizers[0], tokenizer_2=copies.tokenizers[1], unet=copies.unet,
        scheduler=_euler_scheduler(model),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    reference.vae.register_to_config(scaling_factor=model.scaling_factor, force_upcast=False)
    return reference


def _reference_image(reference, model, params, **extra):
    """diffusers' float pixels for the same prompt, Euler sigmas and initial noise as `params`."""
    with torch.inference_mode():
        return reference(
            params.prompt, negative_prompt=params.negative_prompt or None, height=params.height, width=params.width,
            guidance_scale=params.cfg_scale, sigmas=_sigmas(params.steps).tolist(), latents=_noise(model, params),
            output_type="np", **extra,
        ).images


def _sdxl_size(params):
    return {"original_size": (params.height, params.width), "target_size": (params.height, params.width)}


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_sd_pipeline_matches_diffusers(tiny_models, family):
    model = tiny_models(family)
    params = GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=1234, sampler_name="Euler", scheduler="Karras",
        steps=6, cfg_scale=6.5, width=64, height=64,
    )
    ours = _difusi_image(model, params)
    theirs = _reference_image(_sd_reference(model), model, params)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3


def test_sdxl_pipeline_matches_diffusers(tiny_models):
    model = tiny_models("sdxl")
    params = GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=77, sampler_name="Euler", scheduler="Karras",
        steps=5, cfg_scale=5.0, width=64, height=64,
    )
    ours = _difusi_image(model, params)
    theirs = _reference_image(_sdxl_reference(model, False), model, params, **_sdxl_size(params))
    assert np.abs(ours - theirs).max() <= 1e-3


@pytest.mark.slow
def test_full_size_sd15_architecture_matches_diffusers(tmp_path):
    """The true SD 1.5 architecture (random fp16 weights, run in fp32), 64x64, 2 Euler steps."""
    from difusi.models import load_model
    from difusi.models.synthetic import write_tiny_checkpoint

    path = tmp_path / "sd15-random.safetensors"
    write_tiny_checkpoint(path, "sd1", "safetensors", size="sd15", dtype=torch.float16)
    model = load_model(path)
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, sampler_name="Euler",
                              scheduler="Karras", steps=2, cfg_scale=7.0, width=64, height=64)
    ours = _difusi_image(model, params)
    theirs = _reference_image(_sd_reference(model), model, params)
    assert np.abs(ours - theirs).max() <= 1e-3


def test_sdxl_empty_negative_prompt_is_zeros_like_diffusers(tiny_models):
    """With no negative prompt SDXL's uncond is all zeros (diffusers' force_zeros_for_empty_prompt, A1111 too)."""
    model = tiny_models("sdxl")
    params = GenerationParams(prompt=PROMPT, seed=5, sampler_name="Euler", scheduler="Karras", steps=3,
                              cfg_scale=4.0, width=64, height=64)
    ours = _difusi_image(model, params)
    theirs = _reference_image(_sdxl_reference(model, True), model, params, **_sdxl_size(params))
    assert np.abs(ours - theirs).max() <= 1e-3

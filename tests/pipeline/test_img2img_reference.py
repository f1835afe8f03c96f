"""img2img and the 9-channel inpainting path equal independent references on the same random weights (issue 15).

1. img2img equals a loop written here from the published rules, on diffusers' own UNet / VAE and transformers'
   CLIP holding the tiny sd1 weights (`reference_modules`): the init picture encoded to the mean of diffusers'
   `AutoencoderKL` latent distribution (times the scaling factor), Karras sigmas written out here (Karras et al.
   2022 eq. 5 over SD's scaled-linear table), A1111's step rule (`t_enc = int(min(s, 0.999) * n)`, start index
   `n - t_enc - 1`; with "do exactly the steps" `n = int(steps / min(s, 0.999))` and `t_enc = steps - 1`), the
   seed's CPU `torch.randn` noise (contract 2), Euler (k-diffusion's `sample_euler`, no churn) with CFG, decode.
   The same run is also checked against diffusers' `StableDiffusionImg2ImgPipeline` where the conventions meet.

   The known off-by-one: diffusers' `get_timesteps` runs `int(n * s)` steps, A1111 `int(min(s, 0.999) * n) + 1`
   (A1111 starts one sigma higher), except at s = 1 where both run all n. So A1111's strength s is diffusers'
   strength s' with `int(n * s') = t_enc + 1`; with that s' and the posterior's mean both pipelines agree.

2. The 9-channel inpainting path (and txt2img on a 9-channel checkpoint) equals diffusers'
   `StableDiffusionInpaintPipeline` on the same random 9-channel weights with an all-white mask at strength 1.
   diffusers samples the VAE posterior with the job's generator; `retrieve_latents` in its module is replaced by
   the mean (what difusi, and a seed-for-seed remake, use). Conditioning for a partial mask is compared directly
   with diffusers' `prepare_mask_latents`.

Pixels are compared as floats in [0, 1]: difusi's 8-bit PNG pixels against the reference's float decode, within
2/255 (the 8-bit rounding alone is 0.5/255).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as diffusers_img2img
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as diffusers_inpaint
from PIL import Image

from difusi.init_images import img2img_steps, inpainting_conditioning
from difusi.models import load_model
from difusi.models.synthetic import reference_modules, write_tiny_checkpoint
from difusi.params import GenerationParams
from difusi.pipeline import img2img, txt2img
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.vae import pil_to_tensor

PROMPT = "a photo of a red cat, highly detailed"
NEGATIVE = "blurry, low quality"
TOLERANCE = 2 / 255
MEASURED: dict[str, float] = {}
"""Max abs pixel differences seen (printed with -s; the report quotes them)."""


# ----------------------------------------------------------------------------- the schedule, written out here


def _table_sigmas() -> np.ndarray:
    """SD's 1000 training sigmas: scaled-linear betas, sigma = sqrt((1 - abar) / abar)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


TABLE = _table_sigmas()
LOG_TABLE = np.log(TABLE)


def _karras(n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5 between the table's smallest and largest sigma, then 0 (k-diffusion)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = TABLE[0] ** (1 / rho), TABLE[-1] ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def _timestep(sigma: float) -> float:
    """k-diffusion's DiscreteSchedule.sigma_to_t: linear in log-sigma between table entries."""
    return float(np.interp(math.log(sigma), LOG_TABLE, np.arange(1000, dtype=np.float64)))


def _a1111_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """A1111's `setup_img2img_steps` (modules/sd_samplers_common.py), written out: (schedule steps, t_enc)."""
    if fix_steps:
        return int(steps / min(strength, 0.999)), steps - 1
    return steps, int(min(strength, 0.999) * steps)


# ----------------------------------------------------------------------------- the reference loop


def _text(copies, prompt: str) -> torch.Tensor:
    tokenizer, encoder = copies.tokenizers[0], copies.text_encoders[0]
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        return encoder(ids)[0]


def _reference_img2img(copies, scaling: float, picture: Image.Image, params: GenerationParams) -> np.ndarray:
    """Float pixels [H, W, 3] in [0, 1] of A1111's img2img with Euler and Karras, on diffusers' modules."""
    picture = picture.convert("RGB")
    if picture.size != (params.width, params.height):  # resize mode 0: "just resize", Lanczos (A1111)
        picture = picture.resize((params.width, params.height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    context = torch.cat([_text(copies, params.negative_prompt), _text(copies, params.prompt)])
    n, t_enc = _a1111_steps(params.steps, params.denoising_strength, params.img2img_fix_steps)
    sigmas = torch.tensor(_karras(n)[n - t_enc - 1 :], dtype=torch.float32)
    with torch.inference_mode():
        init = copies.vae.encode(pixels).latent_dist.mean * scaling
        noise = torch.randn(init.shape, generator=torch.Generator("cpu").manual_seed(params.seed))
        x = init + noise * params.initial_noise_multiplier * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            c_in = 1 / (sigma**2 + 1) ** 0.5
            t = torch.tensor([_timestep(float(sigma))] * 2, dtype=torch.float32)
            eps = copies.unet(torch.cat([x, x]) * c_in, t, encoder_hidden_states=context).sample
            denoised_uncond, denoised_cond = (torch.cat([x, x]) - eps * sigma).chunk(2)
            denoised = denoised_uncond + (denoised_cond - denoised_uncond) * params.cfg_scale
            x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)  # Euler, s_churn = 0
        decoded = copies.vae.decode(x / scaling).sample
    return (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth gradient with a coloured square and some noise: structure the VAE can see."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255.0 / width, y * 255.0 / height, np.full_like(x, 128.0, dtype=np.float64)], axis=-1)
    array[height // 4 : height // 2, width // 3 : 2 * width // 3] = (230, 40, 40)
    array += rng.normal(0, 12, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sd1(tiny_models):
    model = tiny_models("sd1")
    return model, reference_modules(model)


def _params(**changes) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1234, sampler_name="Euler", scheduler="Karras",
                steps=8, cfg_scale=6.5, width=64, height=64, denoising_strength=0.6)
    return GenerationParams(**{**base, **changes})


def _record(name: str, value: float) -> None:
    MEASURED[name] = value
    print(f"\n[measured] {name}: max abs pixel difference {value * 255:.3f}/255")


# ----------------------------------------------------------------------------- 1. img2img vs the hand-written loop


def test_the_schedule_written_here_is_difusis_karras_schedule():
    """The reference's sigmas are written independently; difusi's must be the same numbers."""
    for n in (4, 8, 13):
        ours = build_sigmas(get_sampler("Euler"), "Karras", n, DiscreteNoiseTable()).numpy()
        np.testing.assert_allclose(ours, _karras(n), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("steps", "strength", "fix", "expected"),
    [
        (8, 0.6, False, (8, 4)),  # 5 steps from sigmas[3]
        (5, 0.6, True, (8, 4)),  # "do exactly": int(5 / 0.6) = 8 steps scheduled, 5 run
        (4, 1.0, False, (4, 3)),  # full strength: min(1, 0.999) caps t_enc at n - 1, all 4 steps run
        (10, 0.25, False, (10, 2)),
        (3, 0.001, False, (3, 0)),  # t_enc 0: one step, from the last non-zero sigma
    ],
)
def test_a1111_step_rule(steps, strength, fix, expected):
    assert img2img_steps(steps, strength, fix) == expected == _a1111_steps(steps, strength, fix)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"steps": 5, "img2img_fix_steps": True},
        {"steps": 4, "denoising_strength": 1.0},
        {"steps": 10, "denoising_strength": 0.25, "initial_noise_multiplier": 0.9, "seed": 99},
    ],
    ids=["s0.6", "fix-steps", "s1.0", "s0.25-noise0.9"],
)
def test_img2img_equals_the_reference_loop(sd1, changes):
    model, copies = sd1
    params = _params(**changes)
    picture = _picture()
    ours = _pixels(img2img(model, params, [picture]).images[0].image)
    theirs = _reference_img2img(copies, model.scaling_factor, picture, params)
    assert ours.shape == theirs.shape == (64, 64, 3)
    deviation = float(np.abs(ours - theirs).max())
    _record(f"img2img vs reference loop {changes}", deviation)
    assert deviation <= TOLERANCE
    # The picture matters (the reference is not just near any image): at s < 1 it differs from the init picture
    # by far more than the tolerance, and a different init picture gives another result.
    assert np.abs(ours - _pixels(picture)).max() > 10 * TOLERANCE


def test_img2img_resize_mode_0_equals_the_reference_on_a_resized_picture(sd1):
    """A 96x80 init picture, "just resize" (A1111: Lanczos) to the job's 64x64."""
    model, copies = sd1
    params = _params(resize_mode=0, seed=5)
    picture = _picture(96, 80, seed=3)
    ours = _pixels(img2img(model, params, [picture]).images[0].image)
    theirs = _reference_img2img(copies, model.scaling_factor, picture, params)
    deviation = float(np.abs(ours - theirs).max())
    _record("img2img resize mode 0 vs reference loop", deviation)
    assert deviation <= TOLERANCE


def test_fix_steps_equals_the_plain_rule_with_the_same_schedule(sd1):
    """With "do exactly" 5 steps at s = 0.6 A1111 schedules int(5 / 0.6) = 8 steps and runs the last 5: the same
    sigmas as 8 steps at s = 0.6 without it, so the images are bit-identical."""
    model, _ = sd1
    picture = _picture()
    fixed = img2img(model, _params(steps=5, img2img_fix_steps=True), [picture]).images[0].image
    plain = img2img(model, _params(steps=8), [picture]).images[0].image
    assert np.array_equal(np.asarray(fixed), np.asarray(plain))
    other = img2img(model, _params(steps=5), [picture]).images[0].image  # 5 steps at s 0.6: t_enc 3, other sigmas
    assert not np.array_equal(np.asarray(other), np.asarray(plain))


# ----------------------------------------------------------------------------- cross-check with diffusers' img2img


def _euler_scheduler(model):
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=model.prediction_type, timestep_spacing="trailing",
    )


def _mean_latents(encoder_output, generator=None, sample_mode="sample"):
    """diffusers' `retrieve_latents` made deterministic: the posterior's mean, as difusi (and A1111's remakes)."""
    return encoder_output.latent_dist.mean


def _img2img_pipeline(model, copies):
    pipe = StableDiffusionImg2ImgPipeline(
        vae=copies.vae, text_encoder=copies.text_encoders[0], tokenizer=copies.tokenizers[0], unet=copies.unet,
        scheduler=_euler_scheduler(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.vae.register_to_config(scaling_factor=model.scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("n", "strength"), [(8, 0.6), (10, 0.25), (6, 0.5), (4, 1.0), (7, 0.999)])
def test_diffusers_step_count_is_one_less_than_a1111_below_full_strength(sd1, n, strength):
    """diffusers' `get_timesteps` (the conventions' meeting point): `int(n * s)` steps from timestep index
    `n - int(n * s)`; A1111 runs `t_enc + 1` from index `n - t_enc - 1`. Equal at s = 1 only."""
    model, copies = sd1
    pipe = _img2img_pipeline(model, copies)
    pipe.scheduler.set_timesteps(sigmas=_karras(n).tolist())
    timesteps, count = pipe.get_timesteps(n, strength, "cpu")
    t_enc = _a1111_steps(n, strength, False)[1]
    assert count == int(n * strength) == len(timesteps)
    if strength == 1.0:
        assert count == t_enc + 1 == n
    else:
        assert count == t_enc  # one fewer than A1111's t_enc + 1
    # With s' chosen so that int(n * s') = t_enc + 1, diffusers runs exactly A1111's sigmas.
    matched = (t_enc + 1.5) / n if t_enc + 1 < n else 1.0
    pipe.scheduler.set_timesteps(sigmas=_karras(n).tolist())
    _, count = pipe.get_timesteps(n, matched, "cpu")
    assert count == t_enc + 1
    begin = pipe.scheduler._begin_index
    ours = build_sigmas(get_sampler("Euler"), "Karras", n, DiscreteNoiseTable())[n - t_enc - 1 :]
    np.testing.assert_allclose(pipe.scheduler.sigmas[begin:].numpy(), ours.numpy(), rtol=1e-6)


@pytest.mark.parametrize("changes", [{}, {"steps": 10, "denoising_strength": 0.25, "seed": 99}], ids=["s0.6", "s0.25"])
def test_img2img_equals_diffusers_img2img_at_the_matching_strength(sd1, monkeypatch, changes):
    model, copies = sd1
    params = _params(**changes)
    picture = _picture()
    n, t_enc = _a1111_steps(params.steps, params.denoising_strength, False)
    monkeypatch.setattr(diffusers_img2img, "retrieve_latents", _mean_latents)
    with torch.inference_mode():
        theirs = _img2img_pipeline(model, copies)(
            params.prompt, image=picture, strength=(t_enc + 1.5) / n, negative_prompt=params.negative_prompt,
            guidance_scale=params.cfg_scale, sigmas=_karras(n).tolist(),
            generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np",
        ).images[0]
    ours = _pixels(img2img(model, params, [picture]).images[0].image)
    deviation = float(np.abs(ours - theirs).max())
    _record(f"img2img vs diffusers img2img {changes}", deviation)
    assert deviation <= TOLERANCE


# ----------------------------------------------------------------------------- 2. the 9-channel inpainting path


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-inpainting") / "tiny-sd1-inpainting.safetensors"
    write_tiny_checkpoint(path, "sd1", "safetensors", seed=3, inpainting=True)
    model = load_model(path)
    assert model.inpainting and model.unet.config.in_channels == 9
    return model, reference_modules(model)


def _inpaint_pipeline(model, copies):
    pipe = StableDiffusionInpaintPipeline(
        vae=copies.vae, text_encoder=copies.text_encoders[0], tokenizer=copies.tokenizers[0], unet=copies.unet,
        scheduler=_euler_scheduler(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.vae.register_to_config(scaling_factor=model.scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_inpaint(model, copies, params, picture, mask) -> np.ndarray:
    sigmas = build_sigmas(get_sampler("Euler"), "Karras", params.steps, DiscreteNoiseTable()).tolist()
    with torch.inference_mode():
        return _inpaint_pipeline(model, copies)(
            params.prompt, image=picture, mask_image=mask, strength=1.0, negative_prompt=params.negative_prompt,
            guidance_scale=params.cfg_scale, sigmas=sigmas, height=params.height, width=params.width,
            generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np",
        ).images[0]


def test_inpainting_checkpoint_equals_diffusers_inpaint_pipeline(inpainting, monkeypatch):
    """All-white mask, strength 1: diffusers starts from pure noise * sigma_max; A1111 adds the init latents unless
    the masked content is "latent nothing" (3), which zeroes them under the (whole) mask, so fill 3 is where the
    two meet. The masked picture is grey (0 in [-1, 1]) on both sides; no blur, so the mask stays all white."""
    model, copies = inpainting
    monkeypatch.setattr(diffusers_inpaint, "retrieve_latents", _mean_latents)
    params = _params(steps=6, denoising_strength=1.0, inpainting_fill=3, mask_blur=0)
    picture, mask = _picture(), Image.new("L", (64, 64), 255)
    ours = _pixels(img2img(model, params, [picture], mask).images[0].image)
    theirs = _diffusers_inpaint(model, copies, params, picture, mask)
    deviation = float(np.abs(ours - theirs).max())
    _record("9-channel inpaint vs diffusers StableDiffusionInpaintPipeline", deviation)
    assert deviation <= TOLERANCE
    assert np.abs(ours - _pixels(picture)).max() > 10 * TOLERANCE


def test_txt2img_on_an_inpainting_checkpoint_equals_diffusers_with_a_white_mask(inpainting, monkeypatch):
    """A1111's txt2img conditioning (all masked, a grey picture's latents) is what diffusers' inpaint pipeline makes
    of any picture under an all-white mask at strength 1."""
    model, copies = inpainting
    monkeypatch.setattr(diffusers_inpaint, "retrieve_latents", _mean_latents)
    params = _params(steps=5, seed=77)
    ours = _pixels(txt2img(model, params).images[0].image)
    theirs = _diffusers_inpaint(model, copies, params, _picture(seed=8), Image.new("L", (64, 64), 255))
    deviation = float(np.abs(ours - theirs).max())
    _record("txt2img on a 9-channel checkpoint vs diffusers inpaint (white mask)", deviation)
    assert deviation <= TOLERANCE


def _partial_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 14, 42, 50))
    return mask


def test_inpainting_conditioning_equals_diffusers_prepare_mask_latents(inpainting, monkeypatch):
    """A partial binary mask: difusi's `cat([mask, masked-picture latents])` equals diffusers' mask (nearest
    resize to the latents) and masked-image latents (picture * (mask < 0.5), encoded) from `prepare_mask_latents`."""
    model, copies = inpainting
    monkeypatch.setattr(diffusers_inpaint, "retrieve_latents", _mean_latents)
    pipe = _inpaint_pipeline(model, copies)
    picture, mask = _picture(seed=4), _partial_mask()
    pixels = pil_to_tensor([picture])
    latent_size = (64 // model.vae_scale_factor, 64 // model.vae_scale_factor)
    ours = inpainting_conditioning(model, pixels, [mask], latent_size, 1.0)
    init_image = pipe.image_processor.preprocess(picture, height=64, width=64).float()
    mask_condition = pipe.mask_processor.preprocess(mask, height=64, width=64)
    with torch.inference_mode():
        their_mask, their_latents = pipe.prepare_mask_latents(
            mask_condition, init_image * (mask_condition < 0.5), 1, 64, 64, torch.float32, "cpu", None, False)
    assert torch.equal(ours[:, :1], their_mask)
    assert 0 < float(their_mask.mean()) < 1
    torch.testing.assert_close(ours[:, 1:], their_latents, rtol=0, atol=1e-5)


def test_inpainting_mask_weight_lerps_the_masked_picture(inpainting):
    """A1111's conditioning mask strength w: the picture lerped towards picture * (1 - mask), i.e. encoded
    picture * (1 - w * mask); w = 0 is the unmasked picture."""
    model, copies = inpainting
    picture, mask = _picture(seed=4), _partial_mask()
    pixels = pil_to_tensor([picture])
    binary = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    latent_size = (64 // model.vae_scale_factor, 64 // model.vae_scale_factor)
    for weight in (0.0, 0.35, 1.0):
        ours = inpainting_conditioning(model, pixels, [mask], latent_size, weight)
        with torch.inference_mode():
            expected = copies.vae.encode(pixels * (1 - weight * binary)).latent_dist.mean * model.scaling_factor
        torch.testing.assert_close(ours[:, 1:], expected, rtol=0, atol=1e-5)

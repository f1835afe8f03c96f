"""txt2img and img2img: GenerationParams (+ init pictures) -> images.

Owns the denoise loop around the pieces that each live in their own module:
prompt -> conditioning (difusi.prompts) -> per-image noise (difusi.rng) -> sampler over a CFG denoiser
(difusi.samplers) -> latents -> VAE decode (difusi.vae) -> PIL images + infotext.

Batches run as batched network calls; every random draw of image i comes from seed s+i, so image i is the
same whether generated alone or anywhere in a batch (docs/ARCHITECTURE.md contract 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difusi import __version__
from difusi.errors import Interrupted
from difusi.finite import ensure_finite
from difusi.hires import crop_latents, hires_size, is_latent_upscaler, upscale_latents
from difusi.images.load import open_image
from difusi.images.resize import resize_image
from difusi.init_images import (
    InitLatents,
    encode_batch,
    img2img_steps,
    inpainting_conditioning,
    prepare_picture,
    sized_for,
    start_pictures,
    tail_sigmas,
    txt2img_conditioning,
)
from difusi.models.families import spec_of
from difusi.networks.embeddings import attach
from difusi.networks.job import NetworkLibrary, prepare_job
from difusi.networks.tags import parse_network_tags
from difusi.params import IMG2IMG, INPAINT, TXT2IMG, GenerationParams, resolve_seed, same_as_first
from difusi.prompts.conditioning import (
    Conditioning,
    conditioning_at,
    encode_prompt_schedule,
    pad_to_same_length,
    sdxl_time_ids,
)
from difusi.prompts.parser import prompt_warnings
from difusi.rng import image_noise
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import CFGDenoiser, DiscreteNoiseTable, EpsDenoiser, VDenoiser
from difusi.samplers.noise import BrownianNoiseSampler, ImageNoiseSampler
from difusi.speed import prepare_model
from difusi.speed.cfg_cutoff import skip_uncond
from difusi.speed.deepcache import deepcache
from difusi.speed.graph import unet_for
from difusi.speed.tome import token_merging
from difusi.vae import decode_latents, encode_images, latents_to_pil, pil_to_tensor


@dataclass
class Progress:
    """One sampling step of a job: what front ends need for progress bars and live previews."""

    step: int
    """Steps finished in the current batch (1-based after the first step)."""
    steps: int
    """Sampler steps per batch (len(sigmas) - 1; may differ from params.steps for DPM adaptive)."""
    iteration: int
    """0-based batch index in [0, n_iter)."""
    n_iter: int
    image_index: int
    """Index (over the whole job) of the first image of the current batch."""
    latents: torch.Tensor | None
    """Current denoised estimate (x0) of the batch, in the model's latent space."""

    @property
    def fraction(self) -> float:
        """Fraction of the whole job done, in [0, 1]."""
        total = max(1, self.steps * self.n_iter)
        return min(1.0, (self.iteration * self.steps + self.step) / total)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    subseed: int
    index: int
    infotext: str
    params: GenerationParams

    def save(self, path) -> None:
        """Write a PNG carrying the infotext in A1111's `parameters` chunk (what `difusi info` reads)."""
        from difusi.infotext import write_png

        write_png(self.image, path, self.infotext)


@dataclass
class GenerationResult:
    images: list[GeneratedImage] = field(default_factory=list)
    params: GenerationParams | None = None
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    """What the job did differently from how the request reads, one line each: prompt syntax A1111 reads as
    literal text (`difusi.prompts.parser.prompt_warnings`), extra-network tags removed. Front ends show them
    (HTTP `info["warnings"]`, the CLI's stderr)."""

    @property
    def infotexts(self) -> list[str]:
        return [image.infotext for image in self.images]


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
ImageFn = Callable[[GeneratedImage], None]


def txt2img(
    model: Any,
    params: GenerationParams,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    should_skip: StopFn | None = None,
    on_image: ImageFn | None = None,
    networks: NetworkLibrary | None = None,
) -> GenerationResult:
    """Generate `params.batch_size * params.n_iter` images with a loaded model (`difusi.models.load_model`);
    with `enable_hr`, each is redrawn at the hires size by a second pass (`difusi.hires`).

    `networks` is where the prompt's `<lora:...>` tags, embeddings and `sd_vae` files are looked up
    (`difusi.networks.job.library_for(models_dir)`; None: difusi-mini's shipped networks only). The job's networks
    are merged into the model for this job (and whatever an earlier job merged is taken out first).

    `progress` is called after every sampler step; `should_stop` is polled between steps and ends the
    job with `Interrupted` (whose `.result` holds every image finished so far); `should_skip` abandons
    the current batch and goes on with the next; `on_image` receives each image as soon as it is decoded,
    so callers can save it before the next batch starts.
    """
    return _generate(model, params, None, None, progress, should_stop, should_skip, on_image, networks)


def img2img(
    model: Any,
    params: GenerationParams,
    init_images: Sequence[Image.Image | str | Path | bytes],
    mask: Image.Image | str | Path | bytes | None = None,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    should_skip: StopFn | None = None,
    on_image: ImageFn | None = None,
    networks: NetworkLibrary | None = None,
) -> GenerationResult:
    """Redraw `init_images` (A1111's img2img; image i of the job starts from picture `i % len(init_images)`) by
    `params.denoising_strength`; with a `mask` (white = redraw; or the alpha channel of a single RGBA picture) it
    inpaints, and `params.outpaint_pixels` extends the canvas first. Rules: `difusi.init_images`. Width and height
    default to the first picture's size (rounded down to a multiple of 8). The other arguments are `txt2img`'s.

    Raises ParamError naming the field: "init_images" / "mask" for unreadable pictures, a mask of another size or
    an all-black mask, and every field-table range.
    """
    pictures = [open_image(picture, "init_images") for picture in init_images]
    opened_mask = None if mask is None else open_image(mask, "mask")
    if pictures:
        params = sized_for(params, pictures[0])
    return _generate(model, params, pictures, opened_mask, progress, should_stop, should_skip, on_image, networks)


@dataclass
class _Pass:
    """One sampling pass of a job: the first (txt2img / img2img) or the hires fix's second."""

    sampler: Any
    sigmas: torch.Tensor
    cond: list
    uncond: list
    size: tuple[int, int]
    """(height, width) in pixels."""
    original_size: tuple[int, int]
    """SDXL's size conditioning: (height, width) of the source picture."""


def _generate(model, params, pictures, mask, progress, should_stop, should_skip, on_image, networks):
    started = time.perf_counter()
    kind = TXT2IMG
    latent_mask = None
    if pictures is not None:
        params, pictures, mask, latent_mask = start_pictures(params.validated(native_size=model.native_size),
                                                             pictures, mask)
        kind = INPAINT if mask is not None else IMG2IMG
    params = params.validated(native_size=model.native_size)
    prepare_model(model)  # exact CPU fast path, once per loaded model (difusi.speed.exact)
    sampler = get_sampler(params.sampler_name)
    scheduler = _schedule_name(sampler, params.scheduler)
    seed = resolve_seed(params.seed)
    subseed = resolve_seed(params.subseed)
    total = params.total_images
    seeds = [seed + i for i in range(total)]
    subseeds = [subseed + i for i in range(total)]
    resolved = params.replace(seed=seed, subseed=subseed, sampler_name=sampler.name, scheduler=scheduler)
    schedule_steps = _schedule_steps(sampler, params.steps)
    job_networks = prepare_job(model, resolved, networks)
    warnings = job_networks.warnings + prompt_warnings(job_networks.prompt, schedule_steps, "prompt") + \
        prompt_warnings(params.negative_prompt, schedule_steps, "negative_prompt")
    result = GenerationResult(params=resolved, seeds=seeds, subseeds=subseeds, warnings=warnings)
    upscale = None
    if kind == TXT2IMG and resolved.enable_hr and not is_latent_upscaler(resolved.hr_upscaler):
        upscale = _upscaler(resolved.hr_upscaler, networks)

    table = DiscreteNoiseTable()
    strength = resolved.denoising_strength
    if kind == TXT2IMG:
        sigmas = build_sigmas(sampler, scheduler, params.steps, table, family=model.family)
    else:
        sigmas = _img2img_sigmas(model, sampler, scheduler, params.steps, strength, params.img2img_fix_steps, table)
    size = (resolved.height, resolved.width)
    # The infotext keeps the prompt as written (A1111 does too); only the text encoder sees it without the tags.
    with attach(model, job_networks.embeddings) as embeddings_used:
        cond, uncond = _encode(model, resolved.replace(prompt=job_networks.prompt), schedule_steps)
        first = _Pass(sampler, sigmas, cond, uncond, size, pictures[0].size[::-1] if pictures else size)
        hires = _hires_plan(model, resolved, job_networks.prompt, schedule_steps, table, result) \
            if kind == TXT2IMG and resolved.enable_hr else None
    if (ti_hashes := embeddings_used.ti_hashes()) is not None:
        job_networks.infotext["TI hashes"] = ti_hashes
    denoiser, backend_warnings, unet_precision = _denoiser(model, table, resolved)
    result.warnings += backend_warnings
    # The infotext says the precision that ran (a shortcut the backend could not apply is not claimed).
    resolved = result.params = resolved.replace(unet_precision=unet_precision)
    prepared = [prepare_picture(resolved, picture, mask, latent_mask) for picture in pictures or []]
    steps_per_batch = len(sigmas) - 1 + (len(hires.sigmas) - 1 if hires is not None else 0)

    for iteration in range(params.n_iter):
        _stop_between_phases(should_stop, result, started)
        first_index = iteration * params.batch_size
        batch_seeds = seeds[first_index : first_index + params.batch_size]
        batch_subseeds = subseeds[first_index : first_index + params.batch_size]
        batch_pictures = [prepared[(first_index + k) % len(prepared)] for k in range(len(batch_seeds))] \
            if prepared else None
        tracker = _StepTracker(progress, should_stop, should_skip, steps_per_batch, iteration, params.n_iter,
                               first_index)
        try:
            with torch.inference_mode():
                latents = _sample_batch(model, resolved, first, denoiser, batch_seeds, batch_subseeds, tracker,
                                        batch_pictures)
                if hires is not None:
                    latents = _hires_pass(model, resolved, hires, denoiser, latents, batch_seeds, batch_subseeds,
                                          tracker, upscale)
                decoded = decode_latents(model.vae, latents, model.scaling_factor)
                ensure_finite(decoded, "decoding")
            _drop_late_skip(should_skip)
        except _Skipped:
            continue
        except Interrupted as stop:
            result.seconds = time.perf_counter() - started
            stop.result = result
            raise
        for offset, picture in enumerate(latents_to_pil(decoded)):
            index = first_index + offset
            if batch_pictures is not None:
                picture = batch_pictures[offset].finish(picture)
            image_params = resolved.replace(seed=seeds[index], subseed=subseeds[index])
            generated = GeneratedImage(
                image=picture,
                seed=seeds[index],
                subseed=subseeds[index],
                index=index,
                infotext=_infotext(model, image_params, job_networks.infotext, kind),
                params=image_params,
            )
            result.images.append(generated)
            if on_image is not None:
                on_image(generated)
    result.seconds = time.perf_counter() - started
    return result


def _schedule_name(sampler: Any, scheduler: str) -> str:
    """A legacy sampler name's schedule ("DPM++ 2M Karras") when the schedule is "Automatic"."""
    if sampler.schedule_override is not None and scheduler.lower() == "automatic":
        return sampler.schedule_override
    return scheduler


def _upscaler(name: str, networks: NetworkLibrary | None) -> Callable[[Image.Image, float], Image.Image]:
    from difusi.upscalers import get_upscaler

    upscaler = get_upscaler(name, None if networks is None else networks.models_dir)
    return upscaler.upscale


def _img2img_sigmas(model, sampler, scheduler: str, steps: int, strength: float, fix_steps: bool, table):
    """The img2img part of the schedule (`difusi.init_images.img2img_steps`); no steps at all for strength 0."""
    if strength == 0:
        return torch.zeros(1, dtype=torch.float64)
    n_schedule, t_enc = img2img_steps(steps, strength, fix_steps)
    return tail_sigmas(build_sigmas(sampler, scheduler, n_schedule, table, family=model.family), t_enc)


def _hires_plan(model, params: GenerationParams, clip_prompt: str, first_steps: int, table, result) -> _Pass:
    """The second pass's sampler, sigmas and conditioning (A1111's `calculate_hr_conds`): its own prompts when
    given, with prompt editing on the hires schedule (`get_prompt_schedule(..., hires_steps=)`)."""
    sampler = get_sampler(same_as_first(params.hr_sampler_name) or params.sampler_name)
    scheduler = _schedule_name(sampler, same_as_first(params.hr_scheduler) or params.scheduler)
    steps = params.hr_second_pass_steps or params.steps
    sigmas = _img2img_sigmas(model, sampler, scheduler, steps, params.denoising_strength, True, table)
    prompt = clip_prompt
    if params.hr_prompt:
        tags = parse_network_tags(params.hr_prompt)
        prompt = tags.prompt
        if tags.loras:
            result.warnings.append("hr_prompt: its <lora:...> tags were removed; the hires pass uses the prompt's "
                                   "networks (put them in the prompt)")
    negative = params.hr_negative_prompt or params.negative_prompt
    hires_steps = _schedule_steps(sampler, steps)
    cond, uncond = _encode(model, params.replace(prompt=prompt, negative_prompt=negative), first_steps,
                           hires_steps=hires_steps)
    size = hires_size(params, model.vae_scale_factor)
    return _Pass(sampler, sigmas, cond, uncond, (size.height, size.width), (size.height, size.width))


def _hires_pass(model, params, plan: _Pass, denoiser, latents, seeds, subseeds, tracker, upscale):
    """A1111's `sample_hr_pass`: upscale the first pass (latents, or decoded pixels through an upscaler), then an
    img2img of it with fresh noise from the same seeds at the new size."""
    factor = model.vae_scale_factor
    size = hires_size(params, factor)
    height, width = size.height // factor, size.width // factor
    pixels = None
    if is_latent_upscaler(params.hr_upscaler):
        start = upscale_latents(latents, params.hr_upscaler, height, width)
    else:
        decoded = decode_latents(model.vae, latents, model.scaling_factor)
        ensure_finite(decoded, "decoding")
        pictures = [resize_image(0, picture, size.width, size.height, upscale) for picture in latents_to_pil(decoded)]
        pixels = pil_to_tensor(pictures).to(latents.device)
        start = encode_images(model.vae, pixels, model.scaling_factor)
    init = InitLatents(latents=crop_latents(start, size.crop_x, size.crop_y))
    if params.denoising_strength == 0:
        return init.latents  # the upscaled first pass, not redrawn
    if model.inpainting:
        if pixels is None and params.inpainting_mask_weight < 1.0:
            pixels = decode_latents(model.vae, start, model.scaling_factor)
        init.image_conditioning = crop_latents(
            inpainting_conditioning(model, pixels, [None] * len(seeds), start.shape[-2:], params.inpainting_mask_weight)
            if pixels is not None else
            txt2img_conditioning(model, len(seeds), size.height, size.width, start.device), size.crop_x, size.crop_y)
    return _sample_batch(model, params, plan, denoiser, seeds, subseeds, tracker, None, init=init)


class _Skipped(Exception):
    """Raised from the step callback to abandon the current batch (A1111's "skip")."""


class _StepTracker:
    """Sampler callback: reports progress and polls cancel/skip once per sampler step.

    It does not drive conditioning: the prompt-schedule step is counted by `_ScheduledCFG` itself, so where
    (or whether) a sampler reports progress cannot change which prompt a model call sees."""

    def __init__(self, progress, should_stop, should_skip, steps, iteration, n_iter, image_index):
        self.progress, self.should_stop, self.should_skip = progress, should_stop, should_skip
        self.steps, self.iteration, self.n_iter, self.image_index = steps, iteration, n_iter, image_index
        self.step = 0
        self.offset = 0
        """Steps of the batch's earlier passes (hires fix: progress runs on through the second pass)."""

    def begin_pass(self) -> None:
        self.offset = self.step

    def __call__(self, info: dict) -> None:
        self.step = self.offset + int(info["i"]) + 1
        ensure_finite(info.get("denoised"), "sampling", self.step)
        if self.progress is not None:
            self.progress(
                Progress(self.step, self.steps, self.iteration, self.n_iter, self.image_index, info.get("denoised"))
            )
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("generation interrupted")
        if self.should_skip is not None and self.should_skip():
            raise _Skipped()


def _stop_between_phases(should_stop: StopFn | None, result: GenerationResult, started: float) -> None:
    """A stop asked for while the text was encoded or a batch decoded ends the job before the next batch samples."""
    if should_stop is not None and should_stop():
        result.seconds = time.perf_counter() - started
        stop = Interrupted("generation interrupted")
        stop.result = result
        raise stop


def _drop_late_skip(should_skip: StopFn | None) -> None:
    """A skip that arrives after a batch's last step (while decoding) is dropped, as A1111 clears it at the next
    batch: the batch is finished and kept, and the next one must not be skipped in its place."""
    if should_skip is not None:
        should_skip()


def _sample_batch(model, params, run: _Pass, denoiser, seeds, subseeds, tracker, pictures=None, init=None):
    """One batch's sampling run: from noise (txt2img), from init pictures (img2img / inpaint), or from given init
    latents (the hires pass)."""
    device = _execution_device(model)
    factor = model.vae_scale_factor
    shape = (model.latent_channels, run.size[0] // factor, run.size[1] // factor)
    if init is not None:
        shape = tuple(init.latents.shape[1:])
    # Noise comes from the job's source on the CPU (GPU source: the device's generator), whatever the device and
    # precision, so the seed gives the same image everywhere (contract 2) and the infotext never names a device.
    drawn = image_noise(seeds, shape, subseeds, params.subseed_strength, source=params.rng, device=device)
    noise = drawn.noise.to(device=device, dtype=torch.float32)
    if pictures is not None:
        init = encode_batch(model, params, pictures, noise, device)
    # Latents and sigmas stay float32 whatever the UNet's precision (cast at the UNet call, `_denoiser`), as A1111
    # and diffusers: the sampler's updates x + (d * dt) lose the small steps in float16. float32, not float64,
    # sigmas: the denoiser scales x by them, and float64 would upcast x.
    sigmas = run.sigmas.to(device=device, dtype=torch.float32)
    if init is None:
        x = noise * sigmas[0]
        if model.inpainting:  # txt2img on an inpainting checkpoint: everything masked (A1111)
            init = InitLatents(latents=x, image_conditioning=txt2img_conditioning(
                model, len(seeds), run.size[0], run.size[1], device))
    else:
        if len(sigmas) < 2:
            return init.latents  # strength 0, nothing to redraw: the pictures through the VAE
        multiplier = params.initial_noise_multiplier if pictures is not None else 1.0
        x = init.latents + noise * multiplier * sigmas[0]
    if run.sampler.uses_brownian_noise:
        positive = sigmas[sigmas > 0]
        noise_sampler = BrownianNoiseSampler(x, positive.min(), positive.max(), seeds)
    else:
        noise_sampler = ImageNoiseSampler(drawn.generators, x)
    guided = _ScheduledCFG(denoiser, run, params, len(seeds), model, init)
    tracker.begin_pass()
    # Per pass: DeepCache's cached features belong to one latent size (the hires pass has another).
    with token_merging(model.unet, params.token_merging_ratio), deepcache(model.unet, params.deepcache_interval):
        samples = run.sampler(
            guided, x, sigmas, extra_args={}, callback=tracker, disable=True, noise_sampler=noise_sampler,
            **_sampler_options(run.sampler, params),
        )
    if init is not None and init.keep is not None:
        samples = samples * (1.0 - init.keep) + init.latents * init.keep  # A1111's final blend
    return samples


def _schedule_steps(sampler: Any, steps: int) -> int:
    """Length of the prompt schedule (prompt editing, alternation) for `steps` sampler steps: A1111's
    `SamplerData.total_steps` (modules/sd_samplers_common.py), i.e. `steps * 2` for the samplers A1111 flags
    "second_order" (Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a, Restart) and `steps` for all others.

    A1111's `setup_conds` encodes the prompts for this many steps, because its CFG denoiser counts model calls
    (see `_ScheduledCFG`) and a second-order sampler makes about two calls per step."""
    return steps * 2 if getattr(sampler, "second_order", False) else steps


class _ScheduledCFG:
    """The model the sampler sees: picks the conditioning for the current schedule step (prompt editing,
    alternation) and applies classifier-free guidance (Ho & Salimans 2022) in one batched call.

    The schedule step is explicit and owned here: call k (0-based) of this batch's sampling run uses schedule
    step k, with the schedule built for `_schedule_steps(sampler, steps)` steps. This is A1111's rule:
    `CFGDenoiser.forward` (modules/sd_samplers_cfg_denoiser.py) reads the conditioning with
    `reconstruct_cond_batch(cond, self.step)` and ends with `self.step += 1`, and `setup_conds`
    (modules/processing.py) builds the schedule for `sampler_config.total_steps(steps)` (2x steps for
    "second_order" samplers). Consequences, all A1111's:

    - one call per step (Euler, Euler a, LMS, DPM++ 2M, DPM++ 2M/3M SDE, DDIM, UniPC, LCM): call k is step k,
      so these images are bit-identical to difusi's earlier step counter (advanced by the progress callback);
    - Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a: step i's first call is schedule step 2i and its second
      (corrector / midpoint) call 2i + 1; the last step to sigma = 0 makes one call. `[a:b:0.5]` over N steps
      switches after call int(0.5 * 2N), which can fall between the two calls of one sampler step, and
      `[a|b]` alternates on every call, not every step; an integer `when` counts calls;
    - samplers with their own call pattern count calls too: PLMS (one extra call on its first step), DPM fast
      (exactly `steps` calls over its own solver grid), DPM adaptive (as many as its error control needs),
      Restart (Heun steps on its own sigmas, going back up in noise). Past the schedule's last entry
      `conditioning_at` gives the first entry, as A1111 does; only DPM adaptive gets there.

    A step derived from sigma was considered and rejected: Heun's corrector call is at exactly sigmas[i+1],
    the same sigma as the next step's first call, and DPM fast/adaptive/Restart call at sigmas off the grid
    or out of order, so no sigma -> step map gives A1111's images for all of A1111's samplers.
    The NGMS parity (`skip_uncond`) uses the same call index, as A1111's `self.step % 2` does.

    With init latents and a keep mask (inpainting), every call's denoised estimate is blended with the init latents
    where they are kept (A1111's `CFGDenoiser` with `mask_before_denoising` off); an inpainting checkpoint's
    image conditioning rides along in every call (`c_concat`).
    """

    def __init__(self, denoiser, run, params, batch, model, init=None):
        self.cfg = CFGDenoiser(denoiser)
        self.cond_schedule, self.uncond_schedule = run.cond, run.uncond
        self.cfg_scale, self.batch = params.cfg_scale, batch
        self.time_ids = _sdxl_time_ids(model, run.size, run.original_size)
        self.s_min_uncond = params.s_min_uncond
        self.init = init
        self.calls = 0
        """Model calls made so far in this batch; the next call uses schedule step `self.calls`."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        step = self.calls
        cond = conditioning_at(self.cond_schedule, step)
        uncond = conditioning_at(self.uncond_schedule, step)
        cond, uncond = pad_to_same_length(cond, uncond)
        # NGMS (opt-in, difusi.speed.cfg_cutoff): cond_scale 1 makes the CFG denoiser skip the uncond pass.
        skip = skip_uncond(self.s_min_uncond, float(sigma.reshape(-1)[0]), step, self.cfg_scale)
        denoised = self.cfg(
            x, sigma,
            cond=self._network_kwargs(cond, x), uncond=self._network_kwargs(uncond, x),
            cond_scale=1.0 if skip else self.cfg_scale,
        )
        self.calls += 1
        if self.init is not None and self.init.keep is not None:
            denoised = denoised * (1.0 - self.init.keep) + self.init.latents * self.init.keep
        return denoised

    def _network_kwargs(self, conditioning: Conditioning, x: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = {"context": _repeat(conditioning.context, self.batch).to(x.device, x.dtype)}
        if self.init is not None and self.init.image_conditioning is not None:
            kwargs["c_concat"] = self.init.image_conditioning.to(x.device, x.dtype)
        if conditioning.pooled is not None and self.time_ids is not None:
            kwargs["pooled"] = _repeat(conditioning.pooled, self.batch).to(x.device, x.dtype)
            kwargs["time_ids"] = _repeat(self.time_ids, self.batch).to(x.device, x.dtype)
        return kwargs


def _repeat(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:])


def _encode(model, params: GenerationParams, steps: int | None = None, hires_steps: int | None = None):
    """Prompt schedules (cond, uncond) for `steps` schedule steps (default `params.steps`; txt2img passes
    `_schedule_steps(sampler, params.steps)`, A1111's total_steps); `hires_steps`: the hires pass's schedule."""
    steps = params.steps if steps is None else steps
    # Clip skip acts on SD1 only, as in A1111: SD2 and SDXL already read the penultimate layer (family table).
    family = spec_of(model)
    clip_skip = params.clip_skip if family.honours_clip_skip else 1
    with torch.inference_mode():
        # Negative first, as A1111: the order decides the order of the infotext's "TI hashes".
        uncond = encode_prompt_schedule(model.text_encoders, params.negative_prompt, steps, clip_skip, hires_steps)
        cond = encode_prompt_schedule(model.text_encoders, params.prompt, steps, clip_skip, hires_steps)
    if family.zero_empty_negative and not params.negative_prompt:
        # SDXL's empty negative prompt is all zeros in A1111 and diffusers alike.
        uncond = [(end_step, conditioning.zeros_like()) for end_step, conditioning in uncond]
    for _, conditioning in cond + uncond:
        ensure_finite(conditioning.context, "text encoding")
    return cond, uncond


def _execution_device(model) -> torch.device:
    """Where latents live: the model's execution device (with offload its weights rest on the CPU between calls);
    objects without one (test doubles) use their UNet's first parameter's device."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.unet.parameters()).device


def _denoiser(model, table: DiscreteNoiseTable, params: GenerationParams):
    """The model wrapper the samplers see, the warnings of the UNet backend's choice (a fallback to torch) and the
    UNet precision that runs."""
    choice = unet_for(model, params)  # the torch module, or a compiled graph of it (difusi.speed.graph)
    unet = choice.unet
    dtype = next(model.unet.parameters()).dtype

    def network(x_in, t, context, pooled=None, time_ids=None, c_concat=None):
        # The one cast to the UNet's precision (fp16/bf16 on a GPU) and back: the sampler only sees float32.
        added = None if pooled is None else {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        if c_concat is not None:  # an inpainting UNet: latents (scaled by c_in), mask, masked-picture latents
            x_in = torch.cat([x_in, c_concat], dim=1)
        return unet(x_in.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample.float()

    wrapper = VDenoiser if model.prediction_type == "v_prediction" else EpsDenoiser
    return wrapper(network, table), choice.warnings, choice.precision


def _sdxl_time_ids(model, size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor | None:
    """SDXL size conditioning (Podell et al. 2023), no crop: the original size is the target size in txt2img (as
    A1111) and the init picture's size in img2img."""
    if not spec_of(model).size_conditioning:
        return None
    return sdxl_time_ids(tuple(original_size), (0, 0), tuple(size))


def _sampler_options(sampler, params: GenerationParams) -> dict[str, float]:
    """Pass the user-facing options a sampler understands; None/unset means the sampler's default."""
    wanted = {"eta": params.eta, "s_noise": params.s_noise, "s_churn": params.s_churn,
              "s_tmin": params.s_tmin, "s_tmax": params.s_tmax}
    # A deterministic sampler ignores eta, as in A1111 (API clients send eta for every sampler).
    return {name: value for name, value in wanted.items() if name in sampler.options and value is not None}


def _infotext(model, params: GenerationParams, extra: dict[str, str], kind: str) -> str:
    from difusi.infotext import format_infotext

    return format_infotext(
        params, seed=params.seed, subseed=params.subseed, model_name=model.name, model_hash=model.short_hash,
        version=__version__, extra=extra, kind=kind,
    )

"""txt2img: GenerationParams -> images.

Owns the denoise loop around the pieces that each live in their own module:
prompt -> conditioning (difusi.prompts) -> per-image noise (difusi.rng) -> sampler over a CFG denoiser
(difusi.samplers) -> latents -> VAE decode (difusi.vae) -> PIL images + infotext.

Batches run as batched network calls; every random draw of image i comes from seed s+i, so image i is the
same whether generated alone or anywhere in a batch (docs/ARCHITECTURE.md contract 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from difusi import __version__
from difusi.errors import Interrupted
from difusi.finite import ensure_finite
from difusi.models.families import spec_of
from difusi.networks.embeddings import attach
from difusi.networks.job import NetworkLibrary, prepare_job
from difusi.params import GenerationParams, resolve_seed
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
from difusi.vae import decode_latents, latents_to_pil


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
    """Generate `params.batch_size * params.n_iter` images with a loaded model (`difusi.models.load_model`).

    `networks` is where the prompt's `<lora:...>` tags, embeddings and `sd_vae` files are looked up
    (`difusi.networks.job.library_for(models_dir)`; None: difusi-mini's shipped networks only). The job's networks
    are merged into the model for this job (and whatever an earlier job merged is taken out first).

    `progress` is called after every sampler step; `should_stop` is polled between steps and ends the
    job with `Interrupted` (whose `.result` holds every image finished so far); `should_skip` abandons
    the current batch and goes on with the next; `on_image` receives each image as soon as it is decoded,
    so callers can save it before the next batch starts.
    """
    started = time.perf_counter()
    params = params.validated(native_size=model.native_size)
    prepare_model(model)  # exact CPU fast path, once per loaded model (difusi.speed.exact)
    sampler = get_sampler(params.sampler_name)
    scheduler = params.scheduler
    if sampler.schedule_override is not None and scheduler.lower() == "automatic":
        scheduler = sampler.schedule_override
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
    clip_prompt = job_networks.prompt
    result = GenerationResult(params=resolved, seeds=seeds, subseeds=subseeds, warnings=warnings)

    table = DiscreteNoiseTable()
    sigmas = build_sigmas(sampler, scheduler, params.steps, table, family=model.family)
    # The infotext keeps the prompt as written (A1111 does too); only the text encoder sees it without the tags.
    with attach(model, job_networks.embeddings) as embeddings_used:
        cond_schedule, uncond_schedule = _encode(model, resolved.replace(prompt=clip_prompt), schedule_steps)
    if (ti_hashes := embeddings_used.ti_hashes()) is not None:
        job_networks.infotext["TI hashes"] = ti_hashes
    denoiser = _denoiser(model, table, resolved)

    for iteration in range(params.n_iter):
        _stop_between_phases(should_stop, result, started)
        first = iteration * params.batch_size
        batch_seeds = seeds[first : first + params.batch_size]
        batch_subseeds = subseeds[first : first + params.batch_size]
        tracker = _StepTracker(progress, should_stop, should_skip, len(sigmas) - 1, iteration, params.n_iter, first)
        try:
            with torch.inference_mode(), token_merging(model.unet, params.token_merging_ratio), \
                    deepcache(model.unet, params.deepcache_interval):
                latents = _sample_batch(
                    model, resolved, sampler, sigmas, denoiser, cond_schedule, uncond_schedule,
                    batch_seeds, batch_subseeds, tracker,
                )
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
            index = first + offset
            image_params = resolved.replace(seed=seeds[index], subseed=subseeds[index])
            generated = GeneratedImage(
                image=picture,
                seed=seeds[index],
                subseed=subseeds[index],
                index=index,
                infotext=_infotext(model, image_params, job_networks.infotext),
                params=image_params,
            )
            result.images.append(generated)
            if on_image is not None:
                on_image(generated)
    result.seconds = time.perf_counter() - started
    return result


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

    def __call__(self, info: dict) -> None:
        self.step = int(info["i"]) + 1
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


def _sample_batch(model, params, sampler, sigmas, denoiser, cond_schedule, uncond_schedule, seeds, subseeds, tracker):
    shape = (model.latent_channels, params.height // model.vae_scale_factor, params.width // model.vae_scale_factor)
    device = _execution_device(model)
    # Noise comes from the job's source on the CPU (GPU source: the device's generator), whatever the device and
    # precision, so the seed gives the same image everywhere (contract 2) and the infotext never names a device.
    drawn = image_noise(seeds, shape, subseeds, params.subseed_strength, source=params.rng, device=device)
    # Latents and sigmas stay float32 whatever the UNet's precision (cast at the UNet call, `_denoiser`), as A1111
    # and diffusers: the sampler's updates x + (d * dt) lose the small steps in float16. float32, not float64,
    # sigmas: the denoiser scales x by them, and float64 would upcast x.
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    x = drawn.noise.to(device=device, dtype=torch.float32) * sigmas[0]
    if sampler.uses_brownian_noise:
        positive = sigmas[sigmas > 0]
        noise_sampler = BrownianNoiseSampler(x, positive.min(), positive.max(), seeds)
    else:
        noise_sampler = ImageNoiseSampler(drawn.generators, x)
    batch = len(seeds)
    guided = _ScheduledCFG(denoiser, cond_schedule, uncond_schedule, params.cfg_scale, batch, model, params)
    return sampler(
        guided, x, sigmas, extra_args={}, callback=tracker, disable=True, noise_sampler=noise_sampler,
        **_sampler_options(sampler, params),
    )


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
    """

    def __init__(self, denoiser, cond_schedule, uncond_schedule, cfg_scale, batch, model, params):
        self.cfg = CFGDenoiser(denoiser)
        self.cond_schedule, self.uncond_schedule = cond_schedule, uncond_schedule
        self.cfg_scale, self.batch = cfg_scale, batch
        self.time_ids = _sdxl_time_ids(model, params)
        self.s_min_uncond = params.s_min_uncond
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
        return denoised

    def _network_kwargs(self, conditioning: Conditioning, x: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = {"context": _repeat(conditioning.context, self.batch).to(x.device, x.dtype)}
        if conditioning.pooled is not None and self.time_ids is not None:
            kwargs["pooled"] = _repeat(conditioning.pooled, self.batch).to(x.device, x.dtype)
            kwargs["time_ids"] = _repeat(self.time_ids, self.batch).to(x.device, x.dtype)
        return kwargs


def _repeat(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:])


def _encode(model, params: GenerationParams, steps: int | None = None):
    """Prompt schedules (cond, uncond) for `steps` schedule steps (default `params.steps`; txt2img passes
    `_schedule_steps(sampler, params.steps)`, A1111's total_steps)."""
    steps = params.steps if steps is None else steps
    # Clip skip acts on SD1 only, as in A1111: SD2 and SDXL already read the penultimate layer (family table).
    family = spec_of(model)
    clip_skip = params.clip_skip if family.honours_clip_skip else 1
    with torch.inference_mode():
        # Negative first, as A1111: the order decides the order of the infotext's "TI hashes".
        uncond = encode_prompt_schedule(model.text_encoders, params.negative_prompt, steps, clip_skip)
        cond = encode_prompt_schedule(model.text_encoders, params.prompt, steps, clip_skip)
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
    unet = unet_for(model, params).unet  # the torch module, or a compiled graph of it (difusi.speed.graph)
    dtype = next(model.unet.parameters()).dtype

    def network(x_in, t, context, pooled=None, time_ids=None):
        # The one cast to the UNet's precision (fp16/bf16 on a GPU) and back: the sampler only sees float32.
        added = None if pooled is None else {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return unet(x_in.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample.float()

    wrapper = VDenoiser if model.prediction_type == "v_prediction" else EpsDenoiser
    return wrapper(network, table)


def _sdxl_time_ids(model, params: GenerationParams) -> torch.Tensor | None:
    """SDXL size conditioning (Podell et al. 2023): original size = target size, no crop, as A1111 does."""
    if not spec_of(model).size_conditioning:
        return None
    return sdxl_time_ids((params.height, params.width), (0, 0), (params.height, params.width))


def _sampler_options(sampler, params: GenerationParams) -> dict[str, float]:
    """Pass the user-facing options a sampler understands; None/unset means the sampler's default."""
    wanted = {"eta": params.eta, "s_noise": params.s_noise, "s_churn": params.s_churn,
              "s_tmin": params.s_tmin, "s_tmax": params.s_tmax}
    # A deterministic sampler ignores eta, as in A1111 (API clients send eta for every sampler).
    return {name: value for name, value in wanted.items() if name in sampler.options and value is not None}


def _infotext(model, params: GenerationParams, extra: dict[str, str]) -> str:
    from difusi.infotext import format_infotext

    return format_infotext(
        params, seed=params.seed, subseed=params.subseed, model_name=model.name, model_hash=model.short_hash,
        version=__version__, extra=extra,
    )

"""The small Python API: `generate(prompt, ...)` with the default model, or any checkpoint by path/name;
`img2img(prompt, pictures, ...)` to redraw, inpaint (`mask=`) or outpaint pictures; `upscale(picture, ...)`.

    from difusi import generate, img2img
    result = generate("a red circle on a blue background", seed=1, steps=20)
    result.images[0].save("circle.png")   # PNG with its infotext chunk
    redrawn = img2img("a green circle on a blue background", ["circle.png"], denoising_strength=0.6, seed=1)

Models are kept in one process-wide cache, so repeated calls do not re-read the file; naming another
model frees the previous one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difusi.devices import check_offload, resolve_device, resolve_precision
from difusi.models import LoadedModel, ModelCache, default_model_path, resolve_checkpoint
from difusi.params import GenerationParams
from difusi.pipeline import GenerationResult, txt2img
from difusi.pipeline import img2img as _img2img

_MODELS = ModelCache()


def get_model(model: str | Path | None = None, models_dir: str | Path | None = None, *, device: str = "auto",
              precision: str = "auto", offload: str = "none") -> LoadedModel:
    """Load (or reuse) a checkpoint: None = difusi-mini; else a path, or anything the one resolver accepts
    (`difusi.models.resolve_checkpoint`: title, name, file name, sub-folder path, short or full hash) among
    difusi-mini and `models_dir`'s checkpoints. Unknown or ambiguous names raise CheckpointError.

    `device` ("auto": CUDA, then MPS, then the CPU), `precision` ("auto", "fp32", "fp16", "bf16") and `offload`
    ("none", "model", "sequential") are `difusi.devices`' choices; a bad or absent device raises ParamError
    before any file is read. Asking again with other values reloads the model that way."""
    resolve_device(device)
    resolve_precision(precision)
    check_offload(offload)
    path = default_model_path() if model is None else resolve_checkpoint(model, models_dir)
    return _MODELS.get(path, device=device, precision=precision, offload=offload)


def generate(prompt: str, *, model: str | Path | None = None, models_dir: str | Path | None = None,
             device: str = "auto", precision: str = "auto", offload: str = "none", vae: str | None = None,
             **fields: Any) -> GenerationResult:
    """Generate images for `prompt`; `fields` are GenerationParams fields (A1111 names: seed, steps,
    cfg_scale, sampler_name, scheduler, width, height, batch_size, n_iter, negative_prompt, rng, ...).
    `device`, `precision` and `offload` choose where and how the networks run (`get_model`); they never change
    the infotext, and with the default CPU noise source (`rng="CPU"`) a seed makes the same composition anywhere.

    LoRAs are named in the prompt (`<lora:NAME:0.8>`), embeddings by their name as a word of either prompt, and
    `vae` (the `sd_vae` field: "Automatic", "None", a file name or path) picks a VAE file; all are looked up in
    `models_dir`'s network folders (`difusi.models.folders`) and difusi-mini's shipped ones.
    Raises ParamError (naming the field and the allowed range) for bad values, CheckpointError for
    a missing or unusable model and NetworkError for a missing or unusable LoRA, embedding or VAE file.
    """
    params = _checked_params(prompt, model, vae, fields)
    networks = _checked_networks(params, models_dir)
    loaded = get_model(model, models_dir, device=device, precision=precision, offload=offload)
    return txt2img(loaded, params, networks=networks)


def img2img(prompt: str, init_images: list[Any], *, mask: Any = None, model: str | Path | None = None,
            models_dir: str | Path | None = None, device: str = "auto", precision: str = "auto",
            offload: str = "none", vae: str | None = None, **fields: Any) -> GenerationResult:
    """Redraw `init_images` (PIL images, paths or bytes) for `prompt` by `denoising_strength` (A1111's img2img);
    `mask` (white = redraw) inpaints; `outpaint_pixels=N` extends the canvas. `fields` are GenerationParams fields
    (the img2img and inpaint ones included: denoising_strength, resize_mode, mask_blur, inpainting_fill,
    inpaint_full_res, ...); width and height default to the first picture's size. Errors as `generate`, plus
    ParamError "init_images" / "mask" for unreadable pictures or an unusable mask."""
    from difusi.images.load import open_image
    from difusi.init_images import check_pictures

    params = _checked_params(prompt, model, vae, fields)
    pictures = [open_image(picture, "init_images") for picture in init_images]
    opened_mask = None if mask is None else open_image(mask, "mask")
    check_pictures(pictures, opened_mask)  # unusable pictures fail before a model is read
    networks = _checked_networks(params, models_dir)
    loaded = get_model(model, models_dir, device=device, precision=precision, offload=offload)
    return _img2img(loaded, params, pictures, opened_mask, networks=networks)


def _checked_params(prompt: str, model: str | Path | None, vae: str | None, fields: dict[str, Any]) -> GenerationParams:
    """The job's fields, checked before a model is read (512 stands in for a missing native size)."""
    if vae is not None:
        fields["sd_vae"] = vae
    params = GenerationParams(prompt=prompt, model=None if model is None else str(model), **fields)
    params.validated(native_size=512)
    return params


def _checked_networks(params: GenerationParams, models_dir: str | Path | None) -> Any:
    """The models folder's network library, with the job's LoRAs, VAE and hires upscaler found (before a model is
    read)."""
    from difusi.networks.job import check_job, library_for

    networks = library_for(models_dir)
    check_job(params, networks)
    return networks


def upscale(image: Any, *, scale: float = 2.0, upscaler: str = "Lanczos", models_dir: str | Path | None = None) -> Any:
    """A picture enlarged by `scale` with an upscaler (A1111's Extras: "Lanczos", "Nearest" or a model file's name
    from the models folder's ESRGAN / RealESRGAN / upscale_models folders), as a PIL image."""
    from difusi.images.load import open_image
    from difusi.upscalers import get_upscaler

    return get_upscaler(upscaler, models_dir).upscale(open_image(image, "image"), scale)

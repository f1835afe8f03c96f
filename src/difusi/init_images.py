"""img2img and inpainting: init pictures -> the latents, masks and conditioning a sampling run starts from.

A1111's rules (modules/processing.py `StableDiffusionProcessingImg2Img.init` and `.sample`,
modules/sd_samplers_common.py `setup_img2img_steps`, modules/sd_samplers_kdiffusion.py `sample_img2img`):

- **Steps.** With strength s and n steps the n-step schedule is built and its last `t_enc + 1` steps are run,
  `t_enc = int(min(s, 0.999) * n)`; with "do exactly the steps the slider specifies" (`img2img_fix_steps`) the
  schedule has `int(n / min(s, 0.999))` steps and `t_enc = n - 1`, so exactly n run. The start is
  `x = init_latents + noise * sigmas[start]`, noise from the image's seed (contract 2), times
  `initial_noise_multiplier`. Strength 0 runs nothing: the result is the init picture through the VAE.
- **Pictures.** Each init picture is flattened onto white, resized to the job's size by `resize_mode`
  (`difusi.images.resize`; mode 3 encodes it at its own size and resizes the latents, bilinear), encoded to the
  mean of the VAE's latent distribution. Image i of the job uses init picture `i % len(init_images)`.
- **Masks.** `difusi.images.masks`: an RGBA mask's alpha thresholded, any other mask's luminance as it is,
  inverted for "Inpaint not masked", blurred (OpenCV's 8-bit Gaussian, bit for bit); "only masked" crops the
  picture and mask to the blurred mask's box (plus padding, grown to the job's aspect ratio) and works there at
  the job's size. The latent mask (the blurred mask at latent size, rounded: A1111's `mask_round`) blends every model
  call's denoised estimate with the init latents outside it, and the final latents once more; the decoded image
  is then resized into its box and the original is composited over it through the overlay mask, so pixels where
  the overlay mask is 0 are exactly the original's.
- **Masked content.** 0 fill (the picture's colours blurred into the hole before encoding), 1 original, 2 latent
  noise (the hole's init latents replaced by the seed's unit noise), 3 latent nothing (zeros). As in A1111, every
  mode but "original" encodes the filled picture (so 2 and 3 keep the latents of the filled picture outside the
  hole, and an inpainting checkpoint's conditioning sees it too).
- **Inpainting checkpoints** see `cat([mask, masked-picture latents])` next to the latents in every call
  (A1111's `inpainting_image_conditioning`: the picture lerped towards `picture * (1 - mask)` by
  `inpainting_mask_weight`); txt2img on them uses an all-ones mask and a grey picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from difusi.errors import ParamError
from difusi.images.masks import (
    alpha_mask,
    apply_overlay,
    binary_mask,
    crop_region,
    double_for_overlay,
    expand_crop_region,
    fill,
    gaussian_blur,
    overlay_of,
)
from difusi.images.outpaint import outpaint_canvas
from difusi.images.resize import Upscale, flatten, resize_image
from difusi.params import SIZE_MULTIPLE, GenerationParams, outpaint_sides
from difusi.vae import encode_images, pil_to_tensor

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)


def img2img_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """(schedule steps, t_enc): A1111's `setup_img2img_steps`; `t_enc + 1` sampler steps run."""
    capped = min(strength, 0.999)
    if fix_steps:
        return (int(steps / capped) if strength > 0 else 0), steps - 1
    return steps, int(capped * steps)


def tail_sigmas(sigmas: torch.Tensor, t_enc: int) -> torch.Tensor:
    """The schedule's last `t_enc + 1` steps (`sigmas[n - t_enc - 1:]`, ending in 0)."""
    return sigmas[len(sigmas) - t_enc - 2 :]


@dataclass
class PreparedPicture:
    """One init picture made ready for the job's size (independent of the seed, so it is made once)."""

    pixels: Image.Image
    """RGB at the job's size (or the picture's own size for resize mode 3), masked content 'fill' applied."""
    original_size: tuple[int, int]
    """The init picture's size before resizing (SDXL's size conditioning reads it)."""
    latent_mask: Image.Image | None = None
    """L at the job's size: where the latents are redrawn (None: img2img without a mask)."""
    overlay: Image.Image | None = None
    """RGBA at the canvas's size: the original where it is kept, composited over the result."""
    paste_box: tuple[int, int, int, int] | None = None
    """"Only masked": where the result goes back on the canvas (x, y, w, h)."""
    conditioning_mask: Image.Image | None = None
    """L at the job's size: what an inpainting checkpoint is told is masked."""

    def finish(self, generated: Image.Image) -> Image.Image:
        """The job's image for this picture: pasted back and overlaid when there is a mask."""
        if self.overlay is None:
            return generated
        return apply_overlay(generated, self.overlay, self.paste_box)


def sized_for(params: GenerationParams, picture: Image.Image) -> GenerationParams:
    """Width and height left unset take the picture's size, rounded down to the VAE's multiple of 8 (at least 64,
    the smallest size the field table allows)."""
    if params.width is not None and params.height is not None:
        return params
    width = params.width or max(64, picture.width // SIZE_MULTIPLE * SIZE_MULTIPLE)
    height = params.height or max(64, picture.height // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return params.replace(width=width, height=height)


def check_pictures(images: list[Image.Image], mask: Image.Image | None) -> None:
    """What can be told about the pictures before a model loads (front ends call it first): at least one picture;
    a mask of the first picture's size that marks something to redraw."""
    if not images:
        raise ParamError("init_images", "needs at least one picture")
    if mask is None:
        return
    for image in images:
        if mask.size != image.size:
            raise ParamError("mask", f"is {mask.width}x{mask.height} but the init picture is "
                                     f"{image.width}x{image.height}; they must be the same size")
    binary_mask(mask)


def start_pictures(params: GenerationParams, images: list[Image.Image], mask: Image.Image | None
                   ) -> tuple[GenerationParams, list[Image.Image], Image.Image | None, Image.Image | None]:
    """Outpainting and the RGBA-alpha mask convention, before anything else: returns the params for the job (the
    canvas's size and the outpaint script's blur, fill and area), the pictures, the mask and a separate latent mask.
    """
    check_pictures(images, mask)
    if not params.outpaint_pixels:
        if mask is None and len(images) == 1 and (from_alpha := alpha_mask(images[0])) is not None:
            mask = from_alpha
        return params, images, mask, None
    if len(images) > 1 or mask is not None:
        raise ParamError("outpaint_pixels", "outpainting extends one picture and makes its own mask: give one init "
                                            "picture and no mask")
    sides = outpaint_sides(params)
    canvas = outpaint_canvas(images[0], params.outpaint_pixels, sides, params.mask_blur)
    # A1111's script: mask blur doubled, whole picture, the canvas's size (it keeps the job's size per tile).
    job = params.replace(width=canvas.image.width, height=canvas.image.height, mask_blur=params.mask_blur * 2,
                         mask_blur_x=None, mask_blur_y=None, inpaint_full_res=False, inpainting_mask_invert=0)
    return job, [canvas.image], canvas.mask, canvas.latent_mask


def prepare_picture(params: GenerationParams, image: Image.Image, mask: Image.Image | None,
                    latent_mask: Image.Image | None = None, upscale: Upscale | None = None) -> PreparedPicture:
    """A1111's per-picture preprocessing for one init picture (see the module docstring)."""
    width, height = params.width, params.height
    original_size = image.size
    if mask is None:
        picture = flatten(image)
        if params.resize_mode != 3:
            picture = resize_image(params.resize_mode, picture, width, height, upscale)
        return PreparedPicture(pixels=picture, original_size=original_size)
    mask = binary_mask(mask)  # sizes checked by `check_pictures` (via `start_pictures`)
    if params.inpainting_mask_invert:
        mask = Image.eval(mask, lambda value: 255 - value)
        if mask.getbbox() is None:
            raise ParamError("mask", "covers the whole picture, so 'Inpaint not masked' leaves nothing to inpaint")
    blur_x = params.mask_blur if params.mask_blur_x is None else params.mask_blur_x
    blur_y = params.mask_blur if params.mask_blur_y is None else params.mask_blur_y
    if blur_x or blur_y:
        mask = gaussian_blur(mask, blur_x, blur_y)
    picture = flatten(image)
    paste_box = None
    if params.inpaint_full_res:
        region = expand_crop_region(crop_region(mask, params.inpaint_full_res_padding), width, height,
                                    mask.width, mask.height)
        x1, y1, x2, y2 = region
        overlay_mask = mask
        job_mask = resize_image(2, mask.crop(region), width, height)
        overlay = overlay_of(picture, overlay_mask)
        picture = resize_image(2, picture.crop(region), width, height)
        paste_box = (x1, y1, x2 - x1, y2 - y1)
        if latent_mask is not None:
            latent_mask = resize_image(2, latent_mask.crop(region), width, height)
    else:
        job_mask = resize_image(params.resize_mode, mask, width, height)
        overlay_mask = double_for_overlay(job_mask)
        if params.resize_mode != 3:
            picture = resize_image(params.resize_mode, picture, width, height, upscale)
        # The overlay is at the job's size, where the result is: with latent upscale (mode 3) the picture itself is
        # encoded at its own size, so the overlay gets a resized copy (A1111 pastes it unscaled: a bug there).
        overlay_picture = picture if picture.size == (width, height) else resize_image(0, picture, width, height)
        overlay = overlay_of(overlay_picture, overlay_mask)
        if latent_mask is not None:
            latent_mask = resize_image(params.resize_mode, latent_mask, width, height)
    latent_mask = job_mask if latent_mask is None else latent_mask
    if params.inpainting_fill != ORIGINAL:  # A1111: `if self.inpainting_fill != 1: image = masking.fill(...)`
        picture = fill(picture, latent_mask.resize(picture.size))
    return PreparedPicture(pixels=picture, original_size=original_size, latent_mask=latent_mask, overlay=overlay,
                           paste_box=paste_box, conditioning_mask=job_mask)


@dataclass
class InitLatents:
    """What one batch's sampling run starts from."""

    latents: torch.Tensor
    """[B, C, h, w] scaled init latents (masked content applied)."""
    keep: torch.Tensor | None = None
    """[B, 1, h, w]: 1 where the init latents are kept (A1111's `mask`), 0 where redrawn (`nmask` = 1 - keep)."""
    image_conditioning: torch.Tensor | None = None
    """[B, 5, h, w] for inpainting checkpoints: mask, masked-picture latents."""


def encode_batch(model, params: GenerationParams, pictures: list[PreparedPicture], unit_noise: torch.Tensor,
                 device: torch.device) -> InitLatents:
    """Init latents for a batch (one prepared picture per image) and, with a mask, the keep mask and fill mode;
    `unit_noise` is the batch's initial noise (latent noise fill uses the seed's noise, as A1111)."""
    pixels = pil_to_tensor([picture.pixels for picture in pictures]).to(device)
    with torch.inference_mode():
        latents = encode_images(model.vae, pixels, model.scaling_factor)
    latent_size = (params.height // model.vae_scale_factor, params.width // model.vae_scale_factor)
    if params.resize_mode == 3 and tuple(latents.shape[-2:]) != latent_size:
        latents = torch.nn.functional.interpolate(latents, size=latent_size, mode="bilinear")
    keep = None
    if pictures[0].latent_mask is not None:
        keep = 1.0 - torch.stack([_latent_mask(picture.latent_mask, latent_size) for picture in pictures]).to(device)
        if params.inpainting_fill == LATENT_NOISE:
            latents = latents * keep + unit_noise.to(device) * (1.0 - keep)
        elif params.inpainting_fill == LATENT_NOTHING:
            latents = latents * keep
    conditioning = None
    if model.inpainting:
        masks = [picture.conditioning_mask for picture in pictures]
        conditioning = inpainting_conditioning(model, pixels, masks, latents.shape[-2:], params.inpainting_mask_weight)
    return InitLatents(latents=latents, keep=keep, image_conditioning=conditioning)


def _latent_mask(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A1111: the mask resized (bicubic, PIL's default for `resize`) to the latent size, in [0, 1], rounded."""
    small = mask.convert("L").resize((size[1], size[0]))
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32) / 255.0))[None]


def inpainting_conditioning(model, pixels: torch.Tensor, masks: list[Image.Image | None], latent_size,
                            weight: float) -> torch.Tensor:
    """A1111's `inpainting_image_conditioning`: `cat([mask, encode(lerp(picture, picture * (1 - mask), weight))])`
    with the pixel mask rounded and then resized to the latents (nearest, interpolate's default)."""
    if all(mask is None for mask in masks):
        mask = pixels.new_ones(pixels.shape[0], 1, *pixels.shape[-2:])
    else:
        mask = torch.stack([
            torch.from_numpy(np.around(np.asarray(m.convert("L"), dtype=np.float32) / 255.0))[None] for m in masks
        ]).to(pixels.device)
    masked = torch.lerp(pixels, pixels * (1.0 - mask), weight)
    with torch.inference_mode():
        encoded = encode_images(model.vae, masked, model.scaling_factor)
    small = torch.nn.functional.interpolate(mask, size=tuple(latent_size))
    return torch.cat([small.to(encoded.dtype), encoded], dim=1)


def txt2img_conditioning(model, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """A1111's `txt2img_image_conditioning` for inpainting checkpoints: the whole picture masked, a grey (0.5,
    i.e. 0 in [-1, 1]) picture's latents."""
    grey = torch.zeros(batch, 3, height, width, device=device)
    with torch.inference_mode():
        encoded = encode_images(model.vae, grey, model.scaling_factor)
    return torch.cat([torch.ones_like(encoded[:, :1]), encoded], dim=1)

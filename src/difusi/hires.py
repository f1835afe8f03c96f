"""Hires fix (A1111's `StableDiffusionProcessingTxt2Img` second pass): the size rule and the upscale between passes.

The first pass makes the image at `width` x `height`; the second is an img2img of it, upscaled, at the hires size:
`hr_scale` times the size, or `hr_resize_x` / `hr_resize_y` (one of them 0 keeps the aspect ratio; both given:
cover the target, then crop the overflow centred in latent space, A1111's `truncate_x/y`). Sizes are rounded down
to the VAE's multiple, as the latents A1111 makes are. The upscale is A1111's: a latent mode interpolates the
latents (`torch.nn.functional.interpolate` with the mode's method and antialiasing); any other upscaler decodes the
first image, resizes it (`difusi.upscalers`, A1111's `resize_image(0, ...)`) and encodes it again.

The second pass always runs exactly its steps (`hr_second_pass_steps`, else `steps`), whatever the strength: A1111
passes `steps` to `setup_img2img_steps`, which then takes its "fix steps" branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's `shared.latent_upscale_modes`: name -> (interpolation mode, antialias)."""


@dataclass(frozen=True)
class HiresSize:
    width: int
    height: int
    """The second pass's picture size (what the upscaled first image covers)."""
    crop_x: int = 0
    crop_y: int = 0
    """Latent columns / rows cut away (split between both sides) to reach an exact `hr_resize_x` x `hr_resize_y`."""


def hires_size(params: Any, multiple: int = 8) -> HiresSize:
    """A1111's `init` of txt2img hires fix: the upscale target and the latent crop."""
    width, height = params.width, params.height
    if not params.hr_resize_x and not params.hr_resize_y:
        return HiresSize(_down(int(width * params.hr_scale), multiple), _down(int(height * params.hr_scale), multiple))
    if not params.hr_resize_y:
        target_w, target_h = params.hr_resize_x, params.hr_resize_x * height // width
        return HiresSize(_down(target_w, multiple), _down(target_h, multiple))
    if not params.hr_resize_x:
        target_w, target_h = params.hr_resize_y * width // height, params.hr_resize_y
        return HiresSize(_down(target_w, multiple), _down(target_h, multiple))
    target_w, target_h = params.hr_resize_x, params.hr_resize_y
    if width / height < target_w / target_h:
        cover_w, cover_h = target_w, target_w * height // width
    else:
        cover_w, cover_h = target_h * width // height, target_h
    cover_w, cover_h = _down(cover_w, multiple), _down(cover_h, multiple)
    return HiresSize(cover_w, cover_h, (cover_w - target_w) // multiple, (cover_h - target_h) // multiple)


def _down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def is_latent_upscaler(name: str) -> bool:
    return name in LATENT_UPSCALE_MODES


def upscale_latents(latents: Any, name: str, height: int, width: int) -> Any:
    """A1111's latent hires upscale: `interpolate(samples, size=(h, w), mode=..., antialias=...)`."""
    import torch

    mode, antialias = LATENT_UPSCALE_MODES[name]
    return torch.nn.functional.interpolate(latents, size=(height, width), mode=mode, antialias=antialias)


def crop_latents(latents: Any, crop_x: int, crop_y: int) -> Any:
    """A1111's `samples[:, :, ty//2 : h - (ty+1)//2, tx//2 : w - (tx+1)//2]`."""
    height, width = latents.shape[-2:]
    return latents[:, :, crop_y // 2 : height - (crop_y + 1) // 2, crop_x // 2 : width - (crop_x + 1) // 2]

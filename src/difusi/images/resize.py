"""A1111's `images.resize_image` and `images.flatten` (modules/images.py), so a resize mode means what it means there.

Modes: 0 "Just resize" (stretch to the size), 1 "Crop and resize" (cover the size, crop the overflow centred),
2 "Resize and fill" (fit inside, fill the bands by stretching the picture's edge rows / columns). Mode 3 ("Just
resize (latent upscale)") resizes the latents, not the picture: the pipeline handles it. Resizing is Lanczos; an
upscaler (`difusi.upscalers`) enlarges first when one is named and the picture grows, as A1111's
`upscaler_for_img2img`.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

LANCZOS = Image.Resampling.LANCZOS

Upscale = Callable[[Image.Image, float], Image.Image]
"""An upscaler's `upscale(image, scale)` (difusi.upscalers.Upscaler.upscale)."""


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB, transparent areas composited on `background` (A1111's `img2img_background_color`, white)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return image.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int, upscale: Upscale | None = None) -> Image.Image:
    """A1111's `resize_image(resize_mode, im, width, height, upscaler_name)`; mode 3 resizes like 0 (A1111 uses it
    so for masks; the picture itself is encoded at its own size and its latents resized by the pipeline)."""
    if mode == 0 or mode == 3:
        return _resize(image, width, height, upscale)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _resize(image, src_w, src_h, upscale)
    result = Image.new(resized.mode, (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                result.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                result.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                             box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                result.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                result.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                             box=(fill_width + src_w, 0))
    return result


def _resize(image: Image.Image, width: int, height: int, upscale: Upscale | None) -> Image.Image:
    if upscale is not None and image.mode != "L":
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = upscale(image, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image

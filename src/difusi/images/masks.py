"""A1111's inpainting mask rules (modules/processing.py `StableDiffusionProcessingImg2Img.init`, modules/masking.py).

White (255) marks what is redrawn. The steps, in A1111's order: the mask (the alpha channel of an RGBA mask,
thresholded at 128, else its luminance as it is), inverted for "Inpaint not masked", blurred with a Gaussian
(separately in x and y, kernel `2 * int(2.5 * sigma + 0.5) + 1` taps, OpenCV's reflect-101 border), then either
"only masked" (crop to the blurred mask's box plus padding, grown to the job's aspect ratio) or "whole picture"
(resized to the job's size, doubled and clipped for the overlay). The overlay puts the original back wherever the
overlay mask is 0, so those pixels are exactly the original's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from difusi.errors import ParamError


def binary_mask(mask: Image.Image, field: str = "mask") -> Image.Image:
    """A1111's `create_binary_mask(image, round=True)` (modules/processing.py): an RGBA mask whose alpha is used (not
    all opaque) is read from its alpha channel, thresholded (`255 if x > 128 else 0`: what A1111's brush canvas
    sends); any other mask is its luminance as it is, so a grey uploaded mask stays soft (A1111 rounds only the
    latent mask and an inpainting checkpoint's mask). An empty (all 0) mask is an error: there would be nothing to
    inpaint."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        gray = mask.split()[-1].convert("L").point(lambda value: 255 if value > 128 else 0)
    else:
        gray = mask.convert("L")
    if gray.getbbox() is None:
        raise ParamError(field, "is all black: nothing to inpaint (paint the area to redraw white)")
    return gray


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The mask an RGBA init image carries in its alpha channel (transparent = redraw), A1111's "inpaint upload"
    convention for one picture; None when the picture has no transparency."""
    if image.mode not in ("RGBA", "LA") or image.getextrema()[-1][0] == 255:
        return None
    return ImageOps.invert(image.split()[-1].convert("L"))


def gaussian_blur(mask: Image.Image, sigma_x: int, sigma_y: int) -> Image.Image:
    """OpenCV's `GaussianBlur(mask, (k, 1), sigma_x)` then `GaussianBlur(mask, (1, k), sigma_y)` as A1111 calls it,
    bit for bit: two 8-bit images in a row, each from OpenCV's bit-exact fixed-point path for 8-bit pictures
    (taps in 8 fractional bits, `_fixed_point_kernel`; the sum rounded half up to 8 bits). A float blur rounded once
    differs by up to 2 levels and moves the edge of the area the overlay keeps exactly."""
    array = np.asarray(mask.convert("L"), dtype=np.int64)
    if sigma_x > 0:
        array = _blur_axis(array, sigma_x, axis=1)
    if sigma_y > 0:
        array = _blur_axis(array, sigma_y, axis=0)
    return Image.fromarray(array.astype(np.uint8), mode="L")


def _fixed_point_kernel(sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel (`getGaussianKernelBitExact` + `getGaussianKernelFixedPoint_ED`): the
    normalised Gaussian of `2 * int(2.5 * sigma + 0.5) + 1` taps (A1111's size) times 256, rounded from the tails
    inwards with the rounding error carried to the next tap; the centre tap takes the rest, so the taps sum to 256."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    offsets = np.arange(size) - size // 2
    kernel = np.exp(-(offsets.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    fixed = np.zeros(size, dtype=np.int64)
    error = 0.0
    for i in range(size // 2):
        adjusted = kernel[i] * 256.0 + error
        fixed[i] = fixed[size - 1 - i] = int(np.rint(adjusted))
        error = adjusted - fixed[i]
    fixed[size // 2] = 256 - 2 * int(fixed[: size // 2].sum())
    return fixed


def _blur_axis(array: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One 8-bit pass along `axis`: integer taps, BORDER_REFLECT_101, (sum + 128) >> 8, clipped to 0..255."""
    kernel = _fixed_point_kernel(sigma)
    offsets = np.arange(len(kernel)) - len(kernel) // 2
    length = array.shape[axis]
    out = np.zeros_like(array)
    for offset, weight in zip(offsets, kernel, strict=True):
        if weight:
            out += weight * np.take(array, _reflect_101(np.arange(length) + offset, length), axis=axis)
    return np.clip((out + 128) >> 8, 0, 255)


def _reflect_101(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV's default border, BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), for any overhang."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    folded = np.abs(index) % period
    return np.where(folded >= length, period - folded, folded)


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """A1111's `masking.get_crop_region_v2`: the box of the mask's non-zero pixels, grown by `padding` and clipped
    to the picture; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if not padding:
        return box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's `masking.expand_crop_region`: grow the box to the job's aspect ratio, kept inside the picture."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow(y1, y2, grow, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow(x1, x2, grow, image_width)
    return x1, y1, x2, y2


def _grow(low: int, high: int, grow: int, limit: int) -> tuple[int, int]:
    low -= grow // 2
    high += grow - grow // 2
    if high >= limit:
        low -= high - limit
        high = limit
    if low < 0:
        high -= low
        low = 0
    return low, min(high, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's `masking.fill` ("Masked content: fill"): the masked area takes the colours around it, by compositing
    ever less blurred copies of the unmasked picture."""
    result = Image.new("RGBA", image.size)
    unmasked = Image.new("RGBa", image.size)
    unmasked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = unmasked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def overlay_of(image: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """The original's pixels where `overlay_mask` is 0 (opaque there), fading out where it rises: A1111's
    `image_masked` (an RGBa paste through the inverted mask)."""
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    return overlay.convert("RGBA")


def apply_overlay(generated: Image.Image, overlay: Image.Image,
                  paste_box: tuple[int, int, int, int] | None) -> Image.Image:
    """A1111's `apply_overlay`: an "only masked" result is resized into its box (crop and resize) on the full
    canvas, then the overlay is composited over it."""
    from difusi.images.resize import resize_image

    if paste_box is not None:
        x, y, w, h = paste_box
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, generated, w, h), (x, y))
        generated = base
    composed = generated.convert("RGBA")
    composed.alpha_composite(overlay)
    return composed.convert("RGB")


def double_for_overlay(mask: Image.Image) -> Image.Image:
    """Whole-picture inpainting: A1111 doubles the blurred mask (clipped at 255) for the overlay, so the original
    shows only where the blur has fallen below half."""
    array = np.asarray(mask.convert("L"), dtype=np.float32)
    return Image.fromarray(np.clip(array * 2, 0, 255).astype(np.uint8), mode="L")

"""A1111's "Poor man's outpainting" (scripts/poor_mans_outpainting.py): extend the canvas, inpaint the new area.

The canvas grows by `pixels` on the chosen sides, rounded up to a multiple of 64 (the extra split between the
sides in proportion); the old picture is pasted in, the new bands are the mask. The pixel mask stops
`2 * mask_blur` short of the old picture's edge (so the blur reaches into the old picture a little and the seam
is redrawn), the latent mask `mask_blur // 2` short. A1111 then inpaints the canvas tile by tile at the job's
size; difusi inpaints the whole canvas in one pass at the canvas's size (same masks, same fill modes), which is
what the tiles approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw


@dataclass(frozen=True)
class OutpaintCanvas:
    image: Image.Image
    """The extended picture (new bands black until filled)."""
    mask: Image.Image
    """L, 255 where the picture is new (what is inpainted)."""
    latent_mask: Image.Image
    """L, the mask the latents are blended with (closer to the old picture's edge)."""
    box: tuple[int, int, int, int]
    """Where the old picture sits: left, top, right, bottom."""


def outpaint_canvas(image: Image.Image, pixels: int, sides: tuple[str, ...], mask_blur: int) -> OutpaintCanvas:
    """The canvas, masks and box for extending `image` by `pixels` on `sides` (left, right, up, down)."""
    left, right, up, down = (pixels if side in sides else 0 for side in ("left", "right", "up", "down"))
    target_w = math.ceil((image.width + left + right) / 64) * 64
    target_h = math.ceil((image.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - image.width) // (left + right)
    if right > 0:
        right = target_w - image.width - left
    if up > 0:
        up = up * (target_h - image.height) // (up + down)
    if down > 0:
        down = target_h - image.height - up
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(image.convert("RGB"), (left, up))
    return OutpaintCanvas(
        image=canvas,
        mask=_band_mask(canvas.size, (left, right, up, down), mask_blur * 2),
        latent_mask=_band_mask(canvas.size, (left, right, up, down), mask_blur // 2),
        box=(left, up, left + image.width, up + image.height),
    )


def _band_mask(size: tuple[int, int], bands: tuple[int, int, int, int], inset: int) -> Image.Image:
    left, right, up, down = bands
    mask = Image.new("L", size, "white")
    width, height = size
    ImageDraw.Draw(mask).rectangle(
        (left + (inset if left > 0 else 0), up + (inset if up > 0 else 0),
         width - right - (inset if right > 0 else 0), height - down - (inset if down > 0 else 0)),
        fill="black",
    )
    return mask

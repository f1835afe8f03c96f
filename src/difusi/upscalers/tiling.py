"""Tiled model upscaling with blended seams, so a 4x upscale of a 1024-px image fits in memory.

An upscaling network's activations grow with the input's area times its width: RRDBNet (64 features, growth 32)
holds maps of 64-192 channels at the input size and 64 channels at 2x and 4x, so one 1024-px image in float32 needs
several GB at once. Cutting the input into tiles bounds that by the tile's size, at the price of each tile seeing
zero padding at its cut edges, which changes the output within the network's receptive field of a cut.

The layout is A1111's (`modules/images.py` `split_grid` / `combine_grid`, used by `upscale_with_model` with the
`ESRGAN_tile` = 192 and `ESRGAN_tile_overlap` = 8 options): along each axis, n = ceil((L - overlap) / (tile -
overlap)) tiles spread evenly from 0 to L - tile, so neighbours overlap by at least `overlap` pixels. Each tile is
upscaled alone; a tile that is not first in its row replaces what is left of it after a linear ramp over its first
`overlap * scale` output columns (weight i / (overlap * scale) for the tile, the rest for what was there), and rows
are joined the same way downwards. A1111 blends 8-bit images through a Pillow mask; difusi blends the float
outputs (no extra rounding) and, where the image is smaller than a tile, uses a tile as large as the image instead
of A1111's crop beyond the border (which feeds the network black padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ESRGAN_TILE = 192
"""A1111's `ESRGAN_tile` default: tile size in input pixels (0 = no tiling)."""
ESRGAN_TILE_OVERLAP = 8
"""A1111's `ESRGAN_tile_overlap` default: overlap of neighbouring tiles in input pixels."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of `length` pixels (A1111's `split_grid` rule); `tile` <= length."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1) if count > 1 else 0
    return [min(int(index * step), length - tile) for index in range(count)]


def _ramp(size: int, like: torch.Tensor) -> torch.Tensor:
    """The blend weights of a new tile over its first `size` pixels: 0, 1/size, ..., (size-1)/size."""
    return torch.arange(size, dtype=like.dtype, device=like.device) / size


def tiled_upscale(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int,
                  tile: int = ESRGAN_TILE, overlap: int = ESRGAN_TILE_OVERLAP) -> torch.Tensor:
    """`model(x)` for x [1, C, H, W] computed tile by tile (see the module docstring); output [1, C', H*s, W*s].

    `tile` <= 0 runs the model once on the whole image. `overlap` must be in [0, tile)."""
    if tile <= 0:
        return model(x)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    height, width = x.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return model(x)
    seam = overlap * scale
    out: torch.Tensor | None = None
    for y in rows:
        row: torch.Tensor | None = None
        for x0 in cols:
            piece = model(x[..., y : y + tile_h, x0 : x0 + tile_w])
            if row is None:
                row = piece.new_zeros((*piece.shape[:2], tile_h * scale, width * scale))
            _paste(row, piece, x0 * scale, seam, dim=-1)
        if out is None:
            out = row.new_zeros((*row.shape[:2], height * scale, width * scale))
        _paste(out, row, y * scale, seam, dim=-2)
    return out


def _paste(target: torch.Tensor, piece: torch.Tensor, start: int, seam: int, dim: int) -> None:
    """Write `piece` into `target` at `start` along `dim`, ramping over its first `seam` pixels (not at 0)."""
    length = piece.shape[dim]
    if start == 0 or seam == 0:
        target.narrow(dim, start, length).copy_(piece)
        return
    seam = min(seam, length)
    weight = _ramp(seam, piece)
    weight = weight.view(-1, 1) if dim == -2 else weight
    band = target.narrow(dim, start, seam)
    band.mul_(1 - weight).add_(piece.narrow(dim, 0, seam) * weight)
    if length > seam:
        target.narrow(dim, start + seam, length - seam).copy_(piece.narrow(dim, seam, length - seam))

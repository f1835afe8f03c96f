"""Pixels <-> latents: VAE encode and decode (whole, or in overlapping tiles when the image is large) and PIL
conversion."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("difusi.vae")

TILE_LATENT = 64
"""Latent tile edge for the tiled fallback (512 px for an 8x VAE)."""
TILE_OVERLAP = 16
TILED_ABOVE = 128 * 128
"""Decode in tiles when a latent has more pixels than this (images above 1024x1024 for an 8x VAE)."""


def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, tiled: bool | None = None) -> torch.Tensor:
    """Decode scaled latents to images in [-1, 1], shape [B, 3, H, W] (float32).

    `tiled=None` decodes whole images up to TILED_ABOVE latent pixels and falls back to tiles above that,
    or when a whole decode runs out of memory. Tiles overlap and are blended with linear ramps, which hides
    seams; a tiled decode is close to, not equal to, a whole decode (GroupNorm sees only the tile).

    A VAE in half precision (float16/bfloat16) whose decode gives NaN or infinity is converted to float32 for good
    and the decode is redone, with one warning: A1111's "Automatically revert VAE to 32-bit floats" (its
    `auto_vae_precision`, the automatic form of `--no-half-vae`). float16's largest value is 65504, and the
    activations of SDXL's original VAE exceed it, so a float16 decode would save a black image. Staying in float32
    afterwards (as A1111 does) spares every later image a wasted half-precision decode.
    """
    latents = latents.float() / scaling_factor
    decoded = _decode(vae, latents, tiled)
    if next(vae.parameters()).dtype != torch.float32 and not torch.isfinite(decoded).all():
        log.warning("the VAE gave NaN/inf in %s; decoding in float32 from now on (A1111's no-half-vae fallback)",
                    str(next(vae.parameters()).dtype).removeprefix("torch."))
        # nn.Module's own `to`: diffusers' override adds a warning about keep-in-fp32 modules that do not apply here.
        torch.nn.Module.to(vae, torch.float32)
        decoded = _decode(vae, latents, tiled)
    return decoded


def _decode(vae, latents: torch.Tensor, tiled: bool | None) -> torch.Tensor:
    """One decode in the VAE's own dtype; float32 out."""
    latents = latents.to(next(vae.parameters()).dtype)
    if tiled is None:
        tiled = latents.shape[-1] * latents.shape[-2] > TILED_ABOVE
    if not tiled:
        try:
            return vae.decode(latents).sample.float()
        except (torch.OutOfMemoryError, MemoryError):
            pass
    return _decode_tiled(vae, latents).float()


def _decode_tiled(vae, latents: torch.Tensor, tile: int = TILE_LATENT, overlap: int = TILE_OVERLAP) -> torch.Tensor:
    _, _, height, width = latents.shape
    outputs = None
    weights = None
    stride = tile - overlap
    for top in _tile_starts(height, tile, stride):
        for left in _tile_starts(width, tile, stride):
            piece = latents[:, :, top : top + tile, left : left + tile]
            decoded = vae.decode(piece).sample
            scale = decoded.shape[-1] // piece.shape[-1]
            if outputs is None:
                outputs = decoded.new_zeros(decoded.shape[0], decoded.shape[1], height * scale, width * scale)
                weights = decoded.new_zeros(1, 1, height * scale, width * scale)
            ramp = _ramp(decoded.shape[-2], decoded.shape[-1], overlap * scale, decoded)
            y, x = top * scale, left * scale
            outputs[:, :, y : y + decoded.shape[-2], x : x + decoded.shape[-1]] += decoded * ramp
            weights[:, :, y : y + decoded.shape[-2], x : x + decoded.shape[-1]] += ramp
    return outputs / weights


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(height: int, width: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """Blend weights rising linearly over `overlap` pixels at every edge (never zero, so lone tiles count)."""

    def edge(n: int) -> torch.Tensor:
        position = torch.arange(n, dtype=like.dtype, device=like.device)
        distance = torch.minimum(position + 1, n - position)
        return (distance / max(1, overlap)).clamp(max=1.0)

    return (edge(height)[:, None] * edge(width)[None, :])[None, None]


def encode_images(vae, images: torch.Tensor, scaling_factor: float, tiled: bool | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents (float32): the mean of the VAE's latent distribution, so an
    encode is deterministic (A1111 samples it with the global RNG; diffusers' img2img samples with the job's
    generator; the mean is what both approach and what a seed-for-seed remake needs).

    Large pictures (more than TILED_ABOVE latent pixels) are encoded in overlapping tiles blended with linear
    ramps, like `decode_latents`; a half-precision VAE that gives NaN/inf is moved to float32 and the encode
    redone."""
    moments = _encode(vae, images, tiled)
    if next(vae.parameters()).dtype != torch.float32 and not torch.isfinite(moments).all():
        log.warning("the VAE gave NaN/inf while encoding; using float32 from now on (A1111's no-half-vae fallback)")
        torch.nn.Module.to(vae, torch.float32)
        moments = _encode(vae, images, tiled)
    return moments * scaling_factor


def _encode(vae, images: torch.Tensor, tiled: bool | None) -> torch.Tensor:
    images = images.to(next(vae.parameters()).dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if tiled is None:
        tiled = (images.shape[-1] // factor) * (images.shape[-2] // factor) > TILED_ABOVE
    if not tiled:
        try:
            return vae.encode(images).latent_dist.mean.float()
        except (torch.OutOfMemoryError, MemoryError):
            pass
    return _encode_tiled(vae, images, factor).float()


def _encode_tiled(vae, images: torch.Tensor, factor: int, tile: int = TILE_LATENT,
                  overlap: int = TILE_OVERLAP) -> torch.Tensor:
    _, _, height, width = images.shape
    tile_px, stride_px = tile * factor, (tile - overlap) * factor
    outputs = weights = None
    for top in _tile_starts(height, tile_px, stride_px):
        for left in _tile_starts(width, tile_px, stride_px):
            piece = images[:, :, top : top + tile_px, left : left + tile_px]
            encoded = vae.encode(piece).latent_dist.mean
            if outputs is None:
                outputs = encoded.new_zeros(encoded.shape[0], encoded.shape[1], height // factor, width // factor)
                weights = encoded.new_zeros(1, 1, height // factor, width // factor)
            ramp = _ramp(encoded.shape[-2], encoded.shape[-1], overlap, encoded)
            y, x = top // factor, left // factor
            outputs[:, :, y : y + encoded.shape[-2], x : x + encoded.shape[-1]] += encoded * ramp
            weights[:, :, y : y + encoded.shape[-2], x : x + encoded.shape[-1]] += ramp
    return outputs / weights


def pil_to_tensor(pictures: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB PIL images of one size -> [B, 3, H, W] float32 in [-1, 1] (A1111's `x / 255 * 2 - 1`)."""
    array = np.stack([np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0 for picture in pictures])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


def latents_to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images -> 8-bit RGB PIL images, rounding as diffusers does (so both give the same pixels)."""
    array = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in array]

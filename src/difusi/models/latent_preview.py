"""Approximate latent -> RGB factors for cheap previews (no VAE decode), by family.

`rgb[c] = sum_k latent[k] * factors[k][c] + bias[c]`, giving roughly [-1, 1] from the sampler's
(scaled) latents. The values live in the family table (`difusi.models.families`, one record per
family); this module keeps the list-valued views older callers import.
"""

from __future__ import annotations

from difusi.models.families import FAMILIES, base_spec


def _rows(factors: tuple[tuple[float, ...], ...] | None) -> list[list[float]] | None:
    return None if factors is None else [list(row) for row in factors]


SD1_FACTORS: list[list[float]] = _rows(base_spec("sd1").latent_rgb_factors) or []
SDXL_FACTORS: list[list[float]] = _rows(base_spec("sdxl").latent_rgb_factors) or []
SDXL_BIAS: list[float] = list(base_spec("sdxl").latent_rgb_bias or ())

LATENT_RGB: dict[str, tuple[list[list[float]], list[float] | None]] = {
    spec.key: (_rows(spec.latent_rgb_factors) or [], None if spec.latent_rgb_bias is None else list(spec.latent_rgb_bias))
    for spec in FAMILIES
    if spec.supported and spec.latent_rgb_factors is not None
}
"""Record key -> (factors, bias); architecture names ("sd1", "sd2", "sdxl") are keys too."""

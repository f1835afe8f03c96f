"""Approximate latent -> RGB factors for cheap previews (no VAE decode).

`rgb[c] = sum_k latent[k] * factors[k][c] + bias[c]`, giving roughly [-1, 1] from the sampler's
(scaled) latents. These are the published linear fits used by ComfyUI's latent previewer
(`comfy/latent_formats.py`, SD15 and SDXL); SD2 shares SD1's VAE. Models with other VAEs
(difusi-mini) state theirs in the sidecar.
"""

from __future__ import annotations

SD1_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]

LATENT_RGB: dict[str, tuple[list[list[float]], list[float] | None]] = {
    "sd1": (SD1_FACTORS, None),
    "sd2": (SD1_FACTORS, None),
    "sdxl": (SDXL_FACTORS, SDXL_BIAS),
}

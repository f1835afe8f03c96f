"""Seeded per-image noise (docs/ARCHITECTURE.md contract 2).

Image i of a job with seed s uses seed s+i. Its initial noise is drawn first from
`torch.Generator("cpu").manual_seed(s+i)`, always in float32 on the CPU; every later draw for that image
(ancestral and SDE noise) comes from the same generator (or a Brownian tree seeded with s+i), so an
image never depends on its batch position, the batch size or the device. This matches A1111's CPU RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageNoise:
    """Initial noise for a batch plus the per-image generators that continue after it."""

    noise: torch.Tensor
    generators: list[torch.Generator]


def image_noise(
    seeds: list[int],
    shape: tuple[int, int, int],
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
) -> ImageNoise:
    """Draw the initial latent noise for one batch, one image per seed.

    With `subseed_strength > 0` each image's noise is the spherical interpolation (slerp) from its seed's
    noise towards its subseed's noise, as A1111's "variation seed". The generators returned are the main
    seeds' generators, advanced past the initial draw, for the sampler's later noise.
    """
    noises, generators = [], []
    for index, seed in enumerate(seeds):
        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
        if subseeds is not None and subseed_strength > 0:
            sub = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(subseeds[index])))
            noise = slerp(subseed_strength, noise, sub)
        noises.append(noise)
        generators.append(generator)
    return ImageNoise(torch.cat(noises), generators)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation per latent pixel (over the channel dimension), as A1111 does
    for variation seeds (Shoemake 1985). Falls back to linear interpolation when the vectors are
    nearly parallel, where slerp is numerically unstable.

    Note: A1111's fallback swaps the weights (`low*t + high*(1-t)`); we use the correct `(1-t)*low + t*high`,
    which differs from A1111 only when the two noises are almost identical (never for distinct seeds).
    """
    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot.clamp(-1, 1))
    sin_omega = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / sin_omega).unsqueeze(1) * low + (torch.sin(t * omega) / sin_omega).unsqueeze(1) * high

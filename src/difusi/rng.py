"""Seeded per-image noise (docs/ARCHITECTURE.md contract 2) from A1111's three noise sources.

Image i of a job with seed s uses seed s+i. Its initial noise is the first draw of a generator seeded with
s+i, always float32; every later draw for that image (ancestral and SDE noise) comes from the same
generator (or a Brownian tree seeded with s+i), so an image never depends on its batch position or size.

The generator follows A1111's setting "Random number generator source" (`RNG_SOURCES`):

- "CPU": `torch.Generator("cpu").manual_seed(s+i)`, whatever the job's device; difusi's default, and the
  only source whose images are also device-independent.
- "GPU": torch's generator on the job's device (A1111's default). A1111 uses the CPU generator when its
  device is the CPU or Apple's MPS, and so do we; a device that is asked for but absent (e.g. "cuda" on a
  machine without CUDA) is a `ParamError("rng", ...)`, never a silent fallback to other noise.
- "NV": A1111's emulation of CUDA's `torch.randn` (`difusi.philox`), computed on the CPU for any device,
  so images made with A1111's "GPU" source on an NVIDIA card can be remade without one. Its generator is a
  `PhiloxGenerator` whose offset advances by one per draw: the initial noise is draw 0, the sampler's
  first ancestral noise draw 1, and so on, as A1111's `ImageRNG`.

A1111 writes "RNG: CPU" / "RNG: NV" into infotexts and omits the field for its default "GPU".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difusi.errors import ParamError
from difusi.philox import PhiloxGenerator

RNG_SOURCES = ("CPU", "GPU", "NV")

# A per-image noise generator: torch's (sources CPU and GPU) or the CUDA emulation (source NV).
NoiseGenerator = torch.Generator | PhiloxGenerator


@dataclass
class ImageNoise:
    """Initial noise for a batch plus the per-image generators that continue after it."""

    noise: torch.Tensor
    generators: list[NoiseGenerator]


def check_source(source: str) -> str:
    """`source` if it is one of `RNG_SOURCES`, else a `ParamError` naming the choices."""
    if source not in RNG_SOURCES:
        raise ParamError("rng", f"unknown random number generator source {source!r}; use one of {', '.join(RNG_SOURCES)}")
    return source


def generator_device(source: str, device: str | torch.device = "cpu") -> torch.device:
    """The device whose torch generator a CPU or GPU source draws from (NV always computes on the CPU)."""
    device = torch.device(device)
    if check_source(source) != "GPU" or device.type in ("cpu", "mps"):
        return torch.device("cpu")  # MPS too: A1111's create_generator and randn draw on the CPU there
    if not _device_present(device):
        raise ParamError("rng", f"the GPU noise source needs device {device}, which is not available here")
    return device


def _device_present(device: torch.device) -> bool:
    """Whether a generator on `device` can be made and used (CUDA's index is checked: making one is lazy)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    try:
        torch.Generator(device)
    except RuntimeError:
        return False
    return True


def create_generator(seed: int, source: str = "CPU", device: str | torch.device = "cpu") -> NoiseGenerator:
    """A fresh generator for one image's seed (A1111's `rng.create_generator`)."""
    if check_source(source) == "NV":
        try:
            return PhiloxGenerator(int(seed))
        except ValueError as error:
            raise ParamError("seed", str(error)) from error
    return torch.Generator(generator_device(source, device)).manual_seed(int(seed))


def draw(generator: NoiseGenerator, shape: Sequence[int]) -> torch.Tensor:
    """The generator's next float32 N(0, I) draw of `shape`, on the generator's device (the CPU for NV)."""
    if isinstance(generator, PhiloxGenerator):
        return torch.from_numpy(generator.randn(tuple(shape)))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=generator.device)


def randn(shape: Sequence[int], seed: int, source: str = "CPU", offset: int = 0,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """The `offset`-th draw (0 = the first) of `shape` from a generator seeded with `seed`, float32 on `device`.

    For NV the offset is the Philox offset, i.e. the number of earlier draws of any shape; torch's
    generators consume state by size, so for CPU and GPU it counts earlier draws of this same shape.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    generator = create_generator(seed, source, device)
    if isinstance(generator, PhiloxGenerator):
        generator.offset = int(offset)  # counter-based: jump straight to the draw
    else:
        for _ in range(offset):
            draw(generator, shape)
    return draw(generator, shape).to(device)


def image_noise(
    seeds: list[int],
    shape: tuple[int, int, int],
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
    *,
    source: str = "CPU",
    device: str | torch.device = "cpu",
) -> ImageNoise:
    """Draw the initial latent noise for one batch, one image per seed, from `source` (see the module doc).

    With `subseed_strength > 0` each image's noise is the spherical interpolation (slerp) from its seed's
    noise towards its subseed's noise, as A1111's "variation seed"; the subseed noise is the first draw of a
    fresh generator of the same source. The generators returned are the main seeds' generators, advanced
    past the initial draw, for the sampler's later noise. The noise lies on the generators' device: the CPU,
    except for the GPU source on a GPU `device`.
    """
    noises, generators = [], []
    for index, seed in enumerate(seeds):
        generator = create_generator(seed, source, device)
        noise = draw(generator, (1, *shape))
        if subseeds is not None and subseed_strength > 0:
            sub = draw(create_generator(subseeds[index], source, device), (1, *shape))
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

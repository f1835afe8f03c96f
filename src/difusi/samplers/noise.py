"""Per-image noise for stochastic samplers, so an image never depends on its batch (docs/ARCHITECTURE.md contract 2).

`ImageNoiseSampler` draws each image's noise from that image's own generator (a CPU or GPU `torch.Generator`,
or the CUDA-emulating `PhiloxGenerator` of A1111's NV source, see `difusi.rng`); `BrownianNoiseSampler`
gives each image its own torchsde Brownian tree (Li et al. 2020), so the noise an SDE sampler sees over an
interval does not depend on how many steps cut it up (what makes DPM++ SDE results stable across step counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchsde

from difusi.rng import NoiseGenerator, draw


class ImageNoiseSampler:
    """noise_sampler(sigma, sigma_next) -> N(0, I) shaped like x; image i's noise comes from generators[i].

    Each draw is float32 on its generators' device (the CPU for CPU generators and NV's Philox ones, as the
    initial noise; one job's generators share a device) and is then moved to x's device and dtype. A Philox generator's offset advances by one
    per call, so after `difusi.rng.image_noise` the first call is NV draw 1, as in A1111.
    """

    def __init__(self, generators: Sequence[NoiseGenerator], x: torch.Tensor):
        if len(generators) != x.shape[0]:
            raise ValueError(f"need one generator per image: {len(generators)} generators for batch {x.shape[0]}")
        self.generators = list(generators)
        self.image_shape = (1, *x.shape[1:])
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        draws = [draw(generator, self.image_shape) for generator in self.generators]
        return torch.cat(draws).to(self.device, self.dtype)


class BrownianNoiseSampler:
    """noise_sampler(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) from one
    Brownian tree per image over [sigma_min, sigma_max] (torchsde.BrownianTree, seeded by the image seed).

    `seeds` is one seed per image; a single int builds one tree for the whole batch (fast for large
    statistical batches, but then images depend on the batch). sigma and sigma_next may also be
    per-image tensors of shape [B].
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: int | Sequence[int],
                 tol: float = 1e-6):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        if not 0 <= self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.device, self.dtype = x.device, x.dtype
        self.batched = not isinstance(seeds, int)
        shapes = [(1, *x.shape[1:])] * x.shape[0] if self.batched else [tuple(x.shape)]
        seed_list = list(seeds) if self.batched else [seeds]
        if len(seed_list) != len(shapes):
            raise ValueError(f"need one seed per image: {len(seed_list)} seeds for batch {x.shape[0]}")
        self.trees = [
            torchsde.BrownianTree(self.sigma_min, torch.zeros(shape, dtype=torch.float32), self.sigma_max,
                                  entropy=int(seed), tol=tol, pool_size=24)
            for shape, seed in zip(shapes, seed_list, strict=True)
        ]

    def _increment(self, tree, a: float, b: float) -> torch.Tensor:
        lo, hi = sorted((min(max(a, self.sigma_min), self.sigma_max), min(max(b, self.sigma_min), self.sigma_max)))
        if hi <= lo:
            raise ValueError(f"Brownian noise needs two different sigmas inside [{self.sigma_min}, {self.sigma_max}]")
        return tree(lo, hi) / (hi - lo) ** 0.5

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma, dtype=torch.float64), torch.as_tensor(sigma_next, dtype=torch.float64)
        if a.ndim == 0 and b.ndim == 0:
            pairs = [(float(a), float(b))] * len(self.trees)
        else:
            a, b = a.expand(len(self.trees)), b.expand(len(self.trees))
            pairs = list(zip(a.tolist(), b.tolist(), strict=True))
        draws = [self._increment(tree, lo, hi) for tree, (lo, hi) in zip(self.trees, pairs, strict=True)]
        return torch.cat(draws).to(self.device, self.dtype)

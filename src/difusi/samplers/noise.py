"""Per-image noise for stochastic samplers, so an image never depends on its batch (docs/ARCHITECTURE.md contract 2).

`ImageNoiseSampler` draws each image's noise from that image's own generator (a CPU or GPU `torch.Generator`,
or the CUDA-emulating `PhiloxGenerator` of A1111's NV source, see `difusi.rng`); `BrownianNoiseSampler`
gives each image its own torchsde Brownian tree (Li et al. 2020), so the noise an SDE sampler sees over an
interval does not depend on how many steps cut it up (what makes DPM++ SDE results stable across step counts).
"""

from __future__ import annotations

import math
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

    torchsde quantises a tree's times to its tolerance grid (`round(t, -log10(tol))`: 6 decimals for 1e-6),
    its two ends included, and warns about any query outside the rounded ends before clamping it. The sampler's
    sigmas are float32 values (14.614641189575195 for SD's sigma_max), never on that grid, so a query at the first
    sigma fell just outside the tree's end (14.614641) on every step of every SDE run. Queries are therefore put
    on the tree's own grid here (`_tree_time`): torchsde would round and clamp them to exactly these times anyway,
    so the noise is bit-identical to before, minus the warnings.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: int | Sequence[int],
                 tol: float = 1e-6):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # sigma_min == sigma_max is a one-step schedule: its only step ends at sigma 0, which SDE samplers take
        # without noise, so the tree is never asked (torchsde accepts an empty interval, as A1111 relies on).
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self._round = (lambda t: t) if tol == 0 else (lambda t: round(t, -int(math.log10(tol))))  # torchsde's rule
        self._tree_min, self._tree_max = self._round(self.sigma_min), self._round(self.sigma_max)
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
        # The increment is scaled by the sigmas the sampler asked for (unchanged published results); only the tree
        # is asked on its own grid, where it would have rounded and clamped the times to anyway.
        return tree(self._tree_time(lo), self._tree_time(hi)) / (hi - lo) ** 0.5

    def _tree_time(self, sigma: float) -> float:
        """A time on the tree's grid and inside its rounded ends: what torchsde would use for `sigma`, so the tree
        answers the same without warning that the query lay outside [t0, t1]. Rounding is monotone and the ends are
        on the grid, so clamping after rounding equals torchsde's clamping before it."""
        return min(max(self._round(sigma), self._tree_min), self._tree_max)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma, dtype=torch.float64), torch.as_tensor(sigma_next, dtype=torch.float64)
        if a.ndim == 0 and b.ndim == 0:
            pairs = [(float(a), float(b))] * len(self.trees)
        else:
            a, b = a.expand(len(self.trees)), b.expand(len(self.trees))
            pairs = list(zip(a.tolist(), b.tolist(), strict=True))
        draws = [self._increment(tree, lo, hi) for tree, (lo, hi) in zip(self.trees, pairs, strict=True)]
        return torch.cat(draws).to(self.device, self.dtype)

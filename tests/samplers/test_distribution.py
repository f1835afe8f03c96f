"""Stochastic samplers must sample the target distribution.

Samples from each stochastic sampler (all noise from seeded generators) are compared with the exact
mixture: component weights, per-component means and covariances. Each statistic's error is divided by its
standard error for that many exact samples (binomial for weights, sigma/sqrt(n) for means,
sqrt((S_ii S_jj + S_ij^2)/n) for covariance entries) and every |z| must be < 5 (about 13 statistics per
sampler: a false alarm has probability < 1e-5). Default tier: 2,000 samples; slow tier: 20,000.
The step counts (in `DISTRIBUTION_CASES`) are high enough that discretisation bias stays well below 5 standard
errors at 20,000 samples, as measured.
"""

import pytest
import torch

from difusi.samplers.common import get_ancestral_step
from difusi.samplers.measure import DISTRIBUTION_CASES, DistributionCase, distribution_stats, draw_samples

TESTED = [c for c in DISTRIBUTION_CASES if c.max_z != float("inf")]


@pytest.mark.parametrize("case", TESTED, ids=[c.label for c in TESTED])
def test_distribution_quick(case, mixture):
    n = 2000
    stats = distribution_stats(draw_samples(case, n, seed=11, mixture=mixture), mixture)
    assert stats["max_z"] < case.max_z, stats


@pytest.mark.slow
@pytest.mark.parametrize("case", TESTED, ids=[c.label for c in TESTED])
def test_distribution_20k(case, mixture):
    stats = distribution_stats(draw_samples(case, 20_000, seed=12, mixture=mixture), mixture)
    assert stats["max_z"] < case.max_z, stats


def test_removing_the_noise_is_detected(mixture):
    """The statistic has power: ancestral Euler with s_noise = 0 (noise removed, nothing else changed)
    collapses the modes and must fail by a wide margin."""
    case = DistributionCase("Euler a without noise", "Euler a", 60, {"s_noise": 0.0})
    stats = distribution_stats(draw_samples(case, 2000, seed=11, mixture=mixture), mixture)
    assert stats["max_z"] > 20, stats


def test_lcm_is_the_consistency_recursion(mixture):
    """LCM is biased with a plain denoiser by design (D is a posterior mean), so check its definition instead:
    x_{i+1} = D(x_i, sigma_i) + sigma_{i+1} z_i, and the last step returns D."""
    from difusi.samplers import get_sampler

    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    noises = [torch.randn(6, 2, generator=torch.Generator().manual_seed(i + 1), dtype=torch.float64) for i in range(2)]
    calls = iter(noises)
    out = get_sampler("LCM")(mixture.denoise, x.clone(), sigmas, noise_sampler=lambda s, sn: next(calls))
    expected = x
    for i in range(3):
        expected = mixture.denoise(expected, sigmas[i])
        if i < 2:
            expected = expected + sigmas[i + 1] * noises[i]
    assert torch.allclose(out, expected, atol=1e-12)


def test_ancestral_step_preserves_the_noise_level():
    sigma_down, sigma_up = get_ancestral_step(torch.tensor(5.0), torch.tensor(2.0), eta=1.0)
    assert torch.isclose(sigma_down**2 + sigma_up**2, torch.tensor(4.0))
    # eta = 1 adds the DDPM posterior noise: sigma_up^2 = s_to^2 (s_from^2 - s_to^2) / s_from^2
    assert torch.isclose(sigma_up**2, torch.tensor(4.0 * 21.0 / 25.0))
    sigma_down, sigma_up = get_ancestral_step(torch.tensor(5.0), torch.tensor(2.0), eta=0.0)
    assert float(sigma_down) == 2.0 and float(sigma_up) == 0.0

"""Per-image noise: an image is the same alone or at any position of a batch (docs/ARCHITECTURE.md contract 2)."""

import pytest
import torch

from difusi.samplers import build_sigmas, get_sampler, list_samplers
from difusi.samplers.noise import BrownianNoiseSampler, ImageNoiseSampler

STOCHASTIC = [(s.name, {}) for s in list_samplers() if s.stochastic] + [
    ("Euler", {"s_churn": 10.0}), ("Heun", {"s_churn": 10.0}), ("DPM2", {"s_churn": 10.0}), ("DDIM", {"eta": 1.0}),
]


def initial_noise(seed):
    return torch.randn((1, 2), generator=torch.Generator("cpu").manual_seed(seed))


def run(name, options, seeds, mixture, table):
    sampler = get_sampler(name)
    sigmas = build_sigmas(sampler, "Automatic", 24, table).float()  # 24 steps: Restart really restarts
    x = torch.cat([initial_noise(s) for s in seeds]) * sigmas[0]
    if sampler.uses_brownian_noise:
        noise = BrownianNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seeds=seeds)
    else:
        noise = ImageNoiseSampler([torch.Generator("cpu").manual_seed(s) for s in seeds], x)
    model = lambda x, sigma: mixture.denoise(x, sigma)  # noqa: E731
    return sampler(model, x, sigmas, noise_sampler=noise, **options)


@pytest.mark.parametrize(("name", "options"), STOCHASTIC, ids=[f"{n}{o or ''}" for n, o in STOCHASTIC])
def test_batch_of_four_equals_four_single_runs(name, options, mixture, table):
    seeds = [1234, 1235, 1236, 1237]
    batch = run(name, options, seeds, mixture, table)
    singles = torch.cat([run(name, options, [s], mixture, table) for s in seeds])
    assert (batch - singles).abs().max() <= 1e-6
    # ...and the noise really matters: different seeds give different images.
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_image_noise_sampler_uses_one_generator_per_image():
    x = torch.zeros(3, 4, 2, 2)
    noise = ImageNoiseSampler([torch.Generator().manual_seed(s) for s in (7, 8, 9)], x)
    first, second = noise(1.0, 0.5), noise(0.5, 0.2)
    generator = torch.Generator().manual_seed(8)
    assert torch.equal(first[1:2], torch.randn((1, 4, 2, 2), generator=generator))
    assert torch.equal(second[1:2], torch.randn((1, 4, 2, 2), generator=generator))


def test_brownian_noise_is_unit_gaussian_and_consistent():
    x = torch.zeros(1, 20_000)
    noise = BrownianNoiseSampler(x, 0.03, 15.0, seeds=[3])
    z = noise(10.0, 5.0)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    # Brownian increments over adjacent intervals add up: W(10) - W(2) = (W(10) - W(5)) + (W(5) - W(2)).
    whole = noise(10.0, 2.0) * 8**0.5
    parts = noise(10.0, 5.0) * 5**0.5 + noise(5.0, 2.0) * 3**0.5
    assert torch.allclose(whole, parts, atol=1e-4)
    # Same seed, same path, independent of query order.
    again = BrownianNoiseSampler(x, 0.03, 15.0, seeds=[3])
    assert torch.allclose(again(5.0, 2.0), noise(5.0, 2.0), atol=1e-5)


def test_noise_samplers_need_one_source_per_image():
    with pytest.raises(ValueError, match="one generator per image"):
        ImageNoiseSampler([torch.Generator()], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one seed per image"):
        BrownianNoiseSampler(torch.zeros(2, 3), 0.1, 1.0, seeds=[1, 2, 3])

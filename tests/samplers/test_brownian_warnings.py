"""Issue 19 defect 5: SDE samplers ran with torchsde warning "Should have tb<=t1 but got tb=14.614641189575195 and
t1=14.614641" on every step at the first sigma. torchsde rounds a tree's times to its tolerance grid (6 decimals),
its ends included, and the float32 sigmas are off that grid; BrownianNoiseSampler now asks the tree on its grid.
The noise must stay bit-identical to what torchsde returned before (its own rounding and clamping)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchsde

from difusi import pipeline
from difusi.samplers import build_sigmas, get_sampler, list_samplers
from difusi.samplers.noise import BrownianNoiseSampler

SDE = [sampler.name for sampler in list_samplers() if sampler.uses_brownian_noise]
SCHEDULES = ["Automatic", "Karras", "Exponential", "Normal", "Uniform"]


def _pipeline_sigmas(name: str, schedule: str, steps: int, table) -> torch.Tensor:
    # As pipeline._sample_batch: float32 sigmas, and the tree spans the smallest and largest positive one.
    return build_sigmas(get_sampler(name), schedule, steps, table).to(torch.float32)


def _run(name: str, sigmas: torch.Tensor, mixture, seeds: list[int]) -> torch.Tensor:
    positive = sigmas[sigmas > 0]
    x = torch.randn((len(seeds), 2), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    noise = BrownianNoiseSampler(x, positive.min(), positive.max(), seeds)
    return get_sampler(name)(lambda x, sigma: mixture.denoise(x, sigma).float(), x, sigmas, noise_sampler=noise)


def test_sde_samplers_cover_the_three_named_in_the_issue():
    assert {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"} <= set(SDE)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", SDE)
def test_sde_sampling_emits_no_warning(name, schedule, mixture, table):
    sigmas = _pipeline_sigmas(name, schedule, 8, table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _run(name, sigmas, mixture, [11, 12])
    assert torch.isfinite(result).all()


def test_one_step_schedule_works(mixture, table):
    """One step: the tree spans a single sigma (torchsde accepts it) and is never asked (the step ends at 0)."""
    for name in SDE:
        sigmas = _pipeline_sigmas(name, "Automatic", 1, table)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.isfinite(_run(name, sigmas, mixture, [5])).all()


def test_noise_is_what_torchsde_answered_before(table):
    """The increments equal torchsde's own answer to the unrounded query (rounded and clamped there, with the
    warning), divided by the same sqrt(interval): published sampler results do not move."""
    sigmas = _pipeline_sigmas("DPM++ 2M SDE", "Karras", 10, table)
    positive = sigmas[sigmas > 0]
    low, high = float(positive.min()), float(positive.max())
    x = torch.zeros(1, 4, 3, 3)
    sampler = BrownianNoiseSampler(x, low, high, [42])
    reference = torchsde.BrownianTree(low, torch.zeros(1, 4, 3, 3), high, entropy=42, tol=1e-6, pool_size=24)
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True))[:-1]  # the last step ends at 0
    pairs += [(high, float(sigmas[3])), (float(sigmas[-2]), float(sigmas[-3]))]
    for sigma, sigma_next in pairs:
        a, b = sorted((min(max(sigma, low), high), min(max(sigma_next, low), high)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde warns here about the off-grid ends; that is the old path
            expected = reference(a, b) / (b - a) ** 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(sampler(sigma, sigma_next), expected)


@pytest.fixture(scope="module")
def mini():
    from difusi.models import default_model_path, load_model

    return load_model(default_model_path())


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_a_real_run_emits_no_warning(name, mini, one_torch_thread):
    """The issue's reproduction: a difusi-mini job through the pipeline (float32 sigmas, per-image trees)."""
    from difusi.params import GenerationParams

    params = GenerationParams(prompt="a red circle", steps=3, sampler_name=name, seed=4294967295, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pipeline.txt2img(mini, params)
    assert result.seeds == [4294967295, 4294967296]

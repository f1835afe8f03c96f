"""Progress callback, cancel, and bad input for every sampler."""

import pytest
import torch

from difusi.errors import Interrupted, ParamError
from difusi.samplers import list_samplers
from difusi.samplers.schedules import karras_sigmas

ALL = [s.name for s in list_samplers()]
FIXED_STEPS = [n for n in ALL if n not in ("DPM fast", "DPM adaptive")]


def _x():
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6


@pytest.mark.parametrize("name", FIXED_STEPS)
def test_callback_once_per_step_with_the_contract_keys(name, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    sigmas = karras_sigmas(8, 0.03, 14.6)
    seen = []
    sampler(mixture, _x(), sigmas, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(8))
    assert all(set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"} for info in seen)
    assert torch.allclose(torch.stack([torch.as_tensor(info["sigma"]) for info in seen]), sigmas[:-1])
    assert all(info["denoised"].shape == (3, 2) for info in seen)


def test_dpm_fast_and_adaptive_report_their_own_steps(mixture):
    samplers = {s.name: s for s in list_samplers()}
    seen = []
    samplers["DPM fast"](mixture, _x(), karras_sigmas(10, 0.03, 14.6), callback=seen.append, eta=0.0)
    assert [info["i"] for info in seen] == list(range(4))  # 10 evaluations = 3 + 3 + 3 + 1
    seen.clear()
    samplers["DPM adaptive"](mixture, _x(), karras_sigmas(10, 0.03, 14.6), callback=seen.append, eta=0.0)
    sigmas = [float(info["sigma"]) for info in seen]
    assert len(seen) > 3 and sigmas == sorted(sigmas, reverse=True) and sigmas[0] == pytest.approx(14.6)


@pytest.mark.parametrize("name", ALL)
def test_cancel_raises_from_the_callback_and_stops_model_calls(name, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    calls = []

    def model(x, sigma):
        calls.append(1)
        return mixture.denoise(x, sigma)

    def callback(info):
        if info["i"] == 2:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        sampler(model, _x(), karras_sigmas(30, 0.03, 14.6), callback=callback)
    calls_at_cancel = len(calls)
    assert calls_at_cancel <= 9 * 3  # at most three steps of the costliest sampler (DPM fast/adaptive: 3 per step)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("sigmas", "needle"),
    [([14.6, 3.0, 5.0, 0.0], "sigmas[2]=5"), ([14.6, 3.0, 3.0, 0.0], "strictly decreasing"),
     ([14.6, 3.0, 1.0], "end in 0"), ([0.0], "at least 2"), ([14.6, float("nan"), 0.0], "finite")],
)
def test_bad_sigmas(name, sigmas, needle, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    with pytest.raises(ParamError) as info:
        sampler(mixture, _x(), torch.tensor(sigmas, dtype=torch.float64))
    assert info.value.field == "sigmas" and needle in str(info.value)


@pytest.mark.parametrize("name", [s.name for s in list_samplers() if "eta" in s.options])
def test_negative_eta(name, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    with pytest.raises(ParamError) as info:
        sampler(mixture, _x(), karras_sigmas(4, 0.03, 14.6), eta=-0.5)
    assert info.value.field == "eta" and "-0.5" in str(info.value)


@pytest.mark.parametrize("name", [s.name for s in list_samplers() if "s_noise" in s.options])
def test_negative_s_noise(name, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    with pytest.raises(ParamError) as info:
        sampler(mixture, _x(), karras_sigmas(4, 0.03, 14.6), s_noise=-1.0)
    assert info.value.field == "s_noise" and ">= 0" in str(info.value)


def test_sampler_exceptions_are_not_swallowed(mixture):
    """A failing model propagates unchanged (no sampler catches exceptions)."""
    def broken(x, sigma):
        raise RuntimeError("model exploded")

    for sampler in list_samplers():
        with pytest.raises(RuntimeError, match="model exploded"):
            sampler(broken, _x(), karras_sigmas(4, 0.03, 14.6))


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [("DPM adaptive", {"order": 4}, "order"), ("DPM adaptive", {"h_init": 0.0}, "h_init"),
     ("DPM++ SDE", {"r": 1.5}, "r"), ("DPM++ 2M SDE", {"solver_type": "rk4"}, "solver_type"),
     ("LMS", {"order": 0}, "order"), ("UniPC", {"variant": "bh3"}, "variant"), ("UniPC", {"order": 1.5}, "order"),
     ("Euler", {"s_churn": -1.0}, "s_churn")],
)
def test_bad_options_name_the_option(name, options, field, mixture):
    sampler = next(s for s in list_samplers() if s.name == name)
    with pytest.raises(ParamError) as info:
        sampler(mixture, _x(), karras_sigmas(4, 0.03, 14.6), **options)
    assert info.value.field == field


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_only_inside_its_sigma_window(name, mixture):
    """EDM churn applies only for s_tmin <= sigma <= s_tmax; outside it the sampler is the plain ODE solver."""
    sampler = next(s for s in list_samplers() if s.name == name)
    sigmas = karras_sigmas(8, 0.03, 14.6)
    plain = sampler(mixture, _x(), sigmas)
    outside = sampler(mixture, _x(), sigmas, s_churn=20.0, s_tmin=100.0, s_tmax=200.0,
                      noise_sampler=lambda s, sn: torch.ones(3, 2, dtype=torch.float64))
    inside = sampler(mixture, _x(), sigmas, s_churn=20.0, s_tmin=0.5, s_tmax=5.0,
                     noise_sampler=lambda s, sn: torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(plain, outside)
    assert not torch.allclose(plain, inside)

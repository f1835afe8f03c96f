"""Schedule values against their formulas, diffusers' spacings and known relations."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from scipy import stats

from difusi.errors import ParamError
from difusi.samplers import build_sigmas, get_sampler, get_schedule, list_schedules
from difusi.samplers.schedules import AYS_SIGMAS, schedule_sigmas

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
CONCRETE = [s.name for s in list_schedules() if s.function is not None]


def test_noise_table_matches_diffusers_alphas(table):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG)
    assert torch.allclose(table.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-6)
    assert table.sigma_min == pytest.approx(0.029167, abs=1e-5)
    assert table.sigma_max == pytest.approx(14.614642, abs=1e-5)


@pytest.mark.parametrize("name", CONCRETE)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_every_schedule_is_valid(name, steps, table):
    sigmas = schedule_sigmas(name, steps, table)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0
    assert (sigmas[:-1] > 0).all()
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0] <= table.sigma_max + 1e-3


def test_simple_at_20_steps_is_diffusers_trailing(table):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    assert torch.allclose(schedule_sigmas("Simple", 20, table).float(), scheduler.sigmas, rtol=1e-5)


@pytest.mark.parametrize("steps", [10, 20, 25])
def test_ddim_schedule_is_diffusers_leading_with_offset_1(steps, table):
    scheduler = DDIMScheduler(**SD_CONFIG, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    expected = table.sigmas[scheduler.timesteps.long()]
    assert torch.allclose(schedule_sigmas("DDIM", steps, table)[:-1], expected)


def test_karras_formula_and_endpoints(table):
    sigmas = schedule_sigmas("Karras", 10, table)
    assert sigmas[0] == pytest.approx(table.sigma_max, rel=1e-12)
    assert sigmas[-2] == pytest.approx(table.sigma_min, rel=1e-12)
    # Equal steps in sigma^(1/rho), rho = 7 (Karras et al. 2022, eq. 5).
    steps = np.diff(sigmas[:-1].numpy() ** (1 / 7))
    assert np.allclose(steps, steps[0])
    rho3 = schedule_sigmas("Karras", 10, table, rho=3.0)[:-1].numpy() ** (1 / 3)
    assert np.allclose(np.diff(rho3), np.diff(rho3)[0])


def test_karras_matches_diffusers_use_karras_sigmas(table):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    scheduler.set_timesteps(15)
    assert torch.allclose(schedule_sigmas("Karras", 15, table).float(), scheduler.sigmas, rtol=1e-4)


def test_exponential_and_polyexponential(table):
    exp = schedule_sigmas("Exponential", 12, table)[:-1].log().numpy()
    assert np.allclose(np.diff(exp), np.diff(exp)[0])
    assert math.exp(exp[0]) == pytest.approx(table.sigma_max) and math.exp(exp[-1]) == pytest.approx(table.sigma_min)
    assert torch.allclose(schedule_sigmas("Polyexponential", 12, table), schedule_sigmas("Exponential", 12, table))
    poly2 = schedule_sigmas("Polyexponential", 12, table, rho=2.0)[:-1].log()
    ramp = torch.linspace(1, 0, 12, dtype=torch.float64) ** 2
    expected = ramp * (math.log(table.sigma_max) - math.log(table.sigma_min)) + math.log(table.sigma_min)
    assert torch.allclose(poly2, expected)


def test_uniform_normal_and_sgm_uniform_are_equal_timestep_steps(table):
    uniform = schedule_sigmas("Uniform", 10, table)[:-1]
    assert torch.allclose(table.sigma_to_t(uniform), torch.linspace(999, 0, 10, dtype=torch.float64), atol=1e-6)
    normal = schedule_sigmas("Normal", 10, table)[:-1]
    assert torch.allclose(normal, uniform)  # t(sigma_max) = 999 and t(sigma_min) = 0 for the SD table
    sgm = schedule_sigmas("SGM Uniform", 10, table)[:-1]
    assert torch.allclose(table.sigma_to_t(sgm), torch.linspace(999, 0, 11, dtype=torch.float64)[:-1], atol=1e-6)


def test_beta_schedule_uses_beta_quantiles(table):
    sigmas = schedule_sigmas("Beta", 9, table)[:-1].numpy()
    fraction = (sigmas - table.sigma_min) / (table.sigma_max - table.sigma_min)
    assert np.allclose(stats.beta.cdf(fraction, 0.6, 0.6), 1 - np.linspace(0, 1, 9), atol=1e-9)


def test_kl_optimal_is_uniform_in_arctan(table):
    sigmas = schedule_sigmas("KL Optimal", 8, table)[:-1]
    angles = torch.atan(sigmas).numpy()
    assert np.allclose(np.diff(angles), np.diff(angles)[0])
    assert sigmas[0] == pytest.approx(table.sigma_max) and sigmas[-1] == pytest.approx(table.sigma_min)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_align_your_steps_tables_and_interpolation(family, table):
    # The published table has 11 sigmas (the last, 0.029, is a step); 11 steps use it as is (A1111).
    exact = schedule_sigmas("Align Your Steps", 11, table, family=family)
    assert exact[:-1].tolist() == AYS_SIGMAS[family] and exact[-1] == 0
    twenty = schedule_sigmas("Align Your Steps", 21, table, family=family)[:-1]
    # Log-linear interpolation on an even grid: every second of 21 points is a table point.
    assert torch.allclose(twenty[::2], torch.tensor(AYS_SIGMAS[family], dtype=torch.float64))
    assert torch.allclose(twenty[1::2], (twenty[:-2:2] * twenty[2::2]).sqrt())


def test_align_your_steps_sdxl_schedule_name(table):
    assert torch.equal(schedule_sigmas("Align Your Steps SDXL", 16, table),
                       schedule_sigmas("Align Your Steps", 16, table, family="sdxl"))
    assert not torch.equal(schedule_sigmas("Align Your Steps", 16, table),
                           schedule_sigmas("Align Your Steps", 16, table, family="sdxl"))


def test_automatic_resolves_to_the_a1111_default(table):
    assert torch.equal(build_sigmas("DPM++ 2M", "Automatic", 20, table), schedule_sigmas("Karras", 20, table))
    assert torch.equal(build_sigmas("Euler a", "Automatic", 20, table), schedule_sigmas("Uniform", 20, table))
    assert torch.equal(build_sigmas("DPM++ 2M SDE", None, 20, table), schedule_sigmas("Exponential", 20, table))
    assert torch.equal(build_sigmas("DDIM", "Automatic", 20, table), schedule_sigmas("DDIM", 20, table))


def test_legacy_name_override_applies_only_to_automatic(table):
    assert torch.equal(build_sigmas("Euler Karras", "Automatic", 12, table), schedule_sigmas("Karras", 12, table))
    assert torch.equal(build_sigmas("Euler Karras", "Exponential", 12, table), schedule_sigmas("Exponential", 12, table))


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a", "DPM++ 3M SDE", "UniPC"])
def test_discard_penultimate_sigma(name, table):
    sampler = get_sampler(name)
    assert sampler.discard_penultimate_sigma
    full = schedule_sigmas("Karras", 21, table)
    got = build_sigmas(sampler, "Karras", 20, table)
    assert len(got) == 21
    assert torch.equal(got, torch.cat([full[:-2], full[-1:]]))


def test_schedule_lookup_accepts_keys_aliases_and_case(table):
    assert get_schedule("karras").name == "Karras"
    assert get_schedule("SGM_UNIFORM").name == "SGM Uniform"
    assert get_schedule("ddim_uniform").name == "DDIM"
    assert get_schedule("kl_optimal").name == "KL Optimal"
    assert get_schedule(None).name == "Automatic"


def test_unknown_schedule_lists_valid_names(table):
    with pytest.raises(ParamError) as info:
        build_sigmas("Euler", "Karass", 20, table)
    assert info.value.field == "scheduler" and "Karras" in str(info.value) and "'Karass'" in str(info.value)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "20"])
def test_bad_steps(steps, table):
    with pytest.raises(ParamError) as info:
        build_sigmas("Euler", "Karras", steps, table)
    assert info.value.field == "steps" and "1 to 1000" in str(info.value)


def test_schedule_a1111_shape():
    entry = get_schedule("Karras").to_a1111()
    assert entry == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}
    assert get_schedule("Simple").to_a1111()["need_inner_model"] is True

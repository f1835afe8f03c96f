"""Noise table, eps/v wrappers and classifier-free guidance."""

import pytest
import torch
from diffusers import DDPMScheduler

from difusi.errors import ParamError
from difusi.samplers.denoiser import CFGDenoiser, DiscreteNoiseTable, EpsDenoiser, VDenoiser

from .conftest import gaussian


def test_sigma_to_t_round_trips_and_hits_table_points(table):
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(table.sigma_to_t(table.t_to_sigma(t)), t, atol=1e-9)
    assert torch.allclose(table.sigma_to_t(table.sigmas[[3, 400, 999]]), torch.tensor([3.0, 400.0, 999.0], dtype=torch.float64))
    # log-sigma interpolation: halfway in t is the geometric mean of the neighbours
    assert torch.isclose(table.t_to_sigma(torch.tensor(10.5)), (table.sigmas[10] * table.sigmas[11]).sqrt())
    # out-of-range sigmas clamp to the table ends
    assert float(table.sigma_to_t(torch.tensor(100.0))) == 999.0 and float(table.sigma_to_t(torch.tensor(1e-4))) == 0.0


def test_custom_alphas_cumprod():
    alphas = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    table = DiscreteNoiseTable(alphas_cumprod=alphas)
    assert torch.allclose(table.sigmas, ((1 - alphas) / alphas).sqrt())


def _sample_at_t(table, t, seed):
    """x0, noise, the VP sample x_t and k-diffusion x = x_t / sqrt(abar_t), via diffusers' add_noise."""
    x0, noise = gaussian((2, 4, 3, 3), seed), gaussian((2, 4, 3, 3), seed + 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x_vp = scheduler.add_noise(x0.float(), noise.float(), torch.tensor([t, t])).double()
    return x0, noise, x_vp / table.alphas_cumprod[t].sqrt()


def test_eps_denoiser_recovers_x0_from_a_perfect_eps_network(table):
    t = 700
    x0, noise, x = _sample_at_t(table, t, 0)
    seen = {}

    def network(x_in, timestep):
        seen["x_in"], seen["t"] = x_in, timestep
        return noise

    denoised = EpsDenoiser(network, table)(x, table.sigmas[[t, t]])
    assert torch.allclose(denoised, x0, atol=1e-5)
    assert torch.allclose(seen["t"], torch.tensor([700.0, 700.0], dtype=torch.float64))
    # the network sees the VP-scaled input x * c_in = x_t
    assert torch.allclose(seen["x_in"], x * table.alphas_cumprod[t].sqrt())


def test_v_denoiser_recovers_x0_from_a_perfect_v_network(table):
    t = 350
    x0, noise, x = _sample_at_t(table, t, 2)
    abar = table.alphas_cumprod[t]
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v-prediction target (Salimans & Ho 2022)
    denoised = VDenoiser(lambda x_in, timestep: v, table)(x, table.sigmas[[t, t]])
    assert torch.allclose(denoised, x0, atol=1e-5)


def _net(x_in, t, context, extra=None):
    """A toy network whose output depends on the conditioning, to see guidance."""
    out = x_in * 0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    if extra is not None:
        out = out + extra["text_embeds"].sum(-1).reshape(-1, 1, 1, 1)
    return out


def test_cfg_combines_cond_and_uncond_in_one_batched_call(table):
    calls = []

    def inner(x, sigma, **kwargs):
        calls.append(x.shape[0])
        return EpsDenoiser(_net, table)(x, sigma, **kwargs)

    x = gaussian((2, 4, 3, 3), 4)
    sigma = torch.tensor([3.0, 3.0], dtype=torch.float64)
    cond = {"context": torch.full((2, 77, 8), 2.0, dtype=torch.float64), "extra": {"text_embeds": torch.ones(2, 3, dtype=torch.float64)}}
    uncond = {"context": torch.zeros(2, 77, 8, dtype=torch.float64), "extra": {"text_embeds": torch.zeros(2, 3, dtype=torch.float64)}}
    guided = CFGDenoiser(inner)(x, sigma, cond, uncond, 7.5)
    assert calls == [4]
    d_cond = EpsDenoiser(_net, table)(x, sigma, **cond)
    d_uncond = EpsDenoiser(_net, table)(x, sigma, **uncond)
    assert torch.allclose(guided, d_uncond + 7.5 * (d_cond - d_uncond))
    calls.clear()
    assert torch.allclose(CFGDenoiser(inner)(x, sigma, cond, uncond, 1.0), d_cond)
    assert calls == [2]  # scale 1 skips the uncond pass


def test_cfg_rejects_mismatched_conditioning(table):
    cfg = CFGDenoiser(EpsDenoiser(_net, table))
    x, sigma = gaussian((1, 4, 3, 3), 5), torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(ParamError, match="chunk count"):
        cfg(x, sigma, {"context": torch.zeros(1, 154, 8)}, {"context": torch.zeros(1, 77, 8)}, 7.0)

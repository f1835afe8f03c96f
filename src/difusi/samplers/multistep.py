"""Linear multistep samplers: LMS (Adams-Bashforth on the sigma grid), PLMS (Liu et al. 2022, PNDM)
and UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models")."""

from __future__ import annotations

import numpy as np
import torch

from difusi.errors import ParamError
from difusi.samplers.common import check_sigmas, report, sigma_batch, t_fn, to_d


def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Weight of the derivative at sigmas[i - j] in the variable-step Adams-Bashforth step
    sigmas[i] -> sigmas[i + 1]: the integral over that step of the Lagrange basis polynomial through
    sigmas[i], ..., sigmas[i - order + 1] that is 1 at sigmas[i - j]. The integral is exact (polynomial
    antiderivative) rather than numerical quadrature."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d(np.poly(nodes)) / np.prod([sigmas[i - j] - node for node in nodes]) if nodes else np.poly1d([1.0])
    antiderivative = np.polyint(basis)
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, order=4):
    """Linear multistep (Adams-Bashforth) of the given order on the probability-flow ODE in sigma, with
    coefficients for the actual non-uniform sigma grid (k-diffusion's LMS, Karras et al. 2022 sec. 3).
    Starts at order 1 and gains one order per step."""
    check_sigmas(sigmas)
    if int(order) != order or order < 1:
        raise ParamError("order", f"must be a positive integer, got {order!r}")
    extra_args = extra_args or {}
    grid = sigmas.detach().cpu().double().tolist()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x), **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        current_order = len(ds)
        coeffs = [lms_coefficient(current_order, grid, i, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


_PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", PLMS): DDIM transfer steps driven by a fixed-weight Adams-Bashforth combination of the
    last four noise predictions. The first step uses a pseudo improved-Euler (two evaluations), as in
    A1111 and diffusers' PNDM with skip_prk_steps.

    In sigma space the noise prediction is the ODE derivative d = (x - D) / sigma and DDIM's transfer is an
    Euler step, so each step is x + (sigma_next - sigma) * sum(w_k d_k). The weights assume equal steps.
    """
    check_sigmas(sigmas)
    extra_args = extra_args or {}
    history = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        d = to_d(x, sigma, denoised)
        history = (history + [d])[-4:]
        report(callback, x, i, sigma, sigma, denoised)
        if len(history) == 1 and sigma_next > 0:
            x_euler = x + d * (sigma_next - sigma)
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_batch(sigma_next, x), **extra_args))
            d_prime = (d + d_next) / 2
        elif len(history) == 1:
            d_prime = d
        else:
            weights = _PLMS_WEIGHTS[len(history)]
            d_prime = sum(w * dk for w, dk in zip(weights, reversed(history), strict=True))
        x = x + d_prime * (sigma_next - sigma)
    return x


def _unipc_coefficients(rks: list[torch.Tensor], h: torch.Tensor, order: int, variant: str):
    """UniPC's B(h), phi_1 and the linear system R rho = b (Zhao et al. 2023, Alg. 2/3, data prediction)."""
    hh = -h
    h_phi_1 = hh.expm1()
    b_h = hh if variant == "bh1" else hh.expm1()
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, rhs = [], []
    nodes = torch.stack(rks + [torch.ones_like(h)])
    for k in range(1, order + 1):
        rows.append(nodes ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(rhs)


def _unipc_update(x, sigma, sigma_next, lambdas, denoised_hist, order, variant, model_t=None):
    """One UniP predictor step (model_t None) or UniC corrector step (model_t = D at the new point),
    from the point with history entries [-1] (current) back to [-order]."""
    lam_s0 = lambdas[-1]
    h = t_fn(sigma_next) - lam_s0
    m0 = denoised_hist[-1]
    rks, slopes = [], []
    for k in range(1, order):
        rk = (lambdas[-1 - k] - lam_s0) / h
        rks.append(rk)
        slopes.append((denoised_hist[-1 - k] - m0) / rk)
    h_phi_1, b_h, rows, rhs = _unipc_coefficients(rks, h, order, variant)
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0
    if model_t is None:
        if not slopes:
            return x_next
        rhos = torch.full((1,), 0.5, dtype=rhs.dtype) if order == 2 else torch.linalg.solve(rows[:-1, :-1], rhs[:-1])
        return x_next - b_h * sum(r * s for r, s in zip(rhos, slopes, strict=True))
    rhos = torch.full((1,), 0.5, dtype=rhs.dtype) if order == 1 else torch.linalg.solve(rows, rhs)
    correction = sum((r * s for r, s in zip(rhos[:-1], slopes, strict=True)), torch.zeros_like(x))
    return x_next - b_h * (correction + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 order=3, variant="bh1", use_corrector=True):
    """UniPC multistep with data prediction (Zhao et al. 2023): UniP-p predictor of the given order and the
    UniC corrector, which re-uses the model evaluation at the new point, so one evaluation per step.
    `variant` picks B(h) = h ("bh1") or expm1(h) ("bh2"). Orders warm up from 1 and drop back near the
    end (lower-order final, as diffusers and A1111); the step to sigma = 0 returns the denoised value."""
    check_sigmas(sigmas)
    if variant not in ("bh1", "bh2"):
        raise ParamError("variant", f"must be 'bh1' or 'bh2', got {variant!r}")
    if int(order) != order or order < 1:
        raise ParamError("order", f"must be a positive integer, got {order!r}")
    extra_args = extra_args or {}
    steps = len(sigmas) - 1
    lambdas, history = [], []
    last_x, last_order = None, 0
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x), **extra_args)
        if use_corrector and last_x is not None:
            x = _unipc_update(last_x, sigmas[i - 1], sigma, lambdas, history, last_order, variant, model_t=denoised)
        lambdas = (lambdas + [t_fn(sigma)])[-order:]
        history = (history + [denoised])[-order:]
        report(callback, x, i, sigma, sigma, denoised)
        last_order = min(order, steps - i, i + 1)
        last_x = x
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, lambdas, history, last_order, variant)
    return x


@torch.no_grad()
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     order=3, variant="bh2", use_corrector=True):
    """UniPC with B(h) = expm1(h) (ComfyUI's "uni_pc_bh2"); see `sample_unipc`."""
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                        order=order, variant=variant, use_corrector=use_corrector)

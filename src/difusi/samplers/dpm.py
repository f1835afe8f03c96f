"""DPM2 / DPM2 ancestral (Karras et al. 2022's second-order sampler with a log-midpoint) and DPM-Solver
fast / adaptive (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps").

DPM-Solver works in half-log-SNR time t = -log(sigma). With the data-free ODE written in terms of
eps(x, t) = (x - D(x, sigma)) / sigma, the exact solution with eps frozen is
x(t_next) = x - sigma(t_next) * expm1(h) * eps, h = t_next - t; the 2nd/3rd order solvers add
finite-difference corrections of eps (Lu et al. 2022, Algorithms 1 and 2).
"""

from __future__ import annotations

import torch

from difusi.errors import ParamError
from difusi.samplers.common import (
    add_churn,
    check_nonnegative,
    check_sigmas,
    churn_gamma,
    default_noise_sampler,
    get_ancestral_step,
    report,
    sigma_batch,
    sigma_fn,
    t_fn,
    to_d,
)


def _log_midpoint(sigma_a, sigma_b):
    """Geometric mean of two noise levels: DPM2 evaluates its second derivative there."""
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM2: a second-order midpoint method whose midpoint is the geometric mean of the two sigmas
    (the "DPM-Solver-2"-like sampler of k-diffusion, Karras et al. 2022 / Lu et al. 2022)."""
    check_sigmas(sigmas)
    check_nonnegative(s_churn=s_churn, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    steps = len(sigmas) - 1
    for i in range(steps):
        gamma = churn_gamma(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = add_churn(x, sigmas[i], gamma, s_noise, noise_sampler)
        denoised = model(x, sigma_batch(sigma_hat, x), **extra_args)
        d = to_d(x, sigma_hat, denoised)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
        x_mid = x + d * (sigma_mid - sigma_hat)
        d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_batch(sigma_mid, x), **extra_args))
        x = x + d_mid * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """DPM2 ancestral: a DPM2 step down to sigma_down, then fresh noise of size sigma_up."""
    check_sigmas(sigmas)
    check_nonnegative(eta=eta, s_noise=s_noise)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x), **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_batch(sigma_mid, x), **extra_args))
            x = x + d_mid * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps in t = -log(sigma); `t` may be a scalar or one value per image."""

    def __init__(self, model, x_like, extra_args):
        self.model = model
        self.extra_args = extra_args
        self.shape = (-1,) + (1,) * (x_like.ndim - 1)

    def _b(self, v):
        """Broadcast a per-image vector over the image dimensions."""
        return v.reshape(self.shape) if v.ndim else v

    def eps(self, x, t):
        sigma = sigma_fn(t)
        sigma_in = sigma if sigma.ndim else sigma_batch(sigma, x)
        denoised = self.model(x, sigma_in, **self.extra_args)
        return (x - denoised) / self._b(sigma), denoised

    def step_1(self, x, t, t_next, eps):
        h = self._b(t_next - t)
        return x - self._b(sigma_fn(t_next)) * h.expm1() * eps

    def step_2(self, x, t, t_next, eps, r1=0.5):
        h = self._b(t_next - t)
        s1 = t + r1 * (t_next - t)
        u1 = x - self._b(sigma_fn(s1)) * (r1 * h).expm1() * eps
        eps_r1, _ = self.eps(u1, s1)
        sigma_next = self._b(sigma_fn(t_next))
        return x - sigma_next * h.expm1() * eps - sigma_next / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, eps, r1=1 / 3, r2=2 / 3):
        h = self._b(t_next - t)
        s1, s2 = t + r1 * (t_next - t), t + r2 * (t_next - t)
        u1 = x - self._b(sigma_fn(s1)) * (r1 * h).expm1() * eps
        eps_r1, _ = self.eps(u1, s1)
        sigma_s2 = self._b(sigma_fn(s2))
        u2 = (x - sigma_s2 * (r2 * h).expm1() * eps
              - sigma_s2 * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, _ = self.eps(u2, s2)
        sigma_next = self._b(sigma_fn(t_next))
        return x - sigma_next * h.expm1() * eps - sigma_next / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _fast_orders(nfe: int) -> list[int]:
    """Split a budget of model evaluations into DPM-Solver-3 steps ending with lower orders
    (Lu et al. 2022, sec. 3.4, "DPM-Solver-fast")."""
    if nfe < 3:
        return [1] * nfe
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _solver_range(sigmas):
    """DPM fast/adaptive integrate from sigmas[0] to the last non-zero sigma; their result keeps that noise."""
    check_sigmas(sigmas)
    return sigmas[0], sigmas[-2], len(sigmas) - 1


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                    eta=1.0, s_noise=1.0):
    """DPM-Solver-fast (Lu et al. 2022): as many third-order steps as fit in n = len(sigmas) - 1 model
    evaluations, evenly spaced in t = -log(sigma) from sigmas[0] to the last non-zero sigma.

    The result is x at that last sigma (as in k-diffusion / A1111), not a final denoise to 0. With eta > 0
    each step lands on sigma_down and adds noise (ancestral variant); eta defaults to 1 because A1111 passes
    its "eta (ancestral)" setting, 1 by default, to this sampler. eta=0 is the deterministic DPM-Solver-fast.
    """
    check_nonnegative(eta=eta, s_noise=s_noise)
    sigma_max, sigma_min, nfe = _solver_range(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    solver = _DPMSolver(model, x, extra_args or {})
    orders = _fast_orders(nfe)
    ts = torch.linspace(float(t_fn(sigma_max)), float(t_fn(sigma_min)), len(orders) + 1, dtype=torch.float64)
    ts = ts.to(sigmas.dtype)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_down = torch.minimum(ts[-1], t_fn(sigma_down)) if eta else t_next
        if eta:
            sigma_up = (sigma_fn(t_next) ** 2 - sigma_fn(t_down) ** 2).clamp(min=0) ** 0.5
        eps, denoised = solver.eps(x, t)
        report(callback, x, i, sigma_fn(t), sigma_fn(t), denoised)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_down, eps)
        if eta:
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * sigma_up
    return x


class _PIDController:
    """Per-image PID step-size controller (Söderlind 2003 via Lu et al. 2022's adaptive DPM-Solver).

    Each image has its own step size, so a batch takes exactly the steps each image would take alone.
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = None

    def propose_step(self, error: torch.Tensor) -> torch.Tensor:
        inv_error = 1 / (error + self.eps)
        if self.errs is None:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + torch.atan(factor - 1)  # soft limiter: keeps step-size changes within a factor ~2.5
        accept = factor >= self.accept_safety
        self.errs[2] = torch.where(accept, self.errs[1], self.errs[2])
        self.errs[1] = torch.where(accept, self.errs[0], self.errs[1])
        self.h = self.h * factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=1.0, s_noise=1.0, shared_steps=False):
    """Adaptive DPM-Solver-12 / 23 (Lu et al. 2022, sec. 3.3 and Appendix C): embedded lower/higher order
    pair, RMS error over each image scaled by max(atol, rtol * |x|), PID step-size control in t = -log(sigma).

    eta defaults to 1 as in A1111 (see `sample_dpm_fast`); eta=0 is the deterministic solver.
    Integrates from sigmas[0] to the last non-zero sigma of `sigmas` (the rest of `sigmas` is unused) and
    returns x there. The callback fires once per loop iteration in which some image accepted its step.
    Each image in a batch is controlled separately; every loop iteration draws one noise sample per image
    whether its step was accepted or not, so with per-image noise samplers a batch equals single runs.
    shared_steps=True instead controls the whole batch with one error norm (k-diffusion's behaviour).

    With eta > 0, per-image control makes the step sizes depend on the image's own noisy state, which biases
    the sampled distribution when an image has very few dimensions (measured on the 2-D test problem: about
    9% covariance error; with shared steps it is within sampling noise). For real latents of thousands of
    values the step choice depends far less on any one value, so the effect is expected to be much smaller.
    """
    if order not in (2, 3):
        raise ParamError("order", f"DPM adaptive supports order 2 or 3, got {order!r}")
    check_nonnegative(eta=eta, s_noise=s_noise, rtol=rtol, atol=atol, h_init=h_init)
    if h_init == 0 or (rtol == 0 and atol == 0):
        raise ParamError("h_init" if h_init == 0 else "rtol", "h_init and one of rtol/atol must be > 0")
    sigma_max, sigma_min, _ = _solver_range(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    solver = _DPMSolver(model, x, extra_args or {})
    batch = x.shape[0]
    t_end = t_fn(sigma_min).expand(batch).clone()
    s = t_fn(sigma_max).expand(batch).clone()
    pid = _PIDController(torch.full_like(s, abs(h_init)), pcoeff, icoeff, dcoeff,
                         1.5 if eta else order, accept_safety)
    x_prev = x
    accepted = 0
    while bool((s < t_end - 1e-5).any()):
        running = s < t_end - 1e-5
        t = torch.minimum(t_end, s + pid.h)
        t = torch.where(running, t, s + 1)  # finished images take a harmless dummy step that is discarded
        if eta:
            sigma_down, _ = get_ancestral_step(sigma_fn(s), sigma_fn(t), eta)
            t_down = torch.minimum(t_end, t_fn(sigma_down))
            sigma_up = (sigma_fn(t) ** 2 - sigma_fn(t_down) ** 2).clamp(min=0) ** 0.5
        else:
            t_down, sigma_up = t, torch.zeros_like(t)
        eps, denoised = solver.eps(x, s)
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_down, eps), solver.step_2(x, s, t_down, eps)
        else:
            x_low, x_high = solver.step_2(x, s, t_down, eps, r1=1 / 3), solver.step_3(x, s, t_down, eps)
        delta = torch.maximum(torch.as_tensor(atol, dtype=x.dtype), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = ((x_low - x_high) / delta).flatten(1).pow(2).mean(1)
        error = (error.mean().expand(batch) if shared_steps else error).sqrt()
        noise = noise_sampler(sigma_fn(s), sigma_fn(t))
        accept = pid.propose_step(error) & running
        take = solver._b(accept)
        x_prev = torch.where(take, x_low, x_prev)
        x_new = x_high + noise * s_noise * solver._b(sigma_up)
        x = torch.where(take, x_new, x)
        if bool(accept.any()):
            report(callback, x, accepted, sigma_fn(s.min()), sigma_fn(s.min()), denoised)
            accepted += 1
        s = torch.where(accept, t, s)
    return x


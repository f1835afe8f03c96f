"""An exact test problem: a Gaussian mixture in a few dimensions, whose ideal denoiser is closed-form.

For data x0 ~ sum_k w_k N(mu_k, S_k) and x = x0 + sigma * n, the noisy density is sum_k w_k N(mu_k, S_k + sigma^2 I)
and the optimal denoiser (Tweedie / posterior mean) is
    D(x, sigma) = sum_k r_k(x) [mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k)],
with r_k the posterior responsibilities. The probability-flow ODE dx/dsigma = (x - D) / sigma then has the
exact right-hand side sigma * sum_k r_k (S_k + sigma^2 I)^-1 (x - mu_k), solved here to ~1e-12 with scipy.
The samplers' test suite and the sampler report both use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp


class GaussianMixture:
    """A mixture of full-covariance Gaussians; all maths in float64."""

    def __init__(self, weights, means, covariances):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covariances = torch.as_tensor(np.asarray(covariances, dtype=np.float64))
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)
        self.dim = self.means.shape[1]

    def _posterior_terms(self, x: torch.Tensor, sigma):
        """Responsibilities r [B, K] and (S_k + sigma^2)^-1 (x - mu_k) as [B, K, d]."""
        x = x.to(torch.float64)
        var = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2  # [B or 1, 1, 1]
        lam = self.eigenvalues.unsqueeze(0) + var  # [B, K, d]
        diff = x.unsqueeze(1) - self.means.unsqueeze(0)  # [B, K, d]
        rotated = torch.einsum("kji,bkj->bki", self.eigenvectors, diff)  # U^T (x - mu)
        solved = torch.einsum("kij,bkj->bki", self.eigenvectors, rotated / lam)
        log_density = -0.5 * ((rotated**2 / lam).sum(-1) + lam.log().sum(-1) + self.dim * math.log(2 * math.pi))
        log_r = self.weights.log() + log_density
        return torch.softmax(log_r, dim=1), solved

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact posterior mean E[x0 | x, sigma], same dtype as x; sigma scalar or [B]."""
        r, solved = self._posterior_terms(x, sigma)
        var = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        # mu + S (S + s^2)^-1 (x - mu) = x - s^2 (S + s^2)^-1 (x - mu)
        x0 = x.to(torch.float64) - var * (r.unsqueeze(-1) * solved).sum(1)
        return x0.to(x.dtype)

    __call__ = denoise

    def velocity(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """dx/dsigma = (x - D(x, sigma)) / sigma without the 0/0 at sigma = 0."""
        r, solved = self._posterior_terms(x, sigma)
        return torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) * (r.unsqueeze(-1) * solved).sum(1)

    def solve_ode(self, x: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-12,
                  atol: float = 1e-12) -> torch.Tensor:
        """Probability-flow ODE solution from sigma_from to sigma_to (DOP853, tight tolerances)."""
        shape = x.shape

        def rhs(sigma, flat):
            return self.velocity(torch.from_numpy(flat).reshape(shape), sigma).reshape(-1).numpy()

        sol = solve_ivp(rhs, (sigma_from, sigma_to), x.to(torch.float64).reshape(-1).numpy(), method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.eigenvectors * self.eigenvalues.sqrt().unsqueeze(1)  # U diag(sqrt(lam))
        return self.means[labels] + torch.einsum("nij,nj->ni", scale[labels], z), labels

    def mean(self) -> torch.Tensor:
        return (self.weights.unsqueeze(1) * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        second = (self.weights.reshape(-1, 1, 1) * (self.covariances + torch.einsum("ki,kj->kij", self.means, self.means))).sum(0)
        m = self.mean()
        return second - torch.outer(m, m)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely component of each clean sample."""
        r, _ = self._posterior_terms(x, 0.0)
        return r.argmax(1)


def standard_mixture() -> GaussianMixture:
    """The 2-D, 3-component mixture used by tests and the report: unequal weights, anisotropic and rotated
    covariances, modes 8+ standard deviations apart (so labels are unambiguous)."""
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    cov0 = rotation @ np.diag([0.6**2, 0.3**2]) @ rotation.T
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.5, 0.0], [2.0, 2.0], [1.5, -2.5]],
        covariances=[cov0, [[0.3, 0.1], [0.1, 0.2]], [[0.15, 0.0], [0.0, 0.15]]],
    )

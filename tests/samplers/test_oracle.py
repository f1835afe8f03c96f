"""The exact problem itself must be right before it can judge samplers."""

import torch

from difusi.samplers.gmm import GaussianMixture

from .conftest import gaussian


def test_denoiser_is_tweedie_posterior_mean(mixture):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie's formula), with the gradient by autograd of the
    independently written mixture log-density."""
    x = (gaussian((32, 2), 1) * 3).requires_grad_(True)
    sigma = 0.8
    cov = mixture.covariances + sigma**2 * torch.eye(2, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mixture.means, covariance_matrix=cov)
    log_p = torch.logsumexp(dist.log_prob(x.unsqueeze(1)) + mixture.weights.log(), dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    expected = x.detach() + sigma**2 * grad
    assert torch.allclose(mixture.denoise(x.detach(), torch.full((32,), sigma, dtype=torch.float64)), expected, atol=1e-12)


def test_denoiser_matches_monte_carlo_posterior_mean(mixture):
    """E[x0 | x] estimated by importance-weighting exact data samples with the Gaussian likelihood."""
    x0, _ = mixture.sample(200_000, torch.Generator().manual_seed(0))
    query = torch.tensor([[0.0, 0.5], [-2.0, -0.3]], dtype=torch.float64)
    sigma = 1.5
    log_w = -((query.unsqueeze(1) - x0.unsqueeze(0)) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(log_w, dim=1)
    monte_carlo = w @ x0
    assert torch.allclose(mixture.denoise(query, sigma), monte_carlo, atol=0.02)


def test_exact_samples_have_the_closed_form_moments(mixture):
    x0, labels = mixture.sample(100_000, torch.Generator().manual_seed(1))
    assert torch.allclose(x0.mean(0), mixture.mean(), atol=0.03)
    assert torch.allclose(torch.cov(x0.T), mixture.covariance(), rtol=0.03, atol=0.03)
    assert (mixture.classify(x0) == labels).double().mean() > 0.9999  # modes are well separated


def test_reference_ode_solution_is_converged(mixture):
    """Tightening the tolerance 100x changes the reference by far less than any sampler error we measure."""
    x_T = gaussian((8, 2), 2) * 14.6
    tight = mixture.solve_ode(x_T, 14.6, 0.03)
    looser = mixture.solve_ode(x_T, 14.6, 0.03, rtol=1e-10, atol=1e-10)
    assert (tight - looser).abs().max() < 1e-8


def test_single_gaussian_flow_is_linear_in_closed_form():
    """For one Gaussian N(0, s^2 I), the probability flow is x(sigma) = x_T sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))."""
    g = GaussianMixture([1.0], [[0.0, 0.0]], [[[0.25, 0.0], [0.0, 0.25]]])
    x_T = gaussian((4, 2), 3) * 10
    exact = x_T * ((0.25 + 0.05**2) / (0.25 + 10**2)) ** 0.5
    assert torch.allclose(g.solve_ode(x_T, 10.0, 0.05), exact, atol=1e-9)

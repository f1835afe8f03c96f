"""Shared fixtures for the sampler tests: the exact Gaussian-mixture problem and SD's noise table."""

import pytest
import torch

import difusi  # noqa: F401  (sets the offline environment before diffusers is imported)
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.samplers.gmm import standard_mixture

SIGMA_MIN = 0.0292  # SD's smallest training sigma (rounded)
SIGMA_MAX = 14.6146  # SD's largest training sigma (rounded)


@pytest.fixture(scope="session")
def mixture():
    return standard_mixture()


@pytest.fixture(scope="session")
def table():
    return DiscreteNoiseTable()


def gaussian(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)

"""Fixtures for the hardening tests: the bad files, and one real server on loopback over them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hardening_harness import Files, build_files, serve


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these tests share 2 busy cores (see tests/server/conftest.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> Files:
    return build_files(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="session")
def matrix_server(bad_files) -> Iterator[str]:
    with serve(bad_files) as url:
        yield url


@pytest.fixture()
def http(matrix_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=matrix_server, timeout=120) as client:
        yield client

"""Fixtures for the hardening tests: the bad files, and one real server on loopback over them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hardening_harness import Files, build_files, serve


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_torch_thread) -> None:
    """These tests share 2 busy cores with a live server (see the root conftest)."""


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

"""Fixtures shared by several test folders."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for the test, restored afterwards.

    Server tests share 2 CPU cores with a running server and other work; one thread avoids OpenMP spin
    contention (measured: a tiny-model step went from ~1 s to ~0.2 s under load). Folders opt in with an
    autouse fixture that requests this one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

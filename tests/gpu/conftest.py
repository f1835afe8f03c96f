"""GPU tier: runs only where `torch.cuda.is_available()` (tools/gpu-check.sh on a lent GPU machine).

Without CUDA every test here is skipped, so the default CPU suite pays nothing for this folder. The dry run of
tools/gpu-check.sh (`DIFUSI_GPU_CHECK_DRY=1`) runs the tests on the CPU instead, comparing the CPU with itself,
so a GPU session never discovers a typo; tests marked `cuda_only` (they mean nothing without a GPU) stay skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_helpers import CUDA, DRY

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before any Hugging Face import)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda_only: needs a real CUDA device even in the gpu-check dry run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    cuda = torch.cuda.is_available()
    no_cuda = pytest.mark.skip(reason="no CUDA device: tests/gpu runs on a GPU machine (bash tools/gpu-check.sh)")
    dry = pytest.mark.skip(reason="needs a real CUDA device (gpu-check dry run)")
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue  # only this folder's tests; a run of the whole suite collects others too
        if DRY and not cuda:
            if item.get_closest_marker("cuda_only") and CUDA == "cuda":
                item.add_marker(dry)
        elif not cuda:
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the models every GPU test uses: tiny random SD1 and SDXL checkpoints, and difusi-mini."""
    from difusi.models import default_model_path
    from difusi.models.synthetic import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("gpu-checkpoints")
    paths = {"mini": default_model_path()}
    for family in ("sd1", "sdxl"):
        paths[f"tiny-{family}"] = folder / f"tiny-{family}.safetensors"
        write_tiny_checkpoint(paths[f"tiny-{family}"], family, "safetensors")
    return paths

"""Fixtures: spandrel's architecture classes as the reference, and a models folder with random-weight upscalers."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from builders import rrdbnet_basicsr, srvgg_compact, to_old_esrgan, write_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny networks: one thread is as fast and does not fight the other tests for the 2 cores."""


@pytest.fixture(scope="session")
def spandrel_arches() -> types.SimpleNamespace:
    """spandrel 0.4.2's ESRGAN and Compact architectures, imported without running `spandrel/__init__.py`
    (it imports every architecture, LaMa's pulls torchvision, which fails against this CPU torch)."""
    spec = importlib.util.find_spec("spandrel")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("spandrel is not installed (pip install spandrel==0.4.2 --no-deps): no reference to compare with")
    if "spandrel" not in sys.modules:
        package = types.ModuleType("spandrel")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["spandrel"] = package
    from spandrel.architectures.Compact import CompactArch
    from spandrel.architectures.ESRGAN import ESRGANArch

    return types.SimpleNamespace(esrgan=ESRGANArch(), compact=CompactArch())


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """A models folder: ESRGAN/ with old-layout and compact files, RealESRGAN/ with BasicSR-layout x4 / x2 files
    (one wrapped in params_ema), and a LoRA misfiled in ESRGAN/."""
    root = tmp_path_factory.mktemp("models")
    write_model(root / "ESRGAN" / "4x_old.pth", to_old_esrgan(rrdbnet_basicsr(seed=1, num_blocks=1)))
    write_model(root / "ESRGAN" / "compact-x4.safetensors", srvgg_compact(seed=2))
    write_model(root / "RealESRGAN" / "RealESRGAN_x4plus.pth", rrdbnet_basicsr(seed=3, num_blocks=1), wrap="params_ema")
    write_model(root / "RealESRGAN" / "RealESRGAN_x2plus.safetensors", rrdbnet_basicsr(seed=4, num_blocks=1, scale=2))
    lora = {"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 2), "lora_unet_down_blocks_0.lora_down.weight":
            torch.zeros(2, 4)}
    write_model(root / "ESRGAN" / "not-an-upscaler.safetensors", lora)
    return root

"""`difusi.devices`: device names checked against this machine, precision per device, offload modes (issue 17 item 1,
issue 19 item 1). CUDA and MPS presence is simulated by patching the two probes, so the rules run on any machine."""

from __future__ import annotations

import pytest
import torch

from difusi import devices
from difusi.devices import OFFLOAD_MODES, Precision, available_devices, check_offload, resolve_device, resolve_precision
from difusi.errors import ParamError


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture()
def two_cuda(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert available_devices() == ["cpu"]
    assert resolve_device("auto") == resolve_device(None) == resolve_device() == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch, two_cuda):
    assert available_devices() == ["cuda:0", "cuda:1", "cpu"]
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert available_devices() == ["mps", "cpu"]
    assert resolve_device("auto") == torch.device("mps")


def test_explicit_devices(two_cuda):
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(("name", "why"), [
    ("cuda", "torch built without CUDA"),
    ("cuda:0", "torch built without CUDA"),
    ("mps", "no Apple MPS backend"),
])
def test_absent_device_is_one_line_naming_what_the_machine_has(no_gpu, monkeypatch, name, why):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ParamError) as info:
        resolve_device(name)
    assert info.value.field == "device"
    assert str(info.value) == f"device: {name!r} is not available here ({why}); this machine has: cpu"
    assert "\n" not in str(info.value)


def test_cuda_index_beyond_the_machine(two_cuda):
    with pytest.raises(ParamError, match=r"'cuda:2' is not available here \(2 CUDA devices\); "
                                         r"this machine has: cuda:0, cuda:1, cpu"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["banana", "meta", "xla", "cuda:x", "cpu:1", "", "gpu"])
def test_unknown_device_names_are_refused(no_gpu, name):
    with pytest.raises(ParamError) as info:
        resolve_device(name)
    assert info.value.field == "device"
    assert info.value.message == (f"unknown device {name!r}; use one of auto, cpu, cuda, cuda:N, mps "
                                  "(this machine has: cpu)")


def test_this_machine_really_has_no_cuda_here():
    """Not simulated: on a CPU-only build the real probe must say so (skipped where a GPU exists)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ParamError, match="this machine has: cpu"):
        resolve_device("cuda")


def test_precision_auto_follows_the_device():
    assert resolve_precision("auto", "cpu") == Precision.uniform(torch.float32)
    assert resolve_precision("auto", "cuda") == Precision(torch.float16, torch.float16, torch.float16)
    assert resolve_precision("auto", torch.device("mps")) == Precision.uniform(torch.float16)
    assert resolve_precision() == Precision.uniform(torch.float32)


@pytest.mark.parametrize(("text", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16),
                                             ("bf16", torch.bfloat16), (" BF16 ", torch.bfloat16)])
def test_explicit_precision_sets_every_network(text, dtype):
    for device in ("cpu", "cuda"):
        precision = resolve_precision(text, device)
        assert (precision.unet, precision.text_encoder, precision.vae) == (dtype, dtype, dtype)
        assert precision.name == text.strip().lower()


@pytest.mark.parametrize("bad", ["half", "fp8", "", None, 16])
def test_bad_precision_is_a_param_error(bad):
    with pytest.raises(ParamError) as info:
        resolve_precision(bad)
    assert info.value.field == "precision" and "auto, fp32, fp16, bf16" in info.value.message


def test_precision_is_frozen_and_names_mixed_dtypes():
    mixed = Precision(torch.float16, torch.float16, torch.float32)
    assert mixed.name == "unet=fp16,text_encoder=fp16,vae=fp32"
    with pytest.raises(AttributeError):
        mixed.unet = torch.float32  # type: ignore[misc]


def test_offload_modes():
    assert OFFLOAD_MODES == ("none", "model", "sequential")
    assert [check_offload(mode) for mode in OFFLOAD_MODES] == list(OFFLOAD_MODES)
    with pytest.raises(ParamError, match="offload: must be one of none, model, sequential, got 'medvram'"):
        check_offload("medvram")


def test_building_the_cli_parser_does_not_import_torch():
    """The device flags' choices come from difusi.devices; a bad flag or `difusi info` must not pay torch's import."""
    import subprocess
    import sys

    code = "import sys, difusi.cli; difusi.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

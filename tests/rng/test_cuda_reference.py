"""NV noise against torch.randn recorded on a real CUDA GPU (tests/rng/cuda_randn_reference.json).

The file is made on a GPU machine by `python tools/record_cuda_randn.py`; until then the CUDA comparison
is skipped and only the seed-0 3x4 known answer (tests/rng/test_philox.py) ties NV to real CUDA. Still to
be verified there: seeds 0, 1, 12345, 4294967294 and 2^40 + 3; shapes (3, 4), (12,), (1, 4, 8, 8),
(1, 4, 64, 64), (4, 96, 96) and (1, 4, 128, 128); offsets 0..2 on a seeded generator, and offset 0 from
`torch.manual_seed` (A1111's path for subseed noise).

NV follows A1111's float64 Box-Muller while cuRAND computes in float32, so values agree to a few float32
ulps, not bit for bit: the tolerance below is 1e-6 absolute plus 1e-5 relative.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from difusi.philox import cuda_randn
from difusi.rng import randn

REFERENCE = Path(__file__).with_name("cuda_randn_reference.json")
TOOL = Path(__file__).parents[2] / "tools" / "record_cuda_randn.py"


def mismatches(reference: dict, draw, rtol: float, atol: float) -> list[str]:
    """Cases whose recorded values `draw(seed, shape, offset) -> flat float array` does not reproduce."""
    bad = []
    for case in reference["cases"]:
        got = np.asarray(draw(case["seed"], tuple(case["shape"]), case["offset"]), dtype=np.float64)
        expected = np.asarray(case["values"], dtype=np.float64)
        error = np.abs(got[case["indices"]] - expected)
        if not (error <= atol + rtol * np.abs(expected)).all():
            bad.append(f"seed {case['seed']} shape {case['shape']} offset {case['offset']} ({case['generator']}): "
                       f"max error {error.max():.3g}")
    return bad


def nv_flat(seed, shape, offset):
    return cuda_randn(seed, shape, offset).ravel()


@pytest.mark.skipif(not REFERENCE.exists(), reason="no CUDA recording yet: run tools/record_cuda_randn.py on a GPU")
def test_nv_matches_recorded_cuda_randn():
    reference = json.loads(REFERENCE.read_text())
    assert reference["cases"]
    assert mismatches(reference, nv_flat, rtol=1e-5, atol=1e-6) == []


@pytest.mark.skipif(not REFERENCE.exists() or not torch.cuda.is_available(), reason="needs the recording and CUDA")
def test_gpu_source_matches_recorded_cuda_randn():
    reference = json.loads(REFERENCE.read_text())

    def gpu_flat(seed, shape, offset):
        return randn(shape, seed, source="GPU", offset=offset, device="cuda").flatten().cpu().numpy()

    assert mismatches(reference, gpu_flat, rtol=0, atol=0) == []


def load_tool():
    spec = importlib.util.spec_from_file_location("record_cuda_randn", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recording_format_round_trips_on_the_cpu(tmp_path):
    """The recorder, run on the CPU generator, writes a file this test's reader reproduces exactly with the
    CPU source, and NV does not reproduce it (so the comparison can fail)."""
    tool = load_tool()
    path = tmp_path / "reference.json"
    with torch.random.fork_rng(devices=[]):  # the recorder seeds torch's global generator
        tool.write(tool.record("cpu"), path)
    reference = json.loads(path.read_text())
    assert {case["generator"] for case in reference["cases"]} == {"local", "global"}

    def cpu_flat(seed, shape, offset):
        return randn(shape, seed, source="CPU", offset=offset).flatten().numpy()

    assert mismatches(reference, cpu_flat, rtol=0, atol=0) == []
    assert len(mismatches(reference, nv_flat, rtol=1e-5, atol=1e-6)) == len(reference["cases"])

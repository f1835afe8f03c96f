"""Opt-in lower precision of the compiled UNet graph (issue 18 item 6): `unet_precision` fp32 | bf16 | int8.

- "fp32" (default): the exact graph, `INFERENCE_PRECISION_HINT=f32` (`difusi.speed.graph.backends`).
- "bf16": the same cached f32 OpenVINO IR compiled with `INFERENCE_PRECISION_HINT=bf16` (OpenVINO then runs
  matmuls/convolutions in bfloat16 on AMX / AVX512-BF16, accumulating in f32). It needs a CPU whose OpenVINO plugin
  reports "BF16" in `OPTIMIZATION_CAPABILITIES` (AVX512_BF16 or AMX): elsewhere OpenVINO would emulate or ignore it,
  so difusi refuses it there with a warning and runs the exact fp32 path instead.
- "int8": NNCF `compress_weights` (mode INT8_ASYM, per output channel: weight-only, activations stay f32) of the
  cached f32 IR, written as its own cache entry (`cache.entry_for(..., precision="int8")`, made once from the f32
  entry, in a fresh process for large UNets), compiled with the f32 hint. Needs the `nncf` package.

bf16 shares the f32 entry on disk (the precision is a compile option, the IR is the same file; a second 3.4 GB copy
of SD 1.5 would only evict other entries); the compiled graph in memory is keyed by (backend, precision), so a bf16
graph is never handed to an fp32 job or the other way round. Only OpenVINO implements them: with backend torch /
onnx, a missing package, or any reason the graph path cannot run the job, the job runs exact fp32 and a warning says
the precision was not applied (`UNetChoice.precision` says what ran; the infotext must follow it).

Measured: bench/results/graph-precision.md.

    python -m difusi.speed.graph.precision SRC_XML OUT_DIR     (int8 compression in a fresh process)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from difusi.errors import ParamError

PRECISIONS = ("fp32", "bf16", "int8")
EXACT = "fp32"
INFOTEXT_KEY = "UNet precision"
STATS = {"compressions": 0}
"""int8 entries made (tests, benches)."""
OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
"""OpenVINO `INFERENCE_PRECISION_HINT` per precision (int8 is weight-only: the compute stays f32)."""


def check_precision(name: Any) -> None:
    """Raise ParamError("unet_precision", ...) unless `name` is one of PRECISIONS."""
    if name not in PRECISIONS:
        raise ParamError("unet_precision", f"must be one of {', '.join(PRECISIONS)}, got {name!r}")


def nncf_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nncf") is not None
    except (ImportError, ValueError):
        return False


def nncf_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nncf")
    except metadata.PackageNotFoundError:
        return "missing"


_BF16: dict[str, bool] = {}


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 here (AVX512_BF16 / AMX): "BF16" in its capabilities."""
    if "cpu" not in _BF16:
        try:
            import openvino as ov

            _BF16["cpu"] = "BF16" in list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # noqa: BLE001  (no openvino: no bf16 graph)
            _BF16["cpu"] = False
    return _BF16["cpu"]


def unavailable(precision: str) -> str | None:
    """Why `precision` cannot run on this machine's OpenVINO (None when it can, or for fp32)."""
    if precision == "bf16" and not bf16_supported():
        return ("this CPU has no native bf16 (OpenVINO reports no BF16 capability: needs AVX512_BF16 or AMX), "
                "where bf16 would be emulated and slower")
    if precision == "int8" and not nncf_installed():
        return "int8 weight compression needs the Python package 'nncf' (pip install nncf)"
    return None


def compress_int8(source_xml: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir/unet.xml` + `unet.bin`: the f32 IR with int8 (asymmetric, per-channel) weights, plus an empty
    `weights.json` (the compressed weights are no longer plain f32 Constants: a LoRA cannot be spliced in)."""
    import nncf
    import openvino as ov

    from difusi.speed.graph.convert import OV_GRAPH_FILE, WEIGHTS_FILE

    started = time.perf_counter()
    print("difusi: compressing the UNet graph's weights to int8 (NNCF)", file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(str(source_xml))
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(compressed, str(out_dir / OV_GRAPH_FILE), compress_to_fp16=False)
    del model, compressed
    (out_dir / WEIGHTS_FILE).write_text("{}")
    return {"compress_seconds": time.perf_counter() - started, "nncf": nncf_version(), "compression": "INT8_ASYM"}


def compress_in_child(source_xml: Path, out_dir: Path) -> dict[str, Any]:
    """Run `compress_int8` in a fresh Python process."""
    from difusi.speed.graph.convert import run_in_child

    return run_in_child("difusi.speed.graph.precision", [str(source_xml), str(out_dir)],
                        "int8 compression of the UNet graph")


if __name__ == "__main__":
    import difusi  # noqa: F401  (offline env and thread settings, as every difusi entry point)

    print(json.dumps(compress_int8(Path(sys.argv[1]), Path(sys.argv[2]))))

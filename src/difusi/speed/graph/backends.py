"""The two graph runtimes behind one small interface: build a compiled UNet graph from a cached ONNX file, with
chosen weights, and run it.

Each runs a graph exported once from the torch UNet (`difusi.speed.graph.convert`): ONNX Runtime an ONNX file,
OpenVINO an IR converted by its own PyTorch frontend (fused attention, faster to compile):

- ONNX Runtime (`onnx`): an `InferenceSession` on the CPU execution provider, all graph optimizations. Weights
  that differ from the file (a LoRA merge) replace the file's: `SessionOptions.add_initializer(name, OrtValue)` makes
  ORT "use this initializer instance instead of deserializing one from the model file" (ORT C API docs,
  `OrtApi::AddInitializer`)... except for initializers stored in an external data file, as ours are: those are
  replaced with `add_external_initializers` (copied before the graph optimizations run).
- OpenVINO (`openvino`): `Core.read_model(unet.xml)` then `compile_model(..., "CPU")`. Replaced weights are new
  `Constant`s (sharing the torch tensor's memory) spliced in place of the Constant that `weights.json` names for
  that parameter (written at conversion). OpenVINO's
  compiled-blob cache (`CACHE_DIR`) is not used: measured on SD 1.5, importing the blob took as long as compiling the
  read graph (5.1 s vs 4.4-6.0 s), while writing it made the first compile 21.6 s and doubled the entry's disk size.

`INFERENCE_PRECISION_HINT` is forced to f32 (unless the job opted into `unet_precision` bf16,
`difusi.speed.graph.precision`): on CPUs with AVX-512 BF16 / AMX (this session's Xeon) OpenVINO's
default is bf16, which moved the tiny UNet's output by 3e-2 instead of 2e-6 (measured: `docs/bench/graph-backend.md`).
Thread counts follow torch's (`torch.get_num_threads()`), so both runtimes use the cores the torch path would.

`import_backend` is the one place the runtime packages are imported (tests make it fail to simulate a machine
without them).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GRAPH_BACKENDS = ("openvino", "onnx")
PACKAGES = {"openvino": "openvino", "onnx": "onnxruntime"}
"""The Python package each backend needs (`pip install difusi[graph]` installs both)."""


class BackendMissing(ImportError):
    """The backend's package is not installed (or does not import)."""


def import_backend(name: str) -> Any:
    """The backend's runtime module (`openvino` / `onnxruntime`); BackendMissing with the pip line when absent."""
    package = PACKAGES[name]
    try:
        return importlib.import_module(package)
    except Exception as error:  # noqa: BLE001  (a broken install counts as missing: the torch path still runs)
        raise BackendMissing(f"backend {name!r} needs the Python package {package!r} "
                             f"(pip install 'difusi[graph]'): {type(error).__name__}: {error}") from None


def installed(name: str) -> bool:
    """Whether the backend's package is installed, without importing it (importing openvino costs ~0.5 s, which
    `auto` must not add to every small job that stays on torch)."""
    import importlib.util

    try:
        return importlib.util.find_spec(PACKAGES[name]) is not None
    except (ImportError, ValueError):
        return False


def backend_version(name: str) -> str:
    """The installed package's version (from its metadata: no import), part of the cache key."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGES[name])
    except metadata.PackageNotFoundError:
        return str(import_backend(name).__version__)


def _threads() -> int:
    return max(1, torch.get_num_threads())


class Runner:
    """One compiled graph: `run(feeds) -> np.ndarray`, plus how long building it took."""

    build_seconds: float = 0.0

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class OrtRunner(Runner):
    def __init__(self, onnx_path: Path, overrides: dict[str, torch.Tensor]):
        ort = import_backend("onnx")
        started = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's pool threads spin after each run by default; between UNet calls the torch parts of a step (sampler,
        # CFG) and the VAE decode run on the same cores, and spinning threads slowed them (bench: whole images).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if overrides:
            # The graph's weights live in an external data file, and `add_initializer` is not applied to external
            # initializers (measured: a LoRA's override was silently ignored); `add_external_initializers`
            # replaces them "before any of the optimizations take place" and copies the data (ORT C API docs,
            # `OrtApi::AddExternalInitializers`), so the arrays need not outlive the session.
            arrays = [tensor.detach().contiguous().numpy() for tensor in overrides.values()]
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
            options.add_external_initializers(list(overrides), values)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.build_seconds = time.perf_counter() - started

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]


class OpenVinoRunner(Runner):
    def __init__(self, graph_path: Path, overrides: dict[str, torch.Tensor], hint: str = "f32"):
        ov = import_backend("openvino")
        started = time.perf_counter()
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": _threads()}
        model = core.read_model(str(graph_path))
        if overrides:
            mapping = json.loads((graph_path.parent / "weights.json").read_text())
            unmapped = [name for name in overrides if name not in mapping]
            if unmapped:
                raise KeyError(f"{len(unmapped)} changed weights have no single Constant in the OpenVINO graph "
                               f"(e.g. {unmapped[0]})")
            replace_constants(ov, model, {mapping[name]: tensor for name, tensor in overrides.items()})
        self.compiled = core.compile_model(model, "CPU", config)
        del model
        self.input_names = {i.get_any_name() for i in self.compiled.inputs}
        self.request = self.compiled.create_infer_request()
        self.build_seconds = time.perf_counter() - started

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = self.request.infer({k: v for k, v in feeds.items() if k in self.input_names})
        return np.array(result[self.compiled.output(0)], copy=True)


def replace_constants(ov: Any, model: Any, overrides: dict[str, torch.Tensor]) -> None:
    """Splice a new Constant (sharing `tensor`'s memory) in place of each named initializer Constant."""
    if not overrides:
        return
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    missing = [name for name in overrides if name not in constants]
    if missing:
        raise KeyError(f"{len(missing)} weights are not constants of the graph (e.g. {missing[0]})")
    for name, tensor in overrides.items():
        old = constants[name]
        array = tensor.detach().contiguous().numpy()
        shape = list(old.get_output_shape(0))
        if shape != list(array.shape):
            if int(np.prod(shape)) != array.size:
                raise KeyError(f"weight {name}: graph shape {shape}, torch {list(array.shape)}")
            array = array.reshape(shape)  # a bias the frontend stored as [1, C, 1, 1]
        new = ov.op.Constant(array, shared_memory=True)
        new.set_friendly_name(name)
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))


def build_runner(name: str, graph_path: Path, overrides: dict[str, torch.Tensor], precision: str = "fp32") -> Runner:
    """The compiled graph of `graph_path` on backend `name`, with `overrides` (initializer name -> tensor) replacing
    the file's weights of those names; `precision` (`difusi.speed.graph.precision`, OpenVINO only) sets the
    inference precision hint: f32 for fp32 and int8 (weight-only), bf16 for bf16."""
    if name == "onnx":
        if precision != "fp32":
            raise ValueError(f"unet_precision {precision} needs the openvino backend")
        return OrtRunner(graph_path, overrides)
    from difusi.speed.graph.precision import OV_HINT

    return OpenVinoRunner(graph_path, overrides, OV_HINT[precision])

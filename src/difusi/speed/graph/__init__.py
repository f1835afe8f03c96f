"""Compiled-graph UNet backends for the CPU (issue 18): which backend runs a job's UNet calls.

`unet_for(model, params)` returns a `UNetChoice` whose `unet` the pipeline's denoiser calls in place of `model.unet`,
with the same signature (`(x, t, encoder_hidden_states=..., added_cond_kwargs=...) -> object with .sample`), and the
warnings the job's result carries (e.g. a fallback to the torch path).

Backends (`params.backend`, CLI `--backend`): "torch" (difusi's exact eager path), "onnx" (ONNX Runtime, CPU
execution provider, an ONNX export of the UNet) and "openvino" (OpenVINO CPU plugin, f32, an IR converted by its
PyTorch frontend), each made once per checkpoint file and cached on disk (`difusi.speed.graph.convert`,
`difusi.speed.graph.cache`); "auto".
Measured side by side on the same random SD 1.5-architecture weights (docs/bench/graph-backend.md,
bench/results/graph/cpu-speed.md; 2-core Xeon, AVX-512/AMX, one interleaved run): a CFG call at 256 px 1.53x
(OpenVINO) / 1.45x (ORT) diffusers eager against the torch path's 1.37x, at 512 px 1.15x / 1.04x against 1.12x;
deviation ~1e-7 on outputs of magnitude 0.05 (float32 summation order only); first conversion 27-35 s in a fresh
process; cached load 1.9-4.2 s (OpenVINO) / 10.5-11.8 s (ORT); a LoRA switch 1.4 s / 8.1-8.9 s.
Both take new weights without a re-export (see `unet.GraphUNet.sync`).

Where a graph backend cannot run the job, the torch path does, and `UNetChoice.warnings` says why when a graph
backend was asked for by name: its package is missing (one line naming the pip extra); DeepCache or ToMe is on (they
patch the torch UNet's blocks, which a graph does not have); the model is not a float32 CPU model (GPU, fp16/bf16,
offload, `--compile`); conversion or loading failed. NGMS needs nothing (it only skips calls), interrupts need
nothing (calls are per step), NaN checks run on the returned latents as before.

`auto` rule: a graph backend (one that already has a graph of this checkpoint in memory or in the disk cache, else
the first installed of `AUTO_ORDER`) runs the job when that graph exists, or when the job is large enough to pay for
a first conversion: estimated seconds saved (`SAVED_S_PER_MPIX_CALL` x UNet parameters / 860 M x million latent
pixels x UNet batch rows x calls) >= estimated conversion + load (`CONVERT_FIXED_S` + `CONVERT_S_PER_GPARAM` x
billion parameters). Constants from the bench run (bench/results/graph/cpu-speed.md): SD 1.5 conversion 27-35 s
wall + 2-4 s load; since the torch path reorders its convolution weights once (`difusi.speed.packed_conv`), an
OpenVINO call saves only 0.16 s at 256 px (2 x 32 x 32 rows: 78 s per million) and 0.14 s at 512 px (2 x 64 x 64:
17 s per million); 17 is used. So on this machine an SD 1.5 job converts from about fourteen 512 px 20-step CFG images
(one saves ~2.8 s against the ~38 s conversion); small UNets (difusi-mini, test checkpoints) stay on torch unless a
graph is already cached. Otherwise torch.

Lower precision (`params.unet_precision`, issue 18 item 6, `difusi.speed.graph.precision`): "bf16" or "int8" is an
opt-in shortcut that only OpenVINO implements. With backend `auto` or `openvino` the job's UNet runs on OpenVINO at
that precision (for `auto` without the amortisation rule: asking for it is asking for the graph); with `torch` or
`onnx`, OpenVINO missing, a CPU without native bf16, nncf missing for int8, or any reason above that the graph cannot
run the job, the job runs at exact fp32 and a warning says the precision was not applied. `UNetChoice.precision` is
the precision that ran: the infotext's "UNet precision" key must follow it, not the request.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from difusi.errors import ParamError

BACKENDS = ("auto", "torch", "openvino", "onnx")
AUTO_ORDER = ("openvino", "onnx")
"""Preference of `auto` when both are installed: the faster on the measured CPU (docs/bench/graph-backend.md)."""

# The amortisation rule's constants (module docstring; docs/bench/graph-backend.md), scaled by the UNet's size.
SD15_PARAMS = 860e6
SAVED_S_PER_MPIX_CALL = 17.0
CONVERT_FIXED_S = 6.0
CONVERT_S_PER_GPARAM = 37.0
INLINE_MAX_PARAMS = 50_000_000
"""UNets up to this size convert in the running process (a second copy is a few MB); larger ones in a fresh one."""
CONVERT_ENV = "DIFUSI_GRAPH_CONVERT"
""""process" or "inline" forces where conversion runs (tests, benches)."""

STATS = {"conversions": 0, "loads": 0, "rebuilt_corrupt": 0}
"""Counters for tests and benches: graphs exported, compiled graphs built from the cache, corrupt entries rebuilt
(int8 compressions: `difusi.speed.graph.precision.STATS`)."""

_DERIVED_KEY = "graph_unet"
"""Where the compiled graph lives: `LoadedModel.derived` (objects made from the weights, dropped with the model)."""


def _graph_of(model: Any) -> Any:
    return (getattr(model, "derived", None) or {}).get(_DERIVED_KEY)


def _set_graph(model: Any, graph: Any) -> None:
    vars(model).setdefault("derived", {})[_DERIVED_KEY] = graph


@dataclass
class UNetChoice:
    unet: Any
    """Called like `model.unet`."""
    backend: str
    """The backend that runs: "torch", "openvino" or "onnx"."""
    warnings: list[str] = field(default_factory=list)
    precision: str = "fp32"
    """The UNet precision that runs (`difusi.speed.graph.precision`): "fp32" unless a bf16 / int8 graph does."""


def check_backend(name: str) -> None:
    """Raise ParamError("backend", ...) unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ParamError("backend", f"must be one of {', '.join(BACKENDS)}, got {name!r}")


def available_backends() -> list[str]:
    """The graph backends whose package imports here."""
    from difusi.speed.graph.backends import GRAPH_BACKENDS, installed

    return [name for name in GRAPH_BACKENDS if installed(name)]


def unet_for(model: Any, params: Any) -> UNetChoice:
    """The UNet for this job (see the module docstring for the rule); never raises for a backend problem."""
    requested = getattr(params, "backend", "auto") or "auto"
    precision = getattr(params, "unet_precision", "fp32") or "fp32"
    if precision != "fp32":
        return _lower_precision(model, params, requested, precision)
    return _choose(model, params, requested)


def _not_applied(precision: str) -> str:
    return f"unet_precision {precision} was not applied: the UNet runs in exact fp32"


def _lower_precision(model: Any, params: Any, requested: str, precision: str) -> UNetChoice:
    """The job asked for a bf16 / int8 UNet graph (module docstring): OpenVINO at that precision, or the fp32 choice
    with a warning saying why the precision was not applied."""
    from difusi.speed.graph.precision import unavailable

    def fp32(reason: str) -> UNetChoice:
        choice = _choose(model, params, requested)
        choice.warnings.insert(0, f"{reason}; {_not_applied(precision)}")
        return choice

    if requested not in ("auto", "openvino"):
        return fp32(f"unet_precision {precision} needs the openvino backend, the job asked for backend {requested}")
    from difusi.speed.graph.backends import BackendMissing, import_backend

    try:
        import_backend("openvino")
    except BackendMissing as error:
        return _torch(model, f"unet_precision {precision}: {error}; {_not_applied(precision)} on torch")
    reason = unavailable(precision)
    if reason is not None:
        return fp32(f"unet_precision {precision}: {reason}")
    problem = _unsupported(model, params)
    if problem is not None:
        return _torch(model, f"unet_precision {precision} (backend openvino): {problem}; "
                             f"{_not_applied(precision)} on torch")
    try:
        graph = graph_unet(model, "openvino", precision)
    except Exception as error:  # noqa: BLE001  (a graph that cannot be made never costs the image)
        return _torch(model, f"unet_precision {precision} (backend openvino): the UNet graph could not be used "
                             f"({_error_line(error)}); {_not_applied(precision)} on torch")
    return UNetChoice(graph, "openvino", [], precision)


def _choose(model: Any, params: Any, requested: str) -> UNetChoice:
    """The fp32 choice (module docstring)."""
    if requested == "torch":
        return UNetChoice(model.unet, "torch")
    explicit = requested != "auto"
    if explicit:
        from difusi.speed.graph.backends import BackendMissing, import_backend

        try:
            import_backend(requested)
        except BackendMissing as error:
            return _torch(model, f"{error}; the UNet runs on torch")
        name = requested
    else:
        installed = available_backends()
        if not installed:
            return UNetChoice(model.unet, "torch")
        ordered = [b for b in AUTO_ORDER if b in installed] + [b for b in installed if b not in AUTO_ORDER]
        name = next((b for b in ordered if _has_graph(model, b)), ordered[0])
    problem = _unsupported(model, params)
    if problem is not None:
        if explicit or _worth_it(model, params, name):
            return _torch(model, f"backend {name}: {problem}; the UNet runs on torch")
        return UNetChoice(model.unet, "torch")
    if not explicit:
        if not _worth_it(model, params, name):
            return UNetChoice(model.unet, "torch")
        from difusi.speed.graph.backends import BackendMissing, import_backend

        try:
            import_backend(name)
        except BackendMissing:
            return UNetChoice(model.unet, "torch")  # installed but broken: auto stays quiet, an explicit name warns
    try:
        graph = graph_unet(model, name)
    except Exception as error:  # noqa: BLE001  (a graph that cannot be made never costs the image)
        return _torch(model, f"backend {name}: the UNet graph could not be used ({_error_line(error)}); "
                             "the UNet runs on torch")
    return UNetChoice(graph, name)


def release(model: Any) -> None:
    """Drop the model's compiled graph (its runtime memory, several GB for SD 1.5) now; `free_model` drops every
    derived object with the model."""
    if model is not None and _graph_of(model) is not None:
        _set_graph(model, None)


def _error_line(error: Exception) -> str:
    """`Type: first line of the message` (at most 300 characters of it), for a one-line warning."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return f"{type(error).__name__}: {first}"


def _torch(model: Any, warning: str) -> UNetChoice:
    return UNetChoice(model.unet, "torch", [warning])


def _unsupported(model: Any, params: Any) -> str | None:
    """Why this job's UNet calls cannot go through a CPU float32 graph, or None."""
    if (getattr(params, "deepcache_interval", 1) or 1) > 1 or (getattr(params, "token_merging_ratio", 0) or 0) > 0:
        return "DeepCache and ToMe patch the torch UNet's blocks, which a compiled graph does not have"
    try:
        parameter = next(model.unet.parameters())
    except (AttributeError, StopIteration, TypeError):
        return "the model has no torch UNet to export"
    import torch

    if parameter.device.type != "cpu" or torch.device(getattr(model, "device", "cpu")).type != "cpu":
        return "graph backends run on the CPU only"
    if parameter.dtype != torch.float32:
        return f"graph backends run float32 UNets, this one is {str(parameter.dtype).replace('torch.', '')}"
    if getattr(model, "compiled", False):
        return "the UNet is compiled with torch.compile (--compile)"
    if getattr(model, "offload", "none") not in (None, "none"):
        return "offload is on"
    if not hasattr(getattr(model.unet, "config", None), "block_out_channels"):
        return "the UNet is not a diffusers UNet2DConditionModel"
    return None


def _unet_params(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.unet.parameters())


def job_work(model: Any, params: Any) -> float:
    """Million latent-pixel rows the job's UNet calls process (calls x batch rows x latent pixels)."""
    from difusi.samplers import get_sampler

    try:
        second_order = get_sampler(params.sampler_name).second_order
    except Exception:  # noqa: BLE001  (an unknown sampler fails validation elsewhere)
        second_order = False
    calls = params.steps * (2 if second_order else 1) * params.n_iter
    rows = params.batch_size * (1 if params.cfg_scale == 1 else 2)
    factor = getattr(model, "vae_scale_factor", 8) or 8
    return calls * rows * (params.width // factor) * (params.height // factor) / 1e6


def estimates(model: Any, params: Any) -> tuple[float, float]:
    """(seconds a graph would save on this job, seconds a first conversion costs) by the rule above."""
    size = _unet_params(model)
    saved = SAVED_S_PER_MPIX_CALL * size / SD15_PARAMS * job_work(model, params)
    return saved, CONVERT_FIXED_S + CONVERT_S_PER_GPARAM * size / 1e9


def _has_graph(model: Any, name: str) -> bool:
    """A graph of this model for backend `name` is in memory or in the disk cache."""
    existing = _graph_of(model)
    if existing is not None and existing.backend == name:
        return True
    try:
        return cached_entry(model, name) is not None
    except Exception:  # noqa: BLE001  (test doubles, unhashable paths: no graph)
        return False


def _worth_it(model: Any, params: Any, name: str) -> bool:
    """`auto`: a cached graph exists, or the job saves more than a conversion costs."""
    if _has_graph(model, name):
        return True
    try:
        saved, cost = estimates(model, params)
    except Exception:  # noqa: BLE001  (test doubles, unhashable paths: no graph)
        return False
    return saved >= cost


def cached_entry(model: Any, name: str):
    """The valid cache entry of this model's UNet for backend `name`, or None."""
    from difusi.speed.graph import cache
    from difusi.speed.graph.backends import backend_version

    entry = cache.entry_for(model, name, backend_version(name))
    return entry if cache.is_valid(entry) else None


def graph_unet(model: Any, name: str, precision: str = "fp32"):
    """The model's `GraphUNet` for backend `name` at `precision`: kept on the model between jobs, loaded from the disk
    cache, or converted (once) and cached. Weights are synced with the torch UNet's (LoRA) before it is returned."""
    from difusi.speed.graph import cache
    from difusi.speed.graph.backends import backend_version
    from difusi.speed.graph.unet import GraphUNet

    graph = _graph_of(model)
    if graph is not None and (graph.backend != name or graph.torch_unet is not model.unet
                              or getattr(graph, "precision", "fp32") != precision):
        _set_graph(model, None)  # one compiled copy per model: free the other backend's (or precision's) first
        graph = None
    if graph is None:
        stored = "int8" if precision == "int8" else "fp32"  # bf16 compiles the f32 entry with another hint
        entry = cache.entry_for(model, name, backend_version(name), stored)
        make = compress_into if stored == "int8" else convert_into
        if not cache.is_valid(entry):
            if entry.folder.exists():
                STATS["rebuilt_corrupt"] += 1
                print(f"difusi: the cached UNet graph {entry.folder.name} is incomplete or damaged; converting again",
                      file=sys.stderr, flush=True)
            make(model, entry)
        graph = GraphUNet(model, name, entry, precision)
        try:
            _load(graph, model)
        except KeyError:
            raise  # a merged LoRA changes a weight the graph cannot take (not damage): unet_for runs torch
        except Exception:  # noqa: BLE001  (a file that passed the size check but does not load: rebuild once)
            STATS["rebuilt_corrupt"] += 1
            print(f"difusi: the cached UNet graph {entry.folder.name} does not load; converting again",
                  file=sys.stderr, flush=True)
            cache.remove(entry)
            make(model, entry)
            _load(graph, model)
        cache.touch(entry)
        _set_graph(model, graph)
    else:
        graph.sync(model)
    return graph


def _load(graph: Any, model: Any) -> None:
    started = time.perf_counter()
    label = "" if getattr(graph, "precision", "fp32") == "fp32" else f" ({graph.precision})"
    print(f"difusi: loading the {graph.backend} UNet graph{label}", file=sys.stderr, flush=True)
    graph.sync(model)
    STATS["loads"] += 1
    graph.load_seconds = time.perf_counter() - started


def _build_mode(model: Any) -> str:
    """Where a cache entry is made: "inline" (small UNets) or in a fresh "process"; `DIFUSI_GRAPH_CONVERT` forces."""
    return os.environ.get(CONVERT_ENV) or ("inline" if _unet_params(model) <= INLINE_MAX_PARAMS else "process")


def _build_entry(model: Any, entry: Any, build: Any) -> float:
    """Make `entry` with `build(mode, staged_folder) -> facts` in a staging folder and publish it in the cache
    (nothing half-written is left behind); returns the seconds it took."""
    from difusi.speed.graph import cache

    mode = _build_mode(model)
    staged = cache.staging_folder(entry)
    started = time.perf_counter()
    try:
        facts = build(mode, staged)
        facts["wall_seconds"] = time.perf_counter() - started
        facts["mode"] = mode
        cache.publish(entry, staged, facts)
    finally:
        if staged.exists():
            cache.shutil.rmtree(staged, ignore_errors=True)
    return time.perf_counter() - started


def convert_into(model: Any, entry: Any) -> None:
    """Export the model file's UNet into `entry` (fresh process for large UNets), then publish it in the cache."""
    from difusi.speed.graph.convert import convert_checkpoint, convert_in_child

    def export(mode: str, staged: Any) -> dict:
        convert = convert_in_child if mode == "process" else convert_checkpoint
        return convert(model.path, staged, entry.facts["backend"])

    STATS["conversions"] += 1
    seconds = _build_entry(model, entry, export)
    print(f"difusi: UNet graph converted in {seconds:.1f} s and cached in {entry.folder}", file=sys.stderr, flush=True)


def compress_into(model: Any, entry: Any) -> None:
    """Make the int8 entry `entry` from the model file's f32 OpenVINO entry (converted first when missing): NNCF
    weight compression (`difusi.speed.graph.precision`), in a fresh process for large UNets, then publish it."""
    from difusi.speed.graph import cache
    from difusi.speed.graph.backends import backend_version
    from difusi.speed.graph.precision import STATS as PRECISION_STATS
    from difusi.speed.graph.precision import compress_in_child, compress_int8

    source = cache.entry_for(model, "openvino", backend_version("openvino"))
    if not cache.is_valid(source):
        if source.folder.exists():
            cache.remove(source)
        convert_into(model, source)

    def compress(mode: str, staged: Any) -> dict:
        return (compress_in_child if mode == "process" else compress_int8)(source.graph_path, staged)

    PRECISION_STATS["compressions"] += 1
    seconds = _build_entry(model, entry, compress)
    cache.touch(source)
    print(f"difusi: UNet graph compressed to int8 in {seconds:.1f} s and cached in {entry.folder}", file=sys.stderr,
          flush=True)

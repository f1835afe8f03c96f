"""Export a checkpoint's UNet to a graph file, normally in a fresh process: ONNX for ONNX Runtime (`export_unet`),
OpenVINO IR for OpenVINO (`export_openvino`).

    python -m difusi.speed.graph.convert CHECKPOINT OUT_DIR [--backend onnx|openvino]

Why a fresh process: tracing and writing the graph holds a second float32 copy of the UNet (plus the ONNX protobuf),
which for SD 1.5 is 3.4 GB more; in its own process that memory is returned when the process ends, so the running
job's peak RSS does not double (issue 18). The child loads the checkpoint from its file, so the exported weights are
the file's (never a LoRA merged into the parent's UNet): the cache entry means exactly "this file's UNet".

ONNX export: `torch.onnx.export(..., dynamo=False)` (the TorchScript exporter: torch 2.13's default dynamo exporter needs
`onnxscript`, which difusi does not ship), opset 17, `do_constant_folding=False` so that every parameter stays an
initializer named by its torch name (`unet.<module path>.weight`): the runtimes' weight replacement relies on it.
Dims batch, height, width and token count are dynamic (one graph serves every size and batch, and NGMS's half batch;
measured against static shapes in docs/bench/graph-backend.md). The trace runs at a latent size divisible by the
UNet's total downsampling, so diffusers' `forward_upsample_size` branch is traced as False: latents of other sizes
are refused by `GraphUNet` (they run on torch). Weights go to one external data file next to the graph.

Progress: one line per stage on stderr, `difusi: converting the UNet graph [stage i/4: ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

GRAPH_FILE = "unet.onnx"
DATA_FILE = "unet.onnx.data"
OV_GRAPH_FILE = "unet.xml"
WEIGHTS_FILE = "weights.json"
OPSET = 17
INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
OUTPUT = "out_sample"
STAGES = ("loading the checkpoint", "tracing the UNet", "writing the graph file", "checking the graph")


def progress(stage: int, extra: str = "") -> None:
    print(f"difusi: converting the UNet graph [stage {stage}/{len(STAGES)}: {STAGES[stage - 1]}]{extra}",
          file=sys.stderr, flush=True)


class _Wrapper(torch.nn.Module):
    """Positional tensors in, the sample tensor out (what a graph exporter needs). Attribute `unet`: so every
    initializer is named `unet.<parameter name>`."""

    def __init__(self, unet: Any, sdxl: bool):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


def is_sdxl(unet: Any) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def trace_latent(unet: Any) -> int:
    """A latent side divisible by the UNet's downsampling (2 per level but the last), at least 8 (traced at side x
    2 side: unequal sides, so no height/width mix-up can hide in the graph)."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return max(8, factor)


def example_inputs(unet: Any, batch: int = 2) -> tuple[torch.Tensor, ...]:
    config = unet.config
    side = trace_latent(unet)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, config.in_channels, side, 2 * side, generator=generator),
              torch.full((batch,), 500.0),
              torch.randn(batch, 77, config.cross_attention_dim, generator=generator)]
    if is_sdxl(unet):
        pooled = unet.add_embedding.linear_1.in_features - 6 * config.addition_time_embed_dim
        inputs += [torch.randn(batch, pooled, generator=generator),
                   torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)]
    return tuple(inputs)


def export_unet(unet: Any, out_dir: Path, report=progress) -> dict[str, Any]:
    """Write `out_dir/unet.onnx` (+ `unet.onnx.data`) from a float32 CPU torch UNet; returns facts for the cache."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    sdxl = is_sdxl(unet)
    wrapper = _Wrapper(unet.eval(), sdxl)
    inputs = example_inputs(unet)
    names = list(INPUTS[: len(inputs)])
    dynamic = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
               "encoder_hidden_states": {0: "batch", 1: "tokens"}, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}}
    report(2)
    started = time.perf_counter()
    raw = out_dir / "raw"
    raw.mkdir(exist_ok=True)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python bools (documented above)
        torch.onnx.export(wrapper, inputs, str(raw / GRAPH_FILE), dynamo=False, input_names=names,
                          output_names=[OUTPUT], dynamic_axes={k: dynamic[k] for k in names}, opset_version=OPSET,
                          do_constant_folding=False, external_data=True)
    traced = time.perf_counter() - started
    report(3)
    graph = onnx.load(str(raw / GRAPH_FILE), load_external_data=True)
    onnx.save_model(graph, str(out_dir / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=0)
    del graph
    for path in raw.iterdir():
        path.unlink()
    raw.rmdir()
    report(4)
    initializers = _initializer_names(out_dir / GRAPH_FILE)
    params = {f"unet.{name}" for name, _ in unet.named_parameters()}
    missing = sorted(params - initializers)
    if missing:
        raise RuntimeError(f"{len(missing)} UNet parameters are not initializers of the graph (e.g. {missing[0]})")
    return {"inputs": names, "export_seconds": traced, "seconds": time.perf_counter() - started}


def export_openvino(unet: Any, out_dir: Path, report=progress) -> dict[str, Any]:
    """Write `out_dir/unet.xml` + `unet.bin` (OpenVINO IR, float32) and `weights.json` from a float32 CPU torch UNet.

    `openvino.convert_model` straight from the torch module (not from the ONNX file): its PyTorch frontend maps
    `F.scaled_dot_product_attention` to OpenVINO's fused ScaledDotProductAttention op (32 in SD 1.5's graph, where the
    ONNX graph has MatMul-Softmax-MatMul), and the resulting graph compiles in 1.6 s instead of 5.2 s from the ONNX
    file (docs/bench/graph-backend.md). IR saved with `compress_to_fp16=False` (the default stores fp16 weights).

    `weights.json` maps each torch parameter (`unet.<name>`) to the graph Constant holding it: by name where the
    frontend kept it (`self.unet.<name>`: the weights), else by value (biases are folded into reshaped Constants
    such as `.../aten::_convolution/Reshape`); a parameter whose values match no Constant, or more than one, is
    left out, and a LoRA that changes it makes the job run on torch (`GraphUNet.sync` raises, `unet_for` warns).
    """
    import hashlib

    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    sdxl = is_sdxl(unet)
    wrapper = _Wrapper(unet.eval(), sdxl)
    inputs = example_inputs(unet)
    names = list(INPUTS[: len(inputs)])
    config = unet.config
    shapes = [ov.PartialShape([-1, config.in_channels, -1, -1]), ov.PartialShape([-1]),
              ov.PartialShape([-1, -1, config.cross_attention_dim])]
    if sdxl:
        shapes += [ov.PartialShape([-1, inputs[3].shape[1]]), ov.PartialShape([-1, 6])]
    report(2)
    started = time.perf_counter()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(wrapper, example_input=inputs, input=shapes)
    for port, name in zip(model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    traced = time.perf_counter() - started
    report(3)
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    weights: dict[str, str] = {}
    by_value: dict[tuple[int, str], list[str]] = {}
    pending = {}
    for name, parameter in unet.named_parameters():
        op = constants.get(f"self.unet.{name}")
        if op is not None and list(op.get_output_shape(0)) == list(parameter.shape):
            weights[f"unet.{name}"] = op.get_friendly_name()
        else:
            pending[f"unet.{name}"] = parameter.detach().contiguous().numpy()
    sizes = {array.size for array in pending.values()}

    def digest(array) -> str:
        return hashlib.sha1(array.tobytes()).hexdigest()

    for friendly, op in constants.items():
        if friendly.startswith("self.unet.") or op.get_element_type() != ov.Type.f32:
            continue
        count = 1
        for dim in op.get_output_shape(0):
            count *= dim
        if count in sizes:
            by_value.setdefault((count, digest(op.get_data())), []).append(friendly)
    claimed: dict[str, int] = {}
    matches = {}
    for name, array in pending.items():
        found = by_value.get((array.size, digest(array)), [])
        if len(found) == 1:
            matches[name] = found[0]
            claimed[found[0]] = claimed.get(found[0], 0) + 1
    weights.update({name: friendly for name, friendly in matches.items() if claimed[friendly] == 1})
    ov.save_model(model, str(out_dir / OV_GRAPH_FILE), compress_to_fp16=False)
    del model
    (out_dir / WEIGHTS_FILE).write_text(json.dumps(weights))
    report(4)
    unmapped = sorted(set(f"unet.{name}" for name, _ in unet.named_parameters()) - set(weights))
    return {"inputs": names, "export_seconds": traced, "seconds": time.perf_counter() - started,
            "unmapped_weights": len(unmapped), "unmapped_examples": unmapped[:5]}


def _initializer_names(path: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return {initializer.name for initializer in graph.graph.initializer}


def convert_checkpoint(checkpoint: Path, out_dir: Path, backend: str = "onnx", report=progress) -> dict[str, Any]:
    """Load `checkpoint`'s UNet as float32 on the CPU and export it for `backend` (stage 1 = the load)."""
    from difusi.models import load_model

    report(1)
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    exporter = export_openvino if backend == "openvino" else export_unet
    return exporter(model.unet, out_dir, report)


def run_in_child(module: str, args: list[str], what: str, timeout: float | None = None) -> dict[str, Any]:
    """`python -m module args` in a fresh Python process that imports this difusi (its progress lines pass through
    to our stderr); the JSON on its last stdout line is the result. RuntimeError naming `what` if it fails."""
    src = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed in its process (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def convert_in_child(checkpoint: Path, out_dir: Path, backend: str = "onnx", timeout: float | None = None) -> dict[str, Any]:
    """Run `convert_checkpoint` in a fresh Python process."""
    return run_in_child("difusi.speed.graph.convert", [str(checkpoint), str(out_dir), "--backend", backend],
                        "UNet graph conversion", timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint's UNet to a graph file: ONNX (onnx) or OpenVINO IR (openvino)")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--backend", choices=("onnx", "openvino"), default="onnx")
    args = parser.parse_args(argv)
    facts = convert_checkpoint(args.checkpoint, args.out_dir, args.backend)
    import resource

    facts["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    import difusi  # noqa: F401  (offline env and thread settings, as every difusi entry point)

    raise SystemExit(main())

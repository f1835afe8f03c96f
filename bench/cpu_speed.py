# ruff: noqa: I001  (difusi is imported first on purpose: see the import below)
"""Bench (issue 7): difusi vs diffusers' StableDiffusionPipeline on the CPU, side by side in one run.

    python bench/cpu_speed.py [--checkpoint PATH] [--quick] [--sections a,b,...] [--out docs/bench]

This host's speed drifts by up to 3x over minutes (shared machine), so every number that is compared is
measured in the same run, variants interleaved repeat by repeat, and medians reported; only the ratios
are meaningful across runs. Sections (all by default):

- `peak`: the CPU's achievable FLOP rate measured now: a 3x3 convolution (320 ch, 64x64, batch 2,
  oneDNN, NCHW and channels_last), sgemm 4096 through `torch.mm` (MKL) and through oneDNN.
- `load`: `load_model` of the random SD 1.5-architecture fp16 safetensors file (~2.1 GB, page-cached)
  in a fresh process vs plain `safetensors.load_file` + float32 cast; peak RSS of each process.
- `unet`: seconds per UNet CFG call (batch 2) at 256 px (32x32 latents) and 512 px (64x64): diffusers'
  eager modules under `no_grad` (what `StableDiffusionPipeline` runs) vs difusi's exact fast path, plus
  ablations at 256 px (each switch alone, inference_mode, 1 thread); achieved GFLOPS from
  `torch.utils.flop_counter` plus attention FLOPs counted at the SDPA call (the counter misses the CPU
  SDPA kernel), against the measured peak; max abs difference of the UNet outputs.
- `vae`: VAE decode of a 64x64 latent (512 px), eager vs fast path.
- `e2e`: one CFG 7 image at 512 px, DPM++ 2M Karras with `--e2e-steps` steps: diffusers pipeline vs
  difusi txt2img; also scaled to 20 steps (measured overhead + 20 x the measured per-step time).
- `modes`: 20-step images at 256 px: diffusers, difusi exact, and each opt-in mode (NGMS, DeepCache,
  ToMe, all three): seconds per image, speed-up over diffusers, deviation from difusi's exact image
  (max / mean abs difference of 8-bit pixels, PSNR).
- `modes512`: the modes at 512 px, per UNet call over one DeepCache cycle (3 consecutive calls, batch 2),
  and the 20-step image time estimated from it (20 calls + the VAE decode measured in `vae`).
- `mini`: the same on the default model difusi-mini (native size, 20 steps).
- `compile`: torch.compile (inductor) of the fast-path UNet at 256 px in a fresh process: cold compile,
  warm start from inductor's on-disk cache in a second process, and seconds per step vs the fast path.
- `sdxl`: an SDXL-architecture random checkpoint (fp16 file, float32 run) in a fresh process: load time,
  one 512 px CFG image (2 steps), peak RSS.
- `backends` (issue 18, `difusi.speed.graph`): for each installed graph backend (ONNX Runtime, OpenVINO), the
  first-use conversion (fresh process, cold cache) and the cached load in a fresh process (seconds, peak RSS); with
  it, the `unet`, `e2e` and `modes` sections gain a row per backend (the backend column): UNet CFG call at 256 and
  512 px, whole images at 256 px (6 steps with `--backend-steps`) and 512 px (scaled to 20 steps), interleaved with
  diffusers eager and difusi's torch path in the same run. The VAE decode runs on torch whatever the backend.

Random weights make the images noise-like: the deviation numbers bound how far a mode moves the output,
not how good it looks. Writes `cpu-speed.json` and `cpu-speed.md` to `--out`.
"""

from __future__ import annotations

import difusi  # noqa: F401, I001  (first: offline env and OpenMP wait policy, read when torch loads libgomp)
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from machine import cpu_line, log, rss_mb

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
CPU = cpu_line()
SECTIONS = ["peak", "threads", "load", "backends", "unet", "vae", "e2e", "modes", "modes512", "mini", "compile", "sdxl"]
GRAPH_CACHE = CACHE / "graph-cache"
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
NEGATIVE = "blurry, low quality"
MODES = {
    "NGMS 5": {"s_min_uncond": 5.0},
    "DeepCache 3": {"deepcache_interval": 3},
    "ToMe 0.5": {"token_merging_ratio": 0.5},
    "NGMS 5 + DeepCache 3 + ToMe 0.5": {"s_min_uncond": 5.0, "deepcache_interval": 3, "token_merging_ratio": 0.5},
    "NGMS 15 + DeepCache 5 + ToMe 0.6": {"s_min_uncond": 15.0, "deepcache_interval": 5, "token_merging_ratio": 0.6},
}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(cases: dict, repeats: int, setup=None) -> dict[str, list[float]]:
    """Run every case once per repeat, cases in turn, so drift hits all alike. `setup(name)` runs untimed."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(repeats):
        for name, fn in cases.items():
            if setup is not None:
                setup(name)
            times[name].append(timed(fn))
            log(f"  {name} repeat {repeat + 1}/{repeats}: {times[name][-1]:.3f} s")
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- peak


def measure_peak(repeats: int) -> dict:
    """The best float32 rate this CPU reaches on large kernels: the best repeat of each (a quiet moment of a shared
    host), the peak the best kernel. Two small-map convolutions show what the exact path's reordered weights save
    (`difusi.speed.packed_conv`)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    channels_last = torch.channels_last
    x = torch.randn(2, 320, 64, 64).contiguous(memory_format=channels_last)
    w = torch.randn(320, 320, 3, 3).contiguous(memory_format=channels_last) * 0.02
    small_x = torch.randn(2, 1280, 8, 8).contiguous(memory_format=channels_last)
    small_w = (torch.randn(1280, 1280, 3, 3) * 0.02).contiguous(memory_format=channels_last)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    bt = b.t().contiguous()

    def reordered(weight, like):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), [1, 1], [1, 1], [1, 1], 1,
                                                        list(like.shape))

    def conv_reordered(inp, packed):
        return torch.ops.mkldnn._convolution_pointwise(inp, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")

    flop = {"conv": 2 * 2 * 320 * 320 * 9 * 64 * 64, "small": 2 * 2 * 1280 * 1280 * 9 * 8 * 8, "gemm": 2 * 4096**3}
    with torch.inference_mode():
        w_packed, small_packed = reordered(w, x), reordered(small_w, small_x)
        cases = {
            "conv3x3 320 ch 64x64 NCHW": ("conv", lambda: F.conv2d(x.contiguous(), w.contiguous(), padding=1)),
            "conv3x3 320 ch 64x64 channels_last": ("conv", lambda: F.conv2d(x, w, padding=1)),
            "conv3x3 320 ch 64x64 reordered weight": ("conv", lambda: conv_reordered(x, w_packed)),
            "conv3x3 1280 ch 8x8 channels_last": ("small", lambda: F.conv2d(small_x, small_w, padding=1)),
            "conv3x3 1280 ch 8x8 reordered weight": ("small", lambda: conv_reordered(small_x, small_packed)),
            "sgemm 4096 torch.mm (MKL)": ("gemm", lambda: torch.mm(a, b)),
            "sgemm 4096 oneDNN": ("gemm", lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")),
        }
        for _, fn in cases.values():
            fn()
        times = interleaved({name: fn for name, (_, fn) in cases.items()}, repeats)
    result = {name: {"seconds": min(times[name]), "gflops": flop[kind] / min(times[name]) / 1e9}
              for name, (kind, _) in cases.items()}
    result["peak_gflops"] = max(v["gflops"] for v in result.values())
    return result


# ----------------------------------------------------------------------------- checkpoint + model


def ensure_sd15(path: Path | None) -> Path:
    path = path or CACHE / "sd15-random-fp16.safetensors"
    if not path.exists():
        from difusi.models.synthetic import write_random_ldm_file

        log(f"writing random SD 1.5-architecture checkpoint to {path}")
        write_random_ldm_file(path)
    return path


def page_cache(path: Path) -> None:
    with path.open("rb") as handle:
        while handle.read(1 << 24):
            pass


LOAD_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import difusi, torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    from safetensors.torch import load_file
    from difusi.models import load_model
    case, path = sys.argv[1], sys.argv[2]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if case == "safetensors load_file + float32":
        state = {k: v.float() for k, v in load_file(path).items()}
    else:
        model = load_model(path)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "imports_rss_mb": base / 1024}))
""")


def measure_load(path: Path, repeats: int) -> dict:
    page_cache(path)
    cases = ["difusi load_model (float32)", "safetensors load_file + float32"]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            out = subprocess.run([sys.executable, "-c", LOAD_CHILD, case, str(path)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"  load {case}: {runs[case][-1]['seconds']:.2f} s")
    size = path.stat().st_size
    return {
        "file_gb": size / 1e9,
        **{case: {"seconds": med([r["seconds"] for r in rs]), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                  "imports_rss_mb": rs[0]["imports_rss_mb"]} for case, rs in runs.items()},
    }


def set_path(model, variant: str) -> None:
    """Switch one loaded model between diffusers' eager modules and (parts of) difusi's fast path."""
    from difusi.speed import exact

    exact.restore_model(model)
    convs = [model.unet, model.vae]
    texts = [encoder.model for encoder in model.text_encoders]
    if variant == "exact":
        exact.prepare_model(model, force=True)
    elif variant == "exact, plain conv weights":
        exact.prepare_modules(convs, linear=True, channels_last=True, packed=False)
        exact.prepare_modules(texts, linear=True, channels_last=False)
    elif variant == "oneDNN linear only":
        exact.prepare_modules(convs + texts, linear=True, channels_last=False)
    elif variant == "channels_last only":
        exact.prepare_modules(convs, linear=False, channels_last=True)


def settle(model, latent: int, calls: int = 3) -> None:
    """Untimed UNet calls (of a model, or of a compiled graph) before timed ones: the exact path times its reordered
    convolution weights per layer on the first calls of a shape (`difusi.speed.packed_conv`), and a dynamic-shape
    graph builds its kernels on the first call at a size; a timed repeat must include neither."""
    unet = getattr(model, "unet", model)
    x, t, context = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.inference_mode():
        for _ in range(calls):
            unet(x, t, encoder_hidden_states=context)


# ----------------------------------------------------------------------------- UNet step


def unet_flops(unet, x, t, context) -> float:
    """FLOPs of one call: torch's counter plus attention at the SDPA call (4 * B * H * N * M * D)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    attention = [0.0]
    original = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        attention[0] += 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=context)
    finally:
        F.scaled_dot_product_attention = original
    return counter.get_total_flops() + attention[0]


def measure_unet(model, latent: int, repeats: int, ablations: bool, peak: float | None, graphs: dict | None = None) -> dict:
    torch.manual_seed(0)
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768)
    threads = torch.get_num_threads()
    set_path(model, "eager")
    flops = unet_flops(model.unet, x, t, context)
    variants = {"diffusers eager (no_grad)": ("eager", torch.no_grad, threads), "difusi exact": ("exact", torch.inference_mode, threads)}
    if ablations:
        variants.update({
            "exact, plain conv weights": ("exact, plain conv weights", torch.inference_mode, threads),
            "eager + inference_mode": ("eager", torch.inference_mode, threads),
            "oneDNN linear only": ("oneDNN linear only", torch.inference_mode, threads),
            "channels_last only": ("channels_last only", torch.inference_mode, threads),
        })
        if threads > 1:
            variants["difusi exact, 1 thread"] = ("exact", torch.inference_mode, 1)
    for backend in graphs or {}:
        variants[f"difusi {backend}"] = ("exact", torch.inference_mode, threads)
    outputs = {}

    def call(name):
        path, context_manager, n = variants[name]
        unet = graphs[name.split(" ", 1)[1]] if graphs and name.split(" ", 1)[1] in graphs else model.unet
        torch.set_num_threads(n)
        try:
            with context_manager():
                outputs[name] = unet(x, t, encoder_hidden_states=context).sample
        finally:
            torch.set_num_threads(threads)

    current = {"path": None}

    def setup(name):
        if current["path"] != variants[name][0]:
            set_path(model, variants[name][0])
            current["path"] = variants[name][0]
            if current["path"] == "exact":
                settle(model, latent)

    for name in variants:  # warm-up, untimed
        setup(name)
        call(name)
    times = interleaved({name: (lambda name=name: call(name)) for name in variants}, repeats, setup)
    base = med(times["diffusers eager (no_grad)"])
    reference = outputs["diffusers eager (no_grad)"]
    rows = {}
    for name, values in times.items():
        seconds = med(values)
        rows[name] = {
            "seconds": seconds, "speedup": base / seconds, "gflops": flops / seconds / 1e9,
            "fraction_of_peak": (flops / seconds / 1e9 / peak) if peak else None,
            "max_abs_diff": float((outputs[name] - reference).abs().max()), "runs": values,
        }
    floor = flops / (peak * 1e9) if peak else None  # no call can be faster than its FLOPs at the peak rate
    return {"latent": latent, "pixels": latent * 8, "gflop_per_call": flops / 1e9, "variants": rows,
            "floor_at_peak_s": floor, "max_speedup_at_peak": (base / floor) if floor else None}


def measure_vae(model, repeats: int) -> dict:
    from difusi.vae import decode_latents

    torch.manual_seed(0)
    latents = torch.randn(1, 4, 64, 64)
    outputs = {}
    variants = {"diffusers eager (no_grad)": ("eager", torch.no_grad), "difusi exact": ("exact", torch.inference_mode)}

    def call(name):
        with variants[name][1]():
            outputs[name] = decode_latents(model.vae, latents, model.scaling_factor, tiled=False)

    times = interleaved({name: (lambda name=name: call(name)) for name in variants}, repeats,
                        lambda name: set_path(model, variants[name][0]))
    base = med(times["diffusers eager (no_grad)"])
    ref = outputs["diffusers eager (no_grad)"]
    return {name: {"seconds": med(v), "speedup": base / med(v), "runs": v,
                   "max_abs_diff": float((outputs[name] - ref).abs().max())} for name, v in times.items()}


# ----------------------------------------------------------------------------- images


_PIPELINES: dict[int, object] = {}


def diffusers_pipeline(model):
    """diffusers' pipeline on a copy of `model`'s weights, built once per model: each build holds another copy of every
    weight (and briefly two), and building a second one next to the compiled graphs ran the 24 GB host out of memory."""
    if id(model) not in _PIPELINES:
        _PIPELINES[id(model)] = _build_diffusers_pipeline(model)
    return _PIPELINES[id(model)]


def _build_diffusers_pipeline(model):
    from diffusers import DPMSolverMultistepScheduler

    from difusi.models.synthetic import reference_pipeline_for

    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            use_karras_sigmas=True, prediction_type=model.prediction_type)
    return reference_pipeline_for(model, scheduler)  # diffusers' own classes with the same weights


def image_cases(model, size: int, steps: int, modes: dict) -> tuple[dict, dict]:
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    # backend "torch": the difusi rows measure the torch path unless a case asks for a graph backend (issue 18)
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, steps=steps, cfg_scale=7.0,
                              sampler_name="DPM++ 2M", scheduler="Karras", width=size, height=size, backend="torch")
    pipe = diffusers_pipeline(model)
    images: dict[str, np.ndarray] = {}

    def run_diffusers():
        # diffusers' pipeline __call__ runs under no_grad; CFG batch 2, same prompt, sampler and schedule.
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size,
                   width=size, generator=torch.Generator("cpu").manual_seed(1), output_type="pil")
        images["diffusers"] = np.asarray(out.images[0], dtype=np.float64)

    def difusi_case(name, changes):
        def run():
            result = txt2img(model, params.replace(**changes))
            images[name] = np.asarray(result.images[0].image, dtype=np.float64)
        return run

    cases = {"diffusers eager": run_diffusers, "difusi exact": difusi_case("difusi exact", {})}
    cases.update({f"difusi {name}": difusi_case(f"difusi {name}", changes) for name, changes in modes.items()})
    paths = {name: ("eager" if name == "diffusers eager" else "exact") for name in cases}
    return cases, {"images": images, "paths": paths}


def deviation(image: np.ndarray, exact: np.ndarray) -> dict:
    diff = np.abs(image - exact)
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))}


def measure_images(model, size: int, steps: int, modes: dict, repeats: int, graphs: dict | None = None) -> dict:
    modes = {**modes, **{backend: {"backend": backend} for backend in graphs or {}}}
    cases, state = image_cases(model, size, steps, modes)
    current = {"path": None}
    warmed: set[str] = set()

    def setup(name):
        if current["path"] != state["paths"][name]:
            set_path(model, state["paths"][name])
            current["path"] = state["paths"][name]
            if current["path"] == "exact":
                settle(model, size // 8)
        backend = name.split(" ", 1)[1] if name.startswith("difusi ") else None
        if graphs and backend in graphs:  # the compiled graph of this backend, built before (untimed), where the
            # pipeline looks for it (`LoadedModel.derived`): otherwise it loads a second copy from the cache
            from difusi.speed import graph

            graph._set_graph(model, graphs[backend])
            if backend not in warmed:  # a dynamic-shape graph's first call at a new size builds its kernels
                settle(graphs[backend], size // 8, calls=1)
                warmed.add(backend)

    times = interleaved(cases, repeats, setup)
    base = med(times["diffusers eager"])
    images = state["images"]
    exact = images["difusi exact"].copy()
    rows = {}
    for name, values in times.items():
        key = "diffusers" if name == "diffusers eager" else name
        rows[name] = {"seconds": med(values), "speedup_vs_diffusers": base / med(values), "runs": values,
                      "deviation_from_difusi_exact": deviation(images[key], exact)}
    # The reordered convolution weights the exact path kept (after its last image): none means the memory guard
    # (`difusi.speed.packed_conv.RESERVE_FRACTION`) refused them and the torch rows ran with plain weights.
    from difusi.speed import packed_conv

    set_path(model, "exact")
    settle(model, size // 8)
    rows["difusi exact"]["reordered_conv_copies"] = packed_conv.kept_copies(model.unet)
    return {"size": size, "steps": steps, "cases": rows}


def measure_modes_512(model, vae: dict, repeats: int) -> dict:
    """Seconds per UNet call at 64x64 latents, averaged over 3 consecutive calls (one DeepCache cycle)."""
    from difusi.speed.deepcache import deepcache
    from difusi.speed.tome import token_merging

    torch.manual_seed(0)
    xs = [torch.randn(2, 4, 64, 64) for _ in range(3)]
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768)
    variants = {
        "diffusers eager (no_grad)": ("eager", 0.0, 1),
        "difusi exact": ("exact", 0.0, 1),
        "difusi ToMe 0.5": ("exact", 0.5, 1),
        "difusi DeepCache 3": ("exact", 0.0, 3),
        "difusi DeepCache 3 + ToMe 0.5": ("exact", 0.5, 3),
    }

    def cycle(name):
        path, ratio, interval = variants[name]
        grad = torch.no_grad if path == "eager" else torch.inference_mode
        with grad(), token_merging(model.unet, ratio), deepcache(model.unet, interval):
            for x in xs:
                model.unet(x, t, encoder_hidden_states=context)

    times = interleaved({name: (lambda name=name: cycle(name)) for name in variants}, repeats,
                        lambda name: set_path(model, variants[name][0]))
    rows = {}
    base_call = med(times["diffusers eager (no_grad)"]) / 3
    for name, values in times.items():
        per_call = med(values) / 3
        decode = vae.get("diffusers eager (no_grad)" if name.startswith("diffusers") else "difusi exact", {}).get("seconds", 0.0)
        rows[name] = {"seconds_per_call": per_call, "call_speedup": base_call / per_call, "image_20_steps_s": 20 * per_call + decode}
    base_image = rows["diffusers eager (no_grad)"]["image_20_steps_s"]
    for row in rows.values():
        row["image_speedup"] = base_image / row["image_20_steps_s"]
    return rows


def scaled_e2e(model, steps: int, unet_512: dict, graphs: dict | None = None) -> dict:
    """One 512 px image per pipeline at `steps` steps, plus the 20-step estimate from the measured s/step."""
    e2e = measure_images(model, 512, steps, {}, 1, graphs)
    pairs = [("diffusers eager", "diffusers eager (no_grad)"), ("difusi exact", "difusi exact")]
    pairs += [(f"difusi {backend}", f"difusi {backend}") for backend in graphs or {}]
    for name, key in pairs:
        if key in unet_512:
            e2e["cases"][name]["scaled_20_steps"] = e2e["cases"][name]["seconds"] + (20 - steps) * unet_512[key]["seconds"]
    base = e2e["cases"]["diffusers eager"].get("scaled_20_steps")
    for case in e2e["cases"].values():
        if base and "scaled_20_steps" in case:
            case["scaled_speedup"] = base / case["scaled_20_steps"]
    return e2e


# ----------------------------------------------------------------------------- graph backends (issue 18)


GRAPH_LOAD_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import difusi, torch
    from difusi.models import load_model
    from difusi.params import GenerationParams
    from difusi.speed import graph
    path, backend = sys.argv[1], sys.argv[2]
    model = load_model(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = time.perf_counter()
    choice = graph.unet_for(model, GenerationParams(prompt="x", backend=backend, width=256, height=256))
    load_s = time.perf_counter() - s
    x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.inference_mode():
        s = time.perf_counter(); choice.unet(x, t, encoder_hidden_states=c); first_call_s = time.perf_counter() - s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    switch = {}
    if sys.argv[3] == "1" and choice.backend == backend:
        # A LoRA switch: a typical LoRA's layers (every attention projection) change in the torch UNet; the graph is
        # rebuilt from the cached file with those tensors handed over (what GraphUNet.sync does), no re-export.
        from difusi.speed.graph.backends import build_runner
        unet = choice.unet
        changed = {f"unet.{n}": p for n, p in model.unet.named_parameters() if ".attn" in n and ".to_" in n}
        with torch.no_grad():
            for p in changed.values():
                p.mul_(1.01)
        unet.runner = None
        s = time.perf_counter(); unet.runner = build_runner(backend, unet.entry.graph_path, changed)
        switch_s = time.perf_counter() - s
        with torch.inference_mode():
            got = unet(x, t, encoder_hidden_states=c).sample
            want = model.unet(x, t, encoder_hidden_states=c).sample
        switch = {"lora_switch_s": switch_s, "lora_tensors": len(changed),
                  "lora_mb": sum(p.numel() * 4 for p in changed.values()) / 2**20,
                  "lora_max_abs_diff": float((got - want).abs().max())}
    print(json.dumps({"backend": choice.backend, "warnings": choice.warnings, "stats": graph.STATS,
                      "load_s": load_s, "first_call_256_s": first_call_s, "peak_rss_after_model_mb": before,
                      "peak_rss_mb": peak, **switch}))
""")


def measure_backends(model, checkpoint: Path) -> tuple[dict, dict]:
    """Cold conversion (fresh process) and cached load (fresh process) per installed backend; returns the report and
    the compiled graphs built here for the interleaved sections."""
    import shutil

    from difusi.speed import graph
    from difusi.speed.graph import backends as graph_backends
    from difusi.speed.graph import cache
    from difusi.speed.graph.unet import GraphUNet

    os.environ["DIFUSI_CACHE_DIR"] = str(GRAPH_CACHE)
    report: dict = {"installed": {}, "versions": {}}
    graphs = {}
    for backend in graph_backends.GRAPH_BACKENDS:
        installed = graph_backends.installed(backend)
        report["installed"][backend] = installed
        if not installed:
            continue
        report["versions"][backend] = graph_backends.backend_version(backend)
        entry = cache.entry_for(model, backend, graph_backends.backend_version(backend))
        shutil.rmtree(entry.folder, ignore_errors=True)
        log(f"  {backend}: converting (fresh process, cold cache)")
        started = time.perf_counter()
        graph.convert_into(model, entry)
        conversion = {**json.loads((entry.folder / "entry.json").read_text())["conversion"],
                      "seconds": time.perf_counter() - started}  # wall clock, fresh process included
        size = sum(p.stat().st_size for p in entry.folder.iterdir())
        loads = []
        for number in range(2):
            out = subprocess.run([sys.executable, "-c", GRAPH_LOAD_CHILD, str(checkpoint), backend, str(number)],
                                 capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if out.returncode != 0:
                loads.append({"error": out.stderr.strip()[-500:]})
                break
            loads.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"  {backend}: cached load in a fresh process {loads[-1]['load_s']:.1f} s")
        report[backend] = {"conversion": conversion, "cache_entry_gb": size / 1e9, "cached_load": loads,
                           "cached_load_s": med([r["load_s"] for r in loads if "load_s" in r] or [float("nan")]),
                           **{k: v for r in loads for k, v in r.items() if k.startswith("lora_")}}
        started = time.perf_counter()
        graph_unet = GraphUNet(model, backend, entry)
        rss_before = rss_mb()
        graph_unet.sync(model)
        report[backend]["in_bench_build_s"] = time.perf_counter() - started
        report[backend]["in_bench_rss_delta_mb"] = rss_mb() - rss_before
        graphs[backend] = graph_unet
    return report, graphs


def measure_mini(repeats: int) -> dict:
    from difusi.api import get_model

    model = get_model(None)
    result = measure_images(model, model.native_size, 20, MODES, repeats)
    result["model"] = model.name
    return result


# ----------------------------------------------------------------------------- threads


THREADS_CHILD = textwrap.dedent("""
    import json, os, sys, time, torch
    import difusi
    from difusi.models import load_model
    from difusi.speed import prepare_model
    model = load_model(sys.argv[1])
    prepare_model(model)
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    runs = {}
    with torch.inference_mode():
        model.unet(x, t, encoder_hidden_states=c)
        for n in (torch.get_num_threads(), 1):
            torch.set_num_threads(n)
            s = time.perf_counter(); model.unet(x, t, encoder_hidden_states=c); runs[n] = time.perf_counter() - s
    print(json.dumps({"policy": os.environ["OMP_WAIT_POLICY"], "runs": runs}))
""")


def measure_threads(path: Path, repeats: int) -> dict:
    """OpenMP wait policy and thread count, fast-path UNet at 256 px, alternating fresh processes
    (the policy is read when libgomp loads). ACTIVE is libgomp's (and so diffusers') default."""
    results: dict[str, list[float]] = {}
    for _ in range(repeats):
        for policy in ("ACTIVE", "PASSIVE"):
            out = subprocess.run([sys.executable, "-c", THREADS_CHILD, str(path)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": policy})
            data = json.loads(out.stdout.strip().splitlines()[-1])
            for threads, seconds in data["runs"].items():
                results.setdefault(f"{policy}, {threads} threads", []).append(seconds)
            log(f"  {policy}: {data['runs']}")
    return {name: {"seconds": med(v), "runs": v} for name, v in results.items()}


# ----------------------------------------------------------------------------- compile


COMPILE_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    import difusi
    from difusi.models import load_model
    from difusi.speed import exact
    path, repeats = sys.argv[1], int(sys.argv[2])
    fast = load_model(path)
    exact.prepare_model(fast)
    # Inductor cannot lower oneDNN's linear on a plain weight (it packs weights itself), so the compiled
    # model keeps nn.Linear and only takes channels_last; inductor picks its own GEMM path.
    other = load_model(path)
    exact.prepare_modules([other.unet], linear=False, channels_last=True)
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    compiled = torch.compile(other.unet)
    out = {}
    with torch.inference_mode():
        s = time.perf_counter(); compiled(x, t, encoder_hidden_states=c); out["first_call_s"] = time.perf_counter() - s
        fast.unet(x, t, encoder_hidden_states=c)
        eager, comp = [], []
        for _ in range(repeats):
            s = time.perf_counter(); fast.unet(x, t, encoder_hidden_states=c); eager.append(time.perf_counter() - s)
            s = time.perf_counter(); compiled(x, t, encoder_hidden_states=c); comp.append(time.perf_counter() - s)
        a = fast.unet(x, t, encoder_hidden_states=c).sample; b = compiled(x, t, encoder_hidden_states=c).sample
    out.update(exact_runs=eager, compiled_runs=comp, max_abs_diff=float((a - b).abs().max()))
    print(json.dumps(out))
""")



def measure_compile(path: Path, repeats: int) -> dict:
    cache_dir = CACHE / "inductor-cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    result = {}
    for label in ("cold", "warm"):
        out = subprocess.run([sys.executable, "-c", COMPILE_CHILD, str(path), str(repeats)], capture_output=True,
                             text=True, env=env)
        if out.returncode != 0:
            errors = [line for line in out.stderr.splitlines() if "Error" in line or "Exception" in line]
            result[label] = {"error": (errors[-1] if errors else f"exit {out.returncode}")[:300]}
            log(f"  compile {label}: failed")
            continue
        data = json.loads(out.stdout.strip().splitlines()[-1])
        data["exact_s"], data["compiled_s"] = med(data["exact_runs"]), med(data["compiled_runs"])
        data["speedup_vs_exact"] = data["exact_s"] / data["compiled_s"]
        result[label] = data
        log(f"  compile {label}: first call {data['first_call_s']:.1f} s, step {data['compiled_s']:.2f} s "
            f"vs exact {data['exact_s']:.2f} s")
    return result


# ----------------------------------------------------------------------------- SDXL


SDXL_CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    import difusi
    from difusi.models import load_model
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img
    path = sys.argv[1]
    s = time.perf_counter(); model = load_model(path); load_s = time.perf_counter() - s
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = GenerationParams(prompt="a photo of a cat", negative_prompt="blurry", seed=1, steps=2, cfg_scale=5.0,
                              sampler_name="Euler", scheduler="Karras", width=512, height=512)
    s = time.perf_counter(); result = txt2img(model, params); gen_s = time.perf_counter() - s
    print(json.dumps({"family": model.family, "load_s": load_s, "generate_2_steps_s": gen_s,
                      "peak_rss_after_load_mb": after_load,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "image_size": list(result.images[0].image.size),
                      "unet_params": sum(p.numel() for p in model.unet.parameters())}))
""")


def measure_sdxl(path: Path | None) -> dict:
    path = path or CACHE / "sdxl-random-fp16.safetensors"
    if not path.exists():
        log(f"writing random SDXL-architecture checkpoint to {path}")
        code = ("import difusi, sys, torch; from difusi.models.synthetic import write_random_ldm_file; "
                "write_random_ldm_file(sys.argv[1], size='sdxl')")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    page_cache(path)
    out = subprocess.run([sys.executable, "-c", SDXL_CHILD, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if out.returncode != 0:  # -9: killed, e.g. by the kernel's OOM killer
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-1500:]}"}
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["file_gb"] = path.stat().st_size / 1e9
    return data


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"# difusi CPU speed vs diffusers ({report['date']})", "",
             f"`{report['command']}` — {report['machine']}; torch {report['torch']}, diffusers {report['diffusers']}, "
             f"{report['threads']} threads. Same run, interleaved repeats, medians; only ratios compare across runs.", ""]
    if report.get("cpu_flags"):
        lines += [f"CPU vector flags: `{report['cpu_flags']}`.", ""]
    for note in report.get("notes", []):
        lines += [f"- {note}"]
    if report.get("notes"):
        lines.append("")
    peak = report.get("peak")
    if peak:
        lines += ["## Measured peak (this run)", "", "| kernel | ms | GFLOPS |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['seconds'] * 1e3:.1f} | {v['gflops']:.0f} |" for k, v in peak.items() if isinstance(v, dict)]
        lines += ["", f"Peak used for fractions: **{peak['peak_gflops']:.0f} GFLOPS** (best repeat of the best kernel).", ""]
    for key in ("unet_256", "unet_512"):
        unet = report.get(key)
        if not unet:
            continue
        lines += [f"## UNet CFG call at {unet['pixels']} px ({unet['latent']}x{unet['latent']} latents, batch 2, "
                  f"{unet['gflop_per_call']:.0f} GFLOP)", "",
                  "| variant | s/step | speed-up vs diffusers | GFLOPS | of peak | max abs diff |", "|---|---:|---:|---:|---:|---:|"]
        for name, v in unet["variants"].items():
            frac = f"{v['fraction_of_peak'] * 100:.0f} %" if v["fraction_of_peak"] else ""
            lines.append(f"| {name} | {v['seconds']:.2f} | {v['speedup']:.2f}x | {v['gflops']:.0f} | {frac} | {v['max_abs_diff']:.1e} |")
        lines.append("")
        if unet.get("floor_at_peak_s"):
            lines += [f"Float32 floor: {unet['gflop_per_call']:.0f} GFLOP at the measured peak take "
                      f"{unet['floor_at_peak_s']:.2f} s, so no float32 runtime can beat diffusers eager here by more "
                      f"than **{unet['max_speedup_at_peak']:.2f}x** (every kernel at the best large kernel's rate).", ""]
    vae = report.get("vae")
    if vae:
        lines += ["## VAE decode, 512 px", "", "| variant | s | speed-up | max abs diff |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['seconds']:.2f} | {v['speedup']:.2f}x | {v['max_abs_diff']:.1e} |" for k, v in vae.items()]
        lines.append("")
    e2e = report.get("e2e")
    if e2e:
        lines += [f"## One CFG image at {e2e['size']} px, {e2e['steps']} steps DPM++ 2M Karras (and scaled to 20 steps)", "",
                  "| pipeline | s/image | speed-up | scaled to 20 steps | speed-up at 20 steps | max abs diff (8-bit) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in e2e["cases"].items():
            scaled = (f"{v['scaled_20_steps']:.0f} | {v['scaled_speedup']:.2f}x" if "scaled_speedup" in v
                      else "(needs the unet section) | ")
            lines.append(f"| {name} | {v['seconds']:.1f} | {v['speedup_vs_diffusers']:.2f}x | {scaled} | "
                         f"{v['deviation_from_difusi_exact']['max_abs']:.0f} |")
        copies = e2e["cases"].get("difusi exact", {}).get("reordered_conv_copies")
        lines += ["", f"UNet convolutions holding a reordered weight on the exact path: {copies}." if copies is not None
                  else "", ""]
    for key, title in (("backend_images", "graph backends, random SD 1.5 architecture"),
                       ("modes", "random SD 1.5 architecture"), ("mini", "default model difusi-mini")):
        modes = report.get(key)
        if not modes:
            continue
        heading = "Whole images" if key == "backend_images" else "Fast modes"
        lines += [f"## {heading}, {title}: {modes['size']} px, {modes['steps']} steps DPM++ 2M Karras, CFG 7", "",
                  "| pipeline | s/image | speed-up vs diffusers | max abs diff | mean abs diff | PSNR dB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in modes["cases"].items():
            d = v["deviation_from_difusi_exact"]
            lines.append(f"| {name} | {v['seconds']:.2f} | {v['speedup_vs_diffusers']:.2f}x | {d['max_abs']:.0f} | "
                         f"{d['mean_abs']:.2f} | {d['psnr_db']:.1f} |")
        lines += ["", "Deviation: 8-bit pixels vs difusi's exact image of the same seed."]
        copies = modes["cases"].get("difusi exact", {}).get("reordered_conv_copies")
        lines += [f"UNet convolutions holding a reordered weight on the exact path: {copies}." if copies is not None
                  else "", ""]
    m512 = report.get("modes512")
    if m512:
        lines += ["## Fast modes at 512 px: UNet calls over one DeepCache cycle (3 calls), 20-step image estimated", "",
                  "| pipeline | s/UNet call | speed-up per call | est. s/image (20 steps + VAE) | speed-up per image |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['seconds_per_call']:.1f} | {v['call_speedup']:.2f}x | {v['image_20_steps_s']:.0f} | "
                  f"{v['image_speedup']:.2f}x |" for k, v in m512.items()]
        lines += ["", "NGMS is left out here: its saving depends on the sigma schedule (see the 256 px table).", ""]
    threads = report.get("threads_policy")
    if threads:
        base = threads.get("ACTIVE, 2 threads", next(iter(threads.values())))["seconds"]
        lines += ["## OpenMP wait policy and threads: fast-path UNet at 256 px, fresh processes alternating", "",
                  "| setting | s/step | speed-up vs ACTIVE (libgomp default) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['seconds']:.2f} | {base / v['seconds']:.2f}x |" for k, v in threads.items()]
        lines.append("")
    load = report.get("load")
    if load:
        lines += [f"## Checkpoint load ({load['file_gb']:.2f} GB fp16 safetensors, page-cached, fresh process)", "",
                  "| case | s | peak RSS MiB (imports alone) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['seconds']:.2f} | {v['peak_rss_mb']:.0f} ({v['imports_rss_mb']:.0f}) |"
                  for k, v in load.items() if isinstance(v, dict)]
        lines.append("")
    comp = report.get("compile")
    if comp:
        lines += ["## torch.compile (inductor) of the fast-path UNet, 256 px", "",
                  "| process | first call s | compiled s/step | fast path s/step | speed-up | max abs diff |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, v in comp.items():
            if "error" in v:
                lines.append(f"| {label} | failed: {v['error'][:80]} | | | | |")
            else:
                lines.append(f"| {label} | {v['first_call_s']:.1f} | {v['compiled_s']:.2f} | {v['exact_s']:.2f} | "
                             f"{v['speedup_vs_exact']:.2f}x | {v['max_abs_diff']:.1e} |")
        lines.append("")
    graph = report.get("backends")
    if graph:
        lines += ["## Graph backends (issue 18): conversion and cached load, SD 1.5 architecture", "",
                  "| backend | version | first-use conversion s (fresh process) | its peak RSS GiB | cache entry GB | "
                  "cached load s (fresh process) | that process's peak RSS GiB | LoRA switch s (tensors, max abs diff) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for backend, installed in graph["installed"].items():
            if not installed:
                lines.append(f"| {backend} | not installed | | | | | | |")
                continue
            v = graph[backend]
            conv = v["conversion"]
            load = next((r for r in v["cached_load"] if "load_s" in r), {})
            lines.append(f"| {backend} | {graph['versions'][backend].split('-')[0]} | {conv.get('wall_seconds', conv['seconds']):.0f} | "
                         f"{conv.get('process_peak_rss_mb', float('nan')) / 1024:.1f} | {v['cache_entry_gb']:.2f} | "
                         f"{v['cached_load_s']:.1f} | {load.get('peak_rss_mb', float('nan')) / 1024:.1f} | "
                         f"{v.get('lora_switch_s', float('nan')):.1f} ({v.get('lora_tensors', 0)}, "
                         f"{v.get('lora_max_abs_diff', float('nan')):.1e}) |")
        lines.append("")
    sdxl = report.get("sdxl")
    if sdxl:
        lines += ["## SDXL architecture (random weights), 512 px", ""]
        if "error" in sdxl:
            lines += [f"failed: `{sdxl['error'][-300:]}`", ""]
        else:
            lines += [f"{sdxl['file_gb']:.2f} GB fp16 file, {sdxl['unet_params'] / 1e9:.2f} B UNet parameters, run in float32: "
                      f"load {sdxl['load_s']:.1f} s, one 512x512 CFG image with 2 Euler steps {sdxl['generate_2_steps_s']:.1f} s, "
                      f"peak RSS {sdxl['peak_rss_mb'] / 1024:.1f} GiB (after load {sdxl['peak_rss_after_load_mb'] / 1024:.1f} GiB).", ""]
    lines += [f"Peak RSS of the bench process: {report['peak_rss_mb'] / 1024:.1f} GiB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="SD 1.5-architecture file (default: random, cached)")
    parser.add_argument("--sdxl-checkpoint", type=Path, default=None)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (1 at 512 px)")
    parser.add_argument("--e2e-steps", type=int, default=4)
    parser.add_argument("--backend-steps", type=int, default=6, help="steps of the 256 px backend images (default 6)")
    parser.add_argument("--modes-repeats", type=int, default=1, help="repeats of the 20-step 256 px images (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--merge", action="store_true", help="keep the other sections of an existing cpu-speed.json")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    r256, r512 = (2, 1) if args.quick else (3, 2)
    from diffusers import __version__ as diffusers_version

    report: dict = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "command": " ".join(["python bench/cpu_speed.py", *sys.argv[1:]]),
                    "machine": f"{CPU['model']}, {CPU['logical_cpus']} logical CPUs", "cpu_flags": CPU["simd_flags"], "torch": torch.__version__,
                    "diffusers": diffusers_version,
                    "threads": torch.get_num_threads(), "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge and (args.out / "cpu-speed.json").exists():
        kept = json.loads((args.out / "cpu-speed.json").read_text())
        note = f"{report['date']}: `{report['command']}` added {', '.join(sections)} to this run's report."
        report = {**kept, "sections": sorted(set(kept.get("sections", [])) | set(sections)),
                  "notes": [*kept.get("notes", []), note]}

    def save():
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (args.out / "cpu-speed.json").write_text(json.dumps(report, indent=2))
        (args.out / "cpu-speed.md").write_text(markdown(report))

    def section(key: str, fn) -> None:
        log(key)
        report[key] = fn()
        save()

    if "peak" in sections:
        section("peak", lambda: measure_peak(5))
    peak = report.get("peak", {}).get("peak_gflops")
    needs_sd15 = set(sections) & {"threads", "load", "backends", "unet", "vae", "e2e", "modes", "modes512", "compile"}
    checkpoint = ensure_sd15(args.checkpoint) if needs_sd15 else None
    if "threads" in sections:
        section("threads_policy", lambda: measure_threads(checkpoint, 2 if args.quick else 3))
    if "load" in sections:
        section("load", lambda: measure_load(checkpoint, 2 if args.quick else 3))
    model = None
    if set(sections) & {"backends", "unet", "vae", "e2e", "modes", "modes512"}:
        from difusi.models import load_model

        model = load_model(checkpoint)
        if set(sections) & {"e2e", "modes"}:
            diffusers_pipeline(model)  # now, while only the model is in memory (see diffusers_pipeline)
    graphs: dict = {}
    if "backends" in sections:
        log("backends")
        report["backends"], graphs = measure_backends(model, checkpoint)
        save()
    if "unet" in sections:
        section("unet_256", lambda: measure_unet(model, 32, r256, True, peak, graphs))
        section("unet_512", lambda: measure_unet(model, 64, r512, False, peak, graphs))
    if "vae" in sections:
        section("vae", lambda: measure_vae(model, r512))
    if "e2e" in sections:
        section("e2e", lambda: scaled_e2e(model, args.e2e_steps, report.get("unet_512", {}).get("variants", {}), graphs))
    if graphs:
        section("backend_images", lambda: measure_images(model, 256, args.backend_steps, {}, r256, graphs))
    if "modes" in sections:
        section("modes", lambda: measure_images(model, 256, 20, MODES, args.modes_repeats))
    if "modes512" in sections:
        section("modes512", lambda: measure_modes_512(model, report.get("vae", {}), r512))
    if model is not None:
        from difusi.models.loader import free_model

        free_model(model)
        model = None
    if "mini" in sections:
        section("mini", lambda: measure_mini(5))
    if "compile" in sections:
        section("compile", lambda: measure_compile(checkpoint, 3))
    if "sdxl" in sections:
        section("sdxl", lambda: measure_sdxl(args.sdxl_checkpoint))
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

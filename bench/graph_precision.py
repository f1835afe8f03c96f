# ruff: noqa: I001  (difusi is imported first on purpose)
"""Bench (issue 18 item 6): the opt-in `unet_precision` (bf16 / int8 OpenVINO UNet graph) vs the fp32 graph, torch
and diffusers eager. Writes bench/results/graph-precision.json (the .md is written by hand from it).

    flock /tmp/difusi-bench.lock python bench/graph_precision.py [--sections mini,adherence,sd15] [--prompts 24]

- `mini`: difusi-mini (the default model), 20-step native-size image (DPM++ 2M Karras, CFG 7): seconds per image,
  interleaved, torch fp32 / openvino fp32 / bf16 / int8; PSNR and max abs pixel difference vs the exact torch image
  over 8 prompts x seeds.
- `adherence`: `difusi.mini.evaluate.Evaluator.adherence` (CFG 7, DPM++ 2M Karras, 20 steps) per precision on
  `--prompts` prompts x `--seeds` seeds.
- `sd15`: the random SD 1.5-architecture checkpoint (.bench-cache, float32), 256 px, one UNet CFG call (batch 2):
  diffusers eager (`reference_modules(model).unet`, no_grad) vs the OpenVINO graph at fp32 / bf16 / int8,
  interleaved, 3 repeats; max abs / relative RMS deviation vs the fp32 graph.
"""

from __future__ import annotations

import difusi  # noqa: F401
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_line, rss_mb

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
VARIANTS = {"torch fp32": ("torch", "fp32"), "openvino fp32": ("openvino", "fp32"),
            "openvino bf16": ("openvino", "bf16"), "openvino int8": ("openvino", "int8")}


def log(*parts):  # to stderr: stdout ends with the report's JSON
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def mini_generator(model, backend, precision):
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    def generate(prompt, negative, seed, count, cfg, sampler, scheduler, steps):
        params = GenerationParams(prompt=prompt, negative_prompt=negative, seed=seed, batch_size=count, cfg_scale=cfg,
                                  sampler_name=sampler, scheduler=scheduler, steps=steps, backend=backend,
                                  unet_precision=precision)
        result = txt2img(model, params)
        if result.warnings:
            log("WARN", result.warnings)
        return [np.asarray(image.image.convert("RGB")) for image in result.images]

    return generate


def section_mini(models, repeats: int) -> dict:
    from difusi.mini.evaluate import prompt_set

    # one loaded model per variant: a model keeps one compiled graph, so sharing one would rebuild it on every switch
    gens = {name: mini_generator(models[name], *v) for name, v in VARIANTS.items()}
    args = (7.0, "DPM++ 2M", "Karras", 20)
    for gen in gens.values():  # warm-up (conversion / compression / compile), untimed
        gen("a red circle on a blue background", "", 0, 1, *args)
    times = {name: [] for name in gens}
    for repeat in range(repeats):
        for name, gen in gens.items():
            started = time.perf_counter()
            gen("a red circle on a blue background", "", repeat + 1, 1, *args)
            times[name].append(time.perf_counter() - started)
        log("mini repeat", repeat, {k: round(v[-1], 3) for k, v in times.items()})
    prompts = prompt_set(8, seed=7)
    dev = {name: {"psnr": [], "max": []} for name in gens}
    for i, spec in enumerate(prompts):
        images = {name: gen(spec.text, "", 500 + i, 1, *args)[0].astype(np.float64) for name, gen in gens.items()}
        for name in gens:
            dev[name]["psnr"].append(psnr(images[name], images["torch fp32"]))
            dev[name]["max"].append(float(np.abs(images[name] - images["torch fp32"]).max()))
    rows = {}
    for name in gens:
        s = statistics.median(times[name])
        finite = [p for p in dev[name]["psnr"] if np.isfinite(p)]
        rows[name] = {"seconds": s, "runs": times[name], "vs_torch": statistics.median(times["torch fp32"]) / s,
                      "vs_fp32_graph": statistics.median(times["openvino fp32"]) / s,
                      "psnr_min": min(dev[name]["psnr"]), "psnr_median": statistics.median(dev[name]["psnr"]),
                      "psnr_finite_count": len(finite), "max_abs_diff_255": max(dev[name]["max"])}
    return rows


def section_adherence(models, prompts: int, seeds: int) -> dict:
    from difusi.mini.evaluate import Evaluator, prompt_set

    out = {}
    specs = prompt_set(prompts)
    for name, (backend, precision) in VARIANTS.items():
        if name == "openvino fp32":
            continue  # equal to torch fp32 (exact)
        started = time.perf_counter()
        evaluator = Evaluator(mini_generator(models[name], backend, precision), specs, seeds)
        summary = evaluator.adherence(7.0, "DPM++ 2M", "Karras", 20)
        summary["seconds"] = time.perf_counter() - started
        out[name] = summary
        log("adherence", name, {k: v for k, v in summary.items() if k != "common_misses"})
    return out


def section_sd15(repeats: int) -> dict:
    from difusi.models import load_model
    from difusi.models.synthetic import reference_modules
    from difusi.speed import graph

    os.environ["DIFUSI_CACHE_DIR"] = str(CACHE / "graph-cache")
    model = load_model(CACHE / "sd15-random-fp16.safetensors")
    log("sd15 loaded, rss", rss_mb())
    facts = {}
    graphs = {}
    for precision in ("fp32", "bf16", "int8"):
        before, started = rss_mb(), time.perf_counter()
        graphs[precision] = graph.graph_unet(model, "openvino", precision)
        model.derived["graph_unet"] = None  # keep each compiled copy here, not on the model (one per model there)
        facts[precision] = {"make_and_load_s": time.perf_counter() - started, "rss_delta_mb": rss_mb() - before,
                            "entry_gb": sum(p.stat().st_size for p in graphs[precision].entry.folder.iterdir()) / 1e9}
        log("sd15 graph", precision, facts[precision])
    refs = reference_modules(model)
    eager = refs.unet
    del refs
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768)
    calls = {"diffusers eager": lambda: eager(x, t, encoder_hidden_states=context).sample,
             **{f"openvino {p}": (lambda g=g: g(x, t, encoder_hidden_states=context).sample) for p, g in graphs.items()}}
    outputs = {}
    with torch.no_grad():
        for name, fn in calls.items():
            outputs[name] = fn()
        times = {name: [] for name in calls}
        for repeat in range(repeats):
            for name, fn in calls.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
            log("sd15 repeat", repeat, {k: round(v[-1], 3) for k, v in times.items()})
    ref = outputs["diffusers eager"]
    base = statistics.median(times["diffusers eager"])
    fp32 = statistics.median(times["openvino fp32"])
    rows = {}
    for name in calls:
        s = statistics.median(times[name])
        d = outputs[name] - ref
        rows[name] = {"seconds": s, "runs": times[name], "vs_eager": base / s, "vs_fp32_graph": fp32 / s,
                      "max_abs_dev": float(d.abs().max()), "rel_rms_dev": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
                      "output_abs_max": float(ref.abs().max())}
    return {"calls": rows, "graphs": facts, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="mini,adherence,sd15")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/graph-precision.json")
    args = parser.parse_args()
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["threads"] = torch.get_num_threads()
    report["cpu"] = cpu_line()  # machines of this kind differ between sessions
    sections = args.sections.split(",")
    if "mini" in sections or "adherence" in sections:
        os.environ.setdefault("DIFUSI_CACHE_DIR", "/tmp/difusi-precision-cache")
        from difusi.models import default_model_path, load_model

        mini = {name: load_model(default_model_path()) for name in VARIANTS}
        if "mini" in sections:
            report["mini"] = section_mini(mini, max(args.repeats, 5))
            args.out.write_text(json.dumps(report, indent=1))
        if "adherence" in sections:
            report["adherence"] = {"prompts": args.prompts, "seeds": args.seeds,
                                   "results": section_adherence(mini, args.prompts, args.seeds)}
            args.out.write_text(json.dumps(report, indent=1))
    if "sd15" in sections:
        report["sd15_256"] = section_sd15(args.repeats)
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

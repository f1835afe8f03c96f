# ruff: noqa: I001  (difusi is imported first on purpose: see the import below)
"""Bench: what img2img and hires fix cost (issue 15's Bench), variants interleaved in one run, medians reported.

    python bench/img2img_speed.py [--quick] [--repeats 3] [--steps 10] [--hires-repeats 1] [--out bench/results]

Run it under `flock /tmp/difusi-bench.lock` so that two benches never share the machine. Sections:

1. **img2img at strength 0.5 vs txt2img**, same steps (DPM++ 2M Karras, CFG 7, seed 1, batch 1), on difusi-mini at
   its native 64 px and on the random SD 1.5-architecture fp16 checkpoint (`.bench-cache/sd15-random-fp16.safetensors`,
   shared with bench/cpu_speed.py; float32 modules as `load_model` makes them on a CPU) at 256 px. The init picture
   is the txt2img result. A1111's step rule runs `int(0.5 * n) + 1` of the n steps (6 of 10), plus one VAE encode,
   so the expected ratio is about 0.6 of the sampling time. Repeats alternate txt2img / img2img (ABBA), after one
   untimed warm-up of each.
2. **hires fix 2x** on the SD 1.5 architecture, 256 -> 512 px: difusi's `txt2img` with `enable_hr` (upscaler
   "Latent", `hr_second_pass_steps`, denoising 0.5) vs diffusers doing the same two passes with the same weights
   (`difusi.models.synthetic.reference_pipeline_for`): `StableDiffusionPipeline` at 256 px to latents, the latents
   upscaled 2x (bilinear, A1111's "Latent"), then `StableDiffusionImg2ImgPipeline` at strength 0.5 with twice the
   steps (so it runs the same number, as A1111's hires pass does), decoded at 512 px. DPM++ 2M Karras on both
   (`DPMSolverMultistepScheduler(use_karras_sigmas=True)`). Alternating, after one untimed warm-up of each.

`--quick`: difusi-mini only and a tiny SD1 checkpoint in place of SD 1.5 (checks that the bench works, ~1 min).
Writes `img2img.json` and `img2img.md` (`img2img-quick.*` for `--quick`) to `--out`.
"""

from __future__ import annotations

import difusi  # noqa: F401  (first: offline env and OpenMP wait policy, read when torch loads libgomp)
import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from machine import cpu_line, cpu_summary, log

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
BASE = {"sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.0, "seed": 1, "backend": "torch"}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternating(cases: dict, repeats: int) -> dict[str, list[float]]:
    """One untimed warm-up of each case, then `repeats` rounds, the order reversed every other round (ABBA)."""
    for fn in cases.values():
        fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(timed(cases[name]))
            log(f"  {name} repeat {repeat + 1}/{repeats}: {times[name][-1]:.3f} s")
    return times


def ensure_checkpoint(quick: bool, folder: Path) -> Path:
    """quick: a tiny SD1 checkpoint in `folder`; else the random SD 1.5 fp16 file of bench/cpu_speed.py."""
    if quick:
        from difusi.models.synthetic import write_tiny_checkpoint

        path = folder / "tiny-sd1.safetensors"
        write_tiny_checkpoint(path, family="sd1")
        return path
    path = CACHE / "sd15-random-fp16.safetensors"
    if not path.exists():
        from difusi.models.synthetic import write_random_ldm_file

        log(f"writing random SD 1.5-architecture checkpoint to {path}")
        write_random_ldm_file(path)
    return path


def measure_img2img(model, name: str, size: int, steps: int, repeats: int) -> dict:
    from difusi.params import GenerationParams
    from difusi.pipeline import img2img, txt2img

    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size,
                              denoising_strength=0.5, **BASE)
    init = txt2img(model, params).images[0].image
    cases = {"txt2img": lambda: txt2img(model, params), "img2img 0.5": lambda: img2img(model, params, [init])}
    times = alternating(cases, repeats)
    t2i, i2i = statistics.median(times["txt2img"]), statistics.median(times["img2img 0.5"])
    run_steps = int(min(0.5, 0.999) * steps) + 1  # A1111's step rule (difusi's img2img_steps, fix_steps off)
    return {"model": name, "size": size, "steps": steps, "img2img_steps": run_steps, "txt2img_s": t2i,
            "img2img_s": i2i, "ratio": i2i / t2i, "step_ratio": run_steps / steps, "runs": times}


def measure_hires(model, size: int, steps: int, hires_steps: int, repeats: int) -> dict:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    from difusi.models.synthetic import reference_pipeline_for
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size,
                              enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=hires_steps,
                              denoising_strength=0.5, **BASE)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            use_karras_sigmas=True, prediction_type=model.prediction_type)
    first = reference_pipeline_for(model, scheduler)
    second = StableDiffusionImg2ImgPipeline(**first.components)
    second.set_progress_bar_config(disable=True)

    def diffusers_hires():
        generator = torch.Generator("cpu").manual_seed(1)
        latents = first(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size,
                        width=size, generator=generator, output_type="latent").images
        upscaled = torch.nn.functional.interpolate(latents, scale_factor=2.0, mode="bilinear", antialias=False)
        # 4-channel input is taken as latents; strength 0.5 of 2n steps runs n, as A1111's hires pass.
        second(PROMPT, negative_prompt=NEGATIVE, image=upscaled, strength=0.5, num_inference_steps=2 * hires_steps,
               guidance_scale=7.0, generator=generator, output_type="pil")

    cases = {"diffusers 2 passes": diffusers_hires, "difusi hires fix": lambda: txt2img(model, params)}
    times = alternating(cases, repeats)
    ours, theirs = statistics.median(times["difusi hires fix"]), statistics.median(times["diffusers 2 passes"])
    return {"size": size, "hires_size": 2 * size, "steps": steps, "hires_steps": hires_steps, "difusi_s": ours,
            "diffusers_s": theirs, "ratio_difusi_over_diffusers": ours / theirs, "runs": times}


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    lines = [
        "# img2img and hires fix speed",
        "",
        f"- date: {report['date']}; torch {report['torch']}, {report['threads']} threads; backend `torch` "
        "(difusi's exact CPU path); DPM++ 2M Karras, CFG 7, batch 1.",
        f"- CPU: {cpu_summary(cpu)}",
        f"- command: `{report['command']}`" + (" (quick: tiny SD1 in place of SD 1.5)" if report["quick"] else ""),
        "- 1/5/15-minute load average at the start: " + ", ".join(f"{x:.1f}" for x in report["load_average_start"])
        + "; at the end: " + ", ".join(f"{x:.1f}" for x in report["load_average_end"])
        + " (other engineers' jobs share these cores: compare only numbers of the same run).",
        "",
        "## img2img at strength 0.5 vs txt2img, same steps",
        "",
        "| model | px | steps | img2img runs | txt2img s | img2img s | ratio img2img/txt2img | step ratio | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["img2img"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['steps']} | {r['img2img_steps']} | {r['txt2img_s']:.3f} | "
                     f"{r['img2img_s']:.3f} | {r['ratio']:.2f} | {r['step_ratio']:.2f} | {len(r['runs']['txt2img'])} |")
    if report.get("hires"):
        h = report["hires"]
        lines += [
            "",
            f"## Hires fix 2x, SD 1.5 architecture, {h['size']} -> {h['hires_size']} px, {h['steps']} + "
            f"{h['hires_steps']} steps",
            "",
            "| | seconds (median) | runs |",
            "|---|---|---|",
            f"| diffusers: txt2img {h['size']} px -> latents x2 (bilinear) -> img2img 0.5 at {h['hires_size']} px | "
            f"{h['diffusers_s']:.2f} | {', '.join(f'{x:.2f}' for x in h['runs']['diffusers 2 passes'])} |",
            f"| difusi txt2img, enable_hr, Latent, hr_second_pass_steps {h['hires_steps']} | {h['difusi_s']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in h['runs']['difusi hires fix'])} |",
            "",
            f"Ratio difusi / diffusers: {h['ratio_difusi_over_diffusers']:.2f}.",
        ]
    lines += ["", report.get("note", ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hires-steps", type=int, default=4, help="first-pass and hires-pass steps (default 4 + 4)")
    parser.add_argument("--hires-repeats", type=int, default=1)
    parser.add_argument("--no-hires", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from difusi.models.loader import default_model_path, load_model

    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": cpu_line(), "quick": args.quick,
              "command": "python bench/img2img_speed.py " + " ".join(os.sys.argv[1:]), "img2img": [],
              "load_average_start": os.getloadavg()}
    log("difusi-mini")
    mini = load_model(default_model_path())
    report["img2img"].append(measure_img2img(mini, "difusi-mini", mini.native_size, args.steps, args.repeats))
    del mini
    with tempfile.TemporaryDirectory() as folder:
        path = ensure_checkpoint(args.quick, Path(folder))
        log(f"loading {path.name}")
        model = load_model(path)
        name = "tiny SD1" if args.quick else "SD 1.5 arch (random)"
        size = 64 if args.quick else 256
        report["img2img"].append(measure_img2img(model, name, size, args.steps, args.repeats))
        if not args.no_hires:
            log("hires fix")
            report["hires"] = measure_hires(model, size, args.hires_steps, args.hires_steps, args.hires_repeats)
    report["load_average_end"] = os.getloadavg()
    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"img2img{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"img2img{suffix}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

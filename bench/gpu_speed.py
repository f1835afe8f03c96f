"""Bench on a CUDA GPU: difusi vs diffusers on the same random weights, torch.compile, peak memory per offload mode.

    python bench/gpu_speed.py [--quick] [--budget 300] [--out DIR] [--sections sd15,sdxl] [--kinds speed,memory,compile]
    python bench/gpu_speed.py --dry --out /tmp/x     # CPU, tiny model: exercises every code path, no numbers

Issue 17's bench: the SD 1.5 architecture at 512 px and the SDXL base architecture at 1024 px with random
weights (`difusi.models.synthetic.write_random_ldm_file`), 20 steps of Euler at CFG 7, batch 1 and 4, fp16:
- difusi vs diffusers' StableDiffusion(XL)Pipeline built from the very modules difusi loaded (same weights, same
  dtype, same attention: both call diffusers' UNet with PyTorch SDPA), in seconds per image (whole job: text
  encoding, sampling, VAE decode) and sampler it/s (between the first and the last step callback; both
  pipelines synchronise CUDA in their step callback, so both pay the same);
- difusi with `difusi.speed.compile.compile_unet` (first job = warm-up, reported separately; targets: >= diffusers
  eager, >= 1.3x with compile);
- peak CUDA memory of one batch-1 job (`--memory-steps`, default 5: the peak is reached in the first step) per
  offload mode (`none`, `model`, `sequential`): `max_memory_allocated` during the job, minus what was allocated
  before the model was loaded, so it counts the weights a mode keeps on the card plus the job's activations.

Random weights make no picture but cost exactly what real weights cost. Results go to `OUT/gpu-bench.json`
after every measurement (a killed run keeps what it measured) and `OUT/gpu-bench.md` (the table for
docs/bench/gpu.md). `--budget` seconds: a section that would not fit in what is left is skipped and
reported as skipped, so tools/gpu-check.sh ends in time; `--quick` runs one repeat, batch 1 only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import difusi  # noqa: F401  (offline env before Hugging Face imports)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIB = 2**20
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Arch:
    """One architecture to bench: its random-weights size, image size and rough costs for the time budget."""

    name: str
    size: str  # write_random_ldm_file size
    pixels: int
    setup_s: float  # rough seconds to write + load the random file, for the budget check
    compile_s: float  # rough seconds for torch.compile's warm-up


ARCHES = {
    # compile_s: difusi compiles with mode "max-autotune-no-cudagraphs", which tunes every matmul and convolution.
    "sd15": Arch("sd15", "sd15", 512, 40.0, 120.0),
    "sdxl": Arch("sdxl", "sdxl", 1024, 100.0, 200.0),
}
DRY_ARCH = Arch("tiny", "tiny", 64, 5.0, 30.0)


class Bench:
    """Options, the results dict and the time budget of one bench run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()
        self.device = "cpu" if args.dry else "cuda"
        self.precision = "fp32" if args.dry else args.precision
        self.steps = 2 if args.dry else args.steps
        self.batches = (1, 2) if args.dry else ((1,) if args.quick else (1, 4))
        self.repeats = 1 if (args.dry or args.quick) else args.repeats
        # Peak memory needs one step; a few give the offload modes' per-step time too (sequential is slow).
        self.memory_steps = self.steps if args.dry else args.memory_steps
        self.kinds = set(args.kinds.split(","))
        self.cuda = self.device == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"about": about(self), "runs": [], "skipped": [], "errors": []}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def fits(self, what: str, needs: float) -> bool:
        """Whether `needs` seconds are left; if not, the item is recorded as skipped (never silently dropped)."""
        if self.left() >= needs:
            return True
        self.results["skipped"].append(f"{what}: time budget ({self.left():.0f} s left, needs ~{needs:.0f} s)")
        print(f"skip {what}: {self.left():.0f} s left of the budget, needs ~{needs:.0f} s", flush=True)
        self.save()
        return False

    def add(self, run: dict[str, Any]) -> None:
        self.results["runs"].append(run)
        print(json.dumps(run), flush=True)
        self.save()

    def error(self, what: str, error: BaseException) -> None:
        line = f"{what}: {type(error).__name__}: {error}"
        self.results["errors"].append(line)
        print(f"error {line}\n{traceback.format_exc()}", flush=True)
        self.save()

    def save(self) -> None:
        self.results["wall_s"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu-bench.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "gpu-bench.md").write_text(table(self.results))


def about(bench: Bench) -> dict[str, Any]:
    import diffusers

    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "device": bench.device, "precision": bench.precision,
        "steps": bench.steps, "batches": list(bench.batches), "repeats": bench.repeats, "dry": bench.args.dry,
        "sampler": "Euler", "cfg_scale": 7.0, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if bench.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())
    return info


# ----------------------------------------------------------------------------- difusi API (being built)


def load(path: Path, device: str, precision: str, offload: str = "none") -> Any:
    """`difusi.models.load_model` with a device, a precision and an offload mode."""
    from difusi.models import load_model

    return load_model(path, device=device, precision=precision, offload=offload)


def free(*objects: Any) -> None:
    """Release models and pipelines now, so the next section's memory numbers start from an empty card."""
    from difusi.models.loader import free_model

    for item in objects:
        if hasattr(item, "unet") and hasattr(item, "text_encoders"):
            free_model(item)
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compile_state(model: Any) -> Any:
    """difusi's compile wrapper on the UNet (warm-up seconds, fallback state), if the API has one."""
    try:
        from difusi.speed.compile import compile_state as state
    except ImportError:
        return None
    return state(model)


def compile_model(model: Any) -> None:
    """`difusi.speed.compile.compile_unet(model)`: compiles in place, or returns the compiled UNet."""
    try:
        from difusi.speed.compile import compile_unet
    except ImportError as error:
        raise NotImplementedError("not implemented yet: difusi.speed.compile.compile_unet") from error
    compiled = compile_unet(model)
    if isinstance(compiled, torch.nn.Module):
        model.unet = compiled


# ----------------------------------------------------------------------------- the two pipelines


def difusi_job(model: Any, arch: Arch, batch: int, steps: int) -> Callable[[], dict[str, float]]:
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, sampler_name="Euler", steps=steps,
                              cfg_scale=7.0, width=arch.pixels, height=arch.pixels, batch_size=batch)

    def run() -> dict[str, float]:
        marks: list[float] = []

        def step(_: Any) -> None:
            sync()
            marks.append(time.perf_counter())

        sync()
        started = time.perf_counter()
        txt2img(model, params, progress=step)
        sync()
        return timing(started, marks, batch)

    return run


def diffusers_pipeline(model: Any) -> Any:
    """diffusers' pipeline on difusi's own modules: identical weights and dtype, no second copy on the card."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type=model.prediction_type,
                                       steps_offset=1)
    from difusi.models.synthetic import reference_pipeline_for

    # diffusers' own classes with the same weights; no fp32 upcast of the VAE inside diffusers: difusi decodes in
    # the loaded precision (with its NaN fallback), so both decode alike.
    pipe = reference_pipeline_for(model, scheduler)
    pipe.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_job(pipe: Any, arch: Arch, batch: int, steps: int) -> Callable[[], dict[str, float]]:
    extra: dict[str, Any] = {}
    if "text_encoder_2" in pipe.components:
        extra = {"original_size": (arch.pixels, arch.pixels), "target_size": (arch.pixels, arch.pixels)}

    def run() -> dict[str, float]:
        marks: list[float] = []

        def step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            sync()
            marks.append(time.perf_counter())
            return kwargs

        generator = torch.Generator("cpu").manual_seed(1)
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, negative_prompt=NEGATIVE, height=arch.pixels, width=arch.pixels, num_inference_steps=steps,
                 guidance_scale=7.0, num_images_per_prompt=batch, generator=generator, output_type="pil",
                 callback_on_step_end=step, **extra)
        sync()
        return timing(started, marks, batch)

    return run


def timing(started: float, marks: list[float], batch: int) -> dict[str, float]:
    total = time.perf_counter() - started
    its = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 and marks[-1] > marks[0] else float("nan")
    return {"s": total, "s_per_image": total / batch, "it_s": its}


def measure(bench: Bench, what: dict[str, Any], jobs: dict[str, Callable[[], dict[str, float]]]) -> None:
    """Warm each job once (lazy CUDA init, cuDNN autotune), then time `repeats` interleaved rounds; medians."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()
    for _ in range(bench.repeats):
        for name, job in jobs.items():
            samples[name].append(job())
    for name, runs in samples.items():
        row = {**what, "pipeline": name,
               "s_per_image": round(statistics.median(r["s_per_image"] for r in runs), 4),
               "it_s": round(statistics.median(r["it_s"] for r in runs), 3),
               "repeats": len(runs)}
        bench.add(row)


# ----------------------------------------------------------------------------- sections


def checkpoint(bench: Bench, arch: Arch) -> Path:
    """The random-weights file for `arch`, written once per cache folder (fp16 on the GPU, fp32 in the dry run)."""
    from difusi.models.synthetic import write_random_ldm_file

    dtype = DTYPES["fp32" if bench.args.dry else "fp16"]
    path = Path(bench.args.cache) / f"random-{arch.size}-{str(dtype).removeprefix('torch.')}.safetensors"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        write_random_ldm_file(partial, size=arch.size, dtype=dtype)
        partial.rename(path)
        bench.results.setdefault("setup", {})[f"{arch.name}_write_s"] = round(time.perf_counter() - started, 1)
    return path


def speed_section(bench: Bench, arch: Arch, path: Path) -> None:
    """difusi vs diffusers, eager, per batch size, on one loaded model."""
    free()
    before = torch.cuda.memory_allocated() if bench.cuda else 0
    started = time.perf_counter()
    model = load(path, bench.device, bench.precision)
    bench.results.setdefault("setup", {})[f"{arch.name}_load_s"] = round(time.perf_counter() - started, 1)
    pipe = None
    if not bench.args.no_diffusers:
        pipe = diffusers_pipeline(model)
    try:
        for batch in bench.batches:
            what = {"arch": arch.name, "px": arch.pixels, "batch": batch, "steps": bench.steps, "mode": "eager"}
            jobs = {"difusi": difusi_job(model, arch, batch, bench.steps)}
            if pipe is not None:
                jobs["diffusers"] = diffusers_job(pipe, arch, batch, bench.steps)
            measure(bench, what, jobs)
        if "memory" in bench.kinds:
            memory_row(bench, arch, model, "none", loaded_from=before)
    finally:
        del pipe
        free(model)


def compile_section(bench: Bench, arch: Arch, path: Path) -> None:
    """difusi with compile_unet: warm-up (compilation) time, then timed jobs, and the image vs eager."""
    import numpy as np

    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    model = load(path, bench.device, bench.precision)
    try:
        params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, sampler_name="Euler",
                                  steps=bench.steps, cfg_scale=7.0, width=arch.pixels, height=arch.pixels)
        eager = np.asarray(txt2img(model, params).images[0].image, dtype=np.int16)
        compile_model(model)
        for batch in bench.batches:
            job = difusi_job(model, arch, batch, bench.steps)
            started = time.perf_counter()
            job()  # compiles for this shape
            warmup = time.perf_counter() - started
            runs = [job() for _ in range(bench.repeats)]
            row = {"arch": arch.name, "px": arch.pixels, "batch": batch, "steps": bench.steps, "mode": "compile",
                   "pipeline": "difusi", "warmup_s": round(warmup, 1),
                   "s_per_image": round(statistics.median(r["s_per_image"] for r in runs), 4),
                   "it_s": round(statistics.median(r["it_s"] for r in runs), 3), "repeats": len(runs)}
            state = compile_state(model)
            row["compiled"] = bool(getattr(model, "compiled", state is not None))  # False: it fell back to eager
            if state is not None and state.warmup_seconds is not None:
                row["first_unet_call_s"] = round(state.warmup_seconds, 1)
            if batch == 1:
                compiled = np.asarray(txt2img(model, params).images[0].image, dtype=np.int16)
                row["max_pixel_diff_vs_eager"] = int(np.abs(compiled - eager).max())
            bench.add(row)
            if not bench.fits(f"{arch.name} compile batch>{batch}", arch.compile_s / 2):
                break
    finally:
        free(model)
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # drop the compiled graphs with the model


def memory_row(bench: Bench, arch: Arch, model: Any, mode: str, loaded_from: int) -> None:
    """One batch-1 job of `--memory-steps` steps: peak allocated CUDA memory during it, counted from what was
    allocated before the model was loaded (so the weights a mode keeps on the card are included)."""
    resident = torch.cuda.memory_allocated() - loaded_from if bench.cuda else 0
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak restarts at what is allocated now: the resident weights
    result = difusi_job(model, arch, 1, bench.memory_steps)()
    row: dict[str, Any] = {"arch": arch.name, "px": arch.pixels, "batch": 1, "steps": bench.memory_steps,
                           "mode": f"offload={mode}", "pipeline": "difusi",
                           "s_per_image": round(result["s_per_image"], 4), "it_s": round(result["it_s"], 3)}
    if bench.cuda:
        row.update(resident_after_load_mib=round(resident / MIB),
                   peak_allocated_mib=round((torch.cuda.max_memory_allocated() - loaded_from) / MIB),
                   peak_reserved_mib=round(torch.cuda.max_memory_reserved() / MIB))
    bench.add(row)


def memory_section(bench: Bench, arch: Arch, path: Path) -> None:
    """The offload modes other than `none` (measured on the speed section's model), one fresh load each."""
    from difusi.devices import OFFLOAD_MODES

    for mode in OFFLOAD_MODES:
        if mode == "none" and "speed" in bench.kinds:
            continue
        if not bench.fits(f"{arch.name} offload {mode}", arch.setup_s / 3 + (30 if mode == "sequential" else 10)):
            return
        free()
        before = torch.cuda.memory_allocated() if bench.cuda else 0
        try:
            model = load(path, bench.device, bench.precision, mode)
        except NotImplementedError as error:
            bench.error(f"{arch.name} offload {mode}", error)
            continue
        try:
            memory_row(bench, arch, model, mode, loaded_from=before)
        finally:
            free(model)


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    """The results as markdown: one row per measurement, speed-ups vs diffusers eager of the same shape."""
    about = results.get("about", {})
    lines = [f"GPU: {about.get('gpu', about.get('device'))}; torch {about.get('torch')}, CUDA {about.get('cuda')}, "
             f"diffusers {about.get('diffusers')}; {about.get('precision')}, {about.get('steps')} steps of Euler, "
             f"CFG 7; median of {about.get('repeats')}; {about.get('date_utc')} UTC"
             + (" — DRY RUN on the CPU, not a measurement" if about.get("dry") else ""),
             "",
             "| arch | px | batch | mode | pipeline | s/image | it/s | vs diffusers | warm-up s | peak MiB |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    base = {(r["arch"], r["batch"]): r["s_per_image"] for r in results.get("runs", [])
            if r.get("pipeline") == "diffusers" and r.get("mode") == "eager"}
    for r in results.get("runs", []):
        reference = base.get((r["arch"], r["batch"]))
        ratio = f"{reference / r['s_per_image']:.2f}x" if reference and r.get("steps") == about.get("steps") else ""
        mode = r["mode"] + (" (fell back to eager)" if r.get("compiled") is False else "")
        lines.append(f"| {r['arch']} | {r['px']} | {r['batch']} | {mode} | {r['pipeline']} | "
                     f"{r['s_per_image']:.3f} | {r['it_s']:.2f} | {ratio} | {r.get('warmup_s', '')} | "
                     f"{r.get('peak_allocated_mib', '')} |")
    for key, label in (("skipped", "Skipped"), ("errors", "Errors")):
        if results.get(key):
            lines += ["", f"{label}:", *[f"- {item}" for item in results[key]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, batch 1 only")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model, 2 steps: code paths only")
    parser.add_argument("--sections", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-steps", type=int, default=5, help="steps of the one job per offload mode")
    parser.add_argument("--kinds", default="speed,memory,compile", help="comma list of speed, memory, compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--budget", type=float, default=float(os.environ.get("DIFUSI_GPU_BENCH_BUDGET", 300)),
                        help="seconds; sections that would not fit are skipped")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--cache", default="/tmp/difusi-gpu-bench", help="folder for the random-weights files")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("bench/gpu_speed.py: no CUDA device (use --dry to exercise it on the CPU)", file=sys.stderr)
        return 2
    bench = Bench(args)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    arches = [DRY_ARCH] if args.dry else [ARCHES[name] for name in args.sections.split(",") if name]
    # Order: eager speed and memory for every architecture first (the main numbers), compile last (the
    # slowest to warm up and the likeliest to hang), so a short budget loses the least.
    plan: list[tuple[str, Arch, Callable[[Bench, Arch, Path], None], float]] = []
    for arch in arches:
        plan.append(("speed", arch, speed_section, arch.setup_s + 20))
        plan.append(("memory", arch, memory_section, arch.setup_s / 3 + 10))
    plan += [("compile", arch, compile_section, arch.compile_s) for arch in arches]
    if args.no_compile:
        bench.kinds.discard("compile")
    plan = [item for item in plan if item[0] in bench.kinds]
    for kind, arch, section, needs in plan:
        if not bench.fits(f"{arch.name} {kind}", needs):
            continue
        # Saved before the section starts: if the phase's timeout kills the bench mid-section (a long compile),
        # the JSON still says which section was cut off.
        bench.results["in_progress"] = f"{arch.name} {kind} (started at {time.perf_counter() - bench.started:.0f} s)"
        bench.save()
        try:
            section(bench, arch, checkpoint(bench, arch))
        except Exception as error:  # one broken section must not lose the others' numbers
            bench.error(f"{arch.name} {kind}", error)
            free()
        bench.results.pop("in_progress")
    bench.save()
    print(table(bench.results), flush=True)
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

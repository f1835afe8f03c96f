"""Bench (issue "The first image must be fast"): process start -> PNG on disk, split by phase; checkpoint load cost.

    python bench/startup.py [--quick] [--repeats N] [--sdxl] [--sections startup,load,imports] [--out docs/bench]

Every measured case runs in a fresh subprocess, cases interleaved repeat by repeat, medians reported (this host is
shared and drifts: only numbers from the same run are compared). Sections:

- `startup`: the floor `python -c "import torch"`; `difusi generate` end to end (the console script, PNG written
  through the output store as the CLI always does); the same job driven step by step through difusi's public pieces
  (`load_model`, `txt2img`, `OutputStore.save`) with each phase timed inside the child; and a minimal diffusers
  script doing the same job (`StableDiffusionPipeline.from_pretrained` of a diffusers folder converted once from the
  same checkpoint and stored in the file's precision; float32 run; DPM++ 2M Karras =
  `DPMSolverMultistepScheduler(use_karras_sigmas=True)`; `image.save`), timed the same way. Models: difusi-mini at its native 64 px, 20 steps, CFG 7; and a random SD 1.5-architecture fp16
  checkpoint at 256 px, 6 steps, CFG 7 (not in `--quick`). A warm-up round (page cache, hash cache) precedes.
  "interpreter" is the time from the parent's spawn to the child's first line, "exit" from the child's last line to
  the parent seeing it exit (interpreter teardown); the other phases are `time.perf_counter()` inside the child.
- `load`: `difusi.models.load_model(path)` (float32 on the CPU) and at the file's own dtype, vs
  `safetensors.torch.load_file(path)` + a copy of every tensor (`.clone()`, or `.float()` for the cast case), for fp16
  and fp32 SD 1.5-size files (`--sdxl`: also an fp16 SDXL-size file, ~6.9 GB; fp32 SDXL is not run: its
  load_file + clone needs ~28 GB). The page cache is warm (the child reads the file once first) and every library is
  imported and warmed by a tiny load before timing. Peak RSS from /proc/self/status VmHWM, reported above the
  child's RSS just before the load and divided by the loaded weights' size.
- `imports`: `python -X importtime` of `import difusi.pipeline` and of a whole `difusi generate`: which heavy
  packages load, their cumulative import time and who imports them.

Checkpoints are cached under `.bench-cache/` (SD 1.5 fp16 + fp32: 6.4 GB, written once, ~1 min). Writes
`startup.json` and `startup.md` to `--out`. Runtime: `--quick` about a minute (difusi-mini only, one tiny load, no warm-up round); full ~10-15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

from machine import cpu_line

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
SECTIONS = ["startup", "load", "imports"]
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
PHASES = ["interpreter", "imports", "load", "prepare", "encode", "sampling", "decode", "save", "other", "exit"]
HEAVY = ["torch", "numpy", "diffusers", "transformers", "peft", "accelerate", "scipy", "scipy.stats", "safetensors",
         "tokenizers", "huggingface_hub", "requests", "jinja2", "PIL", "sqlite3", "fastapi", "uvicorn", "starlette",
         "pydantic", "matplotlib", "pandas", "sklearn", "ray"]

# ----------------------------------------------------------------------------- child scripts

_PRELUDE = """
import time
T0, T0_WALL = time.perf_counter(), time.time()
import json, os, sys
marks = {}
def mark(name):
    marks[name] = time.perf_counter() - T0
def report(**extra):
    mark("end")
    print("BENCH-JSON " + json.dumps({"start_wall": T0_WALL, "end_wall": time.time(), "marks": marks, **extra}),
          flush=True)
"""

DIFUSI_CHILD = _PRELUDE + textwrap.dedent("""
    path, size, steps, cfg, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    import difusi  # first, as the CLI: offline environment and OpenMP wait policy before torch loads
    import torch
    import difusi.pipeline as pipeline
    from difusi.models import load_model
    from difusi.networks.job import check_job, library_for
    from difusi.params import GenerationParams
    from difusi.store import OutputStore
    mark("imports")
    model = load_model(path)
    mark("load")

    def timed(name, fn):  # wraps a pipeline-internal step for timing only; a missing name just loses that split
        def run(*args, **kwargs):
            mark(name + "_start")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name + "_end")
        return run

    for attr, name in (("_encode", "encode"), ("decode_latents", "decode")):
        if hasattr(pipeline, attr):
            setattr(pipeline, attr, timed(name, getattr(pipeline, attr)))
    params, _ = GenerationParams.from_mapping({"prompt": sys.argv[6], "steps": steps, "cfg_scale": cfg, "seed": 1,
                                               "width": size, "height": size})
    networks = library_for(None)
    check_job(params, networks)
    saved = []
    with OutputStore(out_dir) as store:
        def on_image(generated):
            mark("save_start")
            saved.append(str(store.save(generated)))
            mark("save_end")
        mark("txt2img_start")
        pipeline.txt2img(model, params, on_image=on_image, networks=networks,
                         progress=lambda p: marks.setdefault("first_step", time.perf_counter() - T0))
    report(png=saved[0], torch=torch.__version__)
""")

DIFFUSERS_CHILD = _PRELUDE + textwrap.dedent("""
    folder, size, steps, cfg, png = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    mark("imports")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    mark("load")

    def timed(name, fn):
        def run(*args, **kwargs):
            mark(name + "_start")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name + "_end")
        return run

    pipe.encode_prompt = timed("encode", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)

    def on_step(pipeline, step, timestep, kwargs):
        marks.setdefault("first_step", time.perf_counter() - T0)
        return kwargs

    mark("txt2img_start")
    with torch.inference_mode():
        image = pipe(sys.argv[6], negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, height=size,
                     width=size, generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step).images[0]
    mark("save_start")
    image.save(png)
    mark("save_end")
    report(png=png)
""")

LOAD_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import difusi, torch
    from safetensors.torch import load_file
    from difusi.models import load_model
    case, path, warm = sys.argv[1], sys.argv[2], sys.argv[3]
    load_model(warm)  # imports and one-time setup (diffusers / transformers classes) are not part of a load
    {k: v.clone() for k, v in load_file(warm).items()}
    with open(path, "rb") as handle:  # page cache warm
        while handle.read(1 << 24):
            pass

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def weights(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    before, usage0 = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if case == "load_file_clone":
        state = {k: v.clone() for k, v in load_file(path).items()}
        size = weights(state.values())
    elif case == "load_file_float":
        state = {k: v.float() if v.is_floating_point() else v.clone() for k, v in load_file(path).items()}
        size = weights(state.values())
    else:
        model = load_model(path, dtype=torch.float16 if case == "difusi_fp16" else None)
        modules = [model.unet, model.vae] + [getattr(e, "model", e) for e in model.text_encoders]
        size = sum(weights(m.state_dict().values()) for m in modules)
    seconds = time.perf_counter() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    print("BENCH-JSON " + json.dumps({"seconds": seconds, "cpu": cpu, "rss_before": before, "peak": status("VmHWM"),
                                      "weights": size}))
""")

CONVERT_CHILD = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import difusi, torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from difusi.models import convert
    from difusi.models.detect import detect
    from difusi.models.files import CheckpointFile
    from difusi.models.sidecar import read_sidecar
    from difusi.models.text_encoders import reference_tokenizer
    source, folder = Path(sys.argv[1]), Path(sys.argv[2])
    reader = CheckpointFile(source)
    sidecar = read_sidecar(source)
    spec = detect(reader.shapes, sidecar)
    state = {k: reader.tensor(k) for k in reader.keys()}
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = torch.float16 if stored == {torch.float16} else torch.float32  # the folder keeps the file's precision
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    unet_sd, vae_sd, text_sds = convert.split_ldm_checkpoint(state, spec.family, spec.unet_config, spec.vae_config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet = UNet2DConditionModel.from_config(dict(spec.unet_config))
    unet.load_state_dict(unet_sd)
    unet.to(dtype).save_pretrained(tmp / "unet")
    vae_config = dict(spec.vae_config)
    if "scaling_factor" in sidecar:
        vae_config["scaling_factor"] = sidecar["scaling_factor"]
    vae = AutoencoderKL.from_config(vae_config)
    vae.load_state_dict(vae_sd)
    vae.to(dtype).save_pretrained(tmp / "vae")
    text = CLIPTextModel(CLIPTextConfig(**spec.text_encoders[0].config))
    wanted = set(text.state_dict())
    fitted = {}
    for key, value in text_sds[0].items():
        bare = key.removeprefix("text_model.")
        for name in ("text_model." + bare, bare):
            if name in wanted:
                fitted[name] = value
    text.load_state_dict(fitted, strict=False)
    text.to(dtype).save_pretrained(tmp / "text_encoder")
    reference_tokenizer().save_pretrained(tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1, "skip_prk_steps": True,
        "set_alpha_to_one": False}))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    tmp.rename(folder)
""")


# ----------------------------------------------------------------------------- helpers


def log(*parts) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}]", *parts, flush=True)


def run_child(argv: list[str], timeout: float = 1800) -> tuple[float, dict | None, float, float]:
    """(wall seconds, the child's BENCH-JSON record or None, spawn wall time, exit wall time)."""
    spawn = time.time()
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - started
    done = time.time()
    if out.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    record = None
    for line in out.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            record = json.loads(line.removeprefix("BENCH-JSON "))
    return wall, record, spawn, done


def phases_of(record: dict, spawn: float, done: float) -> dict[str, float]:
    """Phase seconds from a child's marks (perf_counter offsets from its first line)."""
    m = record["marks"]
    out = {"interpreter": record["start_wall"] - spawn, "imports": m["imports"], "load": m["load"] - m["imports"]}
    start = m.get("txt2img_start", m["load"])
    encode = (m.get("encode_start"), m.get("encode_end"))
    decode = (m.get("decode_start"), m.get("decode_end"))
    if encode[0] is not None:
        out["prepare"] = encode[0] - start
        out["encode"] = encode[1] - encode[0]
    if decode[0] is not None and encode[1] is not None:
        out["sampling"] = decode[0] - encode[1]
        out["decode"] = (m["save_start"] - decode[0])
    out["save"] = m["save_end"] - m["save_start"]
    out["other"] = m["end"] - m["load"] - sum(out.get(k, 0.0) for k in ("prepare", "encode", "sampling", "decode",
                                                                           "save"))
    out["exit"] = done - record["end_wall"]
    out["total"] = done - spawn
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("difusi")
    return [str(script)] if script.exists() else [sys.executable, "-m", "difusi"]


def ensure_file(path: Path, code: str) -> Path:
    if not path.exists():
        log(f"writing {path.name} (once; cached in {CACHE})")
        tmp = path.with_name(path.name + ".tmp")
        subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT)
        tmp.rename(path)
    return path


def sd15_file(dtype: str) -> Path:
    return ensure_file(CACHE / f"startup-sd15-{dtype}.safetensors",
                       "import sys, difusi, torch; from difusi.models.synthetic import write_random_ldm_file; "
                       f"write_random_ldm_file(sys.argv[1], 'sd15', torch.float{dtype[2:]})")


def sdxl_file() -> Path:
    return ensure_file(CACHE / "startup-sdxl-fp16.safetensors",
                       "import sys, difusi, torch; from difusi.models.synthetic import write_random_ldm_file; "
                       "write_random_ldm_file(sys.argv[1], 'sdxl', torch.float16)")


def tiny_file(dtype: str = "fp32") -> Path:
    return ensure_file(CACHE / f"startup-tiny-sd1-{dtype}.safetensors",
                       "import sys, difusi, torch; from difusi.models.synthetic import write_tiny_checkpoint; "
                       f"write_tiny_checkpoint(sys.argv[1], 'sd1', dtype=torch.float{dtype[2:]})")


def diffusers_folder(source: Path, name: str) -> Path:
    folder = CACHE / f"startup-{name}-diffusers"
    stamp = folder / "source.json"
    identity = {"path": str(source), "size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns,
                "layout": 2}  # 2: components stored in the file's own precision
    if folder.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != identity):
        shutil.rmtree(folder)
    if not folder.exists():
        log(f"converting {source.name} to a diffusers folder (once)")
        subprocess.run([sys.executable, "-c", CONVERT_CHILD, str(source), str(folder)], check=True, cwd=ROOT)
        stamp.write_text(json.dumps(identity))
    return folder


def machine() -> dict:
    info: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    cpu = cpu_line()
    info["cpu"], info["flags"] = cpu["model"], cpu["flags"]
    info["torch"] = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    info["loadavg"] = os.getloadavg()
    return info


# ----------------------------------------------------------------------------- sections


def measure_startup(quick: bool, repeats: int, work: Path) -> dict:
    mini = Path(subprocess.run([sys.executable, "-c", "import difusi.models as m; print(m.default_model_path())"],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip())
    jobs = {"difusi-mini": (mini, 64, 20)}
    if not quick:  # --quick: difusi-mini only (the SD 1.5 job needs the 2 GB file)
        jobs["SD 1.5 fp16 (random)"] = (sd15_file("fp16"), 256, 6)
    folders = {name: diffusers_folder(path, re.sub(r"\W+", "-", name).strip("-").lower())
               for name, (path, _, _) in jobs.items()}
    cfg = 7.0
    cases: dict[str, list[str]] = {"floor: python -c 'import torch'": [sys.executable, "-c", "import torch"]}
    for name, (path, size, steps) in jobs.items():
        cases[f"{name}: difusi generate (CLI)"] = [
            *cli_command(), "generate", PROMPT, "--model", str(path), "--steps", str(steps), "--cfg-scale", str(cfg),
            "--seed", "1", "--width", str(size), "--height", str(size), "--outputs-dir", "{out}"]
        cases[f"{name}: difusi by phase"] = [sys.executable, "-c", DIFUSI_CHILD, str(path), str(size), str(steps),
                                             str(cfg), "{out}", PROMPT]
        cases[f"{name}: diffusers script"] = [sys.executable, "-c", DIFFUSERS_CHILD, str(folders[name]), str(size),
                                              str(steps), str(cfg), "{out}/diffusers.png", PROMPT]
    results: dict[str, dict] = {name: {"wall": [], "phases": []} for name in cases}
    for argv in [] if quick else cases.values():  # warm-up round: page cache, hash cache, .pyc files
        out = Path(tempfile.mkdtemp(dir=work))
        run_child([a.replace("{out}", str(out)) for a in argv])
    for repeat in range(repeats):
        for name, argv in cases.items():
            out = Path(tempfile.mkdtemp(dir=work))
            wall, record, spawn, done = run_child([a.replace("{out}", str(out)) for a in argv])
            pngs = list(out.rglob("*.png"))
            if "floor" not in name and not pngs:
                raise RuntimeError(f"{name}: no PNG written in {out}")
            results[name]["wall"].append(wall)
            if record is not None:
                results[name]["phases"].append(phases_of(record, spawn, done))
            log(f"startup {repeat + 1}/{repeats} {name}: {wall:.2f} s")
    summary = {}
    for name, r in results.items():
        entry = {"wall": median(r["wall"]), "wall_min": min(r["wall"]), "runs": r["wall"]}
        if r["phases"]:
            keys = {k for p in r["phases"] for k in p}
            entry["phases"] = {k: median([p[k] for p in r["phases"] if k in p]) for k in keys}
        summary[name] = entry
    return {"jobs": {name: {"path": str(p), "size": s, "steps": n, "cfg": cfg} for name, (p, s, n) in jobs.items()},
            "cases": summary}


def measure_load(quick: bool, repeats: int, sdxl: bool) -> dict:
    warm = tiny_file()
    files = {"tiny fp16": tiny_file("fp16")} if quick else \
        {"SD 1.5 fp16": sd15_file("fp16"), "SD 1.5 fp32": sd15_file("fp32")}
    if sdxl and not quick:
        files["SDXL fp16"] = sdxl_file()
    out = {}
    for label, path in files.items():
        fp16 = "fp16" in label
        cases = ["load_file_clone", "difusi_default"] + (["load_file_float", "difusi_fp16"] if fp16 and not quick else [])
        runs: dict[str, list[dict]] = {c: [] for c in cases}
        for repeat in range(repeats):
            for case in cases:
                _, record, _, _ = run_child([sys.executable, "-c", LOAD_CHILD, case, str(path), str(warm)])
                runs[case].append(record)
                log(f"load {repeat + 1}/{repeats} {label} {case}: {record['seconds']:.2f} s")
        summary = {}
        for case, records in runs.items():
            summary[case] = {
                "seconds": median([r["seconds"] for r in records]),
                "cpu": median([r["cpu"] for r in records]),
                "above": median([r["peak"] - r["rss_before"] for r in records]),
                "weights": records[0]["weights"],
                "runs": [r["seconds"] for r in records],
            }
        out[label] = {"path": str(path), "file_bytes": path.stat().st_size, "cases": summary}
    return out


def import_chains(text: str, wanted: list[str]) -> list[dict]:
    """First import of each wanted package in `-X importtime` output: cumulative ms and the chain that imported it."""
    entries = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, raw = line.split("|", 2)
        raw = raw[1:]
        entries.append(((len(raw) - len(raw.lstrip(" "))) // 2, raw.strip(), int(cumulative)))
    found = []
    for i, (depth, name, cumulative) in enumerate(entries):
        if name not in wanted:
            continue
        chain, current = [name], depth
        for d, parent, _ in entries[i + 1:]:
            if d < current:
                chain.append(parent)
                current = d
            if current == 0:
                break
        found.append({"package": name, "ms": cumulative / 1000, "via": chain[1:]})
    return found


def measure_imports(work: Path, quick: bool) -> dict:
    runs = {
        "import difusi.pipeline": [sys.executable, "-X", "importtime", "-c", "import difusi.pipeline"],
        "import difusi.models": [sys.executable, "-X", "importtime", "-c", "import difusi.models"],
        "difusi generate (difusi-mini, 20 steps)": [
            sys.executable, "-X", "importtime", "-m", "difusi", "generate", PROMPT, "--steps", "20", "--cfg-scale", "7",
            "--seed", "1", "--outputs-dir", str(work / "importtime")],
    }
    if quick:
        runs = {name: argv for name, argv in runs.items() if "generate" in name}
    out = {}
    for name, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
        out[name] = import_chains(done.stderr, HEAVY)
        log(f"imports {name}: {len(out[name])} heavy packages")
    return out


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    m = report["machine"]
    key_flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
                 if f in m["flags"].split()]
    lines = [
        "# Startup: process start -> PNG, and checkpoint load cost",
        "",
        f"Generated by `python bench/startup.py{' --quick' if report['quick'] else ''}` on {report['date']}.",
        "",
        f"- CPU: {m['cpu']} ({m['cpus']} logical CPUs; load average at start {', '.join(f'{x:.1f}' for x in m['loadavg'])})",
        f"- key flags: {' '.join(key_flags) or 'none of avx2/avx512/amx'}",
        f"- torch {m['torch']}, Python {m['python']}, {m['platform']}",
        f"- repeats: {report['repeats']} per case, fresh process each, interleaved; medians (min of wall in brackets)",
        "",
        "Shared host: timings drift between runs; compare only rows of this one run.",
        "",
        "<details><summary>all CPU flags</summary>",
        "",
        m["flags"] or "(lscpu not available)",
        "",
        "</details>",
        "",
    ]
    if "startup" in report:
        s = report["startup"]
        floor = s["cases"]["floor: python -c 'import torch'"]["wall"]
        lines += ["## Process start -> PNG on disk", ""]
        for name, job in s["jobs"].items():
            lines.append(f"- {name}: `{Path(job['path']).name}`, {job['size']} px, {job['steps']} steps, CFG {job['cfg']}, "
                         "DPM++ 2M Karras, seed 1")
        lines += ["", "Phases in seconds (medians). *by phase* / *diffusers script* rows are timed inside the child; "
                  "\"interpreter\" = spawn -> first line, \"exit\" = last line -> process gone.", ""]
        head = ["case", "wall [min]", "- floor", *PHASES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, entry in s["cases"].items():
            phases = entry.get("phases", {})
            row = [name, f"{entry['wall']:.2f} [{entry['wall_min']:.2f}]", f"{entry['wall'] - floor:+.2f}"]
            row += [f"{phases[k]:.2f}" if k in phases else "" for k in PHASES]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Targets (issue): difusi-mini CLI <= floor + 1.5 s, its load phase <= 0.3 s.", ""]
    if "load" in report:
        lines += ["## Checkpoint load (page cache warm, imports excluded)", "",
                  "| file | case | seconds | CPU s | x reference | RSS above start, MiB | / weights |",
                  "|---|---|---|---|---|---|---|"]
        reference = {"difusi_default": None, "difusi_fp16": "load_file_clone"}
        for label, entry in report["load"].items():
            cases = entry["cases"]
            reference["difusi_default"] = "load_file_float" if "load_file_float" in cases else "load_file_clone"
            for case, r in cases.items():
                ref = reference.get(case)
                ratio = f"{r['seconds'] / cases[ref]['seconds']:.2f} (vs {ref})" if ref else ""
                lines.append(f"| {label} ({entry['file_bytes'] / 2**20:.0f} MiB) | {case} | {r['seconds']:.2f} | "
                             f"{r['cpu']:.2f} | {ratio} | {r['above'] / 2**20:.0f} | {r['above'] / r['weights']:.2f} |")
        lines += ["", "difusi_default = `load_model(path)` (float32 on the CPU: an fp16 file is cast while reading); "
                  "difusi_fp16 = `load_model(path, dtype=torch.float16)`; load_file_clone = `{k: v.clone()}` of "
                  "`safetensors.torch.load_file`, load_file_float = `{k: v.float()}`. \"/ weights\": peak RSS "
                  "(VmHWM) above the RSS just before the load, over the loaded tensors' bytes. Targets: difusi <= "
                  "1.2x the reference, peak <= 1.1x the weights.", ""]
    if "imports" in report:
        lines += ["## Heavy imports", "", "First import of each heavy package (cumulative ms from `-X importtime`, "
                  "one run, noisy) and the chain that brought it in.", ""]
        for name, found in report["imports"].items():
            lines += [f"### {name}", "", "| package | ms | imported via |", "|---|---|---|"]
            for f in sorted(found, key=lambda x: -x["ms"]):
                via = " <- ".join(f["via"][:4]) + (" <- ..." if len(f["via"]) > 4 else "")
                lines.append(f"| {f['package']} | {f['ms']:.0f} | {via} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: difusi-mini and a tiny load only, 1 repeat (~1 min)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case (default 3, --quick 1)")
    parser.add_argument("--sdxl", action="store_true", help="also load an fp16 SDXL-size file (~6.9 GB, ~14 GB RAM)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    CACHE.mkdir(exist_ok=True)
    report: dict = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "quick": args.quick, "repeats": repeats,
                    "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="difusi-startup-") as tmp:
        work = Path(tmp)
        if "startup" in sections:
            report["startup"] = measure_startup(args.quick, repeats, work)
        if "load" in sections:
            report["load"] = measure_load(args.quick, repeats, args.sdxl)
        if "imports" in sections:
            report["imports"] = measure_imports(work, args.quick)
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(report, indent=2))
    (args.out / "startup.md").write_text(text)
    log(f"wrote {args.out / 'startup.md'}")


if __name__ == "__main__":
    main()

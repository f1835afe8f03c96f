# ruff: noqa: I001  (difusi is imported first on purpose: see the import below)
"""Bench: the cost of merging a LoRA into the weights (A1111's way), measured side by side in one run.

    python bench/networks.py --quick                 # tiny SD1 + tiny SDXL checkpoints, < 1 minute
    python bench/networks.py [--sdxl] [--repeats 5] [--rank 32] [--out bench/results]

difusi merges LoRA deltas into the layers' weights before sampling and keeps the originals of the touched layers
to restore them bit for bit (`difusi.networks.apply`). This bench writes a random-weight checkpoint and a random
kohya LoRA (LoCon layout, rank `--rank`, fp16 file) that covers every layer kohya's LoCon trains: each Linear and
Conv2d of the UNet's transformer blocks, resnets, down- and upsamplers, and each attention / MLP linear of every
text encoder. Each family runs in a fresh process (so its RSS numbers are its own) and measures:

1. seconds to build the layer index (first use per loaded model), the first apply (file read + merge), an apply
   with a fresh reader (file read again: a LoRA not in the cache), an apply from the reader's cache (what a job
   that switches LoRAs costs), the same set again (a no-op) and the remove (median of the repeats);
2. seconds per UNet call (batch 2, the CFG batch; same latents, timestep and context every call) without and with
   the LoRA merged, on difusi's exact CPU path (`difusi.speed.prepare_model`, what `txt2img` runs), interleaved
   repeat by repeat with the order alternating (ABBA), so this shared machine's drift hits both alike; the ratio
   merged / plain of each pair, its median and spread. Expected: no difference (the merged weights are the same
   tensors, same shapes, same memory layout). Checks: the merged UNet's output differs from the plain one, every
   merged call gives the same output, and every plain call after a merge + remove is bit-identical to the output
   before any merge;
3. `merge_state(model).saved_bytes` (the saved originals) and the process RSS: before the first apply, its peak
   during the apply (VmHWM, reset through /proc/self/clear_refs), after it, and after the remove.

Sizes: SD 1.5 architecture (random weights, float32 modules, 64x64 latents = 512 px) always; SDXL base architecture
only with `--sdxl` (float16 modules by default, `--sdxl-dtype`; 128x128 latents = 1024 px, `--sdxl-latent`):
a float32 SDXL model (~13.9 GB) plus its saved originals and the merge's transient new weights needs ~40 GB, and
even float16 peaks around 21 GB during the first merge, too close to a 24 GB machine to run by default.
`--quick`: tiny SD1 and tiny SDXL checkpoints, 16x16 latents; only checks that the bench works.
Writes `networks.json` and `networks.md` (`networks-quick.*` for `--quick`) to `--out`.
"""

from __future__ import annotations

import difusi  # noqa: F401  (first: offline env and OpenMP wait policy, read when torch loads libgomp)
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from machine import cpu_line, cpu_summary, log

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
LORA_NAME = "bench-locon"
BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
"""kohya LoCon's UNet targets (sd-scripts networks/lora.py): every Linear / Conv2d inside these."""
TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP")
"""kohya's text-encoder targets."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int | None:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next `peak()` is the peak from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> int | None:
    return _status("VmHWM")


def mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


# ----------------------------------------------------------------------------- inputs


def ensure_checkpoint(case: str, quick: bool, folder: Path) -> Path:
    """quick: a tiny checkpoint in `folder`; else the random full-size fp16 file in .bench-cache (shared with
    bench/cpu_speed.py for SD 1.5), written once without building modules."""
    if quick:
        from difusi.models.synthetic import write_tiny_checkpoint

        path = folder / f"tiny-{case}.safetensors"
        write_tiny_checkpoint(path, family="sdxl" if case == "sdxl" else "sd1")
        return path
    from difusi.models.synthetic import write_random_ldm_file

    path = CACHE / ("sd15-random-fp16.safetensors" if case == "sd15" else "sdxl-random-fp16.safetensors")
    if not path.exists():
        log(f"writing random {case} checkpoint to {path}")
        write_random_ldm_file(path, size=case)
    return path


def locon_layers(model):
    """(component, path, module) of every layer the LoRA covers (kohya LoCon's targets, see BLOCKS)."""
    seen: set[int] = set()
    for component, root, blocks in [("unet", model.unet, BLOCKS)] + [
            (number, encoder.model, TEXT_BLOCKS) for number, encoder in enumerate(model.text_encoders)]:
        for block_path, block in root.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for path, module in block.named_modules(prefix=block_path):
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and id(module) not in seen:
                    seen.add(id(module))
                    yield component, path, module


def locon_names(model) -> list[tuple[str, torch.nn.Module]]:
    """(kohya name, module) of every layer of `locon_layers`, named as kohya writes them: diffusers paths for SD 1.x
    UNets, LDM paths for SDXL's; `lora_te_` for SD 1.x's text encoder, `lora_te1_` / `lora_te2_` for SDXL's."""
    from difusi.models.convert import unet_ldm_module_names

    layers = list(locon_layers(model))
    sdxl = model.family == "sdxl"
    ldm = {}
    if sdxl:
        paths = [path for component, path, _ in layers if component == "unet"]
        ldm = unet_ldm_module_names(paths, model.unet_config or dict(model.unet.config))
    names = []
    for component, path, module in layers:
        if component == "unet":
            names.append(("lora_unet_" + ldm.get(path, path).replace(".", "_"), module))
        else:
            names.append(("lora_te" + (f"{component + 1}_" if sdxl else "_") + path.replace(".", "_"), module))
    return names


def locon_file(model, rank: int, alpha: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict (fp16, as kohya saves) with random factors for every layer of `locon_names`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in locon_names(model):
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
        # small factors: a delta ~1e-3 of the weights' scale, nothing overflows in fp16 or in the UNet
        state[f"{name}.lora_down.weight"] = (down * 0.01).half()
        state[f"{name}.lora_up.weight"] = (up * 0.01).half()
        state[f"{name}.alpha"] = torch.tensor(float(alpha)).half()
    return state


def unet_inputs(model, latent: int, dtype: torch.dtype) -> dict:
    """One CFG batch (2) of fixed random inputs for `model.unet` (SDXL's added conditioning included)."""
    config = model.unet.config
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, config.in_channels, latent, latent, generator=generator).to(dtype),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(dtype),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = float(latent * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator).to(dtype),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * 2).to(dtype)}
    return inputs


# ----------------------------------------------------------------------------- one family (child process)


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": quartiles[0], "q3": quartiles[2], "runs": values}


def run_family(case: str, args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    from difusi.models import load_model
    from difusi.networks.apply import NetworkUse, apply_networks, merge_state, remove_networks
    from difusi.networks.files import NetworkReader
    from difusi.networks.job import NetworkLibrary
    from difusi.speed import prepare_model

    dtype = DTYPES[args.sdxl_dtype] if case == "sdxl" and not args.quick else torch.float32
    latent = 16 if args.quick else (args.sdxl_latent if case == "sdxl" else 64)
    repeats = args.repeats or 5
    result: dict = {"case": case, "dtype": str(dtype).removeprefix("torch."), "latent": latent, "pixels": latent * 8,
                    "repeats": repeats, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = ensure_checkpoint(case, args.quick, folder)
        rss_start = rss()
        log(f"{case}: loading {checkpoint.name} as {result['dtype']}")
        seconds, model = timed(lambda: load_model(checkpoint, device="cpu", dtype=dtype))
        exact = prepare_model(model)
        params = sum(p.numel() for p in model.unet.parameters()) + sum(
            p.numel() for e in model.text_encoders for p in e.model.parameters())
        result.update({"family": model.family, "checkpoint": checkpoint.name, "load_s": seconds, "exact_path": exact,
                       "unet_te_params": params, "model_rss_mib": mib(rss() - rss_start) if rss_start else None})

        state = locon_file(model, args.rank, args.alpha)
        lora_path = folder / "models" / "Lora" / f"{LORA_NAME}.safetensors"
        lora_path.parent.mkdir(parents=True)
        base = "sdxl_base_v1-0" if model.family == "sdxl" else "sd_v1"
        save_file(state, str(lora_path), {"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.alpha),
                                          "ss_network_module": "networks.lora", "ss_base_model_version": base})
        touched = list(locon_layers(model))
        result["lora"] = {"rank": args.rank, "alpha": args.alpha, "layers": len(touched),
                          "unet_layers": sum(1 for c, _, _ in touched if c == "unet"),
                          "file_mib": lora_path.stat().st_size / 2**20,
                          "factor_params": sum(t.numel() for t in state.values()),
                          "touched_weight_params": sum(m.weight.numel() for _, _, m in touched)}
        del state
        library = NetworkLibrary(folder / "models")
        file = library.find_lora(LORA_NAME)

        def uses(reader) -> list:
            return [NetworkUse(reader.read(file), 1.0, 1.0, LORA_NAME)]

        inputs = unet_inputs(model, latent, dtype)

        def step():
            with torch.inference_mode():
                return model.unet(**inputs).sample

        log(f"{case}: {result['lora']['layers']} layers in the LoRA; warm-up UNet call")
        before = step()  # warm-up, untimed; the reference output of the checkpoint's own weights
        gc.collect()

        # 1 + 3: first use
        index_s, _ = timed(lambda: merge_state(model))
        rss_before = rss()
        tracked = reset_peak()
        first_s, warnings = timed(lambda: apply_networks(model, uses(library.reader)))
        peak_apply, rss_applied = peak(), rss()
        saved = merge_state(model).saved_bytes
        result["lora"]["merged_layers"] = len(merge_state(model).saved)
        noop_s, _ = timed(lambda: apply_networks(model, uses(library.reader)))
        remove_s, _ = timed(lambda: remove_networks(model))
        gc.collect()
        rss_removed = rss()
        result["warnings"] = warnings
        result["memory"] = {
            "saved_bytes": saved, "saved_mib": saved / 2**20,
            "weights_mib": sum(p.numel() * p.element_size() for p in model.unet.parameters()) / 2**20 + sum(
                p.numel() * p.element_size() for e in model.text_encoders for p in e.model.parameters()) / 2**20,
            "rss_before_apply_mib": mib(rss_before), "rss_after_apply_mib": mib(rss_applied),
            "rss_after_remove_mib": mib(rss_removed),
            "peak_during_apply_mib": mib(peak_apply) if tracked else None,
            "apply_rss_delta_mib": mib(rss_applied - rss_before) if rss_before else None,
            "apply_peak_delta_mib": mib(peak_apply - rss_before) if tracked and rss_before else None,
            "remove_rss_delta_mib": mib(rss_removed - rss_applied) if rss_before else None,
        }
        log(f"{case}: index {index_s:.3f} s, first apply {first_s:.3f} s, remove {remove_s:.3f} s, "
            f"saved {saved / 2**20:.0f} MiB")

        # 1: repeats of apply (fresh reader = file read, cached reader) and remove
        cold, cached, removes = [], [], []
        for _ in range(repeats):
            cold.append(timed(lambda: apply_networks(model, uses(NetworkReader())))[0])
            removes.append(timed(lambda: remove_networks(model))[0])
            cached.append(timed(lambda: apply_networks(model, uses(library.reader)))[0])
            removes.append(timed(lambda: remove_networks(model))[0])
        result["timing"] = {"index_s": index_s, "first_apply_s": first_s, "noop_apply_s": noop_s, "first_remove_s": remove_s,
                            "apply_cold": spread(cold), "apply_cached": spread(cached), "remove": spread(removes)}

        # 2: per-step time, interleaved ABBA (switching through the cached reader, untimed)
        # every plain call's output is compared with `before` (all but the first run after a merge + remove) and
        # every merged call's with the first merged one
        plain_times, merged_times = [], []
        restored, merged, same_merged = True, None, True
        for repeat in range(repeats):
            order = ("plain", "merged") if repeat % 2 == 0 else ("merged", "plain")
            for which in order:
                if which == "merged":
                    apply_networks(model, uses(library.reader))
                else:
                    remove_networks(model)
                seconds, output = timed(step)
                if which == "merged":
                    merged_times.append(seconds)
                    same_merged &= merged is None or bool(torch.equal(output, merged))
                    merged = output if merged is None else merged
                else:
                    plain_times.append(seconds)
                    restored &= bool(torch.equal(output, before))
                log(f"  {case} {which} repeat {repeat + 1}/{repeats}: {seconds:.3f} s")
        remove_networks(model)
        ratios = [m / p for m, p in zip(merged_times, plain_times, strict=True)]
        result["step"] = {"plain": spread(plain_times), "merged": spread(merged_times), "ratio": spread(ratios),
                          "merged_max_abs_diff": float((merged.float() - before.float()).abs().max()),
                          "restored_bit_identical": restored, "merged_repeatable": same_merged}
    return result


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    lines = [
        "# LoRA merging: apply / remove cost, per-step cost, memory",
        "",
        f"`{report['command']}` — {report['date']}",
        "",
        f"- CPU: {cpu_summary(cpu)}",
        f"- torch {report['torch']}, Python {report['python']}",
        f"- LoRA: random kohya LoCon, rank {report['rank']}, alpha {report['alpha']}, fp16 file: every Linear / Conv2d "
        "of the UNet's transformer blocks, resnets, down/upsamplers and every attention / MLP linear of the text "
        "encoders; multipliers 1.0 / 1.0. Random-weight checkpoints.",
        "",
        "## Apply and remove (seconds; median [min-max] of the repeats)",
        "",
        "| model | layers merged / in the LoRA | LoRA file MiB | layer index (once) | first apply (read + merge) | apply, file read again "
        "| apply, reader cache | same set again | remove |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    families = report["families"]
    for name, r in families.items():
        if "error" in r:
            continue
        t = r["timing"]
        lines.append(
            f"| {name}, {r['dtype']} | {r['lora']['merged_layers']}/{r['lora']['layers']} | {r['lora']['file_mib']:.1f} | {t['index_s']:.3f} "
            f"| {t['first_apply_s']:.3f} | {_cell(t['apply_cold'])} | {_cell(t['apply_cached'])} "
            f"| {t['noop_apply_s'] * 1000:.2f} ms | {_cell(t['remove'])} |")
    lines += [
        "",
        "## Seconds per UNet call (batch 2), plain vs LoRA merged, interleaved ABBA",
        "",
        "| model | latents (px) | threads | exact path | plain s | merged s | ratio merged/plain: median [q1-q3] "
        "(min-max) | merged output differs by | plain outputs after removes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in families.items():
        if "error" in r:
            continue
        s = r["step"]
        ratio = s["ratio"]
        lines.append(
            f"| {name} | {r['latent']}x{r['latent']} ({r['pixels']}) | {r['threads']} | {r['exact_path']} "
            f"| {_cell(s['plain'])} | {_cell(s['merged'])} | {ratio['median']:.3f} [{ratio['q1']:.3f}-{ratio['q3']:.3f}] "
            f"({ratio['min']:.3f}-{ratio['max']:.3f}) | {s['merged_max_abs_diff']:.3g} max abs "
            f"| {'bit-identical' if s['restored_bit_identical'] else 'DIFFERENT'}"
            f"{'' if s['merged_repeatable'] else ' (merged outputs differ between merges!)'} |")
    lines += [
        "",
        "## Memory (MiB)",
        "",
        "| model | UNet + text weights | saved originals (`saved_bytes`) | saved / weights | RSS before apply "
        "| peak during first apply (+delta) | after apply (+delta) | after remove (delta) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in families.items():
        if "error" in r:
            continue
        m = r["memory"]
        peak_cell = "n/a" if m["peak_during_apply_mib"] is None else (
            f"{m['peak_during_apply_mib']:.0f} (+{m['apply_peak_delta_mib']:.0f})")
        lines.append(
            f"| {name} | {m['weights_mib']:.0f} | {m['saved_mib']:.0f} | {m['saved_mib'] / m['weights_mib']:.2f} "
            f"| {_num(m['rss_before_apply_mib'])} | {peak_cell} | {_num(m['rss_after_apply_mib'])} "
            f"({_signed(m['apply_rss_delta_mib'])}) | {_num(m['rss_after_remove_mib'])} "
            f"({_signed(m['remove_rss_delta_mib'])}) |")
    for name, r in families.items():
        if "error" in r:
            lines += ["", f"**{name}: not measured** — {r['error']}"]
        elif r.get("warnings"):
            lines += ["", f"{name} warnings: " + "; ".join(r["warnings"])]
    lines += ["", *report["notes"], ""]
    return "\n".join(lines)


def _cell(stats: dict) -> str:
    return f"{stats['median']:.3f} [{stats['min']:.3f}-{stats['max']:.3f}]"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f}"


NOTES = [
    "How to read: the apply computes `W0 + m * up @ down * alpha / rank` for every covered layer from the saved "
    "originals, writes it in place layer by layer and keeps one copy of each original (`saved_bytes`; in float16 "
    "when that holds it exactly); a job whose LoRA set did not change skips it (\"same set again\"), the remove "
    "copies the originals back. The peak RSS of the first apply is about the weights plus the saved originals; these "
    "stay resident until the remove, and the allocator may keep the freed pages (the RSS after the remove need not "
    "drop).",
    "Per-step: the ratio is of each ABBA pair, medians of ratios; a median within the quartile spread of 1.0 is no "
    "measurable difference. This host is shared, so only ratios within one run compare.",
    "SDXL float32 (13.9 GB of weights, the saved originals and the merge's transient copies: ~40 GB) does not fit a "
    "24 GB machine; `--sdxl` runs it in float16 (peak ~21 GB), which is not difusi's exact CPU path (float32 only).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny SD1 + SDXL checkpoints, 16x16 latents (< 1 minute)")
    parser.add_argument("--sdxl", action="store_true", help="also the full SDXL architecture (needs ~22 GB RAM)")
    parser.add_argument("--sdxl-dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--sdxl-latent", type=int, default=128, help="SDXL latent side (128 = 1024 px)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=None, help="default 5")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.child:
        result = run_family(args.child, args)
        args.child_json.write_text(json.dumps(result), encoding="utf-8")
        return

    cases = ["sd15", "sdxl"] if (args.quick or args.sdxl) else ["sd15"]
    cpu = cpu_line()
    log(f"{cpu['model']}, {cpu['logical_cpus']} logical CPUs; torch {torch.__version__}")
    families: dict[str, dict] = {}
    forwarded = [arg for arg in sys.argv[1:] if arg != "--sdxl"]
    for case in cases:
        name = {"sd15": "SD 1.5", "sdxl": "SDXL"}[case] + (" (tiny)" if args.quick else "")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--child", case, "--child-json", str(out)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
            process = subprocess.run(command, env=env)
            if process.returncode != 0 or not out.exists():
                families[name] = {"error": f"child process exited with {process.returncode}"
                                           + (" (killed: out of memory?)" if process.returncode in (-9, 137) else "")}
                continue
            families[name] = json.loads(out.read_text(encoding="utf-8"))
    report = {
        "command": "python bench/networks.py " + " ".join(sys.argv[1:]),
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "cpu": cpu, "torch": torch.__version__,
        "python": platform.python_version(), "quick": args.quick, "rank": args.rank, "alpha": args.alpha,
        "families": families, "notes": NOTES,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "networks-quick" if args.quick else "networks"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
    if any("error" in r for r in families.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

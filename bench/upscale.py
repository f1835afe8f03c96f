"""Bench: a 4x model upscale, tiled (A1111's ESRGAN tile 192 / overlap 8) vs untiled, time and peak RSS, one run.

    python bench/upscale.py [--size 512] [--out bench/results]

The network is a random-weight RRDBNet of Real-ESRGAN x4plus's shape (23 blocks, 64 features, growth 32, 4x),
saved as a .safetensors file in a temporary models folder and run through `difusi.upscalers.get_upscaler`, exactly
what `difusi upscale` and the Extras endpoints run. Each variant runs in a fresh child process, so its peak RSS
(`ru_maxrss`) is its own: model load + one upscale of a `--size` px RGB image. Also records the tiled result's
deviation from the untiled one (max and mean, 8-bit levels) and `lscpu`'s model name and flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from PIL import Image
from difusi.upscalers import get_upscaler
from difusi.budget import Budget, set_budget
models, size, tile, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
set_budget(Budget(max_pixels=1 << 26, max_batch_pixels=1 << 26))
rng = np.random.default_rng(0)
base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
upscaler = get_upscaler("x4plus-shape", models)
upscaler.tile = tile
start = time.perf_counter()
result = upscaler.upscale(image, 4)
seconds = time.perf_counter() - start
result.save(out)
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mib": before / 1024, "size": list(result.size), "threads": torch.get_num_threads()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "upscalers"))
    import numpy as np
    from builders import rrdbnet_basicsr
    from PIL import Image
    from safetensors.torch import save_file

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        (models / "RealESRGAN").mkdir()
        state = rrdbnet_basicsr(num_feat=64, num_blocks=23, num_grow=32, scale=4, seed=0)
        save_file(state, models / "RealESRGAN" / "x4plus-shape.safetensors")
        for name, tile in (("tiled 192 / 8", 192), ("untiled", 0)):
            out = models / f"{tile}.png"
            done = subprocess.run([sys.executable, "-c", CHILD, str(models), str(args.size), str(tile), str(out)],
                                  capture_output=True, text=True)
            if done.returncode:
                rows[name] = {"error": done.stderr.strip().splitlines()[-1:]}
                continue
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name]["pixels"] = np.asarray(Image.open(out), dtype=np.int16)
    deviation = ""
    if all("pixels" in row for row in rows.values()):
        difference = np.abs(rows["tiled 192 / 8"]["pixels"] - rows["untiled"]["pixels"])
        deviation = f"tiled vs untiled: max {difference.max()} levels, mean {difference.mean():.4f}, " \
                    f"{(difference > 0).mean() * 100:.2f}% of values differ"
    import torch

    lines = [
        "# 4x model upscale: tiled vs untiled, time and peak RSS", "",
        f"`python bench/upscale.py --size {args.size}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        f"- CPU: {cpu_summary()}", f"- torch {torch.__version__}, Python {platform.python_version()}",
        "- model: random-weight RRDBNet, Real-ESRGAN x4plus shape (23 blocks, 64 features, growth 32, 4x), "
        "float32, `difusi.upscalers.get_upscaler`; one child process per variant (peak RSS = `ru_maxrss`, "
        "model load included)",
        f"- input: {args.size}x{args.size} RGB (smooth random image), output {4 * args.size}x{4 * args.size}", "",
        "| variant | seconds | peak RSS MiB | RSS before load MiB | threads |", "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
        else:
            lines.append(f"| {name} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {row['rss_before_mib']:.0f} "
                         f"| {row['threads']} |")
    lines += ["", deviation, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upscale.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Bench: load time and peak RSS of `difusi.models.load_model` on a full-size SD 1.5 checkpoint.

    python bench/load_checkpoint.py [--keep PATH]

Writes a random-weight SD 1.5-architecture checkpoint (fp16 safetensors, ~2.1 GB: 860M UNet, 83M VAE,
123M CLIP ViT-L text encoder) to a temp folder, then measures each case in a fresh subprocess
(`resource.getrusage` peak RSS, which includes the Python + torch + diffusers imports; the
"imports only" row is that baseline):

- `load_file` as returned (lazy: the file is mapped, pages are only read when touched);
- `load_file` + clone: an fp16 state dict really in memory (reference for difusi fp16);
- `load_file` -> float32 dict (reference for difusi fp32);
- difusi `load_model` -> float32 modules (what the CPU pipeline uses; weights double in size);
- difusi `load_model` -> float16 modules (no cast).

Columns: seconds, the ratio to the matching plain-safetensors reference, peak RSS, RSS above the
import baseline, and that divided by the file size. Model hashing is lazy and not included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import difusi, torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # imports are the baseline, not part of a load
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from safetensors.torch import load_file
    from difusi.models import load_model
    case, path = sys.argv[1], sys.argv[2]
    started = time.perf_counter()
    if case == "load_file":
        state = load_file(path)
    elif case == "load_file_clone":
        state = {k: v.clone() for k, v in load_file(path).items()}
    elif case == "load_file_fp32":
        state = {k: v.float() for k, v in load_file(path).items()}
    elif case == "difusi_fp32":
        model = load_model(path)
    elif case == "difusi_fp16":
        model = load_model(path, dtype=torch.float16)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024}))
""")
CASES = ["imports", "load_file", "load_file_clone", "load_file_fp32", "difusi_fp16", "difusi_fp32"]
REFERENCE = {"difusi_fp16": "load_file_clone", "difusi_fp32": "load_file_fp32"}


def _run(case: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(path: Path) -> None:
    code = "import difusi, sys; from difusi.models.synthetic import write_random_ldm_file; write_random_ldm_file(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="write/reuse the checkpoint here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "sd15-random-fp16.safetensors"
        if not path.exists():
            _write(path)
        size_mb = path.stat().st_size / 2**20
        results = {case: _run(case, path) for case in CASES}
    base_rss = results["imports"]["peak_mb"]
    print(f"checkpoint: SD 1.5 architecture, random fp16 weights, {size_mb:.0f} MiB")
    print(f"{'case':<17}{'seconds':>9}{'x reference':>13}{'peak RSS MiB':>14}{'above imports':>15}{'/ file size':>13}")
    for case in CASES:
        r = results[case]
        above = r["peak_mb"] - base_rss
        ref = REFERENCE.get(case)
        ratio = f"{r['seconds'] / results[ref]['seconds']:.2f}" if ref else ""
        print(f"{case:<17}{r['seconds']:>9.2f}{ratio:>13}{r['peak_mb']:>14.0f}{above:>15.0f}{above / size_mb:>13.2f}")
    print("x reference: difusi_fp16 vs load_file_clone, difusi_fp32 vs load_file_fp32")


if __name__ == "__main__":
    main()

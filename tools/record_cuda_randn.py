"""Record torch's CUDA `randn` for a few seeds, shapes and offsets, as the reference for difusi's NV source.

Run on a machine with an NVIDIA GPU (needs only torch):

    python tools/record_cuda_randn.py [--output tests/rng/cuda_randn_reference.json]

`tests/rng/test_cuda_reference.py` then checks `difusi.philox.cuda_randn` (A1111's "NV" emulation) against
the file, and skips while it does not exist. Offset k is the k-th `randn` call of the same shape on a
generator after `manual_seed(seed)`; "global" cases use `torch.manual_seed` and the default CUDA generator,
as A1111 does for subseed noise. Large tensors store a fixed sample of flat indices, not every value.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

SEEDS = (0, 1, 12345, 4294967294, 2**40 + 3)  # 4294967294: A1111's largest random seed
SHAPES = ((3, 4), (12,), (1, 4, 8, 8), (1, 4, 64, 64), (4, 96, 96), (1, 4, 128, 128))
OFFSETS = 3
FULL_UP_TO = 256  # store every value of tensors this small
SAMPLE = 64  # else: the first and last 16 values plus 32 evenly spaced ones


def sample_indices(count: int) -> list[int]:
    if count <= FULL_UP_TO:
        return list(range(count))
    spread = [round(i * (count - 1) / (SAMPLE // 2 - 1)) for i in range(SAMPLE // 2)]
    return sorted({*range(SAMPLE // 4), *range(count - SAMPLE // 4, count), *spread})


def case(seed: int, shape: tuple[int, ...], offset: int, values: torch.Tensor, generator: str) -> dict:
    flat = values.flatten().cpu()
    indices = sample_indices(math.prod(shape))
    return {"seed": seed, "shape": list(shape), "offset": offset, "generator": generator,
            "indices": indices, "values": [float(flat[i]) for i in indices]}


def record(device: str = "cuda") -> dict:
    """Every case drawn on `device` ("cpu" only to test this script without a GPU)."""
    cases = []
    for seed in SEEDS:
        for shape in SHAPES:
            generator = torch.Generator(device).manual_seed(seed)
            for offset in range(OFFSETS):
                cases.append(case(seed, shape, offset, torch.randn(shape, generator=generator, device=device), "local"))
            torch.manual_seed(seed)  # seeds the CPU and every CUDA default generator
            cases.append(case(seed, shape, 0, torch.randn(shape, device=device), "global"))
    about = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        about.update(device_name=properties.name, multi_processor_count=properties.multi_processor_count)
    return {**about, "cases": cases}


def write(reference: dict, path: Path) -> None:
    """JSON with one case per line: small and readable in diffs."""
    header = json.dumps({key: value for key, value in reference.items() if key != "cases"})
    lines = ",\n".join(json.dumps(item) for item in reference["cases"])
    path.write_text(header[:-1] + ', "cases": [\n' + lines + "\n]}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("tests/rng/cuda_randn_reference.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script records torch.randn on CUDA")
    reference = record()
    write(reference, args.output)
    print(f"wrote {len(reference['cases'])} cases from {reference['device_name']} to {args.output}")


if __name__ == "__main__":
    main()

"""Devices and precisions: which torch device a job runs on, and in which dtype each network computes.

Every front end (Python API, CLI, server) resolves its `device` / `precision` / `offload` here, up front, so a
device this machine lacks is one `ParamError` line naming what it has, never a torch traceback later
(issue 19 item 1). The rules:

- `resolve_device("auto")`: CUDA, then Apple's MPS, then the CPU (A1111's `devices.get_optimal_device`).
  Explicit `cpu`, `cuda`, `cuda:N` and `mps` are checked against this machine; anything else
  (`meta`, `banana`, `xla`) is refused: difusi runs images on real devices only.
- `resolve_precision("auto", device)`: on CUDA and MPS the UNet, the text encoders and the VAE run in float16,
  as A1111 does by default; the VAE decode falls back to float32 when float16 overflows to NaN/inf (A1111's
  "Automatically revert VAE to 32-bit floats" with `--no-half-vae` as the manual switch; SDXL's original VAE is
  known to overflow in float16), see `difusi.vae.decode_latents`. On the CPU everything stays float32: the
  exact fast path (`difusi.speed.exact`) is float32, and CPU half precision is slower, not faster.
  Explicit "fp32", "fp16" and "bf16" set all three networks; bfloat16 has float32's exponent range, so its VAE
  does not overflow.
- Latents, sigmas and the sampler's arithmetic stay float32 whatever the precision (cast at the UNet call, as
  A1111 and diffusers do), and noise is drawn on the CPU (docs/ARCHITECTURE.md contract 2), so the infotext of a
  job never depends on its device or precision.

`OFFLOAD_MODES` are the memory modes of `difusi.models.offload`.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from difusi.errors import ParamError

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions: the CLI builds its parser (and these flags' choices) from this module,
# and `difusi info` or a bad flag must not pay torch's import time.

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What `--device` accepts (for help texts and messages)."""
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OFFLOAD_MODES = ("none", "model", "sequential")
"""`none`: every network on the device. `model`: text encoders and VAE stay on the CPU and visit the device only
while they run (A1111 `--medvram`-like). `sequential`: every network's blocks visit the device one at a time
(diffusers' `enable_sequential_cpu_offload`, for cards with about 4 GB)."""



def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def _cuda_count() -> int:
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (AssertionError, RuntimeError):  # a broken driver: as good as no CUDA
        return 0


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    try:
        return bool(backend is not None and backend.is_available())
    except (AssertionError, RuntimeError):
        return False


def available_devices() -> list[str]:
    """The devices this machine can run on, best first for "auto": "cuda:0".. then "mps", always "cpu" last."""
    found = [f"cuda:{index}" for index in range(_cuda_count())]
    if _mps_available():
        found.append("mps")
    return [*found, "cpu"]


def _unavailable(name: str, why: str) -> ParamError:
    return ParamError("device", f"{name!r} is not available here ({why}); this machine has: "
                                f"{', '.join(available_devices())}")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `name` ("auto"/None, "cpu", "cuda", "cuda:N", "mps"), checked against this machine.

    Raises `ParamError("device", ...)` with one line saying what this machine has, e.g.
    "'cuda' is not available here (torch built without CUDA); this machine has: cpu".
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        best = available_devices()[0]
        return torch.device("cuda:0" if best.startswith("cuda") else best)
    if not isinstance(name, str):
        raise ParamError("device", f"must be a device name ({', '.join(DEVICE_CHOICES)}), got {name!r}")
    text = name.strip().lower()
    match = _DEVICE_RE.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2) not in (None, "0")):
        raise ParamError("device", f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} "
                                   f"(this machine has: {', '.join(available_devices())})")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise _unavailable(name, "no Apple MPS backend")
        return torch.device("mps")
    count = _cuda_count()
    if count == 0:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA GPU found"
        raise _unavailable(name, why)
    number = int(index or 0)
    if number >= count:
        raise _unavailable(name, f"{count} CUDA device{'s' if count != 1 else ''}")
    return torch.device("cuda", number)


@dataclass(frozen=True)
class Precision:
    """The dtype each network computes in (latents and sampler arithmetic are always float32)."""

    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> Precision:
        """All three networks in `dtype` (what the older `dtype=` argument of `load_model` means)."""
        return cls(dtype, dtype, dtype)

    @property
    def name(self) -> str:
        """"fp32", "fp16", "bf16" when uniform, else "unet=fp16,text_encoder=fp16,vae=fp32"-style."""
        names = {dtype: name for name, dtype in _dtypes().items()}
        parts = (self.unet, self.text_encoder, self.vae)
        if len(set(parts)) == 1:
            return names.get(self.unet, str(self.unet))
        return ",".join(f"{label}={names.get(dtype, str(dtype))}"
                        for label, dtype in zip(("unet", "text_encoder", "vae"), parts, strict=True))


def resolve_precision(precision: str = "auto", device: str | torch.device = "cpu") -> Precision:
    """The `Precision` for `precision` ("auto", "fp32", "fp16", "bf16") on `device` (see the module doc).

    "auto" is float16 for all networks on CUDA and MPS (the VAE with its float32 NaN fallback) and float32 on the
    CPU. A bad value raises `ParamError("precision", ...)`.
    """
    import torch

    if not isinstance(precision, str) or precision.strip().lower() not in PRECISIONS:
        raise ParamError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    text = precision.strip().lower()
    if text == "auto":
        kind = torch.device(device).type
        return Precision.uniform(torch.float16 if kind in ("cuda", "mps") else torch.float32)
    return Precision.uniform(_dtypes()[text])


def check_offload(offload: str) -> str:
    """`offload` if it is one of `OFFLOAD_MODES`, else `ParamError("offload", ...)`."""
    if offload not in OFFLOAD_MODES:
        raise ParamError("offload", f"must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    return offload


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --precision, --offload and --compile, shared by `difusi generate` and `difusi serve` (here, not in
    the CLI, so the server needs no import of it). Validate with `resolve_device` before loading anything."""
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, "
                                                         "cuda:N or mps (default auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="network precision: auto (fp16 on CUDA/MPS with a float32 VAE fallback, fp32 on the "
                             "CPU), fp32, fp16 or bf16 (default auto)")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                        help="GPU memory mode: none, model (text encoders and VAE visit the GPU only while they "
                             "run) or sequential (one block at a time, for ~4 GB cards) (default none)")
    parser.add_argument("--compile", action="store_true",
                        help="run the UNet through torch.compile (for CUDA; slow to warm up, falls back with a "
                             "warning if it fails)")

"""What every bench records about the machine it ran on, and its timestamped log lines (shared by the benches,
which run as `python bench/NAME.py`, so this folder is on `sys.path`)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime


def log(*parts) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}]", *parts, flush=True)


def cpu_line() -> dict:
    """lscpu's model name and SIMD flags: machines differ between sessions, so every report starts with them."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line}
    flags = fields.get("Flags", "")
    simd = " ".join(flag for flag in flags.split() if flag.startswith(("avx", "amx", "fma", "sse4", "f16c")))
    return {"model": fields.get("Model name") or platform.processor() or "unknown CPU", "logical_cpus": os.cpu_count(),
            "simd_flags": simd, "flags": flags}


def cpu_summary(cpu: dict | None = None) -> str:
    """A `cpu_line()` record (a report's, or this machine's now) as one line: model, logical CPUs, SIMD flags."""
    cpu = cpu_line() if cpu is None else cpu
    return f"{cpu['model']}, {cpu['logical_cpus']} logical CPUs; SIMD flags: {cpu['simd_flags'] or '(lscpu not available)'}"


def rss_mb() -> float:
    """This process's resident memory now, MiB (Linux `VmRSS`; NaN elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")

"""Batch jobs: a file of rows -> validated jobs -> a runner (in-process or Ray) -> images in the outputs folder.

    from difusi.batch import run_file
    summary = run_file("prompts.jsonl", {"steps": 20})      # in-process; workers=2 or ray_address="auto" for Ray
    print(summary.done, summary.skipped, summary.failed)

Modules, one concept each: `rows` (files -> rows -> jobs), `jobs` (BatchJob, job ids, the Runner protocol),
`local` (the in-process runner and `run_job`), `driver` (`run_batch`: skip done, write, retry, summary);
`ray_runner` (RayRunner) is imported only when Ray is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difusi.batch.driver import BatchInterrupted, BatchProgress, BatchSummary, ProgressFn, run_batch
from difusi.batch.jobs import BatchFailure, BatchJob, EncodedImage, JobOutput, Runner, job_id_for
from difusi.batch.rows import BatchError, BatchRow, build_jobs, read_rows
from difusi.errors import DifusiError

__all__ = [
    "BatchError", "BatchFailure", "BatchInterrupted", "BatchJob", "BatchProgress", "BatchRow", "BatchSummary",
    "EncodedImage", "JobOutput", "Runner", "RunnerUnavailable", "build_jobs", "job_id_for", "make_runner",
    "read_rows", "run_batch", "run_file",
]


class RunnerUnavailable(DifusiError):
    """The runner asked for cannot be used here (Ray not installed); one line, before any model loads."""


def make_runner(workers: int | None = None, ray_address: str | None = None, *, device: str = "auto",
                precision: str = "auto", offload: str = "none", compile: bool = False) -> Runner:
    """In-process unless `workers`, `ray_address` or the RAY_ADDRESS environment variable asks for Ray.

    `difusi.batch.ray_runner.RayRunner` is called as `RayRunner(workers=, address=, device=, precision=, offload=)`."""
    from difusi.batch.local import LocalRunner

    address = ray_address
    if address is None and workers is None:  # --workers starts a local cluster: RAY_ADDRESS is for the other case
        address = os.environ.get("RAY_ADDRESS") or None
    if workers is None and address is None:
        return LocalRunner(device=device, precision=precision, offload=offload, compile=compile)
    try:
        from difusi.batch.ray_runner import RayRunner
    except ImportError as error:
        hint = "" if error.name == "difusi.batch.ray_runner" else f" (install difusi[ray]: {error})"
        raise RunnerUnavailable(f"Ray runner not available{hint}") from None
    return RayRunner(workers=workers, address=address, device=device, precision=precision, offload=offload)


def run_file(path: str | Path, defaults: Mapping[str, Any] | None = None, *, workers: int | None = None,
             ray_address: str | None = None, models_dir: str | Path | None = None,
             outputs_dir: str | Path | None = None, skip_invalid: bool = False, progress: ProgressFn | None = None,
             device: str = "auto", precision: str = "auto", offload: str = "none") -> BatchSummary:
    """Run a batch file (JSONL, CSV or A1111 prompts-from-file) with `defaults` for every row; the summary.

    Every row is validated before any model loads (BatchError names the row and the field; with `skip_invalid`
    bad rows are reported in `summary.failed` instead). Folders default as in `difusi generate` (settings).
    Raises BatchInterrupted (with the summary so far) on Ctrl-C."""
    from difusi import settings
    from difusi.store import OutputStore

    folder = settings.models_dir(models_dir)
    jobs, invalid = build_jobs(read_rows(Path(path)), dict(defaults or {}), skip_invalid=skip_invalid,
                               models_dir=folder)
    runner = make_runner(workers, ray_address, device=device, precision=precision, offload=offload)
    try:
        with OutputStore(settings.outputs_dir(outputs_dir)) as store:
            summary = run_batch(jobs, runner, store, progress=progress, models_dir=folder)
    finally:
        runner.close()
    summary.failed = sorted([*invalid, *summary.failed])
    return summary

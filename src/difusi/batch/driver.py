"""The batch driver: sends jobs to a runner and writes what comes back, so nothing is lost and nothing is done twice.

Rules (docs: README "Batch jobs"):
- a job whose id the history already holds with all its images (`OutputStore.done_job_ids`) is skipped; a job that
  appears twice in one batch (same resolved fields, same model) runs once and its copy counts as skipped;
- each image is written atomically from the PNG bytes the runner sent, with its history row and job id
  (`OutputStore.save_encoded`); an image of a half-finished job that is already saved is not saved again;
- a failed job (an error from the runner, missing or incomplete images) is retried `retries` times, then reported
  with its reason, and the other jobs go on; a failure to write the outputs folder (`StorageError`) stops the batch;
- Ctrl-C (KeyboardInterrupt) keeps every image written so far and raises `BatchInterrupted` with the summary; a
  Ctrl-C that arrives while an image is being written waits until its history row is in.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difusi.batch.jobs import BatchFailure, BatchJob, JobOutput, Runner
from difusi.errors import Interrupted, StorageError


@dataclass
class BatchSummary:
    """What a batch run did: jobs `done` in this run, `skipped` (already done), `failed` (row, job id, reason)."""

    done: int = 0
    skipped: int = 0
    failed: list[BatchFailure] = field(default_factory=list)
    images: int = 0
    """Images written in this run."""
    paths: list[Path] = field(default_factory=list)
    """Where they were written, in the order they were."""


@dataclass(frozen=True)
class BatchProgress:
    """Sent to `progress` after each image is written and each job ends."""

    images_done: int
    images_total: int
    """Images this run has to write (jobs already done are not counted)."""
    jobs_done: int
    jobs_total: int
    failed: int
    path: Path | None = None
    """The image just written (None for a job that ended without one)."""
    row: int = 0


ProgressFn = Callable[[BatchProgress], None]


class BatchInterrupted(Interrupted):
    """The batch was stopped (Ctrl-C); every image written so far is kept. `summary` says what was done."""

    def __init__(self, summary: BatchSummary):
        super().__init__("batch interrupted")
        self.summary = summary


def run_batch(jobs: Sequence[BatchJob], runner: Runner, store: Any, *, progress: ProgressFn | None = None,
              retries: int = 1, models_dir: Path | None = None) -> BatchSummary:
    """Run `jobs` on `runner`, writing every image into `store` (an `OutputStore`); see the module docstring."""
    pending, skipped = _pending(jobs, store.done_job_ids())
    run = _Run(store, store.saved_job_images(), progress, pending, BatchSummary(skipped=skipped))
    try:
        failures = run.attempt(pending, runner, models_dir)
        for _ in range(max(0, retries)):
            if not failures:
                break
            failures = run.attempt([job for job, _ in failures.values()], runner, models_dir)
    except KeyboardInterrupt:
        raise BatchInterrupted(run.summary) from None
    run.summary.failed = sorted(BatchFailure(job.row, job_id, reason) for job_id, (job, reason) in failures.items())
    return run.summary


def _pending(jobs: Sequence[BatchJob], done: set[str]) -> tuple[list[BatchJob], int]:
    """Jobs still to run (first of each id), and how many are skipped as done before or repeated."""
    pending: list[BatchJob] = []
    seen: set[str] = set()
    for job in jobs:
        if job.job_id not in done and job.job_id not in seen:
            pending.append(job)
        seen.add(job.job_id)
    return pending, len(jobs) - len(pending)


class _Run:
    """The state of one `run_batch` call: counts, what is saved, and how each runner output is written."""

    def __init__(self, store: Any, saved: dict[str, set[int]], progress: ProgressFn | None,
                 pending: Sequence[BatchJob], summary: BatchSummary):
        self.store, self.saved, self.progress, self.summary = store, saved, progress, summary
        self.jobs_total = len(pending)
        self.images_total = sum(job.image_count for job in pending)
        self.images_done = sum(len(saved.get(job.job_id, ())) for job in pending)
        self.failing: set[str] = set()
        """Jobs whose latest attempt failed (shown by progress bars)."""

    def attempt(self, jobs: Sequence[BatchJob], runner: Runner,
                models_dir: Path | None) -> dict[str, tuple[BatchJob, str]]:
        """Run `jobs` once; return the ones that failed, with their reasons."""
        waiting = {job.job_id: job for job in jobs}
        failures: dict[str, tuple[BatchJob, str]] = {}
        if not waiting:
            return failures
        outputs = runner.run(list(waiting.values()), models_dir)
        try:
            for output in outputs:
                job = waiting.pop(output.job_id, None)
                if job is None:
                    continue  # not asked for in this attempt (a runner's duplicate): nothing to write
                reason = self._accept(job, output)
                if reason is None:
                    self.failing.discard(job.job_id)
                else:
                    failures[job.job_id] = (job, reason)
                    self.failing.add(job.job_id)
                self._report(job, None)
        except (KeyboardInterrupt, StorageError):
            raise
        except Exception as error:  # noqa: BLE001 - the runner broke: its unfinished jobs fail (and are retried)
            reason = f"runner failed: {type(error).__name__}: {error}"
            failures.update({job_id: (job, reason) for job_id, job in waiting.items()})
            waiting.clear()
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()
        failures.update({job_id: (job, "the runner returned no result for it") for job_id, job in waiting.items()})
        return failures

    def _accept(self, job: BatchJob, output: JobOutput) -> str | None:
        """Write the job's images that are not saved yet; the failure reason, or None when the job is done."""
        if output.error is not None:
            return output.error
        indexes = sorted(image.index for image in output.images)
        if indexes != list(range(job.image_count)):
            return f"the runner returned images {indexes}, expected {job.image_count}"
        already = self.saved.setdefault(job.job_id, set())
        for image in sorted(output.images, key=lambda image: image.index):
            if image.index in already:
                continue
            with _sigint_deferred():  # the image, its row and its count go together, or not at all
                path = self.store.save_encoded(image.png, image.infotext, job.params, image.seed, image.subseed,
                                               job.job_id, image.index)
                already.add(image.index)
                self.summary.images += 1
                self.summary.paths.append(path)
                self.images_done += 1
            self._report(job, path)
        self.summary.done += 1
        return None

    def _report(self, job: BatchJob, path: Path | None) -> None:
        if self.progress is not None:
            self.progress(BatchProgress(self.images_done, self.images_total, self.summary.done, self.jobs_total,
                                        len(self.failing), path, job.row))


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives while one image and its history row are written; raise it right after.

    Only the main thread can install signal handlers; elsewhere, and where SIGINT is ignored or not Python's, the
    block runs as it is. The held signal goes to the handler that was installed (Python's raises KeyboardInterrupt)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    caught: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(*caught[0])

"""The job queue: one worker thread owns the model and runs jobs strictly in submission order.

Why one worker: a diffusion model uses all CPU cores (or the whole GPU) for one job, and the model
cache holds one model; running two jobs at once would only slow both and thrash the cache. HTTP
handlers therefore never touch the model: they submit a `Job` and wait for it (A1111's blocking
`/sdapi/v1/txt2img`) or return its id at once (`/difusi/v1/jobs`).

The queue is bounded: when `max_pending` jobs are already waiting, `submit` raises `QueueFull`
(the API answers 503) instead of letting memory and latency grow without limit.

The work itself is a pluggable function `run_job(job) -> result`, so ordering, bounds, cancel and
progress bookkeeping are testable without a model. A job function reports progress through
`job.report(...)` and polls `job.should_stop()` between steps.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difusi.errors import DifusiError, Interrupted

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED, CANCELLED = "queued", "running", "done", "failed", "interrupted", "cancelled"
FINISHED_STATES = frozenset({DONE, FAILED, INTERRUPTED, CANCELLED})


class QueueFull(DifusiError):
    """Raised by `JobQueue.submit` when `max_pending` jobs are already waiting."""


@dataclass
class JobProgress:
    """Where a running job is. `iteration`/`n_iter` count batches (A1111's job_no/job_count)."""

    step: int = 0
    steps: int = 0
    iteration: int = 0
    n_iter: int = 1
    images_done: int = 0
    total_images: int = 0
    textinfo: str | None = None


class Job:
    """One unit of work for the worker, readable by id from any thread.

    `kind` names what to do ("txt2img", "load_model", ...) and `payload` carries its input; the
    job function decides what they mean. `result` is whatever the job function returned (or the
    partial result an `Interrupted` carried); `error` the exception of a failed job.
    """

    def __init__(self, kind: str, payload: Any):
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.payload = payload
        self.status = QUEUED
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.progress = JobProgress()
        self.latents: Any = None
        """The latest latents (x0 estimate) from the sampler, for live previews; None until the first step."""
        self.result: Any = None
        self.error: BaseException | None = None
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Job], None]] = []

    # -- control, called from request threads --------------------------------------------------
    def interrupt(self) -> None:
        """Stop at the next step; finished images are kept (A1111 /interrupt)."""
        self._interrupt.set()

    def skip(self) -> None:
        """Abandon the current batch and go on with the next one (A1111 /skip)."""
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        """Called by the job function once it has honoured a skip, so the next batch runs."""
        self._skip.clear()

    def should_stop(self) -> bool:
        """Polled by the sampler loop between steps."""
        return self._interrupt.is_set() or self._skip.is_set()

    # -- progress, called from the worker ----------------------------------------------------------
    def report(self, latents: Any = None, **fields: Any) -> None:
        """Update progress fields (see `JobProgress`) and, when given, the preview latents."""
        with self._lock:
            for name, value in fields.items():
                if not hasattr(self.progress, name):
                    raise AttributeError(f"JobProgress has no field {name!r}")
                setattr(self.progress, name, value)
            if latents is not None:
                self.latents = latents

    def fraction(self) -> float:
        """Share of the job done in [0, 1], counted in sampling steps over all batches (as A1111)."""
        if self.status in FINISHED_STATES:
            return 1.0
        p = self.progress
        if self.status != RUNNING or p.steps <= 0:
            return 0.0
        done = (p.iteration + min(p.step, p.steps) / p.steps) / max(p.n_iter, 1)
        return max(0.0, min(done, 1.0))

    def eta_seconds(self) -> float:
        """Seconds left, extrapolated from the time spent so far (A1111's eta_relative)."""
        fraction = self.fraction()
        if self.started is None or fraction <= 0.0 or self.status in FINISHED_STATES:
            return 0.0
        elapsed = time.time() - self.started
        return max(elapsed / fraction - elapsed, 0.0)

    # -- completion --------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (any final state); False on timeout."""
        return self._done.wait(timeout)

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` once the job finishes (at once if it already has); from the worker thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def _finish(self, status: str, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self.status = status
            self.result = result
            self.error = error
            self.finished = time.time()
            self.latents = None  # previews are for running jobs; free the tensor
            callbacks, self._callbacks = self._callbacks, []
            self._done.set()
        for callback in callbacks:
            callback(self)


class JobQueue:
    """A bounded FIFO of jobs served by one worker thread calling `run_job(job)`.

    Finished jobs stay readable by id until `keep_finished` newer jobs have finished.
    """

    def __init__(self, run_job: Callable[[Job], Any], max_pending: int = 32, keep_finished: int = 256):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._run_job = run_job
        self.max_pending = max_pending
        self._keep_finished = keep_finished
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._current: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="difusi-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel waiting jobs, interrupt the running one and join the worker."""
        with self._cond:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
            current = self._current
            self._cond.notify_all()
        for job in waiting:
            job._finish(CANCELLED)
        if current is not None:
            current.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- submitting and reading -------------------------------------------------------------------------
    def submit(self, kind: str, payload: Any = None, **progress: Any) -> Job:
        """Append a job; raises QueueFull when `max_pending` jobs are already waiting.

        `progress` sets `JobProgress` fields known before the job runs (txt2img: `n_iter`, `total_images`), so a
        job reads right from the moment it is queued, not only once the worker has loaded its model."""
        job = Job(kind, payload)
        if progress:
            job.report(**progress)  # before the job is visible to the worker or any reader
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise QueueFull(
                    f"the queue is full ({self.max_pending} jobs waiting); retry later or start the server with a larger --queue-size"
                )
            self._pending.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    @property
    def current(self) -> Job | None:
        """The running job, or None when idle."""
        with self._cond:
            return self._current

    def pending(self) -> list[Job]:
        with self._cond:
            return list(self._pending)

    def position(self, job: Job) -> int | None:
        """0-based place of a waiting job in the queue (0 = next); None if not waiting."""
        with self._cond:
            for index, waiting in enumerate(self._pending):
                if waiting is job:
                    return index
        return None

    def cancel(self, job_id: str) -> Job | None:
        """Drop a waiting job, or interrupt it if it is running. Returns the job, None if unknown."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            was_waiting = job in self._pending
            if was_waiting:
                self._pending.remove(job)
        if was_waiting:
            job._finish(CANCELLED)
        elif job.status == RUNNING:
            job.interrupt()
        return job

    # -- the worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._current = job
                job.status = RUNNING
                job.started = time.time()
            try:
                result = self._run_job(job)
            except Interrupted as stopped:
                job._finish(INTERRUPTED, result=getattr(stopped, "result", None), error=stopped)
            except Exception as failure:  # noqa: BLE001 - one bad job must not kill the worker
                job._finish(FAILED, error=failure)
            else:
                job._finish(INTERRUPTED if job.interrupted else DONE, result=result)
            with self._cond:
                self._current = None
                self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status in FINISHED_STATES]
        for job_id in finished[: max(len(finished) - self._keep_finished, 0)]:
            del self._jobs[job_id]

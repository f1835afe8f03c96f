"""Run batch jobs on a Ray cluster: a local one of N workers, or an existing one by address.

    runner = RayRunner(workers=2)                 # starts a local Ray cluster (2 worker slots), shut down by close()
    runner = RayRunner(address="auto")            # or "HOST:PORT", or RAY_ADDRESS: joins a running cluster
    for output in runner.run(jobs, models_dir):   # JobOutput per job, in finishing order
        ...

Each worker is a long-lived Ray actor (`_Worker`) that loads a model once and keeps it across jobs. The runner
hands a worker jobs of the checkpoint it already holds, and moves it to another checkpoint only when its own
runs out, so a batch that mixes models loads each model about once per worker, not once per row. A worker
requests one GPU when the cluster has GPUs. It returns PNG bytes (`difusi.batch.local.run_job`, the same
function the in-process runner calls), never writes files: the driver saves them, so no shared file system is
needed.

Lifecycle: actors start with the runner and live until `close()` (across `run` calls, so a retry pass or the
next batch finds the model loaded). A worker gets jobs only once its process has answered, so one Ray cannot
place (a full cluster) takes no work from the others; `IN_FLIGHT_PER_WORKER` jobs are queued on each actor so it
never waits for the driver. `close()` kills the actors, and shuts down the cluster when the runner started it.

Faults: a worker that dies mid-job (killed actor, killed process, lost node) surfaces as a `RayActorError` on
its jobs; they go back to the front of their queue and the worker is replaced by a fresh actor (Ray's own
restart is off: `ray.kill` ends an actor for good, and the runner must know which job to redo). The job it was
running (the oldest that never returned; actors run tasks in order) is blamed: one that kills
`MAX_DEATHS_PER_JOB` workers is reported failed instead of killing workers forever. The driver
(`difusi.batch.driver.run_batch`) then retries failed jobs once and writes each image once, by job id.

Threads: difusi-mini's PNG bytes depend on torch's intra-op thread count (measured here too: 1 and 2 threads
agree on a 2-core Xeon, 3 and 4 change 15-16 of 16 PNGs). A job carries the driver's count (`BatchJob.threads`,
the rule in `difusi.batch.jobs`) and `run_job` runs it at exactly that count, so a worker's images equal the
in-process runner's and `difusi generate`'s where the driver runs. Each worker also starts at
`threads_per_worker` (default: the same driver count) rather than Ray's OMP_NUM_THREADS=1 (its `num_cpus`).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difusi.batch.jobs import BatchJob, JobOutput
from difusi.errors import DifusiError


class RayClusterError(DifusiError):
    """Ray cannot be used for a batch: not installed, the cluster unreachable, too few GPUs, workers keep dying.

    One line naming the address or resource; the CLI prints it and exits non-zero."""


MAX_DEATHS_PER_JOB = 3
"""A job whose worker died this many times while running it is reported failed (it likely kills workers)."""
IN_FLIGHT_PER_WORKER = 2
"""Jobs queued on each actor, so it starts the next while the driver collects the last (hides the round trip)."""
CONNECT_TIMEOUT_S = 3.0
"""How long a TCP probe of a Ray address may take before the address is called unreachable."""
GCS_ANSWER_TIMEOUT_S = 3.0
"""How long a listening port may take to answer as a Ray GCS (a real one answers in milliseconds)."""
WORKER_START_TIMEOUT_S = 180.0
"""How long a batch waits with no worker up (Ray cannot place one: the cluster is full) before it gives up."""
_OBJECT_STORE_BYTES = 128 * 1024 * 1024
"""A local cluster's shared-memory store: PNGs are kilobytes, so Ray's default (30 % of RAM) would be waste."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise RayClusterError("Ray is not installed: pip install 'difusi[ray]' (needed for --workers/--ray-address)") from error
    return ray


class _Worker:
    """The Ray actor body (wrapped by `ray.remote` at runtime, so importing this module needs no Ray).

    Keeps one model: `difusi.api.get_model`'s process-wide cache reloads only when the checkpoint changes."""

    def __init__(self, device: str, precision: str, offload: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the thread rule (module docstring): identical bytes whatever the layout
        self._device, self._precision, self._offload = device, precision, offload
        self._held: str | None = None  # resolved path of the loaded model ("" = difusi-mini); None = nothing yet
        self._loads = 0

    def run(self, job: BatchJob, models_dir: str | None) -> JobOutput:
        from difusi.api import get_model
        from difusi.batch.local import run_job
        from difusi.models.catalog import resolve_checkpoint

        try:
            path = None if job.checkpoint is None else resolve_checkpoint(job.checkpoint, models_dir)
            held = "" if path is None else str(path)
            if self._held != held:
                self._loads += 1
            model = get_model(path, device=self._device, precision=self._precision, offload=self._offload)
            self._held = held
            return run_job(model, job, models_dir)
        except DifusiError as error:  # an unusable model fails its job (the driver retries), the worker lives on
            return JobOutput(job_id=job.job_id, row=job.row, images=[], error=f"model: {error}")

    def info(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "loads": self._loads,
                "checkpoint": self._held,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


@dataclass
class _Slot:
    """One worker position: the current actor, its generation (bumped on replacement) and what it holds."""

    actor: Any
    generation: int = 0
    checkpoint: str = ""  # the group (`_group`) of the jobs it was last given
    assigned: bool = False  # has ever been given a job (an unassigned slot may take any checkpoint)
    in_flight: collections.deque[tuple[str, Any]] = field(default_factory=collections.deque)  # (job id, ref), oldest first
    ready: bool = False  # its process answered: only then does it get jobs (one Ray could not place gets none)
    ready_ref: Any = None  # the pending answer to its first `info` call while not ready


def check_address(address: str) -> None:
    """Fail within seconds, naming the address, when no Ray cluster answers there (ray.init retries for 20 s)."""
    if address in ("auto", "local"):
        return  # ray.init finds (or fails to find) the cluster from its session files at once
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise RayClusterError(f"Ray cluster at {address} is unreachable: {error.strerror or error}") from error
    if address.startswith("ray://"):
        return  # Ray Client speaks its own protocol; ray.init reports a wrong one quickly
    # Something listens; is it a Ray GCS? Asked in a child process with a deadline: ray.init retries for 20 s
    # before it gives up on a port that answers but is not Ray (a proxy, another service), Ray's client keeps
    # no timeout when the port stays silent (measured: 13 s), and its C++ side logs every try to fd 2. A child
    # is killed at the deadline with its logs, so the user sees one line.
    try:
        probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, target, str(int(GCS_ANSWER_TIMEOUT_S * 1000))],
                               capture_output=True, text=True, timeout=GCS_ANSWER_TIMEOUT_S + 2)  # + python start
    except subprocess.TimeoutExpired:
        raise RayClusterError(f"Ray cluster at {address} is unreachable: no answer within {GCS_ANSWER_TIMEOUT_S:g} s") from None
    if probe.returncode != 0:
        reason = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else f"probe exited {probe.returncode}"
        raise RayClusterError(f"Ray cluster at {address} is unreachable: {reason}")


_GCS_PROBE = """
import sys
try:
    from ray._raylet import InnerGcsClient  # private API: without it, say yes and let ray.init decide
except ImportError:
    sys.exit(0)
try:
    InnerGcsClient.standalone(sys.argv[1], None, int(sys.argv[2]))
except Exception as error:
    print(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    sys.exit(1)
"""


class RayRunner:
    """Runs `BatchJob`s on Ray actors; see the module docstring. Satisfies `difusi.batch.jobs.Runner`.

    `workers=N` starts a local cluster with N worker slots (or, when this process is already connected to Ray,
    adds N actors to that cluster). `address` ("HOST:PORT", "ray://HOST:PORT", "auto"; default: env
    `RAY_ADDRESS`) joins a running cluster; there `workers` defaults to its free GPUs, else its free CPUs divided
    by the threads per worker. Each worker asks Ray for 1 CPU slot, and for 1 GPU when the cluster has GPUs and
    `device` is not "cpu". `device`, `precision` and `offload` are each worker's `difusi.devices` choices.
    `threads_per_worker` defaults to this process's torch thread count (the thread rule, module docstring).
    """

    worker_class: type = _Worker
    """The actor body; a subclass may wrap it (tests make one that crashes on a given row)."""

    def __init__(self, workers: int | None = None, address: str | None = None, *, device: str = "auto",
                 precision: str = "auto", offload: str = "none", threads_per_worker: int | None = None) -> None:
        import torch

        if workers is not None and workers < 1:
            raise RayClusterError(f"--workers: must be at least 1, got {workers}")
        self._ray = ray = _import_ray()
        self.threads = threads_per_worker or torch.get_num_threads()
        self.device, self.precision, self.offload = device, precision, offload
        address = address or (os.environ.get("RAY_ADDRESS") if workers is None else None)
        self._owns_cluster = False
        if address:
            check_address(address)  # also when already connected: a wrong address is the user's error to see
        if ray.is_initialized():
            pass  # reuse this process's connection (tests share one cluster; a library caller may have its own)
        elif address:
            self._init(address=address)
        else:
            # Our own cluster: logical CPUs = worker slots, so exactly `workers` actors fit and none queue.
            # "local": a new cluster even when RAY_ADDRESS or `ray start` points at another one.
            self._init(address="local", num_cpus=workers or 1, object_store_memory=_OBJECT_STORE_BYTES)
            self._owns_cluster = True
        resources = ray.cluster_resources()
        self.gpus_per_worker = 1 if resources.get("GPU") and device != "cpu" else 0
        if workers is None:  # what is free now: actors beyond it would wait for resources (and get no jobs)
            free = ray.available_resources()
            workers = (max(1, int(free.get("GPU", 0))) if self.gpus_per_worker
                       else max(1, int(free.get("CPU", 1)) // self.threads))
        if self.gpus_per_worker and workers > int(resources["GPU"]):
            raise RayClusterError(f"--workers {workers} needs {workers} GPUs (one per worker); the cluster has {int(resources['GPU'])}")
        self.workers = workers
        self._actor_class = ray.remote(self.worker_class).options(
            num_cpus=1, num_gpus=self.gpus_per_worker,
            max_restarts=0,  # a dead worker is replaced by the runner, which also redoes its job (see _replace)
            max_task_retries=0,
        )
        self._slots = [self._started(_Slot(actor=self._spawn())) for _ in range(workers)]
        self.replacements = 0

    def _init(self, **options: Any) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report, no prompt
        try:
            self._ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                           namespace="difusi", **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = None if options.get("address") == "local" else options.get("address")
            what = f"Ray cluster at {where}" if where else "a local Ray cluster"
            raise RayClusterError(f"{what} could not be used: {str(error).splitlines()[0] if str(error) else error}") from error

    def _spawn(self) -> Any:
        return self._actor_class.remote(self.device, self.precision, self.offload, self.threads)

    @staticmethod
    def _started(slot: _Slot) -> _Slot:
        slot.ready, slot.ready_ref = False, slot.actor.info.remote()
        return slot

    # -- the Runner protocol -------------------------------------------------------------------------------
    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        ray = self._ray
        where = None if models_dir is None else str(models_dir)  # a path on the workers' machines
        queues: dict[str, collections.deque[BatchJob]] = collections.OrderedDict()
        for job in jobs:
            queues.setdefault(_group(job), collections.deque()).append(job)
        by_id = {job.job_id: job for job in jobs}
        deaths: collections.Counter[str] = collections.Counter()
        pending: dict[Any, tuple[_Slot, int, BatchJob]] = {}  # ref -> (slot, its generation at submit, job)
        waiting_since = time.monotonic()  # when the last worker came up or the last job finished
        try:
            while pending or any(queues.values()):
                for depth in range(IN_FLIGHT_PER_WORKER):  # breadth first: every idle worker gets a job first
                    for slot in self._slots:
                        if not slot.ready or len(slot.in_flight) > depth:
                            continue
                        job = self._next_job(slot, queues)
                        if job is not None:
                            ref = slot.actor.run.remote(job, where)
                            pending[ref] = (slot, slot.generation, job)
                            slot.in_flight.append((job.job_id, ref))
                starting = {slot.ready_ref: slot for slot in self._slots if not slot.ready}
                if not pending and time.monotonic() - waiting_since > WORKER_START_TIMEOUT_S:
                    raise RayClusterError(
                        f"no Ray worker started within {WORKER_START_TIMEOUT_S:g} s (each needs 1 CPU"
                        f"{' and 1 GPU' if self.gpus_per_worker else ''}; free now: {_free(ray)})")
                ready, _ = ray.wait([*pending, *starting], num_returns=1, timeout=1.0)  # timeout: Ctrl-C stays responsive
                for ref in ready:
                    if ref in starting:
                        slot = starting[ref]
                        try:
                            ray.get(ref)
                            slot.ready, slot.ready_ref = True, None
                        except ray.exceptions.RayActorError:  # it died starting (import error, OOM): a new one
                            self._replace(slot)
                        waiting_since = time.monotonic()
                        continue
                    waiting_since = time.monotonic()
                    slot, generation, job = pending.pop(ref)
                    current = generation == slot.generation
                    try:
                        output = ray.get(ref)
                    except ray.exceptions.RayActorError as error:
                        if current:  # the first death reported for this actor: blame its running job, replace it
                            deaths[self._running_job(slot)] += 1
                            self._replace(slot)  # its other in-flight jobs fail the same way and are requeued
                        if deaths[job.job_id] >= MAX_DEATHS_PER_JOB:
                            yield JobOutput(job.job_id, job.row, [], error=f"its worker died {deaths[job.job_id]} times: {_first_line(error)}")
                        else:
                            queues.setdefault(_group(job), collections.deque()).appendleft(by_id[job.job_id])
                        continue
                    except ray.exceptions.RayTaskError as error:  # an unexpected exception in run_job
                        output = JobOutput(job.job_id, job.row, [], error=_first_line(error.cause or error))
                    if current:
                        slot.in_flight.remove((job.job_id, ref))
                    yield output
        finally:
            for ref in pending:  # an abandoned run (Ctrl-C, driver error): do not leave work queued on the actors
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort; actors are killed by close() anyway
                    pass
            for slot in self._slots:
                slot.in_flight.clear()

    def _next_job(self, slot: _Slot, queues: dict[str, collections.deque[BatchJob]]) -> BatchJob | None:
        """The worker's next job: its own checkpoint first (no reload); else the checkpoint with the most
        remaining jobs per worker already holding it (so a large group gets several workers, a small one one),
        but a loaded worker leaves a group that its holders will finish anyway."""
        if slot.assigned and queues.get(slot.checkpoint):
            return queues[slot.checkpoint].popleft()
        if slot.in_flight:
            return None  # finish the current checkpoint's queued jobs before switching: no interleaved reloads
        holders = collections.Counter(s.checkpoint for s in self._slots if s.assigned and s is not slot)
        candidates = [(len(queue) / (1 + holders[name]), -index, name)
                      for index, (name, queue) in enumerate(queues.items()) if queue
                      # A worker with a model loaded switches (a reload) only to help where the workers on the
                      # other model have more rows waiting than they hold in flight; else it is left idle.
                      if not slot.assigned or len(queue) > IN_FLIGHT_PER_WORKER * holders[name]]
        if not candidates:
            return None
        _, _, name = max(candidates)
        slot.checkpoint, slot.assigned = name, True
        return queues[name].popleft()

    def _running_job(self, slot: _Slot) -> str:
        """The job a dead actor was running: it runs its tasks in order, so the oldest one that did not return."""
        for job_id, ref in slot.in_flight:
            try:
                self._ray.get(ref, timeout=10)  # finished before the death: its result is kept for the main loop
            except Exception:  # noqa: BLE001 - RayActorError (or a timeout): this one never returned
                return job_id
        return slot.in_flight[0][0] if slot.in_flight else ""

    def _replace(self, slot: _Slot) -> None:
        """A fresh actor in the slot (the old one is dead, or must be): the new one loads its model on its first job."""
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        slot.actor = self._spawn()
        self._started(slot)
        slot.generation += 1
        slot.assigned = False
        slot.in_flight.clear()
        self.replacements += 1
        if self.replacements > 3 * len(self._slots) + 5:
            raise RayClusterError(f"Ray workers keep dying ({self.replacements} replaced); see the Ray logs under /tmp/ray")

    # -- helpers for tests, the bench and diagnostics ------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """The current actor handles, one per worker slot (a test kills one with `ray.kill`)."""
        return [slot.actor for slot in self._slots]

    def worker_info(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """pid, torch threads, model loads and held checkpoint of each current worker."""
        return self._ray.get([slot.actor.info.remote() for slot in self._slots], timeout=timeout)

    def warm_up(self, timeout: float = 120.0) -> float:
        """Wait until every worker process is up (torch imported); returns the seconds waited."""
        started = time.perf_counter()
        for slot in self._slots:
            if not slot.ready:
                self._ray.get(slot.ready_ref, timeout=timeout)
                slot.ready, slot.ready_ref = True, None
        return time.perf_counter() - started

    def close(self) -> None:
        for slot in self._slots:
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._slots = []
        if self._owns_cluster and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_cluster = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free(ray: Any) -> str:
    free = ray.available_resources()
    return ", ".join(f"{name} {free.get(name, 0):g}" for name in ("CPU", "GPU"))


def _group(job: BatchJob) -> str:
    """Jobs of one model share a group, which a worker keeps loaded. The reference as written is part of the key,
    not only the sha256: two names for identical bytes are two files, whose infotexts name different models."""
    return f"{job.model_sha256}/{job.checkpoint}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

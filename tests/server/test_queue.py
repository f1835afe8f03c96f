"""The job queue with a stand-in job function: order, bound, cancel/interrupt/skip, progress, failures."""

from __future__ import annotations

import threading
import time

import pytest

from difusi.errors import Interrupted
from difusi.server.queue import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, JobQueue, QueueFull


class Gate:
    """A job function that records its calls and blocks until released, to hold the worker."""

    def __init__(self):
        self.order: list[str] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, job):
        self.order.append(job.payload)
        self.started.set()
        if job.payload == "block":
            assert self.release.wait(5)
        if job.payload == "fail":
            raise RuntimeError("boom")
        return f"result-{job.payload}"


@pytest.fixture()
def gated():
    gate = Gate()
    queue = JobQueue(gate, max_pending=3)
    queue.start()
    yield queue, gate
    gate.release.set()
    queue.stop()


def test_jobs_run_in_submission_order_and_keep_results(gated):
    queue, gate = gated
    blocker = queue.submit("t", "block")
    assert gate.started.wait(5)
    jobs = [queue.submit("t", str(i)) for i in range(3)]
    assert [queue.position(job) for job in jobs] == [0, 1, 2]
    assert all(job.status == QUEUED for job in jobs)
    gate.release.set()
    for job in jobs:
        assert job.wait(5)
    assert gate.order == ["block", "0", "1", "2"]
    assert [job.result for job in jobs] == ["result-0", "result-1", "result-2"]
    assert blocker.status == DONE and queue.get(jobs[1].id) is jobs[1]


def test_full_queue_raises_and_recovers(gated):
    queue, gate = gated
    queue.submit("t", "block")
    assert gate.started.wait(5)
    waiting = [queue.submit("t", str(i)) for i in range(3)]
    with pytest.raises(QueueFull, match="3 jobs waiting"):
        queue.submit("t", "overflow")
    gate.release.set()
    assert waiting[-1].wait(5)
    assert queue.submit("t", "after").wait(5)  # room again once the backlog drained


def test_failure_is_kept_on_the_job_and_the_worker_survives(gated):
    queue, gate = gated
    bad = queue.submit("t", "fail")
    good = queue.submit("t", "ok")
    assert good.wait(5) and bad.done
    assert bad.status == FAILED and isinstance(bad.error, RuntimeError)
    assert good.status == DONE and good.result == "result-ok"


def test_cancel_waiting_job_and_interrupt_running_job():
    steps_seen: list[int] = []

    def stepping(job):
        for step in range(1, 200):
            if job.should_stop():
                error = Interrupted("stopped")
                error.result = f"partial after {step - 1}"
                raise error
            job.report(step=step, steps=200)
            steps_seen.append(step)
            time.sleep(0.005)
        return "complete"

    queue = JobQueue(stepping, max_pending=4)
    queue.start()
    try:
        running = queue.submit("t", None)
        waiting = queue.submit("t", None)
        deadline = time.time() + 5
        while running.progress.step < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert running.status == RUNNING and 0 < running.fraction() < 1
        assert queue.cancel(waiting.id) is waiting and waiting.status == CANCELLED
        queue.cancel(running.id)
        assert running.wait(5)
        assert running.status == INTERRUPTED
        assert running.result.startswith("partial after") and max(steps_seen) < 199
        assert queue.cancel("no-such-id") is None
    finally:
        queue.stop()


def test_skip_is_seen_by_should_stop_and_cleared_by_the_job():
    seen = []

    def job_fn(job):
        deadline = time.time() + 5
        while not job.skipped and time.time() < deadline:
            time.sleep(0.005)
        seen.append(job.should_stop())
        job.clear_skip()
        seen.append(job.should_stop())
        return "ok"

    queue = JobQueue(job_fn)
    queue.start()
    try:
        job = queue.submit("t")
        while queue.current is not job:
            time.sleep(0.005)
        job.skip()
        assert job.wait(5)
        assert seen == [True, False] and job.status == DONE
    finally:
        queue.stop()


def test_progress_fraction_counts_batches_like_a1111():
    queue = JobQueue(lambda job: None)
    job = queue.submit("t")
    job.status = RUNNING
    job.report(step=5, steps=10, iteration=1, n_iter=2)
    assert job.fraction() == pytest.approx(0.75)  # (1 + 5/10) / 2
    job.report(step=10, steps=10, iteration=1, n_iter=2)
    assert job.fraction() == pytest.approx(1.0)
    with pytest.raises(AttributeError):
        job.report(nonsense=1)


def test_done_callbacks_fire_once_even_when_added_late(gated):
    queue, _ = gated
    job = queue.submit("t", "x")
    calls = []
    job.add_done_callback(lambda j: calls.append(("early", j.status)))
    assert job.wait(5)
    job.add_done_callback(lambda j: calls.append(("late", j.status)))
    assert sorted(calls) == [("early", DONE), ("late", DONE)]


def test_stop_cancels_waiting_jobs():
    gate = Gate()
    queue = JobQueue(gate, max_pending=5)
    queue.start()
    queue.submit("t", "block")
    assert gate.started.wait(5)
    waiting = queue.submit("t", "never")
    gate.release.set()
    queue.stop()
    assert waiting.status in (CANCELLED, DONE)  # may have started in the race; never left hanging
    assert waiting.done
    with pytest.raises(QueueFull):
        queue.submit("t", "late")

"""RayRunner on a real local Ray cluster: same bytes as in-process, a killed worker or driver loses nothing.

One cluster serves the whole module (starting one costs seconds on 2 cores); its 4 logical CPUs leave room for
the module's 2-worker runner and a 2-worker driver subprocess that joins it by address. The test process runs
torch at 1 thread (the shared CPU), so by the thread rule every worker and `difusi generate` (OMP_NUM_THREADS=1)
run at 1 thread too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from difusi.batch.jobs import BatchJob, JobOutput  # noqa: E402
from difusi.batch.ray_runner import RayClusterError, RayRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a blue background", "a big yellow square at the top", "a green triangle",
           "a small blue circle, (bright:1.2)", "two red squares", "a yellow circle at the bottom"]
SAMPLERS = ["Euler a", "DPM++ 2M", "Euler", "DDIM"]


def _rows() -> list[dict]:
    """12 rows on difusi-mini at 64 px, 2-3 steps, varying every kind of field a worker must reproduce."""
    rows = []
    for i in range(12):
        row = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + 7 * i, "steps": 2 + i % 2, "width": 64,
               "height": 64, "sampler_name": SAMPLERS[i % len(SAMPLERS)], "cfg_scale": 4 + i % 3}
        if i % 3 == 0:
            row["batch_size"] = 2
        if i % 4 == 1:
            row["negative_prompt"] = "blurry"
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _jobs(path: Path, models_dir: Path | None = None) -> list[BatchJob]:
    """The batch file's jobs, as `difusi batch` builds them (rows validated, ids, threads)."""
    from difusi.batch.rows import build_jobs, read_rows

    jobs, failures = build_jobs(read_rows(path), models_dir=models_dir)
    assert not failures
    return jobs


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        import logging

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 namespace="difusi-tests", object_store_memory=128 * 1024 * 1024)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner(cluster: str) -> Iterator[RayRunner]:
    with RayRunner(workers=2) as made:
        made.warm_up()
        yield made


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("batch") / "rows.jsonl", _rows())


def _by_job(outputs: Iterator[JobOutput]) -> dict[str, list[bytes]]:
    collected: dict[str, list[bytes]] = {}
    for output in outputs:
        assert output.error is None, output.error
        assert output.job_id not in collected, "a job came back twice"
        collected[output.job_id] = [image.png for image in sorted(output.images, key=lambda image: image.index)]
    return collected


def test_workers_follow_the_thread_rule(runner: RayRunner) -> None:
    import torch

    info = runner.worker_info()
    assert len({entry["pid"] for entry in info}) == 2
    assert all(entry["threads"] == torch.get_num_threads() == 1 for entry in info)


def test_two_workers_give_the_same_png_bytes_as_in_process(runner: RayRunner, batch_file: Path) -> None:
    from difusi.batch.local import LocalRunner

    jobs = _jobs(batch_file)
    assert len(jobs) == 12
    started = time.perf_counter()
    on_ray = _by_job(runner.run(jobs, None))
    ray_seconds = time.perf_counter() - started
    local = LocalRunner()
    try:
        in_process = _by_job(local.run(jobs, None))
    finally:
        local.close()
    assert set(on_ray) == {job.job_id for job in jobs}
    for job in jobs:
        assert len(on_ray[job.job_id]) == job.params.total_images
        assert on_ray[job.job_id] == in_process[job.job_id], f"row {job.row} differs on Ray"
    assert {entry["pid"] for entry in runner.worker_info()}  # both workers still alive
    print(f"12 rows on 2 Ray workers: {ray_seconds:.1f} s")


def test_ray_bytes_equal_difusi_generate(runner: RayRunner, tmp_path: Path) -> None:
    """One row through `difusi generate` (a fresh process, 1 thread as its env says) vs the same row on Ray."""
    row = {"prompt": "a small blue circle, (bright:1.2)", "seed": 31, "steps": 3, "width": 64, "height": 64,
           "sampler_name": "DPM++ 2M", "cfg_scale": 5, "batch_size": 2, "negative_prompt": "blurry"}
    jobs = _jobs(_write_jsonl(tmp_path / "one.jsonl", [row]))
    [output] = list(runner.run(jobs, None))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFUSI_OUTPUTS_DIR": str(tmp_path / "out"),
           "DIFUSI_MODELS_DIR": str(tmp_path / "models"), "DIFUSI_CONFIG": str(tmp_path / "none.json")}
    done = subprocess.run(
        [sys.executable, "-m", "difusi", "generate", row["prompt"], "--seed", "31", "--steps", "3", "--width", "64",
         "--height", "64", "--sampler", "DPM++ 2M", "--cfg-scale", "5", "--batch-size", "2",
         "--negative-prompt", "blurry"], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    paths = [Path(line.split("  seed=")[0]) for line in done.stdout.splitlines() if "  seed=" in line]
    assert len(paths) == 2
    assert [image.png for image in sorted(output.images, key=lambda image: image.index)] == [
        path.read_bytes() for path in paths]


class _KillOneWorker:
    """A Runner wrapper: after the first finished job, kill worker 0 with jobs still in flight on it, either as
    an actor (`ray.kill`, which Ray does not restart) or as a process (SIGKILL, like the OOM killer)."""

    def __init__(self, inner: RayRunner, how: str) -> None:
        self.inner = inner
        self.how = how
        self.killed: list[int] = []

    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        for output in self.inner.run(jobs, models_dir):
            if not self.killed:
                pid = self.inner.worker_info()[0]["pid"]
                if self.how == "ray.kill":
                    ray.kill(self.inner.actors[0])
                else:
                    os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
            yield output

    def close(self) -> None:
        pass


def _history_count(outputs: Path) -> int:
    with sqlite3.connect(outputs / "history.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


def _pngs(outputs: Path) -> list[Path]:
    return sorted(outputs.rglob("*.png"))


def _no_temp_files(outputs: Path) -> bool:
    return not [path for path in outputs.rglob("*") if path.name.startswith(".difusi-tmp-")]


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killed_worker_is_replaced_and_every_row_done_once(runner: RayRunner, batch_file: Path, tmp_path: Path,
                                                           how: str) -> None:
    from difusi.batch.driver import run_batch
    from difusi.store import OutputStore

    jobs = _jobs(batch_file)
    total = sum(job.params.total_images for job in jobs)
    replaced_before = runner.replacements
    killer = _KillOneWorker(runner, how)
    with OutputStore(tmp_path / "out") as store:
        summary = run_batch(jobs, killer, store)
    assert killer.killed, "the worker was never killed"
    assert runner.replacements == replaced_before + 1
    assert summary.done == len(jobs) and not summary.failed, summary
    assert _history_count(tmp_path / "out") == total
    assert len(_pngs(tmp_path / "out")) == total
    assert _no_temp_files(tmp_path / "out")
    infotexts = [_infotext(path) for path in _pngs(tmp_path / "out")]
    assert len(set(infotexts)) == total  # every image once: no row redone into a second file
    assert killer.killed[0] not in {entry["pid"] for entry in runner.worker_info()}  # a new process took its place


def _infotext(path: Path) -> str:
    from difusi.infotext import read_infotext

    text = read_infotext(path)
    assert text
    return text


SUMMARY = re.compile(r"batch done: (\d+) done, (\d+) skipped \(already done\), (\d+) failed")


def test_killed_driver_rerun_finishes_without_redoing(cluster: str, tmp_path: Path) -> None:
    rows = [dict(row, batch_size=1) for row in _rows()]  # one image per row: the count says how many rows are done
    batch = _write_jsonl(tmp_path / "rows.jsonl", rows)
    outputs = tmp_path / "out"
    # `difusi batch` joins the module's cluster by address: its workers default to the free CPUs (2 of 4).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DIFUSI_OUTPUTS_DIR": str(outputs),
           "DIFUSI_MODELS_DIR": str(tmp_path / "models"), "DIFUSI_CONFIG": str(tmp_path / "none.json")}
    command = [sys.executable, "-m", "difusi", "batch", str(batch), "--ray-address", cluster]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    done_before = 0
    while time.monotonic() < deadline and first.poll() is None:
        try:
            done_before = _history_count(outputs)
        except sqlite3.OperationalError:  # the database or its table is not made yet
            done_before = 0
        if done_before >= 3:
            break
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    done_before = _history_count(outputs)
    assert 3 <= done_before < len(rows), f"the kill came too late or too early: {done_before} rows done"
    first_images = {path: path.read_bytes() for path in _pngs(outputs)}

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = SUMMARY.search(second.stderr)
    assert summary, second.stderr
    done, skipped, failed = (int(value) for value in summary.groups())
    assert failed == 0
    assert done + skipped == len(rows)
    assert skipped >= done_before  # a row whose image was published before the kill is never redone
    assert _history_count(outputs) == len(rows)
    assert len(_pngs(outputs)) == len(rows)
    assert _no_temp_files(outputs)
    assert len({_infotext(path) for path in _pngs(outputs)}) == len(rows)
    for path, data in first_images.items():
        assert path.read_bytes() == data  # finished images were kept as they were


def test_grouping_keeps_each_model_on_one_worker(runner: RayRunner, tmp_path: Path) -> None:
    """Rows alternating between two checkpoints: each worker loads about one, not one per row."""
    from difusi.models import default_model_path

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(default_model_path(), models / "mini-copy.safetensors")
    rows = []
    for i in range(8):
        row = {"prompt": PROMPTS[i % 3], "seed": 50 + i, "steps": 2, "width": 64, "height": 64}
        if i % 2:
            row["model"] = "mini-copy"
        rows.append(row)
    jobs = _jobs(_write_jsonl(tmp_path / "mixed.jsonl", rows), models_dir=models)
    loads_before = sum(entry["loads"] for entry in runner.worker_info())
    outputs = list(runner.run(jobs, models))  # the runner protocol directly: no store needed
    assert all(output.error is None for output in outputs), [output.error for output in outputs]
    assert len(outputs) == 8
    loads = sum(entry["loads"] for entry in runner.worker_info()) - loads_before
    assert loads <= 3, f"{loads} model loads for 8 rows of 2 models on 2 workers"
    for job, output in zip(sorted(jobs, key=lambda j: j.job_id), sorted(outputs, key=lambda o: o.job_id), strict=True):
        assert ("Model: mini-copy" in output.images[0].infotext) == (job.checkpoint == "mini-copy")


def test_unreachable_address_fails_fast_with_one_line(cluster: str) -> None:
    started = time.monotonic()
    with pytest.raises(RayClusterError) as raised:
        RayRunner(address="127.0.0.1:9")
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert "127.0.0.1:9" in message and "\n" not in message


def test_cli_address_that_is_not_ray_is_one_line_within_seconds(tmp_path: Path) -> None:
    """`difusi batch --ray-address` at a port that accepts connections but never answers like Ray (the hard case:
    ray.init alone would retry for 20 s), as a fresh process: exit non-zero with one stderr line naming it."""
    import socket

    batch = _write_jsonl(tmp_path / "rows.jsonl", _rows()[:2])
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFUSI_OUTPUTS_DIR": str(tmp_path / "out"),
               "DIFUSI_CONFIG": str(tmp_path / "none.json"), "RAY_ADDRESS": ""}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "difusi", "batch", str(batch), "--ray-address", address],
                              capture_output=True, text=True, env=env, timeout=60)
        seconds = time.monotonic() - started
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], done.stderr
    assert seconds < 15, f"{seconds:.1f} s (process start included)"
    assert not (tmp_path / "out").exists() or not _pngs(tmp_path / "out")


def test_scheduler_hands_each_worker_its_own_model_first() -> None:
    """The assignment rule alone (no cluster): a worker keeps its model while that model has rows; an idle worker
    takes the model with the most rows per worker already on it; nothing switches with jobs still queued."""
    import collections

    from difusi.batch.ray_runner import _group, _Slot
    from difusi.params import GenerationParams

    def job(name: str | None, number: int) -> BatchJob:
        return BatchJob(job_id=f"{name}-{number}", row=number, params=GenerationParams(prompt="x"), checkpoint=name,
                        model_sha256=f"sha-{name}")

    jobs = [job("a" if i % 4 else "b", i) for i in range(12)]  # a: 9 rows, b: 3 rows, interleaved
    queues: dict[str, collections.deque[BatchJob]] = collections.OrderedDict()
    for item in jobs:
        queues.setdefault(_group(item), collections.deque()).append(item)
    runner = object.__new__(RayRunner)
    runner._slots = [_Slot(actor=None, ready=True), _Slot(actor=None, ready=True)]
    loads = [0, 0]
    done: list[str] = []
    while any(queues.values()) or any(slot.in_flight for slot in runner._slots):
        for index, slot in enumerate(runner._slots):  # two in flight per worker, as run() keeps them
            while len(slot.in_flight) < 2:
                before = slot.checkpoint if slot.assigned else None
                picked = runner._next_job(slot, queues)
                if picked is None:
                    break
                loads[index] += _group(picked) != before
                slot.in_flight.append((picked.job_id, None))
        for slot in runner._slots:  # each worker finishes its oldest job
            if slot.in_flight:
                done.append(slot.in_flight.popleft()[0])
    assert sorted(done) == sorted(item.job_id for item in jobs)  # every job handed out exactly once
    assert sum(loads) <= 3 and max(loads) <= 2, loads  # not one load per row: at most one switch in all


GPU_CLUSTER = """
import logging, sys
import ray
from difusi.batch.ray_runner import RayClusterError, RayRunner
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
with RayRunner(workers=2, device="auto") as runner:
    runner.warm_up()
    print("GPUS", runner.gpus_per_worker, sorted(info["gpus"] for info in runner.worker_info()))
with RayRunner(workers=2, device="cpu") as runner:
    print("CPU-ONLY", runner.gpus_per_worker)
try:
    RayRunner(workers=3)
except RayClusterError as error:
    print("TOO-MANY", error)
"""


def test_each_worker_requests_one_gpu_when_the_cluster_has_them(tmp_path: Path) -> None:
    """A cluster that declares 2 GPUs (Ray schedules by declared resources, so none need exist): each worker gets
    one of its own (CUDA_VISIBLE_DEVICES), `--device cpu` asks for none, and more workers than GPUs is one line.
    A fresh process, because this one is connected to the module's GPU-less cluster."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", GPU_CLUSTER], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["GPUS"] == "1 ['0', '1']"
    assert lines["CPU-ONLY"] == "0"
    assert lines["TOO-MANY"] == "--workers 3 needs 3 GPUs (one per worker); the cluster has 2"


def test_a_job_that_kills_every_worker_fails_alone(cluster: str, tmp_path: Path) -> None:
    """A row whose job crashes its worker process each time (think: out of memory) is given up after
    MAX_DEATHS_PER_JOB workers, reported as failed with the reason, and the other rows finish."""
    from difusi.batch.ray_runner import MAX_DEATHS_PER_JOB, _Worker

    class CrashOnRowTwo(_Worker):  # defined in the test, so Ray ships it by value to the workers
        def run(self, job: BatchJob, models_dir: str | None) -> JobOutput:
            if job.row == 2:
                os._exit(1)
            return super().run(job, models_dir)

    class Runner(RayRunner):
        worker_class = CrashOnRowTwo

    jobs = _jobs(_write_jsonl(tmp_path / "rows.jsonl", [dict(row, batch_size=1) for row in _rows()[:4]]))
    with Runner(workers=2) as crashing:
        outputs = {output.row: output for output in crashing.run(jobs, None)}
        # One worker per death of row 2, plus one for each time a crash also lost the reply of another job (on a
        # loaded machine that job is blamed, redone, and still counted below as done once); an innocent job is
        # blamed fewer than MAX_DEATHS_PER_JOB times, or it would have been reported as failed below.
        innocent = len(jobs) - 1
        assert MAX_DEATHS_PER_JOB <= crashing.replacements <= MAX_DEATHS_PER_JOB + innocent * (MAX_DEATHS_PER_JOB - 1)
    assert sorted(outputs) == [1, 2, 3, 4]
    assert outputs[2].error is not None and f"its worker died {MAX_DEATHS_PER_JOB} times" in outputs[2].error
    assert all(outputs[row].error is None and len(outputs[row].images) == 1 for row in (1, 3, 4))

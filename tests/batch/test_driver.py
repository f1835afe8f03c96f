"""The batch driver and the store's job bookkeeping, with fake runners (no model): resume, retry, exactly once."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difusi.batch import BatchInterrupted, BatchJob, EncodedImage, JobOutput, run_batch
from difusi.batch.jobs import job_id_for
from difusi.infotext import read_infotext, write_png
from difusi.params import GenerationParams
from difusi.store import DB_NAME, TEMP_PREFIX, OutputStore


def make_job(row: int, images: int = 1) -> BatchJob:
    params = GenerationParams(prompt=f"row {row}", seed=100 * row, subseed=1, steps=2, width=16, height=8,
                              batch_size=images)
    return BatchJob(job_id_for(params, "0" * 64), row, params, None, "0" * 64)


def png_bytes(job: BatchJob, index: int) -> tuple[bytes, str]:
    infotext = f"row {job.row}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: {job.params.seed + index}, Size: 16x8"
    pixels = np.full((8, 16, 3), (job.row * 10 + index) % 256, dtype=np.uint8)
    buffer = io.BytesIO()
    write_png(Image.fromarray(pixels), buffer, infotext)
    return buffer.getvalue(), infotext


def output_for(job: BatchJob) -> JobOutput:
    images = []
    for index in range(job.image_count):
        png, infotext = png_bytes(job, index)
        images.append(EncodedImage(index, job.params.seed + index, job.params.subseed + index, png, infotext))
    return JobOutput(job.job_id, job.row, images)


class FakeRunner:
    """Yields each job's output; `interrupt_after` raises KeyboardInterrupt after that many outputs (a Ctrl-C),
    `fail` maps a row to how many of its attempts fail."""

    def __init__(self, interrupt_after: int | None = None, fail: dict[int, int] | None = None):
        self.interrupt_after = interrupt_after
        self.fail = dict(fail or {})
        self.ran: list[int] = []

    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        for job in jobs:
            if self.interrupt_after is not None and len(self.ran) == self.interrupt_after:
                raise KeyboardInterrupt
            self.ran.append(job.row)
            if self.fail.get(job.row, 0) > 0:
                self.fail[job.row] -= 1
                yield JobOutput(job.job_id, job.row, error=f"boom on row {job.row}")
                continue
            yield output_for(job)

    def close(self) -> None:
        pass


def history_rows(outputs: Path) -> list[tuple[str, str, int, int]]:
    with sqlite3.connect(outputs / DB_NAME) as db:
        return db.execute("SELECT path, job_id, job_image, job_images FROM images ORDER BY id").fetchall()


def pngs(outputs: Path) -> list[Path]:
    return sorted(outputs.rglob("*.png"))


def test_interrupt_then_rerun_does_every_row_exactly_once(tmp_path: Path) -> None:
    jobs = [make_job(row, images=2 if row == 3 else 1) for row in range(1, 7)]
    outputs = tmp_path / "outputs"
    with OutputStore(outputs) as store, pytest.raises(BatchInterrupted) as stopped:
        run_batch(jobs, FakeRunner(interrupt_after=3), store)
    assert (stopped.value.summary.done, stopped.value.summary.images) == (3, 4)
    assert len(pngs(outputs)) == 4

    runner = FakeRunner()
    with OutputStore(outputs) as store:
        summary = run_batch(jobs, runner, store)
    assert runner.ran == [4, 5, 6]  # finished rows were not sent again
    assert (summary.done, summary.skipped, summary.failed, summary.images) == (3, 3, [], 3)
    rows = history_rows(outputs)
    assert len(rows) == 7 == len(pngs(outputs))
    assert sorted((job_id, index) for _, job_id, index, _ in rows) == sorted(
        (job.job_id, index) for job in jobs for index in range(job.image_count))
    assert not [p for p in outputs.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    # Each file holds exactly the bytes the runner sent.
    for path, job_id, index, _ in rows:
        job = next(job for job in jobs if job.job_id == job_id)
        assert (outputs / path).read_bytes() == png_bytes(job, index)[0]
    with OutputStore(outputs) as store:
        assert store.done_job_ids() == {job.job_id for job in jobs}
        again = run_batch(jobs, FakeRunner(), store)
    assert (again.done, again.skipped, again.images) == (0, 6, 0)


def test_failed_job_is_retried_once_then_reported(tmp_path: Path) -> None:
    jobs = [make_job(row) for row in (1, 2, 3)]
    runner = FakeRunner(fail={1: 1, 2: 5})  # row 1 fails once (retried, done); row 2 always
    with OutputStore(tmp_path) as store:
        summary = run_batch(jobs, runner, store)
    assert runner.ran == [1, 2, 3, 1, 2]
    assert summary.done == 2
    assert [(failure.row, failure.job_id, failure.reason) for failure in summary.failed] == [
        (2, jobs[1].job_id, "boom on row 2")]
    assert {job_id for _, job_id, _, _ in history_rows(tmp_path)} == {jobs[0].job_id, jobs[2].job_id}


def test_retries_zero_reports_at_once(tmp_path: Path) -> None:
    runner = FakeRunner(fail={1: 1})
    with OutputStore(tmp_path) as store:
        summary = run_batch([make_job(1)], runner, store, retries=0)
    assert runner.ran == [1] and [failure.row for failure in summary.failed] == [1]


class SilentRunner(FakeRunner):
    """Never answers for row 2 and sends row 3 with an image missing."""

    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        for job in jobs:
            self.ran.append(job.row)
            if job.row == 2:
                continue
            output = output_for(job)
            if job.row == 3:
                output.images = output.images[:1]
            yield output


def test_missing_and_incomplete_outputs_fail_their_rows(tmp_path: Path) -> None:
    jobs = [make_job(1), make_job(2), make_job(3, images=2)]
    with OutputStore(tmp_path) as store:
        summary = run_batch(jobs, SilentRunner(), store)
    assert summary.done == 1
    assert [(failure.row, failure.reason) for failure in summary.failed] == [
        (2, "the runner returned no result for it"), (3, "the runner returned images [0], expected 2")]
    assert len(pngs(tmp_path)) == 1


class BrokenRunner(FakeRunner):
    def run(self, jobs: Sequence[BatchJob], models_dir: Path | None) -> Iterator[JobOutput]:
        yield output_for(jobs[0])
        raise ConnectionError("cluster went away")


def test_a_broken_runner_fails_the_unfinished_jobs_not_the_batch(tmp_path: Path) -> None:
    jobs = [make_job(1), make_job(2)]
    with OutputStore(tmp_path) as store:
        summary = run_batch(jobs, BrokenRunner(), store, retries=0)
    assert summary.done == 1
    assert [(f.row, f.reason) for f in summary.failed] == [(2, "runner failed: ConnectionError: cluster went away")]


def test_half_saved_job_is_completed_without_saving_its_first_image_twice(tmp_path: Path) -> None:
    job = make_job(1, images=3)
    png, infotext = png_bytes(job, 0)
    with OutputStore(tmp_path) as store:
        store.save_encoded(png, infotext, job.params, job.params.seed, 1, job.job_id, 0)
        assert store.done_job_ids() == set()
        assert store.saved_job_images() == {job.job_id: {0}}
        seen: list[tuple[int, int]] = []
        summary = run_batch([job], FakeRunner(), store, progress=lambda p: seen.append((p.images_done, p.images_total)))
        assert store.done_job_ids() == {job.job_id}
    assert (summary.done, summary.images) == (1, 2)
    assert [index for _, _, index, _ in history_rows(tmp_path)] == [0, 1, 2]
    assert seen[-1] == (3, 3)


def test_duplicate_jobs_in_one_batch_run_once(tmp_path: Path) -> None:
    runner = FakeRunner()
    with OutputStore(tmp_path) as store:
        summary = run_batch([make_job(1), make_job(1)], runner, store)
    assert runner.ran == [1] and (summary.done, summary.skipped) == (1, 1)


def test_save_encoded_writes_exact_bytes_and_fills_size(tmp_path: Path) -> None:
    job = make_job(4)
    params = job.params.replace(width=None, height=None)  # a job that left the size to the model
    png, infotext = png_bytes(job, 0)
    with OutputStore(tmp_path) as store:
        path = store.save_encoded(png, infotext, params, 400, 1, job.job_id, 0)
        entry = store.history()[0]
        with pytest.raises(ValueError, match="not PNG"):
            store.save_encoded(b"GIF89a...", infotext, params, 400, 1, job.job_id, 0)
    assert path.read_bytes() == png
    assert path.name.startswith("00000-400-row-4")
    assert (entry.width, entry.height, entry.seed, entry.path) == (16, 8, 400, path)
    assert read_infotext(path) == infotext


OLD_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, path TEXT NOT NULL UNIQUE, prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL, seed INTEGER NOT NULL, subseed INTEGER, sampler TEXT NOT NULL,
    scheduler TEXT NOT NULL, steps INTEGER NOT NULL, cfg_scale REAL NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, model_name TEXT, model_hash TEXT, infotext TEXT NOT NULL, params_json TEXT NOT NULL
);
INSERT INTO images VALUES (1, '2026-01-01T00:00:00', 'old.png', 'old', '', 1, 2, 'Euler', 'Automatic', 2, 7.0, 64,
                           64, NULL, NULL, 'old', '{}');
"""


def test_old_database_gets_the_job_columns(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(OLD_SCHEMA)
    job = make_job(1)
    with OutputStore(tmp_path) as store:
        assert [entry.prompt for entry in store.history()] == ["old"]
        assert store.done_job_ids() == set()
        png, infotext = png_bytes(job, 0)
        store.save_encoded(png, infotext, job.params, job.params.seed, 1, job.job_id, 0)
        assert store.done_job_ids() == {job.job_id}
        assert [entry.prompt for entry in store.history()] == ["row 1", "old"]
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    assert {"job_id", "job_image", "job_images"} <= columns


def test_ctrl_c_during_a_save_waits_for_its_history_row(tmp_path: Path) -> None:
    import signal

    class InterruptedStore(OutputStore):
        def save_encoded(self, *args: object, **kwargs: object) -> Path:
            # A Ctrl-C arriving mid-save, delivered synchronously (os.kill's delivery time depends on which thread the
            # kernel picks): whatever handler is installed now runs; it must not leave a file without its row.
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            return super().save_encoded(*args, **kwargs)

    jobs = [make_job(1), make_job(2)]
    # Python's own Ctrl-C handler, as in a terminal: a test run in the background (nohup, `cmd &`) starts with SIGINT
    # ignored, and an earlier test may have left another handler.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with InterruptedStore(tmp_path) as store, pytest.raises(BatchInterrupted) as stopped:
            run_batch(jobs, FakeRunner(), store)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert (stopped.value.summary.done, stopped.value.summary.images) == (0, 1)
    assert [job_id for _, job_id, _, _ in history_rows(tmp_path)] == [jobs[0].job_id]
    assert len(pngs(tmp_path)) == 1


def test_a_kill_between_publishing_and_the_row_keeps_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is on disk but its row never came (the process died): the next open rebuilds the row from the
    infotext and takes the job from `pending_jobs`, so a re-run does not save the image a second time."""
    import difusi.store

    class Killed(BaseException):
        pass

    def die(db: object, row: dict, *, recovered: bool = False) -> None:
        raise Killed

    job = make_job(1, images=2)
    with OutputStore(tmp_path) as store:
        png, infotext = png_bytes(job, 0)
        store.save_encoded(png, infotext, job.params, job.params.seed, 1, job.job_id, 0)
        monkeypatch.setattr(difusi.store, "_write_row", die)
        png, infotext = png_bytes(job, 1)
        with pytest.raises(Killed):
            store.save_encoded(png, infotext, job.params, job.params.seed + 1, 2, job.job_id, 1)
    monkeypatch.undo()
    assert len(pngs(tmp_path)) == 2 and len(history_rows(tmp_path)) == 1
    runner = FakeRunner()
    with OutputStore(tmp_path) as store:
        assert store.done_job_ids() == {job.job_id}  # opening the history repaired the row, with its job
        summary = run_batch([job], runner, store)
    assert runner.ran == [] and summary.skipped == 1
    assert sorted((job_id, index) for _, job_id, index, _ in history_rows(tmp_path)) == [(job.job_id, 0),
                                                                                          (job.job_id, 1)]
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM pending_jobs").fetchone() == (0,)

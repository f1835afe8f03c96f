"""`difusi batch` end to end on difusi-mini (64 px, 2-3 steps), in this process: the same PNG bytes as
`difusi generate` per row, exit codes, bad input before any model loads, Ctrl-C and re-run, the thread rule."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difusi.batch import build_jobs, read_rows
from difusi.cli import FIELD_FLAGS
from difusi.params import format_value
from difusi.store import DB_NAME, TEMP_PREFIX


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> Iterator[None]:
    yield  # both paths run at the same (one) thread count; see test_run_job_runs_at_the_jobs_thread_count


def cli(root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str,
        outputs: str = "outputs") -> subprocess.CompletedProcess:
    from difusi import cli as cli_module

    monkeypatch.setenv("DIFUSI_CONFIG", str(root / "no-config.json"))
    monkeypatch.setenv("DIFUSI_MODELS_DIR", str(root / "models"))
    monkeypatch.setenv("DIFUSI_OUTPUTS_DIR", str(root / outputs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        code = cli_module.main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


ROWS = [
    {"prompt": "a red circle on a blue background", "seed": 1, "steps": 2},
    {"prompt": "a blue square", "seed": 2, "steps": 3, "sampler_name": "Euler a"},
    {"prompt": "a cat", "negative_prompt": "blurry, dark", "seed": 3, "steps": 2, "cfg_scale": 4.5},
    {"prompt": "a green triangle", "seed": 4, "steps": 2, "batch_size": 2},
    {"prompt": "yellow", "seed": 5, "steps": 2, "n_iter": 2},
    {"prompt": "a (big:1.3) circle", "steps": 2},  # seed -1: the batch derives one; generate gets it as --seed
    {"prompt": "[red|blue] square", "seed": 7, "steps": 2, "scheduler": "Karras"},
    {"prompt": "wide", "seed": 8, "steps": 2, "width": 72},
    {"prompt": "variation", "seed": 9, "steps": 2, "subseed": 3, "subseed_strength": 0.5},
    {"prompt": 'quoted: "x", y', "seed": 10, "steps": 2, "sampler_name": "Euler"},
    {"prompt": "clip skip", "seed": 11, "steps": 2, "clip_skip": 2},
    {"prompt": "a dog", "seed": 12, "steps": 2, "model": "difusi-mini"},
]


def generate_args(params: object, row: dict) -> list[str]:
    """`difusi generate` flags for a row: its own fields, the batch defaults, and its resolved seeds."""
    values = {**row, "cfg_scale": row.get("cfg_scale", 6.0), "seed": params.seed, "subseed": params.subseed}
    args = [str(values.pop("prompt"))]
    for name, value in values.items():
        args += [FIELD_FLAGS[name], format_value(value) if isinstance(value, float) else str(value)]
    return args


def saved_by_job(outputs: Path) -> dict[tuple[str, int], bytes]:
    with sqlite3.connect(outputs / DB_NAME) as db:
        rows = db.execute("SELECT path, job_id, job_image FROM images").fetchall()
    return {(job_id, index): (outputs / path).read_bytes() for path, job_id, index in rows}


def test_batch_images_are_the_bytes_of_difusi_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    batch_file = tmp_path / "rows.jsonl"
    batch_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    done = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--cfg-scale", "6")
    assert done.returncode == 0, done.stderr
    assert "12 done, 0 skipped (already done), 0 failed; 14 images written" in done.stderr
    jobs, _ = build_jobs(read_rows(batch_file), {"cfg_scale": 6.0})
    batch = saved_by_job(tmp_path / "outputs")
    assert len(batch) == 14
    for job, row in zip(jobs, ROWS, strict=True):
        outputs = f"generate-{job.row}"
        made = cli(tmp_path, monkeypatch, capsys, "generate", *generate_args(job.params, row), outputs=outputs)
        assert made.returncode == 0, made.stderr
        files = sorted((tmp_path / outputs).rglob("*.png"))
        assert len(files) == job.image_count
        for index, path in enumerate(files):
            assert batch[(job.job_id, index)] == path.read_bytes(), f"row {job.row} image {index}"


def test_bad_row_is_one_line_exit_2_before_any_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("difusi.models.load_model", refuse)
    monkeypatch.setattr("difusi.models.cache.load_model", refuse)
    batch_file = tmp_path / "rows.jsonl"
    batch_file.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "steps": 0}\n', encoding="utf-8")
    done = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "2")
    assert done.returncode == 2
    assert done.stderr == f"difusi: error: {batch_file}: row 3: steps: must be in [1, 1000], got 0\n"
    assert not (tmp_path / "outputs" / DB_NAME).exists()
    flag = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "0")
    assert (flag.returncode, flag.stderr) == (2, "difusi: error: --steps: must be in [1, 1000], got 0\n")
    missing = cli(tmp_path, monkeypatch, capsys, "batch", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and missing.stderr.startswith("difusi: error: FILE: cannot read")


def test_skip_invalid_runs_the_rest_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    batch_file = tmp_path / "rows.csv"
    batch_file.write_text("prompt,seed,model\na,1,\nb,2,no-such-model\n", encoding="utf-8")
    strict = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "2")
    assert strict.returncode == 2 and "row 3: model: " in strict.stderr
    done = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "2", "--skip-invalid")
    assert done.returncode == 1
    assert "1 done, 0 skipped (already done), 1 failed" in done.stderr
    assert "difusi: failed: row 3: model: " in done.stderr and "no-such-model" in done.stderr
    assert len(done.stdout.splitlines()) == 1 and done.stdout.endswith("row=2\n")


def test_ray_runner_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "difusi.batch.ray_runner", None)  # as if the module did not exist
    batch_file = tmp_path / "prompts.txt"
    batch_file.write_text("a cat\n", encoding="utf-8")
    done = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--workers", "2")
    assert (done.returncode, done.stderr) == (2, "difusi: error: Ray runner not available\n")


def test_ctrl_c_keeps_finished_rows_and_rerun_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from difusi.batch import local

    batch_file = tmp_path / "prompts.txt"
    batch_file.write_text("--prompt one --seed 1\n--prompt two --seed 2\n--prompt three --seed 3 --batch_size 2\n",
                          encoding="utf-8")
    real = local.run_job
    calls: list[int] = []

    def interrupted_on_second(model: object, job: object, models_dir: object = None) -> object:
        calls.append(job.row)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, job, models_dir)

    monkeypatch.setattr(local, "run_job", interrupted_on_second)
    stopped = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "2")
    assert stopped.returncode == 130
    assert "batch interrupted: 1 done" in stopped.stderr
    monkeypatch.setattr(local, "run_job", real)
    rerun = cli(tmp_path, monkeypatch, capsys, "batch", str(batch_file), "--steps", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert "2 done, 1 skipped (already done), 0 failed; 3 images written" in rerun.stderr
    outputs = tmp_path / "outputs"
    with sqlite3.connect(outputs / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images").fetchone() == (4, 3)
    assert len(list(outputs.rglob("*.png"))) == 4
    assert not [p for p in outputs.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_run_job_runs_at_the_jobs_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread rule (difusi.batch.jobs): a job carries its builder's thread count and runs at exactly it."""
    import torch

    from difusi.api import get_model
    from difusi.batch.local import run_job
    from difusi.batch.rows import BatchRow

    (job,), _ = build_jobs([BatchRow(1, {"prompt": "a cat", "seed": 3, "steps": 2})], {}, threads=2)
    assert job.threads == 2
    seen: list[int] = []
    import difusi.pipeline

    real = difusi.pipeline.txt2img

    def spy(model: object, params: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(model, params, **kwargs)

    monkeypatch.setattr(difusi.pipeline, "txt2img", spy)
    before = torch.get_num_threads()
    output = run_job(get_model(), job)
    assert output.error is None and len(output.images) == 1
    assert seen == [2] and torch.get_num_threads() == before  # restored afterwards


def test_run_job_refuses_another_model(tmp_path: Path) -> None:
    from difusi.api import get_model
    from difusi.batch.local import run_job
    from difusi.batch.rows import BatchRow

    (job,), _ = build_jobs([BatchRow(1, {"prompt": "a cat", "seed": 3, "steps": 2})], {})
    other = job.__class__(job.job_id, job.row, job.params, None, "f" * 64, job.threads)
    output = run_job(get_model(), other)
    assert output.images == [] and output.error is not None and "the job needs ffffffffff" in output.error


def test_run_file_python_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from difusi.batch import run_file

    monkeypatch.setenv("DIFUSI_CONFIG", str(tmp_path / "no-config.json"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    batch_file = tmp_path / "rows.csv"
    batch_file.write_text("prompt,seed,steps\na,1,\nb,2,0\nc,3,\n", encoding="utf-8")
    summary = run_file(batch_file, {"steps": 2}, skip_invalid=True, outputs_dir=tmp_path / "out",
                       models_dir=tmp_path / "models")
    assert (summary.done, summary.skipped, summary.images) == (2, 0, 2)
    assert [(failure.row, failure.job_id) for failure in summary.failed] == [(3, "")]
    assert [path.name.split("-")[1] for path in summary.paths] == ["1", "3"]
    again = run_file(batch_file, {"steps": 2}, skip_invalid=True, outputs_dir=tmp_path / "out",
                     models_dir=tmp_path / "models")
    assert (again.done, again.skipped, again.images) == (0, 2, 0)


def test_progress_bar_on_a_terminal_and_lines_otherwise(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from difusi.batch import BatchProgress
    from difusi.cli import _BatchReporter

    steps = [BatchProgress(1, 3, 0, 2, 0, Path("out/00000-1-a.png"), 1), BatchProgress(1, 3, 1, 2, 0, None, 1),
             BatchProgress(3, 3, 1, 2, 0, Path("out/00001-2-b.png"), 2), BatchProgress(3, 3, 2, 2, 0, None, 2)]
    plain = _BatchReporter()
    for step in steps:
        plain.update(step)
    plain.close()
    captured = capsys.readouterr()
    assert captured.out == "out/00000-1-a.png  row=1\nout/00001-2-b.png  row=2\n"
    lines = captured.err.splitlines()
    assert lines[0].startswith("difusi: 1/3 images, jobs 0/2, ") and lines[-1].startswith("difusi: 3/3 images, jobs 2/2")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = _BatchReporter()
    for step in steps:
        bar.update(step)
    assert bar.bar is not None and bar.bar.n == 3 and bar.bar.total == 3
    bar.close()
    assert "img" in capsys.readouterr().err  # tqdm's unit, on stderr


def test_job_bytes_follow_the_jobs_thread_count_not_the_process(tmp_path: Path) -> None:
    """Built at 3 threads (which round differently from 1 on the CPUs measured), run in a 1-thread process: the
    bytes equal a 3-thread `txt2img`, as a worker with another default thread count would also give."""
    import io

    import torch

    from difusi.api import get_model
    from difusi.batch.local import run_job, torch_threads
    from difusi.batch.rows import BatchRow
    from difusi.infotext import write_png
    from difusi.pipeline import txt2img

    (job,), _ = build_jobs([BatchRow(1, {"prompt": "a red circle", "seed": 11, "steps": 3})], {}, threads=3)
    model = get_model()
    assert torch.get_num_threads() == 1
    output = run_job(model, job)
    with torch_threads(3):
        reference = txt2img(model, job.params).images[0]
    buffer = io.BytesIO()
    write_png(reference.image, buffer, reference.infotext)
    assert output.images[0].png == buffer.getvalue()


def test_killed_driver_rerun_finishes_the_rest_without_redoing(tmp_path: Path) -> None:
    """SIGKILL of a real `difusi batch` process after two images, then the same command again."""
    import os
    import signal

    batch_file = tmp_path / "rows.jsonl"
    batch_file.write_text("".join(json.dumps({"prompt": f"row {n}", "seed": n, "steps": 2}) + "\n" for n in range(8)),
                          encoding="utf-8")
    env = {**os.environ, "DIFUSI_CONFIG": str(tmp_path / "none.json"), "DIFUSI_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "difusi", "batch", str(batch_file), "--outputs-dir", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    first = [process.stdout.readline(), process.stdout.readline()]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert all(line.endswith("\n") and "row=" in line for line in first), first
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = re.search(r"batch done: (\d+) done, (\d+) skipped \(already done\), 0 failed; (\d+) images written",
                        rerun.stderr)
    assert summary is not None, rerun.stderr
    done, skipped, written = map(int, summary.groups())
    assert skipped >= 2 and done + skipped == 8 and written == done
    with sqlite3.connect(tmp_path / "out" / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images").fetchone() == (8, 8)
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(TEMP_PREFIX)]

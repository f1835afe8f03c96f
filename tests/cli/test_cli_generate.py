"""End-to-end: `python -m difusi ...` as real subprocesses on the default model, writing real files.

One module-scoped job (batch size 2 x batch count 2, a hard prompt) is generated once and reused:
seeds, names, history rows, `info`, reproduce-from-image and flag overrides are all checked against it.
The reference for "bit-identical" is the job itself: docs/ARCHITECTURE.md contract 2 says image i of seed s depends only
on s+i. A1111's infotext does not record the batch size, and on a CPU a batched matrix product can differ
from an unbatched one in the last bit (then, rarely, one 8-bit level of one pixel), so regenerating passes
the original `--batch-size 2`; everything else comes from the PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difusi.infotext import parse_infotext, read_infotext
from difusi.models import default_model_path

SEED = 4242
STEPS = 3
HARD_PROMPT = 'a red circle, on: "blue" (background:1.2)\n[square|circle] \\(x\\) 猫 🐱'
RESULT_LINE = re.compile(r"^(?P<path>.+\.png)  seed=(?P<seed>\d+)$")


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DIFUSI_OUTPUTS_DIR": str(root / "outputs"),
        "DIFUSI_MODELS_DIR": str(root / "models"),
        "DIFUSI_CONFIG": str(root / "no-config.json"),
        "DIFUSI_CACHE_DIR": str(root / "cache"),
        "PYTHONUNBUFFERED": "1",
        # The mini's 64x64 work is tiny; one thread avoids OpenMP spin-waits on a shared, busy CPU.
        "OMP_NUM_THREADS": "1",
    }


def difusi(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difusi", *args], capture_output=True, text=True, env=_env(root), timeout=timeout
    )


def in_process(root: Path, monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`cli.main` in this process (torch already imported: saves a process start); same shape as `difusi`."""
    import torch

    from difusi import cli

    for name, value in _env(root).items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def results(done: subprocess.CompletedProcess) -> list[tuple[Path, int]]:
    lines = done.stdout.splitlines()
    parsed = [RESULT_LINE.match(line) for line in lines]
    assert all(parsed), done.stdout
    return [(Path(m["path"]), int(m["seed"])) for m in parsed]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def history_rows(outputs: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(outputs / "history.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM images ORDER BY id").fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-e2e")
    (path / "models").mkdir()
    return path


@pytest.fixture(scope="module")
def batch(root) -> list[tuple[Path, int]]:
    done = difusi(
        root, "generate", HARD_PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
        "--sampler", "Euler a", "--batch-size", "2", "--batch-count", "2",
    )
    assert done.returncode == 0, done.stderr
    return results(done)


def test_batch_seeds_files_and_history_match(root, batch):
    assert [seed for _, seed in batch] == [SEED, SEED + 1, SEED + 2, SEED + 3]
    day_folders = list((root / "outputs").iterdir())
    pngs = sorted(p for folder in day_folders if folder.is_dir() for p in folder.glob("*.png"))
    assert sorted(path for path, _ in batch) == pngs
    for number, (path, seed) in enumerate(batch):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name)
        assert path.name == f"{number:05d}-{seed}-a-red-circle-on-blue-background-1-2-square-circle-x-猫.png"
        fields, _ = parse_infotext(read_infotext(path))
        assert fields["Seed"] == str(seed)
    rows = history_rows(root / "outputs")[:4]
    assert [Path(root / "outputs" / row["path"]) for row in rows] == [path for path, _ in batch]
    assert [row["seed"] for row in rows] == [seed for _, seed in batch]
    assert all(row["prompt"] == HARD_PROMPT and row["negative_prompt"] == "" for row in rows)
    assert all(row["infotext"] == read_infotext(path) for row, (path, _) in zip(rows, batch, strict=True))
    sha = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert all(row["model_hash"] == sha[:10] for row in rows)


def test_infotext_of_hard_prompt_round_trips(batch):
    path, seed = batch[0]
    text = read_infotext(path)
    fields, unknown = parse_infotext(text)
    assert fields["Prompt"] == HARD_PROMPT
    assert fields["Negative prompt"] == "" and "Negative prompt:" not in text
    assert text.split("\n")[-1].startswith("Steps: 3, Sampler: Euler a, ")
    assert (fields["Steps"], fields["Seed"]) == (str(STEPS), str(seed))
    assert unknown == []


def test_independent_a1111_reader_gets_the_same_values(batch):
    """sd-parsers (a third-party reader of A1111 PNGs) must read our file as an AUTOMATIC1111 image."""
    sd_parsers = pytest.importorskip("sd_parsers")
    path, seed = batch[1]
    with Image.open(path) as image:
        info = sd_parsers.ParserManager().parse(image)
        width, height = image.size
    assert info.generator.value == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "Euler a"
    assert (sampler.parameters["steps"], sampler.parameters["seed"], sampler.parameters["cfg_scale"]) == (
        str(STEPS), str(seed), "7")
    assert [prompt.value for prompt in sampler.prompts] == [HARD_PROMPT] and sampler.negative_prompts == []
    sha = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert (sampler.model.name, sampler.model.hash) == ("difusi-mini", sha[:10])
    assert info.metadata["Size"] == f"{width}x{height}"


def test_info_prints_the_parameters(root, batch):
    path, _ = batch[1]
    done = difusi(root, "info", str(path))
    assert done.returncode == 0
    assert done.stdout == read_infotext(path) + "\n"


def test_from_image_regenerates_identical_pixels(root, batch):
    (original, seed), (neighbour, neighbour_seed) = batch[2], batch[3]
    done = difusi(root, "generate", "--from", str(original), "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    (first, first_seed), (second, second_seed) = results(done)
    assert (first_seed, second_seed) == (seed, neighbour_seed)
    assert first != original
    assert np.array_equal(pixels(first), pixels(original))
    assert np.array_equal(pixels(second), pixels(neighbour))
    assert read_infotext(first) == read_infotext(original)


def test_seed_override_gives_the_images_of_that_seed(root, batch, monkeypatch, capsys):
    """--from image 0 with image 2's seed must reproduce images 2 and 3 exactly: only the seed changed."""
    (first, _), (third, third_seed), (fourth, fourth_seed) = batch[0], batch[2], batch[3]
    done = in_process(root, monkeypatch, capsys, "generate", "--from", str(first), "--seed", str(third_seed),
                      "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    (a, a_seed), (b, b_seed) = results(done)
    assert (a_seed, b_seed) == (third_seed, fourth_seed)
    assert np.array_equal(pixels(a), pixels(third)) and np.array_equal(pixels(b), pixels(fourth))
    assert read_infotext(a) == read_infotext(third)


def test_single_image_reproduces_without_any_flag(root, monkeypatch, capsys):
    made = in_process(root, monkeypatch, capsys, "generate", "a green triangle, small", "--steps", "3",
                      "--sampler", "DPM++ 2M SDE", "--subseed-strength", "0.3", "--cfg-scale", "5.5")
    assert made.returncode == 0, made.stderr
    ((original, seed),) = results(made)
    again = in_process(root, monkeypatch, capsys, "generate", "--from", str(original))
    assert again.returncode == 0, again.stderr
    ((path, new_seed),) = results(again)
    assert new_seed == seed
    assert np.array_equal(pixels(path), pixels(original))
    fields, _ = parse_infotext(read_infotext(path))
    assert fields["Variation seed strength"] == "0.3" and fields["Sampler"] == "DPM++ 2M SDE"
    assert read_infotext(path) == read_infotext(original)


def test_overrides_change_only_what_they_name(root, batch, monkeypatch, capsys):
    original, _ = batch[0]
    done = in_process(root, monkeypatch, capsys, "generate", "--from", str(original), "--sampler", "Euler", "--steps", "4", "--seed", "99")
    assert done.returncode == 0, done.stderr
    ((path, seed),) = results(done)
    assert seed == 99
    before, _ = parse_infotext(read_infotext(original))
    after, _ = parse_infotext(read_infotext(path))
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed == {"Sampler", "Steps", "Seed"}
    assert (after["Sampler"], after["Steps"], after["Seed"]) == ("Euler", "4", "99")
    assert not np.array_equal(pixels(path), pixels(original))


def test_infotext_flag_reports_ignored_keys_and_reproduces(root, batch, monkeypatch, capsys):
    (original, seed), (neighbour, _) = batch[0], batch[1]
    pasted = read_infotext(original).replace(", Version:", ", Face restoration: CodeFormer, ADetailer model: face_yolov8n.pt, "
                                                          "Version:")
    done = in_process(root, monkeypatch, capsys, "generate", "--infotext", pasted, "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "difusi: ignored keys: Face restoration, ADetailer model" in done.stderr.splitlines()
    (first, first_seed), (second, _) = results(done)
    assert first_seed == seed
    assert np.array_equal(pixels(first), pixels(original))
    assert np.array_equal(pixels(second), pixels(neighbour))


def test_output_flag_writes_copies_and_never_overwrites(root, batch, monkeypatch, capsys, tmp_path):
    (original, _), (neighbour, _) = batch[0], batch[1]
    target = tmp_path / "mine.png"
    done = in_process(root, monkeypatch, capsys, "generate", "--from", str(original), "--batch-size", "2",
                      "--output", str(target))
    assert done.returncode == 0, done.stderr
    assert [path for path, _ in results(done)] == [tmp_path / "mine-1.png", tmp_path / "mine-2.png"]
    assert np.array_equal(pixels(tmp_path / "mine-1.png"), pixels(original))
    assert np.array_equal(pixels(tmp_path / "mine-2.png"), pixels(neighbour))
    assert read_infotext(tmp_path / "mine-1.png") == read_infotext(original)
    again = in_process(root, monkeypatch, capsys, "generate", "--from", str(original), "--batch-size", "2",
                       "--output", str(target))
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"difusi: error: --output: {tmp_path / 'mine-1.png'} exists (difusi never overwrites files)"
    ]


def test_history_command_lists_and_searches(root, batch):
    done = difusi(root, "history", "--search", "RED CIRCLE", "--limit", "2")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    newest = [row for row in history_rows(root / "outputs") if "red circle" in row["prompt"].lower()][-2:][::-1]
    for line, row in zip(lines, newest, strict=True):
        assert f"seed={row['seed']}" in line and str(root / "outputs" / row["path"]) in line
    assert difusi(root, "history", "--search", "no such prompt").stdout == ""
    (as_json,) = difusi(root, "history", "--json", "--limit", "1").stdout.splitlines()
    row, latest = json.loads(as_json), history_rows(root / "outputs")[-1]
    assert (row["path"], row["seed"]) == (str(root / "outputs" / latest["path"]), latest["seed"])
    assert row["params"]["seed"] == latest["seed"] and row["infotext"] == latest["infotext"]


def test_sigint_mid_batch_keeps_finished_images_only(root):
    outputs = root / "sigint-outputs"
    env = {**_env(root), "DIFUSI_OUTPUTS_DIR": str(outputs)}
    process = subprocess.Popen(
        [sys.executable, "-m", "difusi", "generate", "a blue square", "--seed", "7", "--steps", "5",
         "--batch-size", "2", "--batch-count", "25", "--sampler", "Euler"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    first = process.stdout.readline()  # the first finished image: now we are in the middle of the batch
    assert RESULT_LINE.match(first.rstrip("\n")), first + process.stderr.read()
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = [RESULT_LINE.match(line) for line in (first + rest).splitlines()]
    assert 2 <= len(saved) < 50 and len(saved) % 2 == 0  # whole batches of two
    files = sorted(p for p in outputs.rglob("*") if p.is_file() and p.suffix == ".png")
    assert sorted(Path(m["path"]) for m in saved) == files
    leftovers = [p.name for p in outputs.rglob("*") if p.is_file() and p.name.startswith(".difusi-tmp")]
    assert leftovers == []
    rows = history_rows(outputs)
    assert sorted(outputs / row["path"] for row in rows) == files
    assert [row["seed"] for row in rows] == list(range(7, 7 + len(files)))
    for path in files:
        with Image.open(path) as image:
            image.verify()
    assert f"difusi: interrupted: {len(files)} of 50 images saved" in stderr

"""OutputStore: file naming, never overwriting, atomic writes, concurrency, and history rows matching files."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import sqlite3
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from difusi.infotext import read_infotext
from difusi.params import GenerationParams
from difusi.store import DB_NAME, TEMP_PREFIX, OutputStore, next_number, prompt_slug

DAY = dt.datetime(2026, 3, 4, 12, 30, tzinfo=dt.UTC)


@dataclass
class FakeImage:
    image: Image.Image
    seed: int
    subseed: int
    index: int
    infotext: str
    params: GenerationParams


def make(seed: int, prompt: str = "a red circle, on blue", pixel: int = 0) -> FakeImage:
    params = GenerationParams(prompt=prompt, negative_prompt="blurry", seed=seed, steps=4, width=16, height=8)
    infotext = (
        f"{prompt}\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
        f'Seed: {seed}, Size: 16x8, Model hash: 0123456789, Model: "mini, v1", Version: difusi 0.1.0'
    )
    pixels = np.full((8, 16, 3), pixel % 256, dtype=np.uint8)
    return FakeImage(Image.fromarray(pixels), seed, seed + 1000, 0, infotext, params)


def test_names_numbers_and_day_folder(tmp_path):
    with OutputStore(tmp_path) as store:
        first = store.save(make(42), now=DAY)
        second = store.save(make(43, prompt="Ünï 猫 (cat:1.2)!!"), now=DAY)
    assert first == tmp_path / "2026-03-04" / "00000-42-a-red-circle-on-blue.png"
    assert second == tmp_path / "2026-03-04" / "00001-43-ünï-猫-cat-1-2.png"


def test_empty_prompt_has_no_slug(tmp_path):
    with OutputStore(tmp_path) as store:
        assert store.save(make(5, prompt="!!!"), now=DAY).name == "00000-5.png"


def test_prompt_slug_is_bounded_and_safe():
    slug = prompt_slug("a/b\\c:d*e?f\"g<h>i|j " + "x" * 200)
    assert slug.startswith("a-b-c-d-e-f-g-h-i-j-")
    assert len(slug) <= 60 and not slug.endswith("-")


def test_numbering_continues_after_existing_files_and_never_overwrites(tmp_path):
    folder = tmp_path / "2026-03-04"
    folder.mkdir()
    (folder / "00007-1-other.png").write_bytes(b"keep me")
    (folder / "notes.txt").write_text("unrelated")
    with OutputStore(tmp_path) as store:
        path = store.save(make(1, prompt="other"), now=DAY)
    assert path.name == "00008-1-other.png"
    assert (folder / "00007-1-other.png").read_bytes() == b"keep me"


def test_name_taken_by_another_writer_moves_to_next_number(tmp_path, monkeypatch):
    """Simulate a writer in another process that took our name between scanning and publishing."""
    import difusi.store as store_module

    folder = tmp_path / "2026-03-04"
    folder.mkdir()
    real = store_module.next_number

    def stale_scan(path):
        (folder / "00000-42-a-red-circle-on-blue.png").write_bytes(b"theirs")
        return real(path) - 1 if real(path) else 0

    monkeypatch.setattr(store_module, "next_number", stale_scan)
    with OutputStore(tmp_path) as store:
        path = store.save(make(42), now=DAY)
    assert path.name.startswith("00001-")
    assert (folder / "00000-42-a-red-circle-on-blue.png").read_bytes() == b"theirs"


def test_png_has_infotext_and_pixels(tmp_path):
    item = make(42, pixel=200)
    with OutputStore(tmp_path) as store:
        path = store.save(item, now=DAY)
    assert read_infotext(path) == item.infotext
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), np.asarray(item.image))


def test_history_row_matches_file(tmp_path):
    item = make(42)
    with OutputStore(tmp_path) as store:
        path = store.save(item, now=DAY)
        (entry,) = store.history()
    assert entry.path == path and entry.path.exists()
    assert (entry.prompt, entry.negative_prompt, entry.seed, entry.subseed) == (item.params.prompt, "blurry", 42, 1042)
    assert (entry.sampler, entry.scheduler, entry.steps, entry.cfg_scale) == ("Euler a", "Automatic", 4, 7.0)
    assert (entry.width, entry.height) == (16, 8)
    assert (entry.model_name, entry.model_hash) == ("mini, v1", "0123456789")
    assert entry.infotext == item.infotext
    assert entry.params["seed"] == 42 and entry.params["prompt"] == item.params.prompt
    assert entry.created_at.startswith("2026-03-04T12:30:00")
    # The path is stored relative to the outputs folder, so the folder can move.
    raw = sqlite3.connect(tmp_path / DB_NAME).execute("SELECT path FROM images").fetchone()[0]
    assert raw == "2026-03-04/00000-42-a-red-circle-on-blue.png"


def test_history_newest_first_limit_and_search(tmp_path):
    with OutputStore(tmp_path) as store:
        for seed, prompt in enumerate(["A Red circle", "blue square", "ÜBER red", "green"]):
            store.save(make(seed, prompt=prompt), now=DAY)
        assert [e.seed for e in store.history()] == [3, 2, 1, 0]
        assert [e.seed for e in store.history(limit=2)] == [3, 2]
        assert [e.seed for e in store.history(query="RED")] == [2, 0]
        assert [e.seed for e in store.history(query="über")] == [2]
        assert [e.seed for e in store.history(query="%")] == []


def test_history_of_missing_store_is_empty_and_creates_nothing(tmp_path):
    assert OutputStore(tmp_path / "none").history() == []
    assert not (tmp_path / "none").exists()


def test_failed_encode_leaves_no_temp_file_and_no_row(tmp_path):
    item = make(1)
    item.image = "not an image"  # type: ignore[assignment]
    with OutputStore(tmp_path) as store:
        with pytest.raises(AttributeError):
            store.save(item, now=DAY)
        assert store.history() == []
    assert os.listdir(tmp_path / "2026-03-04") == []


def test_threads_get_distinct_numbers_and_rows(tmp_path):
    store = OutputStore(tmp_path)
    paths: list = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        for i in range(5):
            path = store.save(make(offset * 100 + i, prompt="same prompt"), now=DAY)
            with lock:
                paths.append(path)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    numbers = sorted(int(p.name[:5]) for p in paths)
    assert numbers == list(range(30))
    rows = store.history(limit=100)
    store.close()
    assert sorted(r.path for r in rows) == sorted(paths)
    assert not [n for n in os.listdir(tmp_path / "2026-03-04") if n.startswith(TEMP_PREFIX)]


def _process_worker(outputs: str, offset: int) -> None:
    with OutputStore(outputs) as store:
        for i in range(4):
            store.save(make(offset * 100 + i, prompt="same prompt"), now=DAY)


def test_processes_get_distinct_numbers_and_rows(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_process_worker, args=(str(tmp_path), k)) for k in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    names = sorted(n for n in os.listdir(tmp_path / "2026-03-04") if n.endswith(".png"))
    assert [int(n[:5]) for n in names] == list(range(12))
    with OutputStore(tmp_path) as store:
        rows = store.history(limit=100)
    assert sorted(r.path.name for r in rows) == names


def test_next_number_ignores_unnumbered_files(tmp_path):
    (tmp_path / "00003-x.png").touch()
    (tmp_path / "0004-short.png").touch()
    (tmp_path / "abc.png").touch()
    assert next_number(tmp_path) == 4
    assert next_number(tmp_path / "missing") == 0

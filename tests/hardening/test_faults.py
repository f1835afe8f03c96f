"""Faults: a full disk on the outputs folder, and the server killed with SIGKILL in the middle of a batch."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from difusi.infotext import read_infotext
from difusi.store import DB_NAME, TEMP_PREFIX
from loopback import free_port

ROOT = Path(__file__).resolve().parents[2]


def child_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1",
            "DIFUSI_CACHE_DIR": str(tmp_path / "cache"), "DIFUSI_CONFIG": str(tmp_path / "no-config.json")}


def pngs(outputs: Path) -> list[Path]:
    return sorted(p for p in outputs.glob("*/*.png") if not p.name.startswith(TEMP_PREFIX))


def temps(outputs: Path) -> list[Path]:
    return sorted(outputs.glob(f"**/{TEMP_PREFIX}*"))


def history_rows(outputs: Path) -> list[tuple[str, str, int]]:
    if not (outputs / DB_NAME).exists():
        return []
    with sqlite3.connect(outputs / DB_NAME) as db:
        return db.execute("SELECT path, infotext, seed FROM images ORDER BY id").fetchall()


def check_database(outputs: Path) -> None:
    with sqlite3.connect(outputs / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def check_files_match_history(outputs: Path) -> list[tuple[str, str, int]]:
    """Every PNG on disk is complete, carries its infotext and has exactly one row, and every row has its PNG."""
    rows = history_rows(outputs)
    files = {p.relative_to(outputs).as_posix(): p for p in pngs(outputs)}
    assert sorted(files) == sorted(path for path, _, _ in rows)
    for path, infotext, seed in rows:
        assert read_infotext(files[path]) == infotext  # parses as a PNG with its chunk: not truncated
        assert f"Seed: {seed}," in infotext
    assert temps(outputs) == []
    return rows


# -- full disk ------------------------------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_gives_one_line_and_leaves_nothing(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE) while the PNG is written: exit 1, one line, no partial file."""
    outputs = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "difusi", "generate", "a red circle", "--steps", "1", "--sampler", "Euler",
         "--width", "256", "--height", "256", "--seed", "3", "--outputs-dir", str(outputs)],
        env=child_env(tmp_path), capture_output=True, text=True, timeout=300,
        preexec_fn=_limit_file_size(48 * 1024),  # the history database fits, a 256x256 PNG does not
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("difusi: step ")]  # progress lines
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"difusi: error: outputs folder {outputs}: cannot save the image: File too large")
    assert "free some space" in lines[0] and done.stdout == ""
    assert pngs(outputs) == [] and temps(outputs) == []
    assert history_rows(outputs) == []
    check_database(outputs)


def test_disk_full_during_a_batch_over_http(http, bad_files, monkeypatch):
    """ENOSPC on the second image of three: 507 with a JSON message; the first image stays, complete and in the
    history; nothing half-written remains; the server goes on serving."""
    import difusi.store as store

    outputs = bad_files.outputs
    before = history_rows(outputs)
    real_write = store.write_png
    calls = []

    def failing_write(image, handle, infotext):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"\x89PNG\r\n\x1a\n half a picture")  # some bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(image, handle, infotext)

    monkeypatch.setattr(store, "write_png", failing_write)
    body = {"prompt": "disk full test", "steps": 2, "sampler_name": "Euler", "seed": 70, "n_iter": 3}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 507, response.text
    error = response.json()
    assert error["error"] == "StorageError"
    assert "cannot save the image: No space left on device; free some space" in error["detail"]
    assert "images saved before this one are kept" in error["detail"]
    rows = history_rows(outputs)
    assert len(rows) == len(before) + 1 and rows[-1][2] == 70
    saved = outputs / rows[-1][0]
    assert read_infotext(saved) == rows[-1][1]
    assert temps(outputs) == []
    check_database(outputs)
    monkeypatch.setattr(store, "write_png", real_write)
    assert http.post("/sdapi/v1/txt2img", json={**body, "n_iter": 1, "seed": 80}).status_code == 200
    assert history_rows(outputs)[-1][2] == 80


# -- SIGKILL --------------------------------------------------------------------------------------------------


def start_server(tmp_path: Path, models: Path, outputs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "difusi", "serve", "--port", str(port), "--models-dir", str(models),
         "--outputs-dir", str(outputs)],
        env=child_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {(tmp_path / f'serve-{port}.log').read_text()}")
        try:
            if httpx.get(url + "/sdapi/v1/progress", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("server did not start")


@pytest.mark.parametrize(
    "delay", [0.004, *(pytest.param(d, marks=pytest.mark.slow) for d in (0.0, 0.002, 0.008, 0.012, 0.02, 0.05))])
def test_sigkill_during_a_batch_loses_and_corrupts_nothing(tmp_path, capsys, delay):
    """Killed `delay` seconds after the fourth image's last sampling step: while it is decoded, written, published
    or recorded, or soon after (the slow tier tries several moments)."""
    models, outputs = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    process, url = start_server(tmp_path, models, outputs)
    seeds = range(500, 540)
    try:
        body = {"prompt": "a blue square", "steps": 3, "sampler_name": "Euler", "seed": seeds[0], "n_iter": len(seeds)}
        job = httpx.post(url + "/difusi/v1/jobs", json=body, timeout=30).json()
        deadline = time.time() + 120
        with httpx.Client(base_url=url, timeout=10) as http:
            # Wait until 3 images are done and the 4th has taken its last step: it is being decoded and saved now.
            while not ((s := http.get(f"/difusi/v1/jobs/{job['id']}").json())["images_done"] >= 3
                       and s["step"] >= s["steps"] and s["iteration"] >= s["images_done"]):
                assert time.time() < deadline, "no images were made"
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    on_disk = pngs(outputs)
    left = temps(outputs)
    rows_at_kill = len(history_rows(outputs))
    assert 3 <= len(on_disk) < len(seeds)  # killed mid-batch

    process, url = start_server(tmp_path, models, outputs)
    try:
        rows = check_files_match_history(outputs)
        check_database(outputs)
        assert [seed for _, _, seed in rows] == list(seeds[: len(rows)])  # in order, none lost, none twice
        assert len(rows) == len(on_disk)
        with capsys.disabled():
            print(f"\nSIGKILL after {len(on_disk)} of {len(seeds)} images: {rows_at_kill} rows and {len(left)} temp "
                  f"files at the kill; after restart {len(rows)} rows, 0 temp files, integrity ok, WAL")
        listed = httpx.get(url + "/difusi/v1/history", params={"limit": 1000}, timeout=30).json()["items"]
        assert sorted(item["seed"] for item in listed) == [seed for _, _, seed in rows]
        again = httpx.post(url + "/sdapi/v1/txt2img", json={**body, "n_iter": 1, "seed": 7}, timeout=120)
        assert again.status_code == 200
        assert [seed for _, _, seed in history_rows(outputs)][-1] == 7
    finally:
        process.terminate()
        process.wait(30)


def test_opening_the_history_repairs_what_a_killed_writer_left(tmp_path):
    """The two states a kill can leave (see difusi.store), made on purpose: a published image whose row was never
    inserted, and a dead writer's half-written temp file. A live writer's temp file must survive."""
    from difusi import generate
    from difusi.store import OutputStore

    outputs = tmp_path / "out"
    result = generate("a green triangle", steps=1, sampler_name="Euler", seed=21, batch_size=2)
    with OutputStore(outputs) as first:
        paths = [first.save(image) for image in result.images]
    original = history_rows(outputs)
    with sqlite3.connect(outputs / DB_NAME) as db:
        db.execute("DELETE FROM images WHERE seed = 22")  # killed between publishing the file and its row
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    day = paths[0].parent
    (day / f"{TEMP_PREFIX}{int(dead.stdout)}-abc.png").write_bytes(b"\x89PNG\r\n\x1a\n partial")
    live = day / f"{TEMP_PREFIX}{os.getpid()}-def.png"
    live.write_bytes(b"being written")
    assert len(history_rows(outputs)) == 1

    OutputStore(outputs).recover()
    assert sorted(p.name for p in day.glob(f"{TEMP_PREFIX}*")) == [live.name]
    live.unlink()
    rows = check_files_match_history(outputs)
    assert sorted(rows) == sorted(original)  # same paths, infotexts and seeds as the rows the writer made
    check_database(outputs)


KILLED_WRITER = """
import sys, time
import difusi.store as store
from difusi import generate
where = sys.argv[2]
real_write, real_row = store.write_png, store._write_row
def slow_write(image, handle, infotext):
    if where == "writing":
        handle.write(b"\\x89PNG\\r\\n\\x1a\\n")
        handle.flush()
        print("inside", flush=True)
        time.sleep(60)
    return real_write(image, handle, infotext)
def slow_row(db, row, **kw):
    if where == "recording" and not kw.get("recovered"):
        print("inside", flush=True)
        time.sleep(60)
    return real_row(db, row, **kw)
store.write_png, store._write_row = slow_write, slow_row
image = generate("a killed writer", steps=1, sampler_name="Euler", seed=31).images[0]
store.OutputStore(sys.argv[1]).save(image)
"""


@pytest.mark.parametrize("where", ["writing", "recording"])
def test_sigkill_inside_a_save(tmp_path, where):
    """A real SIGKILL while a writer is inside OutputStore.save (held there on purpose): while the PNG is being
    written (a temp file remains) or after it was published but before its row (an image without a row). Opening
    the history afterwards leaves every image complete and recorded, and no temp file."""
    outputs = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(outputs), where], env=child_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "inside", writer.stderr.read()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    if where == "writing":
        assert len(temps(outputs)) == 1 and pngs(outputs) == []
    else:
        assert temps(outputs) == [] and len(pngs(outputs)) == 1 and history_rows(outputs) == []

    from difusi.store import OutputStore

    OutputStore(outputs).recover()
    rows = check_files_match_history(outputs)
    assert [seed for _, _, seed in rows] == ([] if where == "writing" else [31])
    check_database(outputs)

"""Outputs folder + SQLite history: where finished images go and how they are found again.

Layout (A1111-like): `<outputs>/<YYYY-MM-DD>/<NNNNN>-<seed>-<prompt-slug>.png`, where NNNNN is one more than
the largest number already used in that day folder. The history database is `<outputs>/history.sqlite3`.

Order of a save, so a crash or Ctrl-C never leaves a half image or a row without its file:
1. encode the PNG (with its infotext) into a hidden temp file in the day folder;
2. under a lock (a `threading.Lock` for this process, an `flock` on `<outputs>/.difusi.lock` for others),
   pick the next number and publish the temp file under its final name with `os.link`, which fails instead
   of overwriting when another writer took the name first (then we take the next number);
3. remove the temp name, then insert the history row.

A process killed (SIGKILL, power cut) inside that order can leave two things, and opening the history repairs
both (`recover`): a temp file of a dead writer (its pid is in the name) is removed, and a published image whose
row was not yet inserted gets its row from the infotext it carries. So after a crash every image on disk is
complete and in the history, and every row has its file. SQLite runs in WAL mode, so a kill mid-insert rolls back.

Batch jobs (`difusi.batch`) save images they receive as PNG bytes (`save_encoded`, same order, the bytes written
unchanged) and mark each row with `job_id`, `job_image` (the image's 0-based index in its job) and `job_images` (how
many images the job makes). A job is done when all of its indexes have rows (`done_job_ids`), so a job stopped
half-way is finished later without saving its first images twice (`saved_job_images`). Databases made before these
columns existed get them on first open (ALTER TABLE ADD COLUMN; old rows have NULL there: no job). The PNG does not
carry its job id, so before a batch image is published under its final name the name and job are noted in the table
`pending_jobs`; a row that `recover` rebuilds for that file takes its job from there, and the note is removed once
the image's row is in. So a kill between publishing and the row insert does not make a re-run save the image twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import re
import sqlite3
import struct
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from PIL import Image

from difusi.errors import StorageError
from difusi.infotext import parse_infotext, write_png
from difusi.params import GenerationParams

try:  # POSIX advisory lock for writers in other processes; Windows relies on O_EXCL-like link semantics.
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

DB_NAME = "history.sqlite3"
LOCK_NAME = ".difusi.lock"
TEMP_PREFIX = ".difusi-tmp-"
SLUG_MAX_CHARS = 60
_NUMBERED = re.compile(r"^(\d{5,})-")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    subseed INTEGER,
    sampler TEXT NOT NULL,
    scheduler TEXT NOT NULL,
    steps INTEGER NOT NULL,
    cfg_scale REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model_name TEXT,
    model_hash TEXT,
    infotext TEXT NOT NULL,
    params_json TEXT NOT NULL,
    job_id TEXT,
    job_image INTEGER,
    job_images INTEGER
);
CREATE INDEX IF NOT EXISTS images_created ON images (created_at);
CREATE TABLE IF NOT EXISTS pending_jobs (path TEXT NOT NULL, job_id TEXT NOT NULL, job_image INTEGER NOT NULL,
                                         job_images INTEGER NOT NULL);
"""

_JOB_COLUMNS = {"job_id": "TEXT", "job_image": "INTEGER", "job_images": "INTEGER"}
"""Columns for batch jobs (module docstring); added to older databases when they are opened. No index: the few
queries on them run once per batch, and every page counts for a history that must fit where images barely do."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SavableImage(Protocol):
    """What `OutputStore.save` needs; `difusi.pipeline.GeneratedImage` has it."""

    image: Image.Image
    seed: int
    subseed: int
    infotext: str
    params: GenerationParams


@dataclass(frozen=True)
class HistoryEntry:
    """One row of the history: a finished image on disk and the recipe that made it."""

    id: int
    created_at: str
    path: Path
    prompt: str
    negative_prompt: str
    seed: int
    subseed: int | None
    sampler: str
    scheduler: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    model_name: str | None
    model_hash: str | None
    infotext: str
    params: dict[str, Any]


def prompt_slug(prompt: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """File-name-safe words of the prompt: "A (cat), 2:1!" -> "a-cat-2-1". Letters of any script are kept."""
    text = unicodedata.normalize("NFKC", prompt).casefold()
    words = re.findall(r"[^\W_]+", text)
    slug = "-".join(words)[:max_chars].strip("-")
    return slug


class OutputStore:
    """Saves images into the outputs folder and records them in the history. Safe to share across threads."""

    def __init__(self, outputs_dir: str | Path):
        self.outputs_dir = Path(outputs_dir)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pending_noted = False  # plain saves skip the pending-job bookkeeping until a batch image is saved

    # -- saving ----------------------------------------------------------------------------------------

    def save(self, generated: SavableImage, *, now: dt.datetime | None = None) -> Path:
        """Write one finished image (PNG with infotext) and then its history row; return the final path.

        Raises StorageError (disk full, file too large, read-only folder, database failure); then no partial
        file is left, the database is unchanged (one transaction) and images saved earlier stay as they are.
        """
        try:
            return self._save(generated, now)
        except OSError as error:
            raise StorageError(_storage_message(self.outputs_dir, error.strerror or str(error), error.errno),
                               error.errno) from error
        except sqlite3.Error as error:
            raise StorageError(_storage_message(self.outputs_dir / DB_NAME, f"history database: {error}", None)) from error

    def save_encoded(self, png: bytes, infotext: str, params: GenerationParams, seed: int, subseed: int, job_id: str,
                     index: int, *, now: dt.datetime | None = None) -> Path:
        """Write one image received as PNG bytes (a batch job's), exactly those bytes, then its history row with
        `job_id` and `index`; same order and errors as `save`. `params` are the job's (its total image count is
        recorded; width/height left None are read from the PNG header)."""
        if not png.startswith(_PNG_SIGNATURE) or len(png) < 24:
            raise ValueError("save_encoded: not PNG bytes")
        width, height = struct.unpack(">II", png[16:24])  # IHDR, the first chunk of every PNG
        image_params = params.replace(seed=seed, subseed=subseed, width=params.width or width,
                                      height=params.height or height)
        generated = _Recovered(params=image_params, seed=seed, subseed=subseed, infotext=infotext)
        job = {"job_id": job_id, "job_image": index, "job_images": params.total_images}
        try:
            return self._save(generated, now, lambda handle: handle.write(png), job)
        except OSError as error:
            raise StorageError(_storage_message(self.outputs_dir, error.strerror or str(error), error.errno),
                               error.errno) from error
        except sqlite3.Error as error:
            raise StorageError(_storage_message(self.outputs_dir / DB_NAME, f"history database: {error}", None)) from error

    def _save(self, generated: SavableImage, now: dt.datetime | None,
              encode: Callable[[BinaryIO], Any] | None = None, job: dict[str, Any] | None = None) -> Path:
        now = now or dt.datetime.now().astimezone()
        with self._lock:
            self._connection()  # opens (and repairs) the history before this image exists on disk
        folder = self.outputs_dir / now.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        if encode is None:
            def encode(handle: BinaryIO) -> None:
                write_png(generated.image, handle, generated.infotext)
        temp = self._write_temp(folder, encode)
        try:
            path = self._publish(temp, folder, generated.seed, generated.params.prompt, job)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        self._insert(path, generated, now, job)
        return path

    def _write_temp(self, folder: Path, encode: Callable[[BinaryIO], Any]) -> Path:
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".png", dir=folder)
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                encode(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def _publish(self, temp: Path, folder: Path, seed: int, prompt: str, job: dict[str, Any] | None = None) -> Path:
        slug = prompt_slug(prompt)
        suffix = f"-{seed}" + (f"-{slug}" if slug else "") + ".png"
        with self._lock, self._process_lock():
            number = next_number(folder)
            while True:
                final = folder / f"{number:05d}{suffix}"
                self._note_pending(final, job)
                try:
                    _link_no_overwrite(temp, final)
                    return final
                except FileExistsError:
                    self._note_pending(final, None)  # another writer's file: not our job
                    number = max(number + 1, next_number(folder))

    def _note_pending(self, final: Path, job: dict[str, Any] | None) -> None:
        """Note (or, with None, forget) the batch job of an image about to be published at `final` (module
        docstring); a plain image notes nothing. Called under `self._lock`, with the history open."""
        if job is None and not self._pending_noted:
            return
        db = self._db
        assert db is not None
        path = final.relative_to(self.outputs_dir).as_posix()
        with db:
            db.execute("DELETE FROM pending_jobs WHERE path = ?", (path,))
            if job is not None:
                self._pending_noted = True
                db.execute("INSERT INTO pending_jobs (path, job_id, job_image, job_images) VALUES (?, ?, ?, ?)",
                           (path, job["job_id"], job["job_image"], job["job_images"]))

    @contextlib.contextmanager
    def _process_lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.outputs_dir / LOCK_NAME, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # -- history ---------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.outputs_dir / DB_NAME, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            _add_job_columns(db)
            db.create_function("casefold", 1, lambda s: s.casefold() if isinstance(s, str) else s, deterministic=True)
            db.row_factory = sqlite3.Row
            self._db = db
            self._recover(db)
        return self._db

    def recover(self) -> None:
        """Open the history now, repairing what a killed writer left (otherwise done on first use)."""
        if (self.outputs_dir / DB_NAME).exists():
            with self._lock:
                self._connection()

    def _recover(self, db: sqlite3.Connection) -> None:
        """Repair what a killed writer left (see the module docstring); runs once, when the history is opened."""
        from difusi.infotext import read_infotext, recipe_from_infotext

        known = {row[0] for row in db.execute("SELECT path FROM images")}
        pending = {row[0]: {"job_id": row[1], "job_image": row[2], "job_images": row[3]}
                   for row in db.execute("SELECT path, job_id, job_image, job_images FROM pending_jobs")}
        for folder in sorted(p for p in self.outputs_dir.iterdir() if p.is_dir() and _DAY.match(p.name)):
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(TEMP_PREFIX):
                    if not _writer_alive(entry.name):
                        entry.unlink(missing_ok=True)
                    continue
                relative = entry.relative_to(self.outputs_dir).as_posix()
                if relative in known or not _NUMBERED.match(entry.name) or entry.suffix != ".png" or entry.is_symlink():
                    continue  # difusi never publishes links: one is not ours, and is not followed out of the folder
                try:
                    text = read_infotext(entry)
                    params, _ = GenerationParams.from_mapping(recipe_from_infotext(text).values) if text else (None, None)
                except Exception:  # noqa: BLE001 - not one of ours (or unreadable): leave it alone, never delete
                    continue
                if params is None:
                    continue
                made = dt.datetime.fromtimestamp(entry.stat().st_mtime).astimezone()
                image = _Recovered(params=params, seed=params.seed, subseed=params.subseed, infotext=text)
                row = self._row(entry, image, made)
                row.update(pending.get(relative, {}))  # a batch image keeps its job (module docstring)
                _write_row(db, row, recovered=True)
        if pending:  # notes whose image has its row are done with; others may belong to a writer still running
            with db:
                db.execute("DELETE FROM pending_jobs WHERE path IN (SELECT path FROM images)")

    def _insert(self, path: Path, generated: Any, now: dt.datetime, job: dict[str, Any] | None = None) -> None:
        row = self._row(path, generated, now)
        row.update(job or {})
        with self._lock:
            _write_row(self._connection(), row)
            if job is not None:
                self._note_pending(path, None)

    def _row(self, path: Path, generated: SavableImage, now: dt.datetime) -> dict[str, Any]:
        params = generated.params
        fields, _ = parse_infotext(generated.infotext)
        values = dataclasses.asdict(params)
        values.update(seed=generated.seed, subseed=generated.subseed)
        row = {
            "created_at": now.isoformat(timespec="milliseconds"),
            "path": path.relative_to(self.outputs_dir).as_posix(),
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": generated.seed,
            "subseed": generated.subseed,
            "sampler": fields.get("Sampler", params.sampler_name),
            "scheduler": fields.get("Schedule type", params.scheduler),
            "steps": params.steps,
            "cfg_scale": params.cfg_scale,
            "width": params.width,
            "height": params.height,
            "model_name": fields.get("Model"),
            "model_hash": fields.get("Model hash"),
            "infotext": generated.infotext,
            "params_json": json.dumps(values, ensure_ascii=False, default=str),
        }
        return row

    def history(self, limit: int = 20, query: str | None = None) -> list[HistoryEntry]:
        """Newest first; `query` keeps rows whose prompt contains it (case-insensitive, any script)."""
        if not (self.outputs_dir / DB_NAME).exists():
            return []
        sql = "SELECT * FROM images"
        args: list[Any] = []
        if query:
            sql += " WHERE instr(casefold(prompt), casefold(?)) > 0"
            args.append(query)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            rows = self._connection().execute(sql, args).fetchall()
        return [self._entry(row) for row in rows]

    def done_job_ids(self) -> set[str]:
        """Ids of batch jobs whose every image has its file and history row (module docstring)."""
        if not (self.outputs_dir / DB_NAME).exists():
            return set()
        sql = ("SELECT job_id FROM images WHERE job_id IS NOT NULL GROUP BY job_id "
               "HAVING COUNT(DISTINCT job_image) >= MAX(job_images)")
        with self._lock:
            return {row[0] for row in self._connection().execute(sql)}

    def saved_job_images(self) -> dict[str, set[int]]:
        """Batch job id -> the 0-based indexes of its images already saved (done or not)."""
        if not (self.outputs_dir / DB_NAME).exists():
            return {}
        saved: dict[str, set[int]] = {}
        with self._lock:
            for job_id, index in self._connection().execute(
                    "SELECT job_id, job_image FROM images WHERE job_id IS NOT NULL"):
                saved.setdefault(job_id, set()).add(index)
        return saved

    def _entry(self, row: sqlite3.Row) -> HistoryEntry:
        values = dict(row)
        for name in _JOB_COLUMNS:  # batch bookkeeping, not part of a HistoryEntry
            values.pop(name, None)
        values["path"] = self.outputs_dir / values["path"]
        values["params"] = json.loads(values.pop("params_json"))
        return HistoryEntry(**values)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add_job_columns(db: sqlite3.Connection) -> None:
    """Give a database made before batch jobs their columns (another process may be adding them at the same time)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    for name, kind in _JOB_COLUMNS.items():
        if name in present:
            continue
        try:
            with db:
                db.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError as error:
            if "duplicate column" not in str(error):
                raise


def _write_row(db: sqlite3.Connection, row: dict[str, Any], *, recovered: bool = False) -> None:
    """Insert one row in one transaction (a kill or a full disk mid-insert leaves the database as it was).

    A `recover` in another process may rebuild a row from a file whose writer is still about to insert it: the
    writer's row (it knows everything) replaces the rebuilt one, and a rebuilt row never replaces a real one.
    """
    columns = ", ".join(row)
    marks = ", ".join(f":{name}" for name in row)
    updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "path")
    conflict = "DO NOTHING" if recovered else f"DO UPDATE SET {updates}"
    with db:
        db.execute(f"INSERT INTO images ({columns}) VALUES ({marks}) ON CONFLICT(path) {conflict}", row)


@dataclass
class _Recovered:
    """A published image found without its history row, rebuilt from its own infotext."""

    params: GenerationParams
    seed: int
    subseed: int
    infotext: str


def _writer_alive(temp_name: str) -> bool:
    """Whether the process that named this temp file (".difusi-tmp-<pid>-...") still runs; unknown -> alive.

    Pids are those of this machine: two machines writing one shared outputs folder is not supported.
    """
    match = re.match(re.escape(TEMP_PREFIX) + r"(\d+)-", temp_name)
    if not match:
        return True
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _storage_message(where: Path, what: str, code: int | None) -> str:
    hint = "; free some space or choose another --outputs-dir" if code in _FULL or "full" in what else ""
    return f"outputs folder {where}: cannot save the image: {what}{hint} (images saved before this one are kept)"


def next_number(folder: Path) -> int:
    """One more than the largest `NNNNN-` prefix in `folder` (0 for an empty folder), as A1111 numbers files."""
    largest = -1
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _NUMBERED.match(entry.name)
            if match:
                largest = max(largest, int(match.group(1)))
    return largest + 1


def _link_no_overwrite(source: Path, target: Path) -> None:
    """Give `source`'s complete file the name `target`, atomically, failing if `target` exists.

    A hard link is atomic and never replaces an existing name; where links are unsupported (some network
    or FAT file systems) fall back to an exclusive check plus `os.replace`, safe under our folder lock.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(source, target)

"""Batch files -> rows of A1111 field values, and rows -> validated jobs, before any model loads.

Formats (chosen by suffix, or `fmt`):
- `.jsonl` / `.json`: one JSON object per line (A1111 field names as keys); a `.json` file whose first character is
  `[` is one JSON array of objects instead;
- `.csv`: the header row names the fields; an empty cell means "not set" (the default is used);
- `.txt`: A1111's "prompts from file" script: a line without `--` is a prompt; a line with `--flag value` pairs sets
  fields (`--prompt "a cat" --steps 20 --negative_prompt "blurry"`); words before the first flag are the prompt.
  Flags are A1111's tag names (`--cfg_scale`, `--sampler_name`, `--n_iter`, `--sd_model`, ...), any field name of
  the field table, or a `difusi generate` flag spelling (`--cfg-scale`, `--batch-count`).

`BatchRow.number` is the 1-based line number in the file (for CSV the header is line 1), so an error message points
at the line an editor or a spreadsheet shows. Blank lines, and `.txt`/`.jsonl` lines starting with `#`, are skipped.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difusi.batch.jobs import BatchFailure, BatchJob, derived_seed, job_id_for
from difusi.errors import CheckpointError, ParamError
from difusi.params import FIELDS, GenerationParams

FORMATS = ("jsonl", "json", "csv", "txt")

ALIASES: dict[str, str] = {"sd_model": "model", "sd_model_checkpoint": "model", "sampler": "sampler_name"}
"""Other names of fields that batch files use: A1111's prompts-from-file `sd_model` tag and its option name."""

_TXT_FLAG = re.compile(r"^--[A-Za-z][\w-]*$")


class BatchError(ParamError):
    """A row of a batch file is unusable; names the row (1-based line number) and the field (None: the whole row)."""

    def __init__(self, row: int, field: str | None, message: str):
        super().__init__(field or "row", message)
        self.row = row
        self.field_name = field
        where = f"row {row}: {field}: " if field else f"row {row}: "
        self.args = (where + message,)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class BatchRow:
    """One job's fields as the file gives them (A1111 names, values still text for CSV and .txt)."""

    number: int
    values: dict[str, Any]


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format named by `fmt`, else by the file's suffix."""
    chosen = (fmt or path.suffix.lstrip(".")).lower()
    if chosen not in FORMATS:
        raise ParamError("format", f"batch file must be one of .{', .'.join(FORMATS)}, got {path.name!r}")
    return chosen


def read_rows(path: Path, fmt: str | None = None) -> list[BatchRow]:
    """Every row of a batch file, with field names checked (unknown names -> BatchError naming them and the row)."""
    path = Path(path)
    chosen = detect_format(path, fmt)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except OSError as error:
        raise ParamError("file", f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ParamError("file", f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    parsers = {"jsonl": _json_rows, "json": _json_rows, "csv": _csv_rows, "txt": _txt_rows}
    return [BatchRow(number, _canonical_names(number, values)) for number, values in parsers[chosen](text)]


def _canonical_names(number: int, values: dict[str, Any]) -> dict[str, Any]:
    """Map aliases to field names; refuse names the field table does not have (naming all of them at once)."""
    named = {ALIASES.get(key, key): value for key, value in values.items()}
    unknown = [key for key in values if ALIASES.get(key, key) not in FIELDS]
    if unknown:
        raise BatchError(number, unknown[0], f"unknown field{'s' if len(unknown) > 1 else ''} "
                                             f"{', '.join(map(repr, unknown))} (fields are A1111 names, e.g. "
                                             "prompt, steps, cfg_scale, sampler_name, seed, width, model)")
    return named


# ----------------------------------------------------------------------------- JSON lines / JSON array


def _json_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if text.lstrip().startswith("["):
        yield from _json_array_rows(text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as error:
            raise BatchError(number, None, f"malformed JSON: {getattr(error, 'msg', error)}") from None
        yield number, _json_object(number, value)


def _json_array_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        items = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise BatchError(getattr(error, "lineno", 1), None, f"malformed JSON: {getattr(error, 'msg', error)}") from None
    if not isinstance(items, list):
        raise BatchError(1, None, "a .json batch file must be one array of objects or one object per line")
    for number, value in enumerate(items, start=1):  # the array index: JSON arrays have no useful line numbers
        yield number, _json_object(number, value)


def _json_object(number: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BatchError(number, None, f"must be a JSON object of fields, got {type(value).__name__}")
    return value


def _refuse_constant(name: str) -> Any:
    # NaN / Infinity are not JSON; Python would accept them and a NaN would reach the range checks as a number.
    raise ValueError(f"{name} is not valid JSON")


# ----------------------------------------------------------------------------- CSV


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        raise BatchError(1, None, f"malformed CSV: {error}") from None
    names = [name.strip() for name in header]
    _canonical_names(1, dict.fromkeys(name for name in names if name))  # unknown columns fail before any data row
    if "" in names:
        raise BatchError(1, None, f"column {names.index('') + 1} has no name in the header")
    while True:
        number = reader.line_num + 1  # a quoted cell may span lines: the row starts on the line after the last one
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise BatchError(number, None, f"malformed CSV: {error}") from None
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(names):
            raise BatchError(number, None, f"{len(cells)} cells but the header names {len(names)} columns")
        yield number, {name: cell for name, cell in zip(names, cells, strict=False) if cell != ""}


# ----------------------------------------------------------------------------- A1111 prompts from file


def _txt_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # A1111's rule: only a line containing "--" is read as options; any other line is the prompt, verbatim.
        yield number, (_txt_options(number, stripped) if "--" in stripped else {"prompt": stripped})


def _txt_options(number: int, line: str) -> dict[str, Any]:
    try:
        tokens = shlex.split(line)
    except ValueError as error:
        raise BatchError(number, None, f"cannot read the options: {error} (quote values with spaces)") from None
    values: dict[str, Any] = {}
    words: list[str] = []
    position = 0
    while position < len(tokens) and not _TXT_FLAG.match(tokens[position]):
        words.append(tokens[position])  # "a cat --steps 20": the words before the first flag are the prompt
        position += 1
    if words:
        values["prompt"] = " ".join(words)
    while position < len(tokens):
        flag = tokens[position]
        if not _TXT_FLAG.match(flag):
            raise BatchError(number, None, f"expected an option like --steps, got {flag!r}")
        name = _txt_field(number, flag)
        value_tokens = []
        position += 1
        # As A1111: prompt texts run until the next flag, so `--prompt a red cat` needs no quotes.
        while position < len(tokens) and not _TXT_FLAG.match(tokens[position]):
            value_tokens.append(tokens[position])
            position += 1
            if name not in ("prompt", "negative_prompt"):
                break
        if not value_tokens:
            raise BatchError(number, name, f"{flag} needs a value")
        values[name] = " ".join(value_tokens)
    return values


_TXT_FLAGS: dict[str, str] = {flag: name for name, spec in FIELDS.items() for flag in spec.flags if flag.startswith("--")}


def _txt_field(number: int, flag: str) -> str:
    """`--cfg_scale` (A1111 tag / field name), `--cfg-scale` (difusi flag) or an alias -> the field name."""
    tag = flag[2:]
    for candidate in (tag, tag.replace("-", "_")):
        name = ALIASES.get(candidate, candidate)
        if name in FIELDS:
            return name
    if flag in _TXT_FLAGS:
        return _TXT_FLAGS[flag]
    raise BatchError(number, tag, f"unknown option {flag} (options are A1111 field names, e.g. --steps, "
                                  "--cfg_scale, --sampler_name, --seed, --negative_prompt)")


# ----------------------------------------------------------------------------- rows -> jobs


def build_jobs(rows: Sequence[BatchRow], defaults: Mapping[str, Any] | None = None, *, skip_invalid: bool = False,
               models_dir: str | Path | None = None,
               threads: int | None = None) -> tuple[list[BatchJob], list[BatchFailure]]:
    """Validate every row (defaults < row values) and resolve its model, seeds and job id; nothing is loaded.

    A bad row raises BatchError (row number and field), or with `skip_invalid` becomes a BatchFailure and the
    others go on. `models_dir` is where model names are looked up (difusi-mini is always known); `threads` is the
    torch thread count every job runs at (default: this process's, see `difusi.batch.jobs`)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    resolver = _ModelResolver(models_dir)
    occurrences: dict[str, int] = {}
    jobs: list[BatchJob] = []
    failures: list[BatchFailure] = []
    for row in rows:
        try:
            jobs.append(_build_job(row, defaults or {}, resolver, occurrences, threads))
        except ParamError as error:
            failure = error if isinstance(error, BatchError) else BatchError(row.number, error.field, error.message)
            if not skip_invalid:
                raise failure from None
            failures.append(BatchFailure(row.number, "", str(failure)))
    return jobs, failures


def _build_job(row: BatchRow, defaults: Mapping[str, Any], resolver: _ModelResolver, occurrences: dict[str, int],
               threads: int) -> BatchJob:
    merged = {key: value for key, value in defaults.items() if value is not None}
    merged.update(row.values)
    params, unknown = GenerationParams.from_mapping(merged)
    if unknown:  # only defaults can get here: rows were checked when read
        raise BatchError(row.number, unknown[0], "unknown field")
    sha256, native_size = resolver.resolve(row.number, params.model)
    # Sizes left out stay None, as in `difusi generate`: the loaded model fills them (the header-only estimate
    # here would miss a variant found at load time, e.g. SD2 v-prediction's 768 px); it serves the checks only.
    checked = params.validated(native_size=native_size).replace(width=params.width, height=params.height)
    checked = _resolve_seeds(checked, sha256, occurrences)
    return BatchJob(job_id=job_id_for(checked, sha256), row=row.number, params=checked, checkpoint=params.model,
                    model_sha256=sha256, threads=threads)


def _resolve_seeds(params: GenerationParams, sha256: str, occurrences: dict[str, int]) -> GenerationParams:
    """Seed/subseed -1 -> a seed derived from the row's content and its occurrence (`difusi.batch.jobs`)."""
    if params.seed != -1 and params.subseed != -1:
        return params
    key = job_id_for(params, sha256)  # the still-unresolved content: identical rows share it
    occurrence = occurrences.get(key, 0)
    occurrences[key] = occurrence + 1
    seed = derived_seed(params, sha256, occurrence, "seed") if params.seed == -1 else params.seed
    subseed = derived_seed(params, sha256, occurrence, "subseed") if params.subseed == -1 else params.subseed
    return params.replace(seed=seed, subseed=subseed)


class _ModelResolver:
    """Model reference -> (sha256, native size), each checkpoint hashed and read (header only) once per batch."""

    def __init__(self, models_dir: str | Path | None):
        self.models_dir = models_dir
        self._known: dict[str | None, tuple[str, int]] = {}

    def resolve(self, number: int, reference: str | None) -> tuple[str, int]:
        if reference not in self._known:
            try:
                self._known[reference] = self._describe(reference)
            except CheckpointError as error:
                raise BatchError(number, "model", str(error)) from None
        return self._known[reference]

    def _describe(self, reference: str | None) -> tuple[str, int]:
        from difusi.models import default_model_path, resolve_checkpoint
        from difusi.models.hashing import file_sha256

        path = default_model_path() if reference is None else Path(resolve_checkpoint(reference, self.models_dir))
        return file_sha256(path), native_size_of(path)


def native_size_of(path: Path) -> int:
    """A checkpoint's native size from headers only (sidecar, else its family record): for the checks before any
    model loads; the loader may still pick a variant with another size."""
    from difusi.models.detect import detect_family_spec
    from difusi.models.families import detect_diffusers
    from difusi.models.files import CheckpointFile, read_json
    from difusi.models.sidecar import read_sidecar

    sidecar = read_sidecar(path)
    if "native_size" in sidecar:
        return int(sidecar["native_size"])
    if path.is_dir():
        unet = path / "unet" / "config.json"
        return detect_diffusers(path, read_json(path / "model_index.json"),
                                read_json(unet) if unet.is_file() else {}).native_size
    reader = CheckpointFile(path)
    try:
        return detect_family_spec(reader.shapes).native_size
    finally:
        reader.close()

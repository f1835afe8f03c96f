"""The X/Y/Z plot (A1111's `scripts/xyz_grid.py`): sweep up to three job fields, one grid image per Z value.

    from difusi.batch.xyz import xyz_plot
    result = xyz_plot(GenerationParams(prompt="a red circle", steps=2), "sampler_name=Euler a,DPM++ 2M",
                      "steps=1-3", store=store)
    result.grids[0].save("grid.png")

An axis is written `TYPE=VALUES`. TYPE is any numeric or choice field of the field table by its A1111 name
(`steps`, `cfg_scale`, `sampler_name`, ...), its UI label or infotext key ("Sampling steps", "Steps"), or one
of A1111's axis labels ("CFG Scale", "Sampler", "Var. seed", ...; `A1111_AXIS_OPTIONS`), plus "Prompt S/R",
"Checkpoint name" and "Nothing". VALUES are A1111's: comma-separated with CSV quoting, integer ranges `1-5`,
`1-5 (+2)`, `10-40 [4]` (four evenly spaced values), float ranges `1.0-2.0 (+0.5)`, `0.5-1.5 [3]`, negative
numbers (`-1`, `-5--1`). Prompt S/R: the first value is searched for in the prompt and negative prompt and
every value (the first included) replaces it; a LoRA multiplier sweep is an S/R over `<lora:name:0.5>`.

Cells are `BatchJob`s run through a batch Runner (in-process, or Ray with `--workers` / `--ray-address`), so
each cell is exactly the image `difusi generate` makes with that cell's fields; each is saved as its own PNG
with its infotext when a store is given, and every grid PNG carries the first cell's infotext plus A1111's
`Script`, `X Type`, `X Values`, ... keys.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from difusi.errors import DifusiError, ParamError
from difusi.params import FIELDS, FieldSpec, GenerationParams, check_field, format_value, resolve_seed

if TYPE_CHECKING:
    from difusi.pipeline import GeneratedImage

SCRIPT_TITLE = "X/Y/Z plot"
"""A1111's script title: the `script_name` HTTP clients send (case-insensitive) and the grid infotext's `Script`."""

NOTHING, FIELD_AXIS, PROMPT_SR, CHECKPOINT = "nothing", "field", "prompt_sr", "checkpoint"

A1111_AXIS_OPTIONS: tuple[tuple[str, str | None], ...] = (
    ("Nothing", NOTHING), ("Seed", "seed"), ("Var. seed", "subseed"), ("Var. strength", "subseed_strength"),
    ("Steps", "steps"), ("Hires steps", "hr_second_pass_steps"), ("CFG Scale", "cfg_scale"), ("Prompt S/R", PROMPT_SR),
    ("Prompt order", None), ("Sampler", "sampler_name"), ("Hires sampler", "hr_sampler_name"), ("Checkpoint name", CHECKPOINT),
    ("Negative Guidance minimum sigma", "s_min_uncond"), ("Sigma Churn", "s_churn"), ("Sigma min", "s_tmin"),
    ("Sigma max", "s_tmax"), ("Sigma noise", "s_noise"), ("Schedule type", "scheduler"),
    ("Schedule min sigma", None), ("Schedule max sigma", None), ("Schedule rho", None), ("Eta", "eta"),
    ("Clip skip", "clip_skip"), ("Denoising", "denoising_strength"), ("Initial noise multiplier", None), ("Extra noise", None),
    ("Hires upscaler", "hr_upscaler"), ("VAE", "sd_vae"), ("Styles", None), ("UniPC Order", None), ("Face restore", None),
    ("Token merging ratio", "token_merging_ratio"), ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None), ("SGM noise multiplier", None), ("Refiner checkpoint", None),
    ("Refiner switch at", None), ("RNG source", "rng"),
)
"""A1111's txt2img axis option list, in its order: HTTP `script_args` name an axis by its index here (A1111's
`x_type` dropdown has `type="index"` over `current_axis_options`, i.e. `axis_options` without the img2img-only
entries; order of A1111 1.6-1.9, whose first 21 entries every later version keeps). The second item is the
difusi field (or axis kind) it sets; None = not supported by difusi, answered with an error naming it. This is
A1111's list, not a second field table: every axis that sets a field reads its type and range from FIELDS."""

_VALUE_ONLY_LABELS = {"sampler_name", "model"}
"""Fields whose grid labels are the bare value ("Euler a"), as A1111's Sampler and Checkpoint name axes; every
other field is labelled "Label: value" (A1111's `format_value_add_label`)."""


class AxisError(ParamError):
    """A bad axis: `field` is the axis ("x", "y", "z" or "script_args"), the message names the axis and value."""


class CellError(DifusiError):
    """A cell's job failed while running (the plot's input was fine): the message names the cell and why."""


# ----------------------------------------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class AxisType:
    """What one axis varies: a field of the field table, the prompt (S/R), the checkpoint, or nothing."""

    kind: str
    """NOTHING, FIELD_AXIS, PROMPT_SR or CHECKPOINT."""
    label: str
    """A1111's label when it has one ("CFG Scale"), else the field's UI label: grid labels and infotext."""
    field: str | None = None
    """The GenerationParams field a FIELD_AXIS sets ("model" for CHECKPOINT)."""

    @property
    def spec(self) -> FieldSpec | None:
        return FIELDS.get(self.field) if self.field else None


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().casefold())


def _axis_field(spec: FieldSpec) -> bool:
    """Numeric and choice fields can be an axis; free text (the prompts) cannot (that is what S/R is for)."""
    return spec.type in (int, float) or spec.choices is not None


def _a1111_label(name: str) -> str | None:
    return next((label for label, target in A1111_AXIS_OPTIONS if target == name), None)


def axis_types() -> list[AxisType]:
    """Every axis type, for the CLI help, the web UI's select and the HTTP mapping: Nothing, every numeric and
    choice field in field-table order (the checkpoint as "Checkpoint name"), Prompt S/R."""
    types = [AxisType(NOTHING, "Nothing")]
    for name, spec in FIELDS.items():
        if not _axis_field(spec):
            continue
        kind = CHECKPOINT if name == "model" else FIELD_AXIS
        types.append(AxisType(kind, _a1111_label(CHECKPOINT if kind == CHECKPOINT else name) or spec.label, name))
    types.append(AxisType(PROMPT_SR, "Prompt S/R"))
    return types


def _aliases() -> dict[str, AxisType]:
    """Every accepted spelling -> axis type: field names, UI labels, infotext keys and A1111's axis labels
    (derived from FIELDS and A1111_AXIS_OPTIONS; nothing spelled twice)."""
    names: dict[str, AxisType] = {}
    for axis in axis_types():
        spec = axis.spec
        spellings = [axis.label, axis.kind]
        if spec is not None:
            spellings += [spec.name, spec.label]
            if spec.infotext and not spec.infotext.startswith("Size-"):
                spellings.append(spec.infotext)
        spellings += [label for label, target in A1111_AXIS_OPTIONS
                      if target is not None and target in (axis.field, axis.kind)
                      and not (axis.kind == CHECKPOINT and target == "model")]
        for spelling in spellings:
            names.setdefault(_norm(spelling), axis)
    names.setdefault(_norm("checkpoint"), names[_norm("model")])
    names.setdefault(_norm("sr"), names[_norm(PROMPT_SR)])
    names.setdefault(_norm("none"), names[_norm(NOTHING)])
    return names


def find_axis_type(name: str, axis: str = "x") -> AxisType:
    """The axis type `name` means (case-insensitive; spaces, `_` and `-` alike); AxisError naming `axis`."""
    found = _aliases().get(_norm(name))
    if found is not None:
        return found
    unsupported = next((label for label, target in A1111_AXIS_OPTIONS if target is None and _norm(label) == _norm(name)),
                       None)
    if unsupported is not None:
        raise AxisError(axis, f"{axis.upper()} axis: A1111's {unsupported!r} axis is not supported by difusi yet")
    known = ", ".join(t.field for t in axis_types() if t.field)
    raise AxisError(axis, f"{axis.upper()} axis: unknown axis type {name!r}; use a field ({known}), "
                          "'Prompt S/R', 'Checkpoint name' or 'Nothing'")


@dataclass(frozen=True)
class Axis:
    """A parsed axis: its type, its values (converted and checked) and the text the user wrote."""

    name: str
    """"x", "y" or "z"."""
    type: AxisType
    values: tuple[Any, ...]
    text: str = ""

    @property
    def is_nothing(self) -> bool:
        return self.type.kind == NOTHING

    def labels(self) -> list[str]:
        """Grid labels, A1111's formats: "" for Nothing, the bare value for Sampler/Checkpoint/S/R, else
        "Label: value"."""
        if self.is_nothing:
            return [""] * len(self.values)
        out = []
        for value in self.values:
            text = _value_text(value)
            if self.type.kind == CHECKPOINT:
                text = Path(text).stem if ("/" in text or "\\" in text or text.endswith((".safetensors", ".ckpt"))) else text
            if self.type.kind == FIELD_AXIS and self.type.field not in _VALUE_ONLY_LABELS:
                text = f"{self.type.label}: {text}"
            out.append(text)
        return out


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return format_value(round(value, 8))  # A1111 rounds float labels to 8 places
    return str(value)


NOTHING_AXIS = Axis("z", AxisType(NOTHING, "Nothing"), (None,))


def split_values(text: str) -> list[str]:
    """A1111's `csv_string_to_list_strip`: CSV with quotes, each value stripped; empty values dropped."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    try:
        return [value.strip() for value in chain.from_iterable(rows) if value.strip()]
    except csv.Error as error:  # e.g. a NUL character: a bad value, not a crash
        raise ValueError(f"cannot read the values as comma-separated text: {error}") from None


_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_INT_STEP = re.compile(rf"^\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*({_INT})\s*\))?\s*$")
_INT_COUNT = re.compile(rf"^\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*$")
_FLOAT_STEP = re.compile(rf"^\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*({_FLOAT})\s*\))?\s*$")
_FLOAT_COUNT = re.compile(rf"^\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*\]\s*$")
MAX_AXIS_VALUES = 1000
"""More values than this on one axis is a typo (`1-100000`), refused before anything is planned."""
MAX_CELLS = 10_000
"""At most this many cells in one plot (all axes multiplied), checked before any cell is planned."""
MAX_GRID_MEGAPIXELS = 200
"""A1111's `img_max_size_mp` default: cells x width x height above this would make a grid too large to draw."""
NO_CHECKPOINT_CHECK: Any = object()
"""models_dir sentinel: checkpoint names from HTTP are resolved by the server's listing, not the library resolver."""
_NO_CHECK = NO_CHECKPOINT_CHECK


def _number(text: str, kind: type) -> Any:
    return kind(text.replace(" ", ""))


def _expand_range(value: str, kind: type, where: str) -> list[Any] | None:
    """A1111's range syntaxes for one value; None when `value` is not a range (a plain number)."""
    step_re, count_re = (_INT_STEP, _INT_COUNT) if kind is int else (_FLOAT_STEP, _FLOAT_COUNT)
    counted = count_re.match(value)
    stepped = None if counted else step_re.match(value)
    if counted:
        start, end, count = _number(counted[1], kind), _number(counted[2], kind), int(counted[3])
        if count < 1:
            raise ValueError(f"{where}: range {value!r} needs a count of at least 1")
        if count > MAX_AXIS_VALUES:
            raise ValueError(f"{where}: range {value!r} has more than {MAX_AXIS_VALUES} values")
        if count == 1:
            return [start]
        # numpy.linspace, as A1111 (int() truncates the int case as A1111 does)
        points = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [int(p) for p in points] if kind is int else [round(p, 10) for p in points]
    if stepped is None:
        return None
    start, end = _number(stepped[1], kind), _number(stepped[2], kind)
    step = _number(stepped[3], kind) if stepped[3] else kind(1)
    if step == 0:
        raise ValueError(f"{where}: range {value!r} has a step of 0")
    span = (end - start) / step
    if span < 0:
        raise ValueError(f"{where}: range {value!r} is empty (the step goes away from the end)")
    count = int(math.floor(span + 1e-9)) + 1  # inclusive end, as A1111 (range(end + 1) / arange(end + step))
    if count > MAX_AXIS_VALUES:
        raise ValueError(f"{where}: range {value!r} has more than {MAX_AXIS_VALUES} values")
    if kind is int:
        return [start + i * step for i in range(count)]
    return [round(start + i * step, 10) for i in range(count)]  # no 0.30000000000000004 labels


def parse_axis(text: str | None, axis: str = "x", *, prompt: str = "", negative_prompt: str = "",
               models_dir: str | Path | None = None) -> Axis:
    """Parse `TYPE=VALUES` (the CLI's and difusi endpoint's syntax); None or "" is the Nothing axis.

    Raises AxisError (field = `axis`) naming the axis and the bad value: unknown type, a value that is not a
    number, out of its field's range, an unknown sampler/schedule/checkpoint, S/R whose search term is in
    neither prompt.
    """
    if text is None or not text.strip():
        return Axis(axis, AxisType(NOTHING, "Nothing"), (None,), "")
    name, sep, values = text.partition("=")
    if not sep:
        raise AxisError(axis, f"{axis.upper()} axis: expected TYPE=VALUES (e.g. 'steps=10,20'), got {text!r}")
    return make_axis(find_axis_type(name, axis), values, axis, prompt=prompt, negative_prompt=negative_prompt,
                     models_dir=models_dir)


def make_axis(kind: AxisType, values_text: str, axis: str = "x", *, prompt: str = "", negative_prompt: str = "",
              models_dir: Any = None, error_field: str | None = None) -> Axis:
    """An axis of type `kind` from A1111's value text; see `parse_axis` (`error_field` overrides the AxisError
    field, e.g. "script_args" for HTTP)."""
    where = f"{axis.upper()} axis ({kind.label})"
    field_name = error_field or axis
    if kind.kind == NOTHING:
        return Axis(axis, kind, (None,), values_text)
    try:
        raw = split_values(values_text)
    except ValueError as error:
        raise AxisError(field_name, f"{where}: {error}") from None
    if not raw:
        raise AxisError(field_name, f"{where}: no values")
    try:
        values = _convert_values(kind, raw, where, prompt, negative_prompt, models_dir)
    except ValueError as error:
        raise AxisError(field_name, str(error)) from None
    if len(values) > MAX_AXIS_VALUES:
        raise AxisError(field_name, f"{where}: more than {MAX_AXIS_VALUES} values")
    return Axis(axis, kind, tuple(values), values_text)


def _convert_values(kind: AxisType, raw: list[str], where: str, prompt: str, negative_prompt: str,
                    models_dir: Any) -> list[Any]:
    if kind.kind == PROMPT_SR:
        search = raw[0]
        if search not in prompt and search not in negative_prompt:
            raise ValueError(f"{where}: search term {search!r} (the first value) is in neither the prompt nor the "
                             "negative prompt")
        return raw
    if kind.kind == CHECKPOINT:
        return [_check_checkpoint(value, where, models_dir) for value in raw]
    spec = kind.spec
    assert spec is not None
    values: list[Any] = []
    for value in raw:
        if spec.type in (int, float):
            expanded = _expand_range(value, spec.type, where)
            if expanded is None:
                try:
                    expanded = [_number(value, spec.type)]
                except ValueError:
                    kind_text = "an integer" if spec.type is int else "a number"
                    raise ValueError(f"{where}: {value!r} is not {kind_text} or a range") from None
            values.extend(expanded)
        else:
            values.append(value)
    for value in values:
        _check_value(spec, value, where)
    return values


def _check_value(spec: FieldSpec, value: Any, where: str) -> None:
    """One field value: its type and range (`check_field`) and, for choices, its registry."""
    try:
        if spec.type is float and isinstance(value, float) and math.isnan(value):
            raise ParamError(spec.name, "must be a number, got NaN")
        check_field(spec, value)
        if spec.choices == "samplers":
            from difusi.samplers import get_sampler

            get_sampler(value)
        elif spec.choices == "schedulers":
            from difusi.samplers import get_schedule

            get_schedule(value)
        elif spec.choices == "rng_sources":
            from difusi.rng import check_source

            check_source(value)
        if spec.name in ("seed", "subseed") and value < -1:
            raise ParamError(spec.name, f"must be -1 (random) or >= 0, got {value}")
    except ParamError as error:
        raise ValueError(f"{where}: {_value_text(value)!r}: {error.message}") from None


def _check_checkpoint(value: str, where: str, models_dir: Any) -> str:
    from difusi.errors import CheckpointError
    from difusi.models.catalog import resolve_checkpoint

    if models_dir is _NO_CHECK:  # the server resolves names against its own listing (never arbitrary paths)
        return value
    try:
        resolve_checkpoint(value, models_dir)
    except CheckpointError as error:
        raise ValueError(f"{where}: {value!r}: {error}") from None
    return value


# ----------------------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One point of the plot: its position and the job it runs."""

    x: int
    y: int
    z: int
    params: GenerationParams
    checkpoint: str | None
    """Checkpoint reference as the user wrote it (resolved by the runner); None = the default model."""


def _apply(axis: Axis, value: Any, params: GenerationParams, checkpoint: str | None,
           ) -> tuple[GenerationParams, str | None]:
    kind = axis.type.kind
    if kind == NOTHING:
        return params, checkpoint
    if kind == PROMPT_SR:
        search = axis.values[0]
        return params.replace(prompt=params.prompt.replace(search, value),
                              negative_prompt=params.negative_prompt.replace(search, value)), checkpoint
    if kind == CHECKPOINT:
        return params.replace(model=value), value
    assert axis.type.field is not None
    return params.replace(**{axis.type.field: value}), checkpoint


def _fix_seeds(axis: Axis) -> Axis:
    """A1111's `fix_axis_seeds`: a -1 on a Seed / Var. seed axis is one random seed, the same in every cell."""
    if axis.type.field not in ("seed", "subseed"):
        return axis
    return dataclasses.replace(axis, values=tuple(resolve_seed(v) if v == -1 else v for v in axis.values))


@dataclass
class XYZPlan:
    """The validated plan: axes and every cell's job, in A1111's order (X fastest)."""

    x: Axis
    y: Axis
    z: Axis
    cells: list[Cell]

    def index(self, ix: int, iy: int, iz: int) -> int:
        return ix + iy * len(self.x.values) + iz * len(self.x.values) * len(self.y.values)


def plan(params: GenerationParams, x: Axis, y: Axis | None = None, z: Axis | None = None,
         native_size: int = 512, *, fix_seeds: bool = True) -> XYZPlan:
    """Every cell's params, each validated before any model loads (errors name the axes' values that caused
    them). Seeds of -1 are drawn once for the whole plot (A1111's `fix_seed`), so cells differ only by axes;
    `fix_seeds=False` is A1111's "Keep -1 for seeds": every cell draws its own."""
    y = y or dataclasses.replace(NOTHING_AXIS, name="y")
    z = z or dataclasses.replace(NOTHING_AXIS, name="z")
    count = len(x.values) * len(y.values) * len(z.values)
    if count > MAX_CELLS:
        raise AxisError(x.name, f"the axes make {count} cells; at most {MAX_CELLS} per plot")
    side_w, side_h = params.width or native_size, params.height or native_size
    for axis in (x, y, z):  # the largest size any cell gets
        if axis.type.field in ("width", "height"):
            biggest = max(axis.values)
            side_w, side_h = (biggest, side_h) if axis.type.field == "width" else (side_w, biggest)
    megapixels = count * side_w * side_h / 1_000_000
    if megapixels > MAX_GRID_MEGAPIXELS:
        raise AxisError(x.name, f"the grid would be {megapixels:.0f} megapixels ({count} cells of up to "
                                f"{side_w}x{side_h}); at most {MAX_GRID_MEGAPIXELS} (A1111's limit)")
    base = params
    if fix_seeds:
        x, y, z = _fix_seeds(x), _fix_seeds(y), _fix_seeds(z)
        base = params.replace(seed=resolve_seed(params.seed), subseed=resolve_seed(params.subseed))
    cells: list[Cell] = []
    for iz, zv in enumerate(z.values):
        for iy, yv in enumerate(y.values):
            for ix, xv in enumerate(x.values):
                cell_params, checkpoint = base, base.model
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    cell_params, checkpoint = _apply(axis, value, cell_params, checkpoint)
                try:
                    cell_params.validated(native_size=native_size)
                except ParamError as error:
                    named = ", ".join(f"{a.name.upper()}={lab}" for a, lab in
                                      ((x, x.labels()[ix]), (y, y.labels()[iy]), (z, z.labels()[iz])) if lab)
                    raise ParamError(error.field, f"{error.message} (cell {named})") from None
                cells.append(Cell(ix, iy, iz, cell_params, checkpoint))
    return XYZPlan(x, y, z, cells)


# ----------------------------------------------------------------------------------------------------------- running


def encode_png(image: Image.Image, infotext: str) -> bytes:
    from difusi.infotext import write_png

    buffer = io.BytesIO()
    write_png(image, buffer, infotext)
    return buffer.getvalue()


class PipelineRunner:
    """An in-process Runner over a model loader (the server's model cache, or `difusi.models.load_model`).

    Same protocol as the batch runners (`run(jobs, models_dir) -> Iterator[JobOutput]`, `close()`); the server
    uses it so cells share the model its cache already holds, and stop between cells when a job is interrupted.
    Each cell is made by `difusi.batch.local.run_job`, the code every batch row is made by.
    """

    def __init__(self, load: Callable[[str | None], Any] | None = None, *,
                 should_stop: Callable[[], bool] | None = None):
        self._load = load
        self._should_stop = should_stop

    def run(self, jobs: Iterable[Any], models_dir: str | Path | None = None) -> Iterator[Any]:
        loaded: dict[str | None, Any] = {}
        for job in jobs:
            if self._should_stop is not None and self._should_stop():
                return
            key = job.checkpoint
            if key not in loaded:
                loaded.clear()  # one model in memory at a time; jobs arrive grouped by checkpoint
                loaded[key] = self._load_model(key, models_dir)
            yield _run_one(loaded[key], job, models_dir)

    def _load_model(self, checkpoint: str | None, models_dir: str | Path | None) -> Any:
        if self._load is not None:
            return self._load(checkpoint)
        from difusi.models import default_model_path, load_model
        from difusi.models.catalog import resolve_checkpoint

        path = resolve_checkpoint(checkpoint, models_dir) if checkpoint else default_model_path()
        return load_model(path)

    def close(self) -> None:
        pass


def _run_one(model: Any, job: Any, models_dir: str | Path | None) -> Any:
    from difusi.batch.local import run_job

    return run_job(model, job, models_dir)  # the one function every batch row is made by (same bytes as `difusi generate`)


def _checkpoint_sha(checkpoint: str | None, models_dir: Any) -> str:
    """The checkpoint's full sha256 (the batch job id hashes it, and runners check they loaded that file)."""
    from difusi.models import default_model_path
    from difusi.models.catalog import describe_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint, None if models_dir is _NO_CHECK else models_dir) \
            if checkpoint else default_model_path()
        return describe_checkpoint(path).sha256
    except (DifusiError, OSError):
        return ""  # the runner reports the unusable checkpoint on the cell itself


def batch_jobs(xyz: XYZPlan, models_dir: str | Path | None = None) -> list[Any]:
    """The plan's cells as `BatchJob`s (row = A1111 cell index), grouped by checkpoint so a runner loads each
    model once (A1111 runs its costly Checkpoint axis outermost for the same reason)."""
    import torch

    from difusi.batch.jobs import BatchJob, job_id_for

    threads = torch.get_num_threads()  # the batch thread rule (difusi.batch.jobs): same bytes on any layout
    shas = {key: _checkpoint_sha(key, models_dir) for key in dict.fromkeys(cell.checkpoint for cell in xyz.cells)}
    jobs = [BatchJob(job_id=job_id_for(cell.params, shas[cell.checkpoint]), row=row, params=cell.params,
                     checkpoint=cell.checkpoint, model_sha256=shas[cell.checkpoint], threads=threads)
            for row, cell in enumerate(xyz.cells)]
    order = {key: n for n, key in enumerate(dict.fromkeys(cell.checkpoint for cell in xyz.cells))}
    return sorted(jobs, key=lambda job: (order[job.checkpoint], job.row))


# ----------------------------------------------------------------------------------------------------------- result


@dataclass
class XYZCell:
    """One finished cell: its first image (the grid's), every image of the job, where they were saved."""

    x: int
    y: int
    z: int
    image: Image.Image
    seed: int
    subseed: int
    infotext: str
    params: GenerationParams
    png: bytes
    paths: list[Path] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    """`GeneratedImage`s (what `OutputStore.save` takes) of every image the cell's job made (batch size x batch count)."""


@dataclass
class XYZResult:
    grids: list[Image.Image]
    """One grid per Z value, in Z order."""
    cells: list[XYZCell]
    """In A1111's order: X fastest, then Y, then Z."""
    infotext: str
    """The first grid's infotext (the first cell's plus Script / X Type / X Values / ...)."""
    grid_infotexts: list[str] = field(default_factory=list)
    z_grid: Image.Image | None = None
    """A1111's grid of grids (Z labels over the columns) when the Z axis has several values, else None."""
    plan: XYZPlan | None = None


def grid_infotext(cell_infotext: str, xyz: XYZPlan) -> str:
    """The first cell's infotext plus A1111's script keys (Script, X Type, X Values, ...), on its last line."""
    from difusi.infotext import quote

    extra = [("Script", SCRIPT_TITLE)]
    for axis in (xyz.x, xyz.y, xyz.z):
        if axis.is_nothing:
            continue
        extra += [(f"{axis.name.upper()} Type", axis.type.label), (f"{axis.name.upper()} Values", axis.text)]
        if axis.type.field in ("seed", "subseed"):
            extra.append((f"Fixed {axis.name.upper()} Values", ", ".join(str(v) for v in axis.values)))
    return cell_infotext + ", " + ", ".join(f"{key}: {quote(value)}" for key, value in extra)


def xyz_plot(params: GenerationParams, x: str | Axis, y: str | Axis | None = None, z: str | Axis | None = None, *,
             runner: Any = None, store: Any = None, models_dir: str | Path | None = None,
             draw_legend: bool = True, margin: int = 0, on_cell: Callable[[XYZCell], None] | None = None,
             fix_seeds: bool = True) -> XYZResult:
    """Run an X/Y/Z plot: parse the axes (strings in `TYPE=VALUES` syntax, or `Axis`), validate every cell, run
    the cells as a batch through `runner` (default: in-process), save each cell's images through `store`
    (an `OutputStore`; None = not saved) and draw one grid per Z value in A1111's layout.

    Raises AxisError / ParamError before anything runs for a bad axis or cell; CellError naming the cell when a
    cell's job fails; Interrupted when the runner stops early (the server's interrupt).
    """
    axes = []
    for name, given in (("x", x), ("y", y), ("z", z)):
        if isinstance(given, Axis) or given is None and name != "x":
            axes.append(given)
        else:
            axes.append(parse_axis(given, name, prompt=params.prompt, negative_prompt=params.negative_prompt,
                                   models_dir=models_dir))
    xyz = plan(params, axes[0], axes[1], axes[2], fix_seeds=fix_seeds)
    jobs = batch_jobs(xyz, models_dir)
    own_runner = runner is None
    if own_runner:
        runner = _default_runner()
    finished: dict[int, XYZCell] = {}
    outputs = runner.run(jobs, models_dir)
    try:
        for output in outputs:
            cell = xyz.cells[output.row]
            if output.error or not output.images:
                named = _cell_name(xyz, cell)
                raise CellError(f"X/Y/Z cell {named} failed: {output.error or 'no image'}")
            finished[output.row] = done = _finish(cell, output, store)
            if on_cell is not None:
                on_cell(done)
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:  # a failed cell leaves the runner's generator mid-way: stop it now
            close()
        if own_runner:
            runner.close()
    if len(finished) != len(xyz.cells):
        from difusi.errors import Interrupted

        raise Interrupted(f"X/Y/Z plot stopped: {len(finished)} of {len(xyz.cells)} cells done")
    cells = [finished[row] for row in range(len(xyz.cells))]
    return assemble(xyz, cells, draw_legend=draw_legend, margin=margin)


def _default_runner() -> Any:
    from difusi.batch.local import LocalRunner

    return LocalRunner()


def _cell_name(xyz: XYZPlan, cell: Cell) -> str:
    parts = [f"{axis.name.upper()}={axis.labels()[i]}" for axis, i in ((xyz.x, cell.x), (xyz.y, cell.y),
                                                                         (xyz.z, cell.z)) if not axis.is_nothing]
    return ", ".join(parts) or "1"


def _finish(cell: Cell, output: Any, store: Any) -> XYZCell:
    from difusi.pipeline import GeneratedImage  # the pipeline's image record; imported late (torch, diffusers)

    saved: list[GeneratedImage] = []
    paths: list[Path] = []
    for encoded in sorted(output.images, key=lambda image: image.index):
        with Image.open(io.BytesIO(encoded.png)) as opened:
            picture = opened.copy()
        params = cell.params.replace(seed=encoded.seed, subseed=encoded.subseed,
                                     width=cell.params.width or picture.width,
                                     height=cell.params.height or picture.height)
        image = GeneratedImage(picture, encoded.seed, encoded.subseed, encoded.index, encoded.infotext, params)
        saved.append(image)
        if store is None:
            continue
        if hasattr(store, "save_encoded"):  # the runner's exact bytes, with the batch job id in the history row
            paths.append(store.save_encoded(encoded.png, encoded.infotext, cell.params, encoded.seed,
                                            encoded.subseed, output.job_id, encoded.index))
        else:
            paths.append(store.save(image))
    first = output.images[0]
    return XYZCell(cell.x, cell.y, cell.z, saved[0].image, first.seed, first.subseed, first.infotext, cell.params,
                   first.png, paths, saved)


def assemble(xyz: XYZPlan, cells: Sequence[XYZCell], *, draw_legend: bool = True, margin: int = 0) -> XYZResult:
    """Draw the grids from finished cells (in A1111 order)."""
    from difusi.batch.grid import draw_grid, grid_of_grids

    nx, ny = len(xyz.x.values), len(xyz.y.values)
    grids, infotexts = [], []
    for iz in range(len(xyz.z.values)):
        chunk = cells[iz * nx * ny:(iz + 1) * nx * ny]
        title = xyz.z.labels()[iz] if draw_legend and not xyz.z.is_nothing else None
        grid, _ = draw_grid([c.image for c in chunk], nx, xyz.x.labels() if draw_legend else None,
                            xyz.y.labels() if draw_legend else None, title=title, margin=margin)
        grids.append(grid)
        infotexts.append(grid_infotext(chunk[0].infotext, xyz))
    z_grid = None
    if len(grids) > 1:  # A1111's grid of grids: untitled grids under their Z labels (a title would repeat them)
        plain = [draw_grid([c.image for c in cells[iz * nx * ny:(iz + 1) * nx * ny]], nx,
                           xyz.x.labels() if draw_legend else None, xyz.y.labels() if draw_legend else None,
                           margin=margin)[0] for iz in range(len(grids))]
        z_grid = grid_of_grids(plain, xyz.z.labels() if draw_legend else [""] * len(grids), margin=margin)
    return XYZResult(grids, list(cells), infotexts[0], infotexts, z_grid, xyz)


# ----------------------------------------------------------------------------------------------------------- saving


GRIDS_FOLDER = "xyz-grids"
"""Grids go to `<outputs>/xyz-grids/YYYY-MM-DD/` (A1111: `txt2img-grids/`), outside the store's day folders, so
the history (which lists generated images) never picks a grid up as one."""


def save_grid(image: Image.Image, infotext: str, outputs_dir: str | Path, *, now: dt.datetime | None = None) -> Path:
    """Write a grid PNG with its infotext, temp file + rename, never overwriting; returns its path."""
    from difusi.infotext import write_png
    from difusi.store import next_number

    now = now or dt.datetime.now().astimezone()
    folder = Path(outputs_dir) / GRIDS_FOLDER / now.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".difusi-tmp-grid-", suffix=".png", dir=folder)
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_png(image, handle, infotext)
        while True:
            target = folder / f"{next_number(folder):05d}-xyz_grid.png"
            try:
                os.link(temp, target)  # fails if it exists: never overwrite a grid another run just wrote
                return target
            except FileExistsError:
                continue
    finally:
        temp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class ScriptRequest:
    """A1111's X/Y/Z `script_args`, parsed: the axes and the options difusi honours."""

    x: Axis
    y: Axis
    z: Axis
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    margin_size: int = 0


SCRIPT_ARGS_ORDER = ("x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown",
                     "z_type", "z_values", "z_values_dropdown", "draw_legend", "include_lone_images",
                     "include_sub_grids", "no_fixed_seeds")
"""A1111's `Script.run` positional arguments (after `p`) that difusi reads; every version since 1.6 starts with
these 13. After them A1111 1.10 has vary_seeds_x/y/z, margin_size, csv_mode (18 in all); 1.6-1.9 have
margin_size, csv_mode, raw_mode (16): `margin_size` is read from position 16 or 13 by that length."""


def is_xyz_script(name: Any) -> bool:
    """`script_name` names the X/Y/Z plot (A1111 matches script titles case-insensitively)."""
    return isinstance(name, str) and name.strip().casefold() == SCRIPT_TITLE.casefold()


def from_script_args(args: Any, *, prompt: str = "", negative_prompt: str = "",
                     resolve_checkpoint: Callable[[str], str] | None = None) -> ScriptRequest:
    """Map A1111's positional `script_args` (see SCRIPT_ARGS_ORDER) to axes; AxisError("script_args") naming the
    position for anything difusi cannot honour. An axis type is A1111's index into A1111_AXIS_OPTIONS (or, as a
    convenience, its label); a choice axis with empty text uses its dropdown list, as A1111's non-CSV mode."""
    where = "script_args"
    if not isinstance(args, list) or len(args) < 9:
        raise AxisError(where, "script_args: the X/Y/Z plot needs A1111's positional list "
                               f"({', '.join(SCRIPT_ARGS_ORDER)}, ...), got {args!r}"[:400])
    axes = []
    for n, name in enumerate("xyz"):
        type_value, text, dropdown = args[3 * n], args[3 * n + 1], args[3 * n + 2]
        kind = _script_axis_type(type_value, name, where)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise AxisError(where, f"script_args[{3 * n + 1}] ({name}_values): must be a string, got {text!r}")
        if not text.strip() and isinstance(dropdown, list) and dropdown:
            text = ",".join(_csv_quote(str(item)) for item in dropdown)
        if kind.kind != NOTHING and not text.strip():
            raise AxisError(where, f"script_args[{3 * n + 1}] ({name}_values): {name.upper()} axis "
                                   f"({kind.label}) has no values")
        axis = make_axis(kind, text, name, prompt=prompt, negative_prompt=negative_prompt, error_field=where,
                         models_dir=None if kind.kind != CHECKPOINT else _NO_CHECK)
        if kind.kind == CHECKPOINT and resolve_checkpoint is not None:
            try:
                axis = dataclasses.replace(axis, values=tuple(resolve_checkpoint(v) for v in axis.values))
            except ParamError as error:
                raise AxisError(where, f"{name.upper()} axis (Checkpoint name): {error.message}") from None
        axes.append(axis)
    flags = [bool(args[i]) if len(args) > i and args[i] is not None else default
             for i, default in ((9, True), (10, False), (11, False), (12, False))]
    margin_index = 16 if len(args) >= 18 else 13
    margin = args[margin_index] if len(args) > margin_index else 0
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 500:
        margin = 0  # A1111's slider range; anything else (e.g. an older layout's flag there) means no margin
    return ScriptRequest(axes[0], axes[1], axes[2], *flags, margin_size=int(margin))




def _csv_quote(value: str) -> str:
    return f'"{value}"' if "," in value or '"' in value else value


def _script_axis_type(value: Any, name: str, where: str) -> AxisType:
    position = "xyz".index(name) * 3
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise AxisError(where, f"script_args[{position}] ({name}_type): must be an index into A1111's axis options, "
                               f"got {value!r}")
    if isinstance(value, str):
        try:
            return find_axis_type(value, name)
        except AxisError as error:
            raise AxisError(where, f"script_args[{position}] ({name}_type): {error.message}") from None
    if not 0 <= value < len(A1111_AXIS_OPTIONS):
        raise AxisError(where, f"script_args[{position}] ({name}_type): axis option index {value} is not one of "
                               f"A1111's txt2img axis options (0-{len(A1111_AXIS_OPTIONS) - 1})")
    label, target = A1111_AXIS_OPTIONS[value]
    if target is None:
        raise AxisError(where, f"script_args[{position}] ({name}_type): A1111's {label!r} axis (index {value}) is "
                               "not supported by difusi yet")
    return find_axis_type(label, name)

"""`difusi` command line: generate | info | models | samplers | history | serve | mini.

    difusi generate "a red circle on a blue background" --steps 20 --seed 42
    difusi generate --from outputs/2026-03-04/00000-42-a-red-circle.png --seed -1
    difusi info outputs/2026-03-04/00000-42-a-red-circle.png

Errors are one line on stderr, `difusi: error: --FLAG: what is allowed, got what`, exit code 2 (no
traceback); Ctrl-C stops after the current step, keeps every finished image and exits with 130.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import difusi  # noqa: F401  (sets the offline hub environment before any Hugging Face import)
from difusi import settings, strict_json
from difusi.budget import add_budget_flags, apply_budget_flags  # noqa: F401  (in budget.py so server needs no cli)
from difusi.budget import with_budget_flags as _with_budget_flags
from difusi.devices import add_device_flags  # in devices.py so the server needs no cli
from difusi.errors import CheckpointError, DifusiError, Interrupted, NumericalError, ParamError, StorageError
from difusi.infotext import KEY_TO_FIELD, parse_infotext, read_infotext, recipe_from_infotext
from difusi.params import FIELDS, PICTURE_KINDS, TXT2IMG, FieldSpec, GenerationParams, format_value

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

FIELD_FLAGS: dict[str, str] = {name: spec.flags[0] for name, spec in FIELDS.items() if spec.flags}
"""GenerationParams field -> the flag a user types to set it (derived from the field table)."""

SPEED_GROUP = "opt-in speed modes (approximate: they change the image; recorded in its infotext)"


class UsageError(DifusiError):
    """A command-line mistake; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with difusi's error format: one line, no usage block, exit code 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        message = re.sub(r"^(--[\w-]+)(?:/--?[\w-]+)+:", r"\1:", message)  # "--width/-W:" -> "--width:"
        _fail(message)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"difusi: error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ----------------------------------------------------------------------------- value types for flags


def _int_type(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float_type(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def _positive_int_type(text: str) -> int:
    value = _int_type(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The whole `difusi` command line (serve and mini forward their arguments to their own parsers)."""
    parser = _Parser(prog="difusi", description="Local Stable Diffusion text-to-image (A1111-compatible).")
    parser.add_argument("--version", action="version", version=f"difusi {difusi.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_generate(commands)
    _add_img2img(commands)
    _add_upscale(commands)
    _add_batch(commands)
    _add_xyz(commands)
    info = commands.add_parser("info", help="print the parameters stored in an image")
    info.add_argument("image", metavar="IMAGE", help="a PNG written by difusi, A1111 or a compatible tool")
    info.add_argument("--json", action="store_true", help="print the parsed fields as JSON")
    models = commands.add_parser("models", help="list checkpoints in the models folder")
    models.add_argument("--models-dir", default=None, help="folder of checkpoints (default: see settings)")
    networks = commands.add_parser("networks", help="list LoRA / LyCORIS files, embeddings and VAEs with hashes and "
                                                    "the model family each is for")
    networks.add_argument("--models-dir", default=None, help="models folder (default: see settings)")
    networks.add_argument("--kind", choices=("lora", "embedding", "vae"), default=None, help="only this kind")
    networks.add_argument("--json", action="store_true", help="print one JSON object per file")
    samplers = commands.add_parser("samplers", help="list samplers, aliases and schedules")
    samplers.add_argument("--report", nargs="?", const="sampler-report", default=None, metavar="DIR",
                          help="write the sampler comparison report (convergence plots) to DIR")
    samplers.add_argument("--quick", action="store_true", help="with --report: a fast, coarse report")
    history = commands.add_parser("history", help="list and search recent generations")
    history.add_argument("--search", default=None, metavar="TEXT", help="only prompts containing TEXT")
    history.add_argument("--limit", type=_positive_int_type, default=20, help="at most N rows (default 20)")
    history.add_argument("--outputs-dir", default=None, help="outputs folder (default: see settings)")
    history.add_argument("--json", action="store_true", help="print rows as JSON lines")
    commands.add_parser("serve", help="run the A1111-compatible HTTP API and web UI (see `difusi serve --help`)",
                        add_help=False)
    commands.add_parser("mini", help="train or evaluate difusi-mini (`difusi mini train|evaluate --help`)",
                        add_help=False)
    return parser


def _add_generate(commands: Any) -> None:
    gen = commands.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images. Flags left out keep the image's values with --from/--infotext, "
        "else the defaults.",
    )
    _add_field_flags(gen, kinds={TXT2IMG})
    _add_job_flags(gen)


def _add_img2img(commands: Any) -> None:
    job = commands.add_parser(
        "img2img",
        help="redraw a picture from a prompt (inpaint with --mask, outpaint with --outpaint)",
        description="img2img, A1111's second tab: IMAGE is redrawn by --denoising-strength (0 keeps it, 1 redraws "
        "it all); --mask M.png (white = redraw, or IMAGE's transparency) inpaints; --outpaint PIXELS extends the "
        "canvas and inpaints the new area. --from takes the fields of an earlier image (an img2img result: give its "
        "init picture as IMAGE).",
    )
    job.add_argument("image", metavar="IMAGE", help="the init picture (PNG, JPEG, WebP)")
    _add_field_flags(job, kinds=PICTURE_KINDS)
    job.add_argument("--mask", default=None, metavar="MASK.png", help="inpainting mask: white is redrawn")
    job.add_argument("--init-image", action="append", default=[], metavar="IMAGE",
                     help="another init picture (repeat; image i of the job uses picture i modulo their number)")
    _add_job_flags(job)


def _add_job_flags(gen: Any) -> None:
    """The flags every image job has besides the field table's: where fields come from, output, folders, device."""
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--from", dest="from_image", default=None, metavar="IMAGE",
                        help="start from the parameters (and model) stored in IMAGE; flags override them")
    source.add_argument("--infotext", default=None, metavar="TEXT",
                        help="start from an A1111 parameters text; unsupported keys are reported")
    gen.add_argument("--output", "-o", default=None, metavar="FILE.png",
                     help="also write the image to FILE.png (FILE-1.png, FILE-2.png... for several); never overwrites")
    gen.add_argument("--models-dir", default=None, help="folder of checkpoints (default: see settings)")
    gen.add_argument("--outputs-dir", default=None, help="folder for images and history (default: see settings)")
    add_device_flags(gen)
    add_budget_flags(gen)


def _add_field_flags(parser: Any, *, prompt: bool = True, kinds: set[str] | frozenset[str] | None = None) -> None:
    """Every field-table flag of the job `kinds` (all when None; the speed modes and the hires, img2img, inpaint
    and outpaint fields in their own help groups); `prompt=False` leaves out PROMPT."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for spec in FIELDS.values():
        if kinds is not None and not spec.kinds & kinds:
            continue
        if spec.flags and (prompt or not spec.flags[0].isupper()):
            _add_field_flag(groups.get(spec.group, parser), spec)


GROUP_TITLES = {
    "hires": "hires fix (a second pass at a larger size)",
    "img2img": "img2img",
    "inpaint": "inpainting (with --mask)",
    "outpaint": "outpainting",
    "speed": SPEED_GROUP,
}


def _add_runner_flags(parser: Any, what: str) -> None:
    """Where batch-like commands run (in-process, or Ray) and the folders, device and budget they use."""
    parser.add_argument("--workers", type=_positive_int_type, default=None, metavar="N",
                        help=f"run {what} on a local Ray cluster of N workers")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help=f"run {what} on an existing Ray cluster (HOST:PORT or auto; default $RAY_ADDRESS)")
    parser.add_argument("--models-dir", default=None, help="folder of checkpoints (default: see settings)")
    parser.add_argument("--outputs-dir", default=None, help="folder for images and history (default: see settings)")
    add_device_flags(parser)
    add_budget_flags(parser)


def _add_field_flag(parser: Any, spec: FieldSpec) -> None:
    """One `generate` flag from the field table: its spellings, value type, help with range and default."""
    help_text = " ".join(part for part in (spec.help, spec.range_text()) if part)
    if spec.default not in (None, ""):  # None defaults are explained by the help text ("the model's native size")
        help_text += f", default {format_value(spec.default) if spec.type is not str else repr(spec.default)}"
    if spec.flags[0].isupper():  # the positional PROMPT
        parser.add_argument(spec.name, nargs="?", default=None, metavar=spec.flags[0], help=help_text)
        return
    if spec.type is bool:
        parser.add_argument(*spec.flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                            help=spec.help)
        return
    value_type = {int: _int_type, float: _float_type, str: str}[spec.type]
    metavar = spec.metavar or spec.flags[0].lstrip("-").replace("-", "_").upper()
    parser.add_argument(*spec.flags, dest=spec.name, type=value_type, default=None, metavar=metavar, help=help_text)


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `difusi` command; returns the exit code (0 ok, 1 I/O failure, 2 usage/parameter/model error,
    130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve", "mini"):
        return _forward(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "generate": _with_budget_flags(cmd_generate),
        "img2img": _with_budget_flags(cmd_generate),
        "upscale": _cmd_upscale,  # applies its own budget flags
        "batch": _with_budget_flags(cmd_batch),
        "xyz": _with_budget_flags(cmd_xyz),
        "info": cmd_info,
        "models": cmd_models,
        "networks": cmd_networks,
        "samplers": cmd_samplers,
        "history": cmd_history,
    }
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("difusi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ParamError as error:
        _fail(_describe_param_error(error, getattr(args, "_origins", {})))
    except (StorageError, NumericalError) as error:  # the run failed (disk, model), the command line was fine
        _fail(str(error), code=EXIT_FAILURE)
    except DifusiError as error:  # UsageError, CheckpointError, ConfigError, ...
        _fail(str(error))
    except OSError as error:  # e.g. outputs folder not writable, disk full: the run failed, not the usage
        _fail(f"{error.filename or ''}: {error.strerror or error}".lstrip(": "), code=EXIT_FAILURE)


MINI_HELP = """usage: difusi mini {train,evaluate,train-lora,evaluate-lora,evaluate-img2img} ...

Train or evaluate difusi-mini, the small model difusi ships.

commands:
  train      train difusi-mini from scratch (`difusi mini train --help`)
  evaluate   score difusi-mini's prompt adherence (`difusi mini evaluate --help`)
  train-lora     train the LoRA that teaches difusi-mini "pink" (`difusi mini train-lora --help`)
  evaluate-lora  score a pink LoRA (`difusi mini evaluate-lora --help`)
  evaluate-img2img  score inpainting, img2img colour changes and near-0 strength (`difusi mini evaluate-img2img --help`)"""
MINI_COMMANDS = {"train": "train", "evaluate": "evaluate", "train-lora": "lora", "evaluate-lora": "lora_eval",
                 "evaluate-img2img": "img2img_eval"}


def _forward(command: str, rest: list[str]) -> int:
    if command == "serve":
        from difusi.server import main as serve_main

        return int(serve_main(rest) or 0)
    if rest and rest[0] in ("-h", "--help"):
        # Asking for help is not a mistake: show the two subcommands and succeed, like every other `--help`.
        print(MINI_HELP)
        return 0
    if not rest or rest[0] not in MINI_COMMANDS:
        _fail("mini: expected `train` or `evaluate`, e.g. `difusi mini train --help`")  # (or the others in MINI_HELP)
    import importlib

    mini_command = importlib.import_module(f"difusi.mini.{MINI_COMMANDS[rest[0]]}")
    try:
        return int(mini_command.main(rest[1:]) or 0)
    except DifusiError as error:  # "field: allowed range, got value", one line
        _fail(f"mini {rest[0]}: {error}")


def _describe_param_error(error: ParamError, origins: dict[str, str]) -> str:
    """Name the flag the user typed, or the infotext key the bad value came from."""
    origin = origins.get(error.field)
    label = origin or FIELD_FLAGS.get(error.field, error.field)
    return f"{label}: {error.message}"


# ----------------------------------------------------------------------------- generate


def _check_device_flags(args: argparse.Namespace) -> Any:
    """The --device this machine can run, before anything else happens: one line naming what it has, exit 2."""
    from difusi.devices import resolve_device

    try:
        return resolve_device(args.device)
    except ParamError as error:
        raise UsageError(f"--device: {error.message}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """`difusi generate` and `difusi img2img` (which has IMAGE, --mask and --init-image besides)."""
    device = _check_device_flags(args)
    pictures = _read_pictures(args)
    params, recipe = _generation_params(args)
    params.validated(native_size=512)  # fail fast, before loading a model (512 only stands in for a missing size)
    output_paths = _output_paths(args.output, params.total_images)
    model_path = _choose_model(args, recipe)
    from difusi.networks.job import check_job, library_for

    networks = library_for(settings.models_dir(args.models_dir))
    check_job(params, networks)  # an unknown LoRA / VAE is one line before any model is read
    if recipe is not None and recipe.fields.get("Lora hashes"):
        from difusi.networks.job import lora_hash_notes

        for note in lora_hash_notes(recipe.fields["Lora hashes"], networks):
            print(f"difusi: note: {note}", file=sys.stderr)
    store_dir = settings.outputs_dir(args.outputs_dir)
    store_dir.mkdir(parents=True, exist_ok=True)  # an unusable outputs folder fails now, not after generating
    # What was assumed to remake the image, once the command line is known to be good (an error stays one line).
    for note in recipe.notes if recipe is not None and args.rng is None else []:  # --rng given: nothing assumed
        print(f"difusi: note: {note}", file=sys.stderr)
    from difusi.models import load_model

    model = load_model(model_path, device=device, precision=args.precision, offload=args.offload)
    if args.compile:
        from difusi.speed.compile import compile_unet

        compile_unet(model)
    from difusi.store import OutputStore

    with OutputStore(store_dir) as store:
        return _run(model, params, store, output_paths, networks, pictures)


def _read_pictures(args: argparse.Namespace) -> tuple[list[Any], Any] | None:
    """`difusi img2img`'s init pictures and mask, read and checked before any model loads (None for generate)."""
    if getattr(args, "image", None) is None:
        return None
    from difusi.images.load import open_image
    from difusi.init_images import check_pictures

    try:
        pictures = [open_image(path, "init_images") for path in [args.image, *args.init_image]]
        mask = None if args.mask is None else open_image(args.mask, "mask")
        check_pictures(pictures, mask)
    except ParamError as error:
        flag = {"init_images": "IMAGE", "mask": "--mask"}.get(error.field, error.field)
        raise UsageError(f"{flag}: {error.message}") from None
    return pictures, mask


def _generation_params(args: argparse.Namespace) -> tuple[GenerationParams, Any]:
    """Merge: defaults < image/infotext values < flags given on the command line."""
    recipe = None
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    args._origins = origins
    if args.from_image is not None:
        text = _read_image_infotext(args.from_image)
        recipe = recipe_from_infotext(text)
        source = "--from"
    elif args.infotext is not None:
        recipe = recipe_from_infotext(args.infotext)
        source = "--infotext"
    if recipe is not None:
        if recipe.ignored:
            print(f"difusi: ignored keys: {', '.join(recipe.ignored)}", file=sys.stderr)
        values.update(recipe.values)
        reverse = {field: key.removesuffix("-1").removesuffix("-2") for key, field in KEY_TO_FIELD.items()}
        origins.update({name: f"{source} {reverse.get(name, name)!r}" for name in recipe.values})
    elif args.prompt is None:
        raise UsageError("PROMPT: required (or start from an image with --from IMAGE or --infotext TEXT)")
    given = _field_flag_values(args)
    values.update(given)
    for name in given:
        origins.pop(name, None)
    params, _ = GenerationParams.from_mapping(values)
    return params, recipe


def _field_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The field-table flags the user gave (None = not given), by field name."""
    return {name: getattr(args, name) for name in FIELD_FLAGS if getattr(args, name, None) is not None}


def _read_image_infotext(path_text: str, label: str = "--from") -> str:
    """The infotext of an image the user named (`label`: the flag or argument, for the one-line error)."""
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"{label}: no such file: {path}")
    try:
        text = read_infotext(path)
    except OSError as error:
        raise UsageError(f"{label}: cannot read {path} as an image: {error}") from None
    if not text:
        raise UsageError(f"{label}: {path} has no generation parameters (no PNG 'parameters' text)")
    return text


def _output_paths(output: str | None, count: int) -> list[Path] | None:
    """`--output FILE.png`: FILE.png for one image, FILE-1.png... for several; refuse to overwrite."""
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output: must name a .png file, got {output!r}")
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
    for candidate in paths:
        if candidate.exists():
            raise UsageError(f"--output: {candidate} exists (difusi never overwrites files)")
    if not path.parent.is_dir():
        raise UsageError(f"--output: folder {path.parent} does not exist")
    return paths


def _choose_model(args: argparse.Namespace, recipe: Any) -> Path:
    """--model if given; else the image's model found by hash (then by name); else difusi-mini."""
    from difusi.models import default_model_path

    models_dir = settings.models_dir(args.models_dir)
    if args.model is not None:
        return _resolve_model_flag(args.model, models_dir)
    if recipe is None or not (recipe.model_hash or recipe.model_name):
        return default_model_path()
    return _find_recipe_model(recipe.model_hash, recipe.model_name, models_dir, args)


def _resolve_model_flag(reference: str, models_dir: Path) -> Path:
    """A path, or anything the one resolver accepts (title, name, file name, short/full hash) in the models folder
    or for the shipped difusi-mini (`difusi.models.resolve_checkpoint`)."""
    from difusi.models import resolve_checkpoint

    try:
        return Path(resolve_checkpoint(reference, models_dir)).resolve()
    except CheckpointError as error:
        raise UsageError(f"--model: {error}") from None


def _find_recipe_model(model_hash: str | None, model_name: str | None, models_dir: Path, args: Any) -> Path:
    """The image's model: by its A1111 `Model hash` (10-hex sha256 prefix), else by its `Model` name, among the
    shipped and the folder's checkpoints (the one resolver's rules; an old 8-hex hash never matches)."""
    from difusi.models.catalog import AmbiguousCheckpointError, CheckpointNotFoundError, find_by_hash, find_checkpoint

    source = "--from" if args.from_image is not None else "--infotext"
    candidates = _known_checkpoints(models_dir)
    hit = find_by_hash(model_hash, candidates) if model_hash else None
    if hit is None and model_name:
        try:
            hit = find_checkpoint(model_name, candidates, str(models_dir))
        except AmbiguousCheckpointError as error:
            raise UsageError(f"{source}: {error}; pass --model to choose one") from None
        except CheckpointNotFoundError:
            hit = None
        if hit is not None and model_hash:
            print(f"difusi: note: no model with hash {model_hash}; using {hit.title} by its name {model_name!r}",
                  file=sys.stderr)
    if hit is not None:
        return Path(hit.path)
    what = f"hash {model_hash}" if model_hash else "name"
    named = f" ({model_name})" if model_name else ""
    raise UsageError(f"{source}: model with {what}{named} not found in {models_dir}; pass --model to choose one")


def _known_checkpoints(models_dir: Path) -> list[Any]:
    """The shipped default model first, then the models folder's checkpoints."""
    from difusi.models.catalog import known_checkpoints

    return known_checkpoints(models_dir)


def _run(model: Any, params: GenerationParams, store: Any, output_paths: list[Path] | None, networks: Any,
         pictures: tuple[list[Any], Any] | None = None) -> int:
    from difusi.pipeline import img2img, txt2img

    stop = threading.Event()
    bar = _ProgressReporter()
    saved: list[Path] = []

    def on_image(generated: Any) -> None:
        path = store.save(generated)
        saved.append(path)
        shown = path
        if output_paths is not None:
            shown = output_paths[generated.index]
            _write_copy(path, shown)
        bar.clear()
        print(f"{shown}  seed={generated.seed}", flush=True)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, _stop_handler(stop))
    try:
        callbacks = {"progress": bar.update, "should_stop": _announce_stop(stop, bar), "on_image": on_image,
                     "networks": networks}
        if pictures is None:
            result = txt2img(model, params, **callbacks)
        else:
            result = img2img(model, params, pictures[0], pictures[1], **callbacks)
    except Interrupted as stopped:
        bar.close()
        _print_warnings(getattr(stopped, "result", None))
        print(f"difusi: interrupted: {len(saved)} of {params.total_images} images saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    _print_warnings(result)
    return 0


def _print_warnings(result: Any) -> None:
    """The job's warnings (prompt syntax read as literal text, extra-network tags removed) on stderr, so stdout
    stays the list of saved files."""
    for warning in getattr(result, "warnings", None) or []:
        print(f"difusi: warning: {warning}", file=sys.stderr)


def _stop_handler(stop: threading.Event) -> Callable[[int, Any], None]:
    """First Ctrl-C: ask the pipeline to stop between steps. Second: abort now (temp files still cleaned up).

    The handler only sets a flag: printing from a signal handler can hit a half-written stderr buffer.
    """

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    return handler


def _announce_stop(stop: threading.Event, bar: Any) -> Callable[[], bool]:
    announced = False

    def should_stop() -> bool:
        nonlocal announced
        if stop.is_set() and not announced:
            announced = True
            bar.clear()
            print("difusi: stopping after this step (Ctrl-C again to abort now)", file=sys.stderr, flush=True)
        return stop.is_set()

    return should_stop


def _write_copy(source: Path, target: Path) -> None:
    """Copy a finished image to --output atomically and without overwriting (temp + link)."""
    fd, temp = tempfile.mkstemp(prefix=".difusi-tmp-", suffix=".png", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
        try:
            os.link(temp, target)
        except FileExistsError:
            raise UsageError(f"--output: {target} appeared while generating; the image is at {source}") from None
    finally:
        Path(temp).unlink(missing_ok=True)


class _ProgressReporter:
    """tqdm bar on a terminal (step, it/s, ETA over the whole job); plain throttled lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last_line = 0.0
        self.first: tuple[float, int] | None = None  # (time, steps done) at the first report: excludes setup
        self.done = 0

    def update(self, progress: Any) -> None:
        total = progress.steps * progress.n_iter
        done = progress.iteration * progress.steps + progress.step
        if self.tty:
            self._update_bar(progress, total, done)
        else:
            self._print_line(progress, total, done)
        self.done = done

    def _update_bar(self, progress: Any, total: int, done: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="it", file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.set_description(f"batch {progress.iteration + 1}/{progress.n_iter}", refresh=False)
        self.bar.update(max(0, done - self.done))

    def _print_line(self, progress: Any, total: int, done: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        if done not in (1, total) and now - self.last_line < 1.0:
            return
        self.last_line = now
        elapsed, steps = now - self.first[0], done - self.first[1]
        speed = f"{steps / elapsed:.2f} it/s  ETA {(total - done) * elapsed / steps:.0f}s" if steps else "-- it/s"
        print(f"difusi: step {progress.step}/{progress.steps} batch {progress.iteration + 1}/{progress.n_iter}  {speed}",
              file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- batch


def _add_upscale(commands: Any) -> None:
    from difusi.upscale_cli import add_upscale_parser

    add_upscale_parser(commands)


def _cmd_upscale(args: argparse.Namespace) -> int:
    from difusi.upscale_cli import cmd_upscale

    return cmd_upscale(args)


def _add_batch(commands: Any) -> None:
    batch = commands.add_parser(
        "batch", help="run every row of a JSONL, CSV or A1111 prompts file as a job",
        description="Run a batch file: JSON Lines or CSV (A1111 field names) or A1111's prompts-from-file text "
        "(one prompt per line, optional --steps 20 --seed 5 ... per line). Field flags are defaults for every "
        "row. Rows are checked before any model loads; rows already done (same job id in the history) are "
        "skipped, so a stopped batch can be re-run.")
    batch.add_argument("file", metavar="FILE", help="batch file: .jsonl, .json, .csv or .txt")
    _add_field_flags(batch, prompt=False)  # the prompt comes from the rows
    batch.add_argument("--skip-invalid", action="store_true",
                       help="report bad rows and run the others (default: a bad row stops the batch)")
    _add_runner_flags(batch, "the rows")


def cmd_batch(args: argparse.Namespace) -> int:
    """`difusi batch FILE`: exit 0 all rows done, 1 some failed, 2 bad input (before any model loads), 130 stopped.
    stdout lists each saved image (`PATH  seed=N  row=R`); progress and the summary go to stderr."""
    from difusi.batch import BatchError, BatchInterrupted, build_jobs, read_rows, run_batch

    device = _check_device_flags(args)
    args._origins = {}
    defaults = _field_flag_values(args)
    GenerationParams.from_mapping(defaults)[0].validated(native_size=512)  # a bad flag names the flag, not a row
    models_dir = settings.models_dir(args.models_dir)
    if args.model is not None:
        _resolve_model_flag(args.model, models_dir)  # an unknown --model names the flag, not every row
    try:
        rows = read_rows(Path(args.file))
        jobs, invalid = build_jobs(rows, defaults, skip_invalid=args.skip_invalid, models_dir=models_dir)
    except BatchError as error:
        raise UsageError(f"{args.file}: {error}") from None
    except ParamError as error:  # the file itself (missing, unreadable, unknown format)
        raise UsageError(f"FILE: {error.message}") from None
    store_dir = settings.outputs_dir(args.outputs_dir)
    store_dir.mkdir(parents=True, exist_ok=True)  # an unusable outputs folder fails now, not after generating
    runner = _runner_from_flags(args, device)
    from difusi.store import OutputStore

    reporter = _BatchReporter()
    try:
        with OutputStore(store_dir) as store:
            summary = run_batch(jobs, runner, store, progress=reporter.update, models_dir=models_dir)
    except BatchInterrupted as stopped:
        reporter.close()
        _print_batch_summary(stopped.summary, invalid, interrupted=True)
        return EXIT_INTERRUPTED
    finally:
        reporter.close()
        runner.close()
    _print_batch_summary(summary, invalid)
    return EXIT_FAILURE if summary.failed or invalid else 0


def _print_batch_summary(summary: Any, invalid: list[Any], *, interrupted: bool = False) -> None:
    failed = sorted([*invalid, *summary.failed])
    state = "interrupted" if interrupted else "done"
    print(f"difusi: batch {state}: {summary.done} done, {summary.skipped} skipped (already done), "
          f"{len(failed)} failed; {summary.images} images written", file=sys.stderr, flush=True)
    for failure in failed:
        job = f" (job {failure.job_id})" if failure.job_id else ""
        reason = failure.reason.removeprefix(f"row {failure.row}: ")
        print(f"difusi: failed: row {failure.row}{job}: {reason}", file=sys.stderr, flush=True)


class _BatchReporter:
    """tqdm bar over the batch's images on a terminal (done/total, rate, ETA); plain throttled lines otherwise.
    Each saved image is one stdout line, as `difusi generate` prints them."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.started = time.perf_counter()
        self.last_line = 0.0
        self.last_state: tuple[int, int, int] | None = None
        self.shown = 0

    def update(self, progress: Any) -> None:
        if progress.path is not None:
            if self.bar is not None:
                self.bar.clear()
            print(f"{progress.path}  row={progress.row}", flush=True)
        if self.tty:
            self._update_bar(progress)
        else:
            self._print_line(progress)

    def _update_bar(self, progress: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=progress.images_total, initial=0, unit="img", file=sys.stderr, dynamic_ncols=True,
                            leave=False)
        self.bar.set_description(f"jobs {progress.jobs_done}/{progress.jobs_total}"
                                 + (f", {progress.failed} failed" if progress.failed else ""), refresh=False)
        self.bar.update(max(0, progress.images_done - self.shown))
        self.shown = progress.images_done

    def _print_line(self, progress: Any) -> None:
        now = time.perf_counter()
        state = (progress.images_done, progress.jobs_done, progress.failed)
        final = progress.jobs_done + progress.failed >= progress.jobs_total
        if state == self.last_state or (not final and now - self.last_line < 1.0):
            return
        rate = progress.images_done / max(now - self.started, 1e-9)
        eta = (progress.images_total - progress.images_done) / rate if rate else 0.0
        self.last_line, self.last_state = now, state
        failed = f", {progress.failed} failed" if progress.failed else ""
        print(f"difusi: {progress.images_done}/{progress.images_total} images, jobs {progress.jobs_done}/"
              f"{progress.jobs_total}{failed}, {rate:.2f} img/s  ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- info, models, samplers, history


def cmd_info(args: argparse.Namespace) -> int:
    text = _read_image_infotext(args.image, "IMAGE")
    if args.json:
        fields, unknown = parse_infotext(text)
        print(strict_json.dumps({"infotext": text, "fields": fields, "unsupported": unknown}, ensure_ascii=False,
                                indent=2))
    else:
        print(text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from difusi.models import default_model_path

    models_dir = settings.models_dir(args.models_dir)
    infos = _known_checkpoints(models_dir)
    print(f"models folder: {models_dir}" + ("" if models_dir.is_dir() else "  (does not exist)"))
    if not infos:
        return 0
    width = max(len(info.name) for info in infos)
    for info in infos:
        mark = "  (default)" if Path(info.path) == default_model_path() else ""
        print(f"{info.name:<{width}}  {info.short_hash}  {info.family:<5}  {info.path}{mark}")
    return 0


def cmd_networks(args: argparse.Namespace) -> int:
    """`difusi networks`: every extra-network file the models folder offers (`difusi.models.folders` rules)."""
    from difusi.networks.listing import list_networks
    from difusi.strict_json import dumps

    rows = list_networks(settings.models_dir(args.models_dir), kind=args.kind)
    if args.json:
        for row in rows:
            print(dumps(row.to_json()))
        return 0
    if not rows:
        print("no LoRA, embedding or VAE files found (see `difusi networks --help` for the folders)")
        return 0
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(f"{row.kind:<9}  {row.name:<{width}}  {row.hash:<12}  {row.family:<7}  {row.path}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from difusi.samplers import list_samplers, list_schedules

    if args.report is not None:
        from difusi.samplers.report import write_report

        out_dir = Path(args.report)
        written = write_report(out_dir, quick=args.quick)
        print(f"report written to {written or out_dir}")
        return 0
    samplers = list_samplers()
    width = max(len(s.name) for s in samplers)
    print(f"{'sampler':<{width}}  {'default schedule':<16}  aliases")
    for sampler in samplers:
        aliases = ", ".join(sampler.aliases)
        print(f"{sampler.name:<{width}}  {sampler.default_schedule or 'Automatic':<16}  {aliases}")
    print(f"\nschedules: {', '.join(schedule.name for schedule in list_schedules())}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from difusi.store import OutputStore

    with OutputStore(settings.outputs_dir(args.outputs_dir)) as store:
        entries = store.history(limit=args.limit, query=args.search)
    for entry in entries:
        if args.json:
            # Strict JSON: the stored params hold s_tmax = inf, which json.dumps would write as `Infinity`.
            print(strict_json.dumps(entry.__dict__, ensure_ascii=False, default=str))
            continue
        first_line = entry.prompt.split("\n", 1)[0]
        prompt = first_line if len(first_line) <= 60 else first_line[:57] + "..."
        print(f"{entry.created_at[:19]}  seed={entry.seed}  {entry.path}  {prompt}")
    if not entries and not args.json:
        print("no images" + (f" matching {args.search!r}" if args.search else ""), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- xyz (X/Y/Z plot)


XYZ_AXIS_HELP = ("TYPE=VALUES: TYPE a field (steps, cfg_scale, sampler_name, seed, ...; A1111 labels such as "
                 "'CFG Scale' too), 'Prompt S/R' or 'Checkpoint name'; VALUES comma-separated (CSV quotes), "
                 "ranges 1-5, 1-5 (+2), 10-40 [4], 0.5-1.5 [3]")


def _add_xyz(commands: Any) -> None:
    plot = commands.add_parser(
        "xyz", help="X/Y/Z plot: sweep up to three fields, one labelled grid per Z value (A1111's script)",
        description="Run every combination of the axes' values as a batch, save each cell's image with its "
        "infotext, and print the path of each grid (one per Z value; A1111's layout). Field flags set the "
        "values every cell starts from.")
    plot.add_argument("--x", required=True, metavar="TYPE=VALUES", help="X axis (columns); " + XYZ_AXIS_HELP)
    plot.add_argument("--y", default=None, metavar="TYPE=VALUES", help="Y axis (rows)")
    plot.add_argument("--z", default=None, metavar="TYPE=VALUES", help="Z axis (one grid per value)")
    plot.add_argument("--no-legend", action="store_true", help="draw the grids without axis labels")
    plot.add_argument("--margin", type=_int_type, default=0, metavar="PX", help="pixels between cells (default 0)")
    _add_field_flags(plot)
    _add_runner_flags(plot, "the cells")


def cmd_xyz(args: argparse.Namespace) -> int:
    """`difusi xyz`: cells through a batch runner (in-process, or Ray), cell PNGs in the outputs folder and history,
    grids under `<outputs>/xyz-grids/`; stdout is the grid paths, one per line."""
    from difusi.batch import xyz

    device = _check_device_flags(args)
    if args.prompt is None:
        raise UsageError("PROMPT: required")
    args._origins = {}
    values = _field_flag_values(args)
    params, _ = GenerationParams.from_mapping(values)
    params.validated(native_size=512)  # the defaults every cell starts from, checked before the axes
    models_dir = settings.models_dir(args.models_dir)
    axes = []
    for name in ("x", "y", "z"):
        try:
            axes.append(xyz.parse_axis(getattr(args, name), name, prompt=params.prompt,
                                       negative_prompt=params.negative_prompt, models_dir=models_dir))
        except ParamError as error:
            raise UsageError(f"--{name}: {error.message}") from None
    if args.model is not None:
        _resolve_model_flag(args.model, models_dir)  # an unknown --model is one line now, not per cell later
    store_dir = settings.outputs_dir(args.outputs_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    runner = _runner_from_flags(args, device)
    from difusi.store import OutputStore

    cells = 0

    def on_cell(cell: Any) -> None:
        nonlocal cells
        cells += 1
        for path in cell.paths:
            print(f"difusi: cell {cells}: {path}  seed={cell.seed}", file=sys.stderr, flush=True)

    try:
        with OutputStore(store_dir) as store:
            result = xyz.xyz_plot(params, axes[0], axes[1], axes[2], runner=runner, store=store,
                                  models_dir=models_dir, draw_legend=not args.no_legend, margin=args.margin,
                                  on_cell=on_cell)
    except xyz.CellError as error:  # the command line was fine, a cell's run failed: exit 1, like generate
        _fail(str(error), code=EXIT_FAILURE)
    finally:
        runner.close()
    for grid, text in zip(result.grids, result.grid_infotexts, strict=True):
        print(xyz.save_grid(grid, text, store_dir), flush=True)
    if result.z_grid is not None:  # A1111's grid of grids: every Z grid side by side under its Z label
        print(xyz.save_grid(result.z_grid, result.infotext, store_dir), flush=True)
    return 0


def _runner_from_flags(args: argparse.Namespace, device: Any) -> Any:
    """`difusi batch` and `difusi xyz`: in-process unless --workers / --ray-address / RAY_ADDRESS ask for Ray."""
    from difusi.batch import make_runner

    return make_runner(args.workers, args.ray_address, device=str(device), precision=args.precision,
                       offload=args.offload, compile=args.compile)


if __name__ == "__main__":
    sys.exit(main())

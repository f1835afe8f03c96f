"""`difusi upscale IMAGE [IMAGE...]`: A1111's Extras upscale from the command line.

Each output PNG keeps the input's text chunks (its generation `parameters`) and gets A1111's postprocessing text
(`Postprocess upscale by: 2, Postprocess upscaler: NAME`) in its `postprocessing` / `extras` chunks
(`difusi.upscalers.extras`). Without `--output`, results go to `<outputs>/extras-images/` (A1111's folder name),
named `<input stem>-<upscaler>-x<scale>.png` with `-1`, `-2`, ... when taken; files are written to a temporary
name and renamed, so an interrupted run leaves no half-written PNG. Bad input raises `ParamError` whose field is
the flag (or `IMAGE`), which `difusi.cli.main` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from difusi import settings
from difusi.budget import add_budget_flags, with_budget_flags
from difusi.errors import ParamError

FLAGS = {"upscaling_resize": "--scale", "upscaling_resize_w": "--width", "upscaling_resize_h": "--height",
         "upscaler_1": "--upscaler", "image": "IMAGE", "scale": "--scale"}
"""Extras request field -> the flag that sets it, for error messages."""


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be >= 8, got {value}")
    return value


def add_upscale_parser(commands: Any) -> None:
    """Add `upscale` to the `difusi` subcommands (`commands` = argparse's subparsers object)."""
    parser = commands.add_parser(
        "upscale", help="upscale images with Lanczos, Nearest or an ESRGAN / Real-ESRGAN model (A1111 Extras)",
        description="Upscale images as A1111's Extras tab does; the outputs keep the inputs' infotext.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="input images (PNG, JPEG, WebP)")
    parser.add_argument("--scale", type=_float, default=2.0, help="scale factor in (0, 8] (default 2)")
    parser.add_argument("--upscaler", default="Lanczos",
                        help="upscaler name (`None`, `Lanczos`, `Nearest` or a model file's name in the models "
                             "folder's ESRGAN/ RealESRGAN/ ... folders) or a model file path (default Lanczos)")
    parser.add_argument("--width", type=_pixels, default=None,
                        help="scale to fit this width (with --height; crops to exactly W x H as A1111's Scale to)")
    parser.add_argument("--height", type=_pixels, default=None, help="scale to fit this height (with --width)")
    parser.add_argument("--output", "-o", type=Path, default=None, help="output PNG (one input image only)")
    parser.add_argument("--models-dir", default=None, help="models folder (default: the configured one)")
    parser.add_argument("--outputs-dir", default=None, help="outputs folder (results go to its extras-images/)")
    add_budget_flags(parser)
    parser.set_defaults(command="upscale")


def cmd_upscale(args: argparse.Namespace) -> int:
    """Run `difusi upscale`; 0 when every image was written. ParamError (field = flag) for bad input."""
    return with_budget_flags(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from difusi.upscalers.extras import UpscaleOptions, open_image, run_upscale, text_items, write_extras_png

    if (args.width is None) != (args.height is None):
        raise ParamError("--width", "--width and --height go together (scale to fit W x H)")
    if args.output is not None and len(args.images) > 1:
        raise ParamError("--output", f"names one file but {len(args.images)} images were given; use --outputs-dir")
    if args.output is not None and args.output.suffix.lower() != ".png":
        raise ParamError("--output", f"must be a .png file, got {str(args.output)!r}")
    options = UpscaleOptions(resize_mode=0 if args.width is None else 1, upscaling_resize=args.scale,
                             upscaling_resize_w=args.width or 512, upscaling_resize_h=args.height or 512,
                             upscaling_crop=True, upscaler_1=args.upscaler)
    models_dir = settings.models_dir(args.models_dir)
    folder = settings.outputs_dir(args.outputs_dir) / "extras-images"
    # Every image is opened and checked (size, budget, upscaler) before the first is upscaled.
    opened = []
    for name in args.images:
        image = _flagged(lambda n=name: open_image(Path(n), "image"), prefix=f"{name}: ")
        opened.append((Path(name), image))
    for path, image in opened:
        result = _flagged(lambda image=image: run_upscale(image, options, models_dir, allow_path=True))
        target = args.output or _free_name(folder, path.stem, args.upscaler, options)
        _write_atomically(target, lambda handle, r=result, i=image: write_extras_png(r.image, handle, text_items(i), r.text))
        print(f"{target}  {result.image.width}x{result.image.height}  {result.text or 'unchanged (upscaler None)'}")
    return 0


def _flagged(call: Any, prefix: str = "") -> Any:
    """Run `call`, turning a ParamError's request field into the flag the user typed."""
    try:
        return call()
    except ParamError as error:
        raise ParamError(FLAGS.get(error.field, error.field), prefix + error.message) from None


def _free_name(folder: Path, stem: str, upscaler: str, options: Any) -> Path:
    label = re.sub(r"[^\w.+-]+", "_", Path(upscaler).stem)
    size = f"{options.upscaling_resize_w}x{options.upscaling_resize_h}" if options.resize_mode == 1 else \
        f"x{options.upscaling_resize:g}"
    base = f"{stem}-{label}-{size}"
    candidate = folder / f"{base}.png"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{base}-{counter}.png"
        counter += 1
    return candidate


def _write_atomically(target: Path, write: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".upscale-", suffix=".png.tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise

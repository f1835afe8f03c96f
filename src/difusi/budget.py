"""Memory budget: refuse image sizes and batches that would exhaust RAM, before any tensor is allocated.

Two limits, both in pixels, because every large activation of a diffusion job (UNet feature maps and
attention over latent pixels, VAE decoder maps at full resolution) grows with them:

- `max_pixels`: width x height of one image (default 2048 x 2048 = 4,194,304);
- `max_batch_pixels`: width x height x batch_size, what is in memory at once (default 4,194,304:
  16 images of 512 x 512, 4 of 1024 x 1024 or one of 2048 x 2048).

The defaults are sized for a 24 GiB machine running SD1/SD2/SDXL in float32: the peak is the VAE decoder's
full-resolution maps (128-256 channels x 4 bytes x pixels, a few alive at once; about 8 GiB at 4 Mpx) and
larger decodes are tiled (`difusi.vae`). Batch count (`n_iter`) runs batches one after another, so it costs
time, not memory, and is not part of the budget.

Where a budget comes from, first that is set wins: `set_budget()` (the CLI's `--max-pixels` /
`--max-batch-pixels` and `difusi serve`'s options call it) > environment `DIFUSI_MAX_PIXELS` /
`DIFUSI_MAX_BATCH_PIXELS` > config file keys `max_pixels` / `max_batch_pixels` (see `difusi.settings`) > defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from difusi.errors import ParamError
from difusi.settings import ConfigError, config_path, load_config

DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_BATCH_PIXELS = 2048 * 2048
ENV_NAMES = {"max_pixels": "DIFUSI_MAX_PIXELS", "max_batch_pixels": "DIFUSI_MAX_BATCH_PIXELS"}
FLAGS = {"max_pixels": "--max-pixels", "max_batch_pixels": "--max-batch-pixels"}


@dataclass(frozen=True)
class Budget:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS


_override: Budget | None = None


def set_budget(budget: Budget | None) -> None:
    """Use `budget` for every job of this process (None: back to environment / config file / defaults)."""
    global _override
    _override = budget


def current_budget() -> Budget:
    """The budget in force now (see the module docstring for the order of sources)."""
    if _override is not None:
        return _override
    values: dict[str, int] = {}
    config: dict | None = None
    for name, env in ENV_NAMES.items():
        text = os.environ.get(env)
        if text:
            values[name] = parse_pixels(text, env)
            continue
        if config is None:
            config = load_config()
        if config.get(name) is not None:
            values[name] = parse_pixels(config[name], f"config file {config_path()}: {name!r}")
    return Budget(**values)


def parse_pixels(value: object, source: str) -> int:
    """A positive pixel count from a flag, environment variable or config value; ConfigError naming `source`."""
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        count = int(str(value).strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{source}: must be a whole number of pixels, got {value!r}") from None
    if count < 64 * 64:
        raise ConfigError(f"{source}: must be at least 4096 (64x64 pixels), got {count}")
    return count


def check_budget(width: int, height: int, batch_size: int, budget: Budget | None = None) -> None:
    """Raise ParamError (field "width" or "batch_size") when a job's size is over the budget."""
    budget = budget or current_budget()
    pixels = width * height
    if pixels > budget.max_pixels:
        raise ParamError(
            "width",
            f"{width}x{height} = {pixels} pixels is over the budget of {budget.max_pixels} pixels per image; "
            f"make the image smaller or raise the budget ({_how_to_raise('max_pixels')})",
        )
    if pixels * batch_size > budget.max_batch_pixels:
        raise ParamError(
            "batch_size",
            f"{batch_size} x {width}x{height} = {pixels * batch_size} pixels in one batch is over the budget of "
            f"{budget.max_batch_pixels}; use a smaller batch_size with more batches (n_iter / --batch-count), "
            f"or raise the budget ({_how_to_raise('max_batch_pixels')})",
        )


def _how_to_raise(name: str) -> str:
    return f"{FLAGS[name]}, {ENV_NAMES[name]} or {name!r} in the config file"


# -- command-line flags (shared by `difusi generate` and `difusi serve`) ---------------------------------------------
# They live here, not in `difusi.cli`, so `difusi.server` can offer them without importing the CLI (no import cycle).


def positive_int_type(text: str) -> int:
    """argparse type for a whole number >= 1, with a message that names the bad value."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """--max-pixels / --max-batch-pixels (shared with `difusi serve`); see the module docstring."""
    parser.add_argument("--max-pixels", type=positive_int_type, default=None, metavar="N",
                        help=f"refuse images over N pixels (width x height; default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--max-batch-pixels", type=positive_int_type, default=None, metavar="N",
                        help=f"refuse batches over N pixels (width x height x batch size; default {DEFAULT_MAX_BATCH_PIXELS})")


def apply_budget_flags(args: argparse.Namespace) -> None:
    """Make the flags given the process's budget (flags > DIFUSI_MAX_* > config file > defaults)."""
    given = {name: getattr(args, name, None) for name in FLAGS}
    given = {name: parse_pixels(value, FLAGS[name]) for name, value in given.items() if value is not None}
    if given:
        set_budget(dataclasses.replace(current_budget(), **given))


def with_budget_flags(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `command` under its --max-* flags, then restore the previous budget (`cli.main()` may run in-process,
    e.g. in tests, and one call's flags must not leak into the next)."""

    def run(args: argparse.Namespace) -> int:
        previous = _override
        try:
            apply_budget_flags(args)
            return command(args)
        finally:
            set_budget(previous)

    return run

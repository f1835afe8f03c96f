"""GenerationParams: the one validated description of a txt2img job, with A1111's field names.

Every front end (Python API, CLI, HTTP API, infotext) builds one of these; `validated()` is the only
place ranges are checked, so the CLI, the API and the library report the same limits.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from difusi.errors import ParamError

SEED_MAX = 2**32 - 1
"""Largest seed accepted; a random seed (-1) is drawn from [0, SEED_MAX - 1] as A1111 does."""

LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 1000),
    "cfg_scale": (0.0, 100.0),
    "width": (64, 4096),
    "height": (64, 4096),
    "batch_size": (1, 64),
    "n_iter": (1, 1000),
    "subseed_strength": (0.0, 1.0),
    "eta": (0.0, 10.0),
    "s_noise": (0.0, 10.0),
    "s_churn": (0.0, 1000.0),
    "s_tmin": (0.0, math.inf),
    "s_tmax": (0.0, math.inf),
    "clip_skip": (1, 12),
    "s_min_uncond": (0.0, 100.0),
    "token_merging_ratio": (0.0, 0.75),
    "deepcache_interval": (1, 50),
}
"""Allowed closed ranges per numeric field; front ends show these in their help and errors."""

SIZE_MULTIPLE = 8

MAX_PROMPT_CHARS = 10_000
"""Longest prompt / negative prompt accepted: about 40 CLIP chunks; longer text costs memory and time in every
cross-attention layer at every step, and no real prompt needs it."""


@dataclass
class GenerationParams:
    """One txt2img job. Field names and meanings follow AUTOMATIC1111's API.

    `width`/`height` of None mean the model's native size. `seed`/`subseed` of -1 mean "draw a
    random one" (the resolved value is reported in the result). `eta` of None means the sampler's
    own default. `model` names a checkpoint (path, name, "name [hash]" or short hash); None = default.
    """

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    s_noise: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    clip_skip: int = 1
    s_min_uncond: float = 0.0
    """Opt-in speed-up (A1111 "NGMS"): below this sigma every other step skips the uncond pass. 0 = off."""
    token_merging_ratio: float = 0.0
    """Opt-in speed-up (A1111's ToMe ratio): fraction of tokens merged before self-attention. 0 = off."""
    deepcache_interval: int = 1
    """Opt-in speed-up (DeepCache): recompute the UNet's deep blocks every N-th call. 1 = off."""
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Values a front end wants echoed but difusi does not interpret (never used for generation)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> tuple[GenerationParams, list[str]]:
        """Build from a dict (HTTP body, parsed infotext); None values are skipped.

        Returns the params and the list of keys that are not GenerationParams fields, so callers
        can ignore them (HTTP, as A1111 does) or report them (CLI `--infotext`). Types are coerced
        ("20" -> 20) and a value that cannot be coerced raises ParamError naming the field.
        """
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in values.items():
            if key not in known:
                unknown.append(key)
                continue
            if value is None:
                continue
            kwargs[key] = _coerce(key, value, known[key].type)
        return cls(**kwargs), unknown

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def validated(self, native_size: int | None = None) -> GenerationParams:
        """Check every field; return a copy with width/height filled from `native_size` when None.

        Raises ParamError(field, message) naming the field and its allowed range. Sampler and
        schedule names are checked against the sampler registry.
        """
        for name in ("prompt", "negative_prompt"):
            _check_text(name, getattr(self, name))
        for name in ("sampler_name", "scheduler"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ParamError(name, "must be a non-empty string")
        _check_seed("seed", self.seed)
        _check_seed("subseed", self.subseed)
        width = self.width if self.width is not None else native_size
        height = self.height if self.height is not None else native_size
        if width is None or height is None:
            raise ParamError("width" if width is None else "height", "is required when the model's native size is unknown")
        checked = dataclasses.replace(self, width=width, height=height)
        for name, (low, high) in LIMITS.items():
            value = getattr(checked, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ParamError(name, f"must be a number, got {value!r}")
            if isinstance(value, float) and math.isnan(value):
                raise ParamError(name, f"must be a number in [{_fmt(low)}, {_fmt(high)}], got NaN")
            if not low <= value <= high:
                raise ParamError(name, f"must be in [{_fmt(low)}, {_fmt(high)}], got {_fmt(value)}")
        for name in ("width", "height"):
            if getattr(checked, name) % SIZE_MULTIPLE:
                raise ParamError(name, f"must be a multiple of {SIZE_MULTIPLE}, got {getattr(checked, name)}")
        if checked.s_tmax < checked.s_tmin:
            raise ParamError("s_tmax", f"must be >= s_tmin ({_fmt(checked.s_tmin)}), got {_fmt(checked.s_tmax)}")
        _check_budget(checked)
        _check_prompt_syntax(checked)
        _check_sampler_and_schedule(checked)
        return checked

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter


def resolve_seed(seed: int) -> int:
    """-1 (or any negative) draws a random seed in [0, 2**32 - 2], as A1111; others pass through."""
    if seed is None or seed < 0:
        return random.SystemRandom().randrange(0, SEED_MAX)
    return int(seed)


def _check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer (-1 for random), got {value!r}")
    if not (value == -1 or 0 <= value <= SEED_MAX):
        raise ParamError(name, f"must be -1 (random) or in [0, {SEED_MAX}], got {value}")


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ParamError(name, "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise ParamError(name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # Lone surrogates (undecodable command-line bytes, JSON "\ud800") cannot go into a tokenizer, PNG or database.
        raise ParamError(name, f"must be valid Unicode text; character {error.start} is an unpaired surrogate "
                               f"{value[error.start]!r}") from None


def _check_budget(params: GenerationParams) -> None:
    from difusi.budget import check_budget

    check_budget(params.width, params.height, params.batch_size)  # memory budget, before anything is allocated


def _check_prompt_syntax(params: GenerationParams) -> None:
    from difusi.prompts.parser import get_prompt_schedule, parse_prompt_attention

    # Bad editing steps and emphasis weights fail here, before a model is loaded, not after.
    for text in (params.prompt, params.negative_prompt):
        for _, scheduled in get_prompt_schedule(text, params.steps):
            parse_prompt_attention(scheduled)


def _check_sampler_and_schedule(params: GenerationParams) -> None:
    from difusi.samplers import get_sampler, get_schedule

    get_sampler(params.sampler_name)  # raises ParamError("sampler_name", ...) listing valid names
    get_schedule(params.scheduler)  # raises ParamError("scheduler", ...); "Automatic" is a schedule too


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    text = str(annotation)
    try:
        if "dict" in text:
            if not isinstance(value, dict):
                raise TypeError
            return value
        if text.startswith("int"):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float):
                if not value.is_integer():
                    raise TypeError
                return int(value)
            return int(str(value).strip())
        if text.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if text.startswith("str"):
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        kind = "an integer" if text.startswith("int") else "a number" if text.startswith("float") else "a string"
        raise ParamError(name, f"must be {kind}, got {value!r}") from None
    return value


def _fmt(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

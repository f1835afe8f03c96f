"""A1111 "parameters" infotext: write it, parse it, map it to GenerationParams, keep it in PNGs.

The format (docs/ARCHITECTURE.md contract 3) is AUTOMATIC1111's, so every Stable Diffusion tool can read our images
and we can read theirs:

    {prompt, possibly several lines}
    Negative prompt: {negative prompt, possibly several lines}     <- omitted when empty
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

The settings line is the *last* line, and only when it holds at least three `key: value` pairs
(A1111's rule in `modules/infotext_utils.py::parse_generation_parameters`). A value containing `,`, `:`
or a newline is written as a JSON string. Known lossy corners of the format itself (shared with A1111):
leading/trailing whitespace of each prompt line is stripped, and a prompt line that starts with
"Negative prompt:" starts the negative prompt. Neither changes CLIP tokens except the second.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from difusi.errors import ParamError
from difusi.params import FIELDS, INFOTEXT_ALWAYS, INFOTEXT_CHANGED, TXT2IMG, GenerationParams

PNG_TEXT_KEY = "parameters"
"""Name of the PNG text chunk A1111 (and every tool that reads it) stores the infotext in."""

_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"

KEY_TO_FIELD: dict[str, str] = {spec.infotext: name for name, spec in FIELDS.items() if spec.infotext}
"""A1111 infotext key -> GenerationParams field, derived from the field table ("Size" arrives split as Size-1 /
Size-2, A1111's rule)."""
MODEL_KEYS = ("Model hash", "Model")
"""Keys naming the checkpoint; they select the model rather than set a GenerationParams field."""
INFORMATIONAL_KEYS = ("Version", "Lora hashes", "TI hashes", "VAE hash")
"""Keys that describe the image but change nothing when regenerating; never reported as ignored."""
SUPPORTED_KEYS = frozenset(KEY_TO_FIELD) | frozenset(MODEL_KEYS) | frozenset(INFORMATIONAL_KEYS)


def quote(value: Any) -> str:
    """A1111's `quote`: JSON-encode a value that would break the `key: value, ...` line.

    Besides A1111's `,` `:` and newline we also quote a value that starts with `"` or has outer whitespace,
    which A1111's parser would otherwise alter; its parser reads both forms back the same way.
    """
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """A1111's `unquote`: decode a JSON-quoted value; anything else is returned unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def format_number(value: float) -> str:
    """Shortest text that reads back to the same number: 7.0 -> "7", 0.1 -> "0.1" (repr round-trips)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def format_infotext(
    params: GenerationParams,
    seed: int,
    subseed: int | None,
    model_name: str | None,
    model_hash: str | None,
    version: str | None = None,
    extra: Mapping[str, Any] | None = None,
    kind: str = TXT2IMG,
) -> str:
    """Write the infotext of ONE image (its own seed/subseed, A1111 writes per-image infotexts).

    `params` must be resolved (width/height set). Keys follow A1111's order; optional keys appear only
    when they differ from the default (Variation seed only with strength > 0, Clip skip only when > 1,
    Eta only when set, Sigma * only when changed). "Schedule type" is the resolved schedule ("Automatic"
    becomes the sampler's default) so the text stays reproducible if defaults change. `version` is the text
    after "Version: " (default "difusi <package version>"; a bare "0.1.0" is prefixed with "difusi ").
    `extra` items go before Version, as A1111's `extra_generation_params`. `kind` is the job kind
    (`difusi.params.JOB_KINDS`): only its fields are written, and a field that `requires` another (the hires
    fields need `enable_hr`) only when that one is on.
    """
    items: dict[str, Any] = {}
    for name, spec in FIELDS.items():
        if spec.infotext is None or spec.infotext_when not in (INFOTEXT_ALWAYS, INFOTEXT_CHANGED):
            continue
        if kind not in spec.kinds:
            continue
        if spec.requires and kind in FIELDS[spec.requires].kinds and not getattr(params, spec.requires):
            continue
        if spec.infotext_when == INFOTEXT_CHANGED and getattr(params, name) == spec.default:
            continue
        items.update(_infotext_items(name, params, seed, subseed, model_name, model_hash))
    items.update(dict(extra or {}))
    items["Version"] = _version_text(version)
    settings = ", ".join(f"{key}: {quote(value)}" for key, value in items.items() if value is not None)
    negative = f"\n{_NEGATIVE_PREFIX} {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{settings}".strip()


def _infotext_items(name: str, params: GenerationParams, seed: int, subseed: int | None, model_name: str | None,
                    model_hash: str | None) -> dict[str, Any]:
    """The infotext key(s) one field writes. Most write their value under their key; the exceptions are A1111's:
    the resolved sampler/schedule labels, the image's own seeds, "Size: WxH" (written by width), the checkpoint
    after Size, and the variation seed only when its strength is on."""
    spec = FIELDS[name]
    value = getattr(params, name)
    if name in ("sampler_name", "scheduler"):
        sampler_label, schedule_label = resolved_sampler_and_schedule(params.sampler_name, params.scheduler)
        return {spec.infotext: sampler_label if name == "sampler_name" else schedule_label}
    if name == "seed":
        return {"Seed": seed}
    if name == "width":
        return {"Size": f"{params.width}x{params.height}", "Model hash": model_hash or None, "Model": model_name or None}
    if name == "height":
        return {}
    if name == "subseed":
        return {spec.infotext: subseed if params.subseed_strength > 0 else None}
    if name == "hr_scale":  # A1111 writes the scale or the resize, never both
        return {spec.infotext: None if params.hr_resize_x or params.hr_resize_y else format_number(value)}
    if name == "hr_resize_x":
        resized = params.hr_resize_x or params.hr_resize_y
        return {"Hires resize": f"{params.hr_resize_x}x{params.hr_resize_y}" if resized else None}
    if name == "hr_resize_y":
        return {}
    if spec.labels is not None:
        return {spec.infotext: spec.labels[int(value)]}
    return {spec.infotext: format_number(value) if isinstance(value, float) else value}


def resolved_sampler_and_schedule(sampler_name: str, scheduler: str) -> tuple[str, str]:
    """Canonical A1111 sampler name and the concrete schedule label it will run with.

    Legacy names ("DPM++ 2M Karras") split into sampler + schedule; "Automatic" resolves to the sampler's
    default schedule (`difusi.samplers.resolve_schedule`, the rule the pipeline samples with). Unknown names
    pass through unchanged: validation reports them, not the writer.
    """
    from difusi.samplers import get_sampler, resolve_schedule

    try:
        sampler = get_sampler(sampler_name)
        return sampler.name, resolve_schedule(sampler, scheduler).name
    except ParamError:
        return sampler_name, scheduler


def parse_infotext(text: str) -> tuple[dict[str, str], list[str]]:
    """Parse an infotext with A1111's rules; return (fields, unknown_keys).

    `fields` maps A1111 keys to string values, always with "Prompt" and "Negative prompt"; quoted values
    are JSON-decoded; "Size: WxH" becomes "Size-1"/"Size-2" (A1111 does this for any WxH value). As A1111,
    a missing "Clip skip" means "1" and a missing "Schedule type" means "Automatic". `unknown_keys` lists,
    in order, keys difusi cannot honour (e.g. "Hires upscale", "ADetailer model"), with "Size-1"/"Size-2"
    reported as the original key.
    """
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""
    prompt, negative = _split_prompts(lines)
    fields: dict[str, str] = {"Prompt": prompt, "Negative prompt": negative}
    unknown: list[str] = []
    for key, value in _PARAM_RE.findall(last_line):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = _SIZE_RE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
        if f"{key}-1" not in SUPPORTED_KEYS and key not in SUPPORTED_KEYS and key not in unknown:
            unknown.append(key)
    fields.setdefault("Clip skip", "1")
    fields.setdefault("Schedule type", "Automatic")
    return fields, unknown


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    """A1111's loop, kept exact: lines are stripped; "Negative prompt:" switches to the negative prompt;
    a line is joined with "\n" only once the text so far is non-empty."""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


@dataclass
class InfotextRecipe:
    """An infotext turned into what difusi needs to regenerate it."""

    values: dict[str, Any]
    """GenerationParams field -> value (strings from the text; `GenerationParams.from_mapping` coerces)."""
    model_hash: str | None = None
    model_name: str | None = None
    ignored: list[str] = field(default_factory=list)
    """A1111 keys present in the text that difusi does not support (reported, never silently dropped)."""
    fields: dict[str, str] = field(default_factory=dict)
    """The raw A1111 key -> value mapping."""
    notes: list[str] = field(default_factory=list)
    """What difusi assumed to remake the image (e.g. the noise source of an A1111 text without "RNG"); front ends
    show them."""

    def params(self, base: GenerationParams | None = None) -> GenerationParams:
        """GenerationParams with these values over `base` (defaults); raises ParamError for bad values."""
        parsed, _ = GenerationParams.from_mapping(self.values)
        if base is None:
            return parsed
        return base.replace(**{name: getattr(parsed, name) for name in self.values})


def recipe_from_infotext(text: str) -> InfotextRecipe:
    """Parse `text` (A1111 rules) and map its keys to GenerationParams fields.

    Legacy sampler names such as "DPM++ 2M Karras" become sampler "DPM++ 2M" + schedule "Karras" when the
    text has no explicit schedule (A1111's back-compat rule). An unknown sampler is kept as written so that
    validation can name it. A settings line without "RNG" means the CPU source when difusi wrote it (`Version:
    difusi ...`) and A1111's default GPU source otherwise, remade with "NV" (see `notes`).
    """
    fields, ignored = parse_infotext(text)
    values: dict[str, Any] = {KEY_TO_FIELD[key]: value for key, value in fields.items() if key in KEY_TO_FIELD}
    if "sampler_name" in values:
        values["sampler_name"], values["scheduler"] = _split_legacy_sampler(
            values["sampler_name"], values.get("scheduler", "Automatic")
        )
    if any(key in fields for key in _HIRES_KEYS):  # A1111 reads hires fix from the presence of its keys
        values["enable_hr"] = "true"
    notes: list[str] = []
    if "RNG" not in fields and "Steps" in fields:  # a settings line without a noise source
        values["rng"], note = _missing_rng(fields.get("Version", ""))
        notes += [note] if note else []
    return InfotextRecipe(
        values=values,
        model_hash=fields.get("Model hash") or None,
        model_name=fields.get("Model") or None,
        ignored=ignored,
        fields=fields,
        notes=notes,
    )


_HIRES_KEYS = ("Hires upscale", "Hires resize-1", "Hires upscaler", "Hires steps")


def _missing_rng(version: str) -> tuple[str, str | None]:
    """The noise source of an infotext without "RNG": difusi's own older images used the CPU generator; anything
    else was made by A1111 (or a tool copying its format) with its default "GPU" source, which A1111 leaves out of
    the text. Those noises are torch's CUDA generator's, which "NV" reproduces on any device (`difusi.philox`);
    "GPU" itself would give CUDA's numbers only on an NVIDIA card, and the CPU's elsewhere."""
    if version.strip().startswith("difusi"):
        return "CPU", None
    return "NV", ("no RNG in the parameters: A1111's default noise source (GPU, NVIDIA's generator) assumed and "
                  "remade on any device with RNG: NV (pass --rng to choose another)")


def _split_legacy_sampler(sampler_name: str, scheduler: str) -> tuple[str, str]:
    from difusi.samplers import get_sampler

    try:
        sampler = get_sampler(sampler_name)
    except ParamError:
        return sampler_name, scheduler
    if sampler.schedule_override and scheduler.strip().lower() == "automatic":
        return sampler.name, sampler.schedule_override
    return sampler.name, scheduler


def _version_text(version: str | None) -> str:
    if version is None:
        from difusi import __version__

        return f"difusi {__version__}"
    return version if version.startswith("difusi") else f"difusi {version}"


def png_info(infotext: str) -> PngInfo:
    """A PngInfo carrying `infotext` in the `parameters` chunk (tEXt when Latin-1, else iTXt UTF-8)."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, infotext)
    return info


def write_png(image: Image.Image, target: str | Path | BinaryIO, infotext: str) -> None:
    """Save `image` as PNG with its infotext to a path or an open binary file."""
    image.save(target, format="PNG", pnginfo=png_info(infotext))


def read_infotext(source: str | Path | BinaryIO) -> str | None:
    """The `parameters` text of an image (PNG text chunk, or `info` for other formats), None when absent."""
    with Image.open(source) as image:
        text = getattr(image, "text", None) or {}
        value = text.get(PNG_TEXT_KEY) or image.info.get(PNG_TEXT_KEY)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value or None

"""A1111's extra-network prompt tags: `<lora:NAME:MULT>`, `<lora:NAME:TE:UNET>`, `<lora:NAME:te=..:unet=..>`.

A1111 (`modules/extra_networks.py parse_prompt`, `extensions-builtin/Lora/extra_networks_lora.py activate`):

- a tag is `<` word `:` anything but `>` `>`; its arguments split on `:`, an argument `key=value` is named, the
  others positional; the tags are removed from the prompt before prompt editing is parsed, so a tag inside
  `[a <lora:x:1>:b:5]` applies to the whole job and the brackets keep only the words;
- `te` = positional 2 (default 1.0), then named `te=`; `unet` = positional 3 (default: te), then named `unet=`;
  positional 4 / named `dyn=` is LyCORIS's dynamic rank (not supported here: reported, then ignored);
- `<lyco:...>` is an alias of `<lora:...>`; tags of other kinds (`<hypernet:...>`) are removed and reported;
- tags are read from the positive prompt only (in the negative prompt `<lora:...>` is text, as in A1111);
- a multiplier of 0 disables that network; the same LoRA twice is applied twice (the deltas add up).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from difusi.errors import ParamError

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag of a prompt."""

    text: str
    """The tag as written."""
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0


@dataclass(frozen=True)
class PromptNetworks:
    """A prompt without its extra-network tags, the LoRA tags in order, and what was removed but not applied."""

    prompt: str
    loras: tuple[LoraTag, ...] = ()
    warnings: tuple[str, ...] = ()


def parse_network_tags(prompt: str) -> PromptNetworks:
    """Split `prompt` into text and tags (rules in the module docstring); a multiplier that is not a number raises
    ParamError("prompt", ...) naming the tag."""
    loras: list[LoraTag] = []
    warnings: list[str] = []
    for match in _TAG.finditer(prompt):
        kind, arguments = match.group(1), match.group(2).split(":")
        if kind.lower() not in LORA_KINDS:
            warnings.append(f"prompt: removed {match.group(0)}: {kind} networks are not supported (only LoRA / "
                            f"LyCORIS), so the image is made without it")
            continue
        positional = [item.strip() for item in arguments if "=" not in item]
        named = dict(item.split("=", 1) for item in arguments if "=" in item)
        named = {key.strip(): value.strip() for key, value in named.items()}
        if not positional or not positional[0]:
            raise ParamError("prompt", f"{match.group(0)}: a LoRA tag needs a name, e.g. <lora:NAME:0.8>")
        te = _multiplier(match.group(0), named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = _multiplier(match.group(0), named.get("unet", positional[2] if len(positional) > 2 else str(te)))
        if len(positional) > 3 or "dyn" in named:
            warnings.append(f"prompt: {match.group(0)}: the dynamic rank (dyn) of LyCORIS is not supported; the "
                            "full rank is used")
        loras.append(LoraTag(match.group(0), positional[0], te, unet))
    return PromptNetworks(_TAG.sub("", prompt), tuple(loras), tuple(warnings))


def _multiplier(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ParamError("prompt", f"{tag}: the multiplier must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ParamError("prompt", f"{tag}: the multiplier must be a finite number, got {text!r}")
    return value

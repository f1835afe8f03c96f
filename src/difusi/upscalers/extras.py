"""A1111's "Extras" upscale step, shared by `difusi upscale` and `POST /sdapi/v1/extra-*-image(s)`.

`run_upscale` is A1111's `ScriptPostprocessingUpscale.process` (`scripts/postprocessing_upscale.py`): upscaler 1
scales by `upscaling_resize` (resize_mode 0) or to fit `upscaling_resize_w` x `upscaling_resize_h` (resize_mode 1:
the factor is max(w / W, h / H), then with `upscaling_crop` the result is centred on a canvas of exactly that size);
upscaler 2, when named and `extras_upscaler_2_visibility` > 0, upscales the original the same way and is blended in
(`Image.blend`). Upscaler 1 "None" means no upscale at all. The info items are A1111's, in its order:
`Postprocess upscale by` / `Postprocess upscale to`, `Postprocess crop to`, `Postprocess upscaler`,
`Postprocess upscaler 2`, joined as A1111's `run_postprocessing` does ("k: v, ...", values with `,` `:` or newlines
JSON-quoted). A whole-number factor is written without ".0" ("Postprocess upscale by: 2").

PNG text: as A1111's extras, the input's own text chunks (its generation `parameters` above all) are kept as they
are, and the postprocessing text goes into a `postprocessing` chunk (A1111 sets `image.info["postprocessing"]`)
and an `extras` chunk (A1111's `pnginfo_section_name` for saved extras images).

Decoding refuses decompression bombs before any pixel is decoded: an image whose header declares more pixels than
the memory budget's `max_pixels` (`difusi.budget`) or Pillow's `Image.MAX_IMAGE_PIXELS` is a ParamError.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from difusi.budget import current_budget
from difusi.errors import ParamError
from difusi.upscalers import check_destination, check_scale, get_upscaler

POSTPROCESSING_KEYS = ("postprocessing", "extras")
"""PNG text chunks that hold A1111's postprocessing text (replaced, not kept from the input)."""


def open_image(source: bytes | str | Path, field: str = "image") -> Image.Image:
    """A picture to upscale (`difusi.images.load.open_image`), within the budget's pixels per image (its result must
    fit the budget too)."""
    from difusi.images.load import open_image as open_picture

    return open_picture(source, field, max_pixels=current_budget().max_pixels)


def text_items(image: Image.Image) -> dict[str, str]:
    """The input's text chunks to keep (A1111's `existing_pnginfo`), without old postprocessing text."""
    items = {key: value for key, value in (getattr(image, "text", None) or {}).items() if isinstance(value, str)}
    parameters = image.info.get("parameters")
    if isinstance(parameters, str):
        items.setdefault("parameters", parameters)
    return {key: value for key, value in items.items() if key not in POSTPROCESSING_KEYS}


@dataclass
class UpscaleOptions:
    """The upscale part of A1111's `ExtrasBaseRequest` (same names and defaults)."""

    resize_mode: int = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0


@dataclass
class UpscaleResult:
    image: Image.Image
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """A1111's postprocessing infotext of this image."""
        return postprocess_text(self.info)


def _quote(value: Any) -> str:
    """A1111's `infotext_utils.quote`, with whole-number floats written as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(char in text for char in ",:\n") else text


def postprocess_text(info: dict[str, Any]) -> str:
    """`"Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+"` from the info items (A1111's join)."""
    return ", ".join(key if key == value else f"{key}: {_quote(value)}" for key, value in info.items()
                     if value is not None)


def html_info(text: str) -> str:
    """A1111's `plaintext_to_html` (the extras endpoints' `html_info`)."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def check_options(options: UpscaleOptions, image: Image.Image) -> float:
    """Check the options against `image` before any work: the factor upscaler 1 will use (ParamError naming the
    request field otherwise)."""
    if options.resize_mode not in (0, 1) or isinstance(options.resize_mode, bool):
        raise ParamError("resize_mode", f"must be 0 (scale by upscaling_resize) or 1 (scale to upscaling_resize_w x "
                                        f"upscaling_resize_h), got {options.resize_mode!r}")
    visibility = options.extras_upscaler_2_visibility
    if isinstance(visibility, bool) or not isinstance(visibility, int | float) or not 0 <= visibility <= 1:
        raise ParamError("extras_upscaler_2_visibility", f"must be a number in [0, 1], got {visibility!r}")
    if options.resize_mode == 1:
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(name, f"must be a whole number of pixels >= 1, got {value!r}")
        scale = max(options.upscaling_resize_w / image.width, options.upscaling_resize_h / image.height)
        check_scale(scale, "upscaling_resize_w")
        if options.upscaling_crop:
            check_destination(options.upscaling_resize_w, options.upscaling_resize_h, image, scale,
                              "upscaling_resize_w")
        return scale
    return check_scale(options.upscaling_resize, "upscaling_resize")


def run_upscale(image: Image.Image, options: UpscaleOptions, models_dir: str | Path | None = None, *,
                allow_path: bool = False) -> UpscaleResult:
    """One image through A1111's extras upscale (module docstring); the image is converted to RGB as A1111 does."""
    image = image.convert("RGB")
    scale = check_options(options, image)
    if options.upscaler_1 in (None, "None"):
        return UpscaleResult(image, {})
    first = get_upscaler(options.upscaler_1, models_dir, field="upscaler_1", allow_path=allow_path)
    second = None
    if options.upscaler_2 not in (None, "None") and options.extras_upscaler_2_visibility > 0:
        second = get_upscaler(options.upscaler_2, models_dir, field="upscaler_2", allow_path=allow_path)
    scale_field = "upscaling_resize_w" if options.resize_mode == 1 else "upscaling_resize"
    info: dict[str, Any] = {}
    result = _upscale_one(first, image, options, scale, scale_field, info)
    info["Postprocess upscaler"] = first.name
    if second is not None:
        other = _upscale_one(second, image, options, scale, scale_field, {})
        result = Image.blend(result, other.convert(result.mode), float(options.extras_upscaler_2_visibility))
        info["Postprocess upscaler 2"] = second.name
    return UpscaleResult(result, info)


def _upscale_one(upscaler: Any, image: Image.Image, options: UpscaleOptions, scale: float, field: str,
                 info: dict[str, Any]) -> Image.Image:
    """A1111's `ScriptPostprocessingUpscale.upscale` for one upscaler (its info items written into `info`)."""
    if options.resize_mode == 1:
        info["Postprocess upscale to"] = f"{options.upscaling_resize_w}x{options.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = options.upscaling_resize
    upscaled = upscaler.upscale(image, scale, field=field)
    if options.resize_mode == 1 and options.upscaling_crop:
        width, height = options.upscaling_resize_w, options.upscaling_resize_h
        canvas = Image.new("RGB", (width, height))
        canvas.paste(upscaled, box=(width // 2 - upscaled.width // 2, height // 2 - upscaled.height // 2))
        upscaled = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return upscaled


def extras_pnginfo(kept: dict[str, str], text: str) -> PngInfo:
    """PNG text chunks of an extras result: the input's own (`text_items`), then `postprocessing` and `extras`."""
    info = PngInfo()
    for key, value in kept.items():
        info.add_text(key, value)
    if text:
        for key in POSTPROCESSING_KEYS:
            info.add_text(key, text)
    return info


def write_extras_png(image: Image.Image, target: str | Path | BinaryIO, kept: dict[str, str], text: str) -> None:
    """Save an extras result as PNG with the chunks of `extras_pnginfo`."""
    image.save(target, format="PNG", pnginfo=extras_pnginfo(kept, text))


def extras_png_bytes(image: Image.Image, kept: dict[str, str], text: str) -> bytes:
    buffer = io.BytesIO()
    write_extras_png(image, buffer, kept, text)
    return buffer.getvalue()

"""Untrusted pictures -> PIL images: base64 / data URLs, paths, bytes, with the checks every front end needs.

A picture is refused before it is decoded when its header declares more pixels than the memory budget allows
(`difusi.budget`), so a small file that would decode to gigabytes (a decompression bomb) costs nothing; PIL's own
`DecompressionBombError` is a second guard. Errors name the request field (`ParamError(field, ...)`).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from difusi.errors import ParamError

_ORIENTATION = 0x0112
MAX_SIDE = 16384
"""Longest side accepted whatever the budget (PIL and the VAE tile at most this)."""


def decode_base64_image(data: object, field: str = "image", *, max_pixels: int | None = None) -> Image.Image:
    """A data URL or raw base64 string -> PIL image (A1111's `decode_base64_to_image`); ParamError(field)."""
    if not isinstance(data, str) or not data.strip():
        raise ParamError(field, "must be a non-empty base64 string or data URL")
    text = data.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ParamError(field, "is not valid base64") from None
    return open_image(raw, field, max_pixels=max_pixels)


def open_image(source: bytes | str | Path | Image.Image, field: str = "image", *,
               max_pixels: int | None = None) -> Image.Image:
    """Bytes, a path or a PIL image -> a loaded PIL image, EXIF rotation applied (what a phone photo means).

    `max_pixels`: the largest width x height accepted (default: the budget's per-image pixels x 4, so an init
    image may be larger than the job, which resizes it; the job's own size is checked by the field table).
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, field, max_pixels)
        return source
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ParamError(field, f"{path} is not a file")
        raw = path.read_bytes()
    else:
        raw = bytes(source)
    try:
        image = Image.open(io.BytesIO(raw))
        _check_size(image.size, field, max_pixels)  # from the header, before the pixels are decoded
        image.load()
        if image.getexif().get(_ORIENTATION, 1) != 1:  # a copy otherwise, losing the PNG's text chunks
            image = ImageOps.exif_transpose(image)
    except ParamError:
        raise  # the size check's own message (a ParamError is a ValueError: keep it out of the clause below)
    except Image.DecompressionBombError as error:
        raise ParamError(field, f"is too large to decode: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ParamError(field, "is not a readable image (PNG, JPEG or WebP expected)") from None
    return image


def _check_size(size: tuple[int, int], field: str, max_pixels: int | None) -> None:
    from difusi.budget import current_budget

    width, height = size
    limit = max_pixels if max_pixels is not None else current_budget().max_pixels * 4
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > limit:
        raise ParamError(field, f"is {width}x{height} = {width * height} pixels; at most {limit} pixels (and "
                                f"{MAX_SIDE} per side) are accepted (raise --max-pixels for larger pictures)")

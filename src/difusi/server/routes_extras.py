"""A1111's Extras and upscaler endpoints: `/sdapi/v1/upscalers`, `/latent-upscale-modes`, `/extra-single-image`,
`/extra-batch-images` (request and response shapes of A1111's `modules/api/models.py`).

The upscale itself is `difusi.upscalers.extras.run_upscale` over the engine's models folder (`engine.models_dir`,
the folder its checkpoints come from), run in a worker thread so the event loop keeps serving `/progress` and
friends; one upscale runs at a time (`_ONE_AT_A_TIME`), so two requests never hold two 4x images' activations.
Upscale models do not touch the diffusion model, so they do not wait behind generation jobs in the queue.

Face restoration (GFPGAN, CodeFormer) is not in difusi: a request asking for it (visibility > 0) is still
upscaled, and the fields are listed in the response's `info` JSON string as `ignored_fields` (contract 4).
Only names from the upscaler list are accepted here, never file paths (unlike `difusi upscale`).
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, Strict

from difusi.errors import ParamError
from difusi.server import a1111
from difusi.server.routes_common import EngineDep

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

_ONE_AT_A_TIME = threading.Lock()

Number = Annotated[float, Strict()]  # strict: JSON numbers only (no "2", no true); ints are accepted for floats
Whole = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]


class ExtrasBaseRequest(BaseModel):
    """A1111's `ExtrasBaseRequest`: the same names and defaults; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h")
    show_extras_results: Flag = Field(True, description="return the images (always, as A1111 for these endpoints)")
    gfpgan_visibility: Number = Field(0, ge=0, le=1, description="face restoration: not in difusi (ignored, listed)")
    codeformer_visibility: Number = Field(0, ge=0, le=1, description="face restoration: not in difusi (ignored, listed)")
    codeformer_weight: Number = Field(0, ge=0, le=1, description="face restoration: not in difusi")
    upscaling_resize: Number = Field(2, description="scale factor in (0, 8] (resize_mode 0)")
    upscaling_resize_w: Whole = Field(512, ge=1, description="target width (resize_mode 1)")
    upscaling_resize_h: Whole = Field(512, ge=1, description="target height (resize_mode 1)")
    upscaling_crop: Flag = Field(True, description="crop to exactly upscaling_resize_w x _h (resize_mode 1)")
    upscaler_1: Text = Field("None", description="main upscaler: a name from GET /sdapi/v1/upscalers")
    upscaler_2: Text = Field("None", description="secondary upscaler, blended in by extras_upscaler_2_visibility")
    extras_upscaler_2_visibility: Number = Field(0, ge=0, le=1, description="weight of upscaler_2 in [0, 1]")
    upscale_first: Flag = Field(False, description="upscale before face restoration (no effect: none in difusi)")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: Text = Field("", description="the image: base64 or a data URL")


class FileData(BaseModel):
    data: Text = Field(description="base64 of the file")
    name: Text = Field(description="file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="images to work on (base64)")  # noqa: N815 (A1111's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None
    info: str = Field(description="difusi: JSON with `ignored_fields` and the postprocessing `infotexts`")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]
    info: str = Field(description="difusi: JSON with `ignored_fields` and the postprocessing `infotexts`")


@router.get("/upscalers")
def upscalers(engine: EngineDep) -> list[dict[str, Any]]:
    """A1111's upscaler list: None, Lanczos, Nearest, then the model files of the engine's models folder."""
    from difusi.upscalers import list_upscalers

    return [info.to_a1111() for info in list_upscalers(engine.models_dir)]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, str]]:
    """A1111's latent upscale modes for the hires fix (names only, as A1111 answers)."""
    from difusi.upscalers import LATENT_UPSCALE_MODES

    return [{"name": name} for name in LATENT_UPSCALE_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, responses=a1111.ERROR_RESPONSES)
async def extra_single_image(body: ExtrasSingleImageRequest, engine: EngineDep) -> dict[str, Any]:
    """Upscale one image (A1111's Extras tab, single image)."""
    images, text, ignored = await run_in_threadpool(_run, engine, body, [(body.image, "image")])
    return {"html_info": _html(text), "image": images[0], "info": _info(ignored, [text])}


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, responses=a1111.ERROR_RESPONSES)
async def extra_batch_images(body: ExtrasBatchImagesRequest, engine: EngineDep) -> dict[str, Any]:
    """Upscale several images with the same settings; `html_info` is the last image's, as in A1111."""
    sources = [(item.data, "imageList") for item in body.imageList]
    images, text, ignored = await run_in_threadpool(_run, engine, body, sources)
    return {"html_info": _html(text), "images": images, "info": _info(ignored, None)}


def _html(text: str) -> str:
    from difusi.upscalers.extras import html_info

    return html_info(text)


def _info(ignored: list[str], texts: list[str] | None) -> str:
    return json.dumps({"ignored_fields": ignored, "infotexts": texts or []}, ensure_ascii=False)


def ignored_fields(body: ExtrasBaseRequest) -> list[str]:
    """Request fields sent with a meaning difusi does not honour (face restoration)."""
    ignored = [name for name in ("gfpgan_visibility", "codeformer_visibility") if getattr(body, name) > 0]
    if body.codeformer_visibility > 0 and body.codeformer_weight > 0:
        ignored.append("codeformer_weight")
    return ignored


def _decode(data: str, field: str) -> Any:
    from difusi.budget import current_budget
    from difusi.images.load import decode_base64_image

    return decode_base64_image(data, field, max_pixels=current_budget().max_pixels)


def _run(engine: Any, body: ExtrasBaseRequest, sources: list[tuple[str, str]]) -> tuple[list[str], str, list[str]]:
    """Decode and check every image, then upscale them one by one: (base64 PNGs, last info text, ignored fields)."""
    from difusi.upscalers.extras import UpscaleOptions, check_options, extras_png_bytes, run_upscale, text_items

    options = UpscaleOptions(**{name: getattr(body, name) for name in UpscaleOptions.__dataclass_fields__})
    if not sources:
        raise ParamError("imageList", "must hold at least one image")
    decoded = [_decode(data, field) for data, field in sources]
    for image in decoded:
        check_options(options, image)
    images, text = [], ""
    with _ONE_AT_A_TIME:
        for image in decoded:
            result = run_upscale(image, options, engine.models_dir)
            text = result.text
            png = extras_png_bytes(result.image, text_items(image), text)
            images.append(base64.b64encode(png).decode("ascii"))
    return images, text, ignored_fields(body)

"""AUTOMATIC1111 `/sdapi/v1` request and response shapes, and their mapping to difusi's types.

Requests are pydantic models with every field optional and unknown fields allowed, because A1111
clients send about 47 keys (many of them null or meaningless here); `to_txt2img_job` keeps what
difusi understands and ignores the rest. The txt2img request model is generated from the field table
(`difusi.params.FIELDS`), so a new field is in the API (and its OpenAPI schema) as soon as it is declared.
Types are checked strictly here (no `true` for 1, no "20" for 20, no 64.0 for an integer); range checks
are not repeated: they live in `GenerationParams.validated`, so every front end reports the same limits.

Decisions that differ from A1111 (documented in the README):
- `save_images` defaults to **true** (A1111's API defaults to false): images made through the API
  land in the outputs folder and history like the CLI's, unless a client opts out.
- Omitted `sampler_name`, `steps`, `cfg_scale`, `width`, `height` take difusi's defaults
  (DPM++ 2M, 20 steps, CFG 7, the model's native size), the same as `difusi generate`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any

from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, create_model
from pydantic_core import PydanticCustomError

from difusi import strict_json
from difusi.errors import ParamError
from difusi.params import FIELDS, PICTURE_KINDS, TXT2IMG, FieldSpec, GenerationParams


def _strict_number(kind: type) -> Any:
    """A pydantic before-validator: JSON booleans and strings are not numbers (pydantic's lax mode takes `true` as 1
    and "20" as 20), and an int field takes no floats at all (64.0 included), the same rule as
    `GenerationParams.validated` applies to the Python API."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PydanticCustomError("number_type", f"Input should be a valid {'integer' if kind is int else 'number'}")
        if kind is int and isinstance(value, float):
            detail = "got a number with a fractional part" if not value.is_integer() else "got a float"
            raise PydanticCustomError("int_from_float", f"Input should be a valid integer, {detail}")
        return value

    return BeforeValidator(check)


def _strict_bool() -> Any:
    """JSON true/false, and 0/1 (A1111 clients send `inpaint_full_res: 0`, its UI's radio index); nothing else."""

    def check(value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise PydanticCustomError("bool_type", "Input should be true or false (or 0 / 1)")

    return BeforeValidator(check)


def _request_field(spec: FieldSpec) -> tuple[Any, Any]:
    """(annotation, pydantic Field) of one request key, from the field table. Ranges go into the schema for
    documentation only: `GenerationParams.validated` checks them, with the same message as every front end."""
    schema: dict[str, Any] = {}
    if spec.range is not None:
        schema.update({key: bound for key, bound in zip(("minimum", "maximum"), spec.range, strict=True)
                       if not math.isinf(bound)})
    if spec.multiple_of:
        schema["multipleOf"] = spec.multiple_of
    default = strict_json.to_strict(spec.default)  # infinity (s_tmax) is no default a JSON client can send
    description = f"{spec.help}; default {default!r}" if default not in (None, "") else spec.help
    if spec.type is str:
        annotation: Any = Annotated[str | None, Strict()]
    elif spec.type is bool:
        annotation = Annotated[bool | None, _strict_bool()]
    else:
        annotation = Annotated[spec.type | None, _strict_number(spec.type)]
    return annotation, Field(None, description=description, json_schema_extra=schema or None)


class _RequestBase(BaseModel):
    """The request keys that are not job fields. Unknown and null fields are ignored (A1111 clients send ~47 keys)."""

    model_config = ConfigDict(extra="allow")

    sampler_index: str | None = Field(None, description="legacy A1111 field, used when sampler_name is absent")
    override_settings: dict[str, Any] | None = Field(
        None, description="per-job options, e.g. {'sd_model_checkpoint': 'name'}; CLIP_stop_at_last_layers = clip_skip"
    )
    save_images: bool | None = Field(None, description="save to the outputs folder and history (default true)")
    send_images: bool | None = Field(None, description="return base64 images in the response (default true)")


Txt2ImgRequest = create_model(
    "Txt2ImgRequest",
    __base__=_RequestBase,
    __doc__="Body of `POST /sdapi/v1/txt2img` (and `/difusi/v1/jobs`): every txt2img field of the field table.",
    **{name: _request_field(spec) for name, spec in FIELDS.items() if spec.http and TXT2IMG in spec.kinds},
)


class _PicturesBase(_RequestBase):
    """The img2img request keys that are pictures (A1111's `StableDiffusionImg2ImgProcessingAPI`)."""

    init_images: list[str] = Field(description="init pictures, base64 or data URLs; image i uses picture i modulo n")
    mask: str | None = Field(None, description="inpainting mask (white = redraw), base64 or data URL, the init "
                                               "picture's size")
    include_init_images: bool | None = Field(None, description="echo init_images and mask in `parameters`")


Img2ImgRequest = create_model(
    "Img2ImgRequest",
    __base__=_PicturesBase,
    __doc__="Body of `POST /sdapi/v1/img2img` (and `/difusi/v1/img2img`): every img2img and inpaint field of the "
            "field table, the init pictures and the mask.",
    **{name: _request_field(spec) for name, spec in FIELDS.items() if spec.http and spec.kinds & PICTURE_KINDS},
)


HONOURED_KEYS: frozenset[str] = frozenset(Txt2ImgRequest.model_fields)
"""Request keys difusi acts on: the field table's txt2img fields plus the request-only keys of `_RequestBase`.
Derived, never listed by hand, so a field declared in `difusi.params` stops being reported as ignored at once."""

HONOURED_OVERRIDES: frozenset[str] = frozenset(
    {"sd_model_checkpoint"} | {spec.option for spec in FIELDS.values() if spec.option and spec.http}
)
"""`override_settings` keys difusi applies per job (the checkpoint, and the A1111 options that set fields)."""

_DEPENDS_ON: dict[str, str] = {"script_args": "script_name", "refiner_switch_at": "refiner_checkpoint",
                               "denoising_strength": "enable_hr", "firstpass_image": "enable_hr"}
"""Keys that do nothing in A1111 unless another key is set (A1111 clients send them with every request):
they count as ignored only when their master key does. `hr_*` and `firstphase_*` keys depend on `enable_hr`."""

_NO_EFFECT: dict[str, Any] = {
    "seed_resize_from_h": lambda v: isinstance(v, int | float) and v <= 0,  # A1111's -1 = "no resize"
    "seed_resize_from_w": lambda v: isinstance(v, int | float) and v <= 0,
    "override_settings_restore_afterwards": lambda v: True,  # difusi's overrides never outlive their job
    "refiner_checkpoint": lambda v: v in ("None", "none"),  # A1111 reads these as "no refiner"
    "do_not_save_grid": lambda v: v is True,  # difusi never makes grids: what the client asked for
    "disable_extra_networks": lambda v: v is True,  # difusi strips <lora:...> tags without applying them
    "sd_vae": lambda v: v in ("Automatic", "None"),  # (an override_settings key) the checkpoint's own VAE
}
"""Values beyond null/false/0/""/[]/{} that ask for nothing difusi fails to do (A1111's own "off" values)."""


def _means_nothing(key: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return True
    check = _NO_EFFECT.get(key)
    return bool(check is not None and check(value))


def _master_of(key: str) -> str | None:
    if key.startswith(("hr_", "firstphase_")):
        return "enable_hr"
    return _DEPENDS_ON.get(key)


def ignored_fields(request: Txt2ImgRequest) -> list[str]:
    """The keys of `request` that asked for something difusi does not do, in request order.

    A1111 clients send about 47 keys, mostly null/false/0/""/[]/{} or A1111's own "off" values; only a key that
    difusi does not honour (`HONOURED_KEYS`) and that was sent with a value that means something is listed, so
    the answer tells a client exactly which requests were dropped (`enable_hr`, `restore_faces`, `styles`, ...).
    Unapplied `override_settings` keys are listed as `override_settings.<key>`.
    """
    extra = request.model_extra or {}
    ignored = []
    xyz_script = _is_xyz_script(extra.get("script_name"))
    for key, value in extra.items():
        if xyz_script and key in ("script_name", "script_args"):
            continue  # the X/Y/Z plot is honoured (`difusi.batch.xyz`): its keys are not ignored
        master = _master_of(key)
        master_value = getattr(request, master, None) if master in type(request).model_fields else extra.get(master)
        if master is not None and _means_nothing(master, master_value):
            continue  # e.g. hr_scale: 2 without enable_hr does nothing in A1111 either
        if key not in type(request).model_fields and not _means_nothing(key, value):
            ignored.append(key)
    for key, value in (request.override_settings or {}).items():
        if key not in HONOURED_OVERRIDES and not _means_nothing(key, value):
            ignored.append(f"override_settings.{key}")
    return ignored


def _is_xyz_script(name: Any) -> bool:
    from difusi.batch.xyz import is_xyz_script

    return is_xyz_script(name)


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="raw base64 PNGs, each with its infotext in the 'parameters' chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seed, all_seeds, subseed, all_subseeds, infotexts, prompt, ...")


class ErrorResponse(BaseModel):
    """Every error body: what went wrong, which request field (when one is to blame), and a readable message."""

    error: str = Field(examples=["ParamError"])
    field: str | None = Field(None, examples=["steps"])
    detail: str = Field(examples=["steps: must be in [1, 1000], got 0"])


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "bad input: malformed JSON, wrong type, out of range, unknown name"},
    503: {"model": ErrorResponse, "description": "the job queue is full"},
}


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(description="a PNG as a data URL or raw base64")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    model_config = ConfigDict(extra="allow")
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


@dataclass
class Txt2ImgJob:
    """What the worker needs for one txt2img request."""

    params: GenerationParams
    checkpoint: str | None
    """Checkpoint name from override_settings; None = the server's current model."""
    save_images: bool
    send_images: bool
    request: dict[str, Any]
    """The request as sent, echoed back as `parameters` (A1111 does the same)."""
    ignored: list[str] = dataclass_field(default_factory=list)
    """Request keys sent with a meaning difusi does not act on yet (`ignored_fields`); reported in `info`."""
    pictures: list[Image.Image] | None = None
    """img2img: the decoded init pictures (None for txt2img)."""
    mask: Image.Image | None = None

    @property
    def kind(self) -> str:
        return "txt2img" if self.pictures is None else "img2img"


def to_txt2img_job(request: Txt2ImgRequest, defaults: dict[str, Any] | None = None, save_default: bool = True) -> Txt2ImgJob:
    """Map an A1111 request to a job; raises ParamError naming the field for bad values.

    `defaults` holds server-wide parameter defaults (from `POST /sdapi/v1/options`) applied before the
    request's own values; `save_default` is used when the request has no `save_images`.
    """
    sent = request.model_dump(exclude_none=True)
    values: dict[str, Any] = dict(defaults or {})
    overrides = sent.get("override_settings") or {}
    for name, spec in FIELDS.items():  # A1111 options that act as per-job fields (the checkpoint is resolved apart)
        if spec.option and spec.name != "model" and overrides.get(spec.option) is not None:
            values[name] = overrides[spec.option]
    for name, spec in FIELDS.items():
        if spec.http and name in sent:
            values[name] = sent[name]
    if "sampler_name" not in sent and sent.get("sampler_index"):
        values["sampler_name"] = sent["sampler_index"]
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise ParamError("sd_model_checkpoint", f"must be a checkpoint name, got {checkpoint!r}")
    params, _unknown = GenerationParams.from_mapping(values)
    return Txt2ImgJob(
        params=params,
        checkpoint=checkpoint,
        save_images=bool(sent.get("save_images", save_default)),
        send_images=bool(sent.get("send_images", True)),
        request=sent,
        ignored=ignored_fields(request),
    )


def to_img2img_job(request: Any, defaults: dict[str, Any] | None = None, save_default: bool = True) -> Txt2ImgJob:
    """Map an A1111 img2img request to a job (pictures decoded with the budget's checks); ParamError names the
    field ("init_images", "mask", or a job field)."""
    from difusi.images.load import decode_base64_image

    job = to_txt2img_job(request, defaults, save_default)
    if not request.init_images:
        raise ParamError("init_images", "needs at least one picture (base64 or data URL)")
    job.pictures = [decode_base64_image(data, "init_images") for data in request.init_images]
    job.mask = None if not request.mask else decode_base64_image(request.mask, "mask")
    if not request.include_init_images:  # A1111 echoes the pictures only when asked to
        job.request = {key: value for key, value in job.request.items() if key not in ("init_images", "mask")}
    return job


def echo_parameters(job: Txt2ImgJob) -> dict[str, Any]:
    """The `parameters` object of the response: every job field with its value as requested."""
    echoed = {name: value for name, value in asdict(job.params).items() if name not in ("extra", "model")}
    echoed["s_tmax"] = None if echoed["s_tmax"] == float("inf") else echoed["s_tmax"]  # JSON has no infinity
    if job.pictures is not None:
        echoed.update(init_images=None, mask=None)
    echoed.update(job.request)
    echoed["save_images"] = job.save_images
    echoed["send_images"] = job.send_images
    return echoed


def job_timestamp(seconds: float | None = None) -> str:
    """A1111's job_timestamp format: local time as YYYYmmddHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds if seconds is not None else time.time()))


def build_info(
    params: GenerationParams,
    seeds: list[int],
    subseeds: list[int],
    infotexts: list[str],
    model_name: str,
    model_hash: str,
    timestamp: str,
    **extra: Any,
) -> dict[str, Any]:
    """The decoded `info` object of a txt2img response, with A1111's keys.

    `params` are the resolved parameters (seed filled in, width/height known); `seeds`/`subseeds`
    cover every image the job was asked for (A1111 lists all seeds even for skipped batches).
    """
    total = params.batch_size * params.n_iter
    info = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * total,
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * total,
        "seed": seeds[0] if seeds else params.seed,
        "all_seeds": list(seeds),
        "subseed": subseeds[0] if subseeds else params.subseed,
        "all_subseeds": list(subseeds),
        "subseed_strength": params.subseed_strength,
        "width": params.width,
        "height": params.height,
        "sampler_name": params.sampler_name,
        "scheduler": params.scheduler,
        "cfg_scale": params.cfg_scale,
        "steps": params.steps,
        "batch_size": params.batch_size,
        "n_iter": params.n_iter,
        "clip_skip": params.clip_skip,
        "eta": params.eta,
        "s_noise": params.s_noise,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(infotexts),
        "styles": [],
        "job_timestamp": timestamp,
        "is_using_inpainting_conditioning": False,
    }
    info.update(extra)
    return info


def info_json(info: dict[str, Any]) -> str:
    """The `info` string: strict JSON (a non-finite number is null, never `Infinity`; difusi.strict_json)."""
    return strict_json.dumps(info, ensure_ascii=False)


def decode_image(data: str, field: str = "image") -> Image.Image:
    """A data URL or raw base64 string -> PIL image (`difusi.images.load.decode_base64_image`: bombs and pictures
    over the budget refused before decoding); ParamError(field) when it is neither."""
    from difusi.images.load import decode_base64_image

    return decode_base64_image(data, field)


def png_text_items(image: Image.Image) -> dict[str, Any]:
    """Text chunks and simple metadata of an image (A1111's png-info `items`)."""
    items: dict[str, Any] = {}
    for key, value in image.info.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str | int | float):
            items[key] = value
    return items


@dataclass
class XYZJob:
    """What the worker needs for an X/Y/Z plot (`script_name: "x/y/z plot"` or `POST /difusi/v1/xyz`): the
    txt2img job every cell starts from, the parsed axes and A1111's script options."""

    spec: Txt2ImgJob
    script: Any
    """`difusi.batch.xyz.ScriptRequest`."""
    send_cells: bool = False
    """Return every cell's image after the grid(s) (A1111's include_lone_images; always for /difusi/v1/xyz)."""

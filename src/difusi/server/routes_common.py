"""What the route modules share: the app's engine and queue, difusi's error type and body, job waiting, PNGs.

Routers (`routes_a1111`, `routes_difusi`, `routes_ui`) hold no references of their own to the engine or
the queue: `create_app` puts both on `app.state`, and a handler asks for them with the `EngineDep` /
`QueueDep` parameters below (FastAPI dependencies reading `request.app.state`). So one router object
serves any number of apps (tests start several servers in one process) and a new route needs no wiring.

This module imports nothing from `app` or the routers, so `app -> routes_* -> routes_common` has no cycle.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from typing import Annotated, Any

from fastapi import Depends, Request

from difusi.errors import CheckpointError, NetworkError, NumericalError, ParamError, StorageError
from difusi.server import a1111
from difusi.server.queue import CANCELLED, Job, JobQueue

log = logging.getLogger("difusi.server")


class ApiError(Exception):
    """An HTTP error with difusi's JSON body."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.field = status, error, detail, field


def error_body(error: str, detail: str, field: str | None = None) -> dict[str, Any]:
    """difusi's one error shape: `{"error": kind, "field": name-or-null, "detail": message}`."""
    return {"error": error, "field": field, "detail": detail}


# -- the app's engine and queue, as FastAPI dependencies ---------------------------------------------------------
def engine_of(request: Request) -> Any:
    """The engine `create_app` stored on `app.state` (anything with `Engine`'s methods)."""
    return request.app.state.engine


def queue_of(request: Request) -> JobQueue:
    """The job queue `create_app` stored on `app.state`."""
    return request.app.state.queue


EngineDep = Annotated[Any, Depends(engine_of)]
"""Handler parameter type: `def route(engine: EngineDep)` receives `request.app.state.engine`."""
QueueDep = Annotated[JobQueue, Depends(queue_of)]
"""Handler parameter type: `def route(queue: QueueDep)` receives `request.app.state.queue`."""


# -- jobs ------------------------------------------------------------------------------------------------------------
async def wait_for_job(job: Job) -> None:
    """Wait until `job` finishes without blocking the event loop (the worker thread wakes us)."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake(_: Job) -> None:
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    job.add_done_callback(wake)
    await finished


def submit(queue: JobQueue, kind: str, payload: Any) -> Job:
    """Queue a job; `QueueFull` becomes a 503 through the app's error handler. A txt2img job reports its
    requested batch count and image total from the start (GET /difusi/v1/jobs/{id} of a queued job)."""
    if isinstance(payload, a1111.Txt2ImgJob):
        params = payload.params
        return queue.submit(kind, payload, n_iter=params.n_iter, total_images=params.total_images)
    return queue.submit(kind, payload)


def prepare_txt2img(engine: Any, body: a1111.Txt2ImgRequest) -> a1111.Txt2ImgJob:
    """Map and check a request before it is queued, so bad input fails fast with 422."""
    spec = a1111.to_txt2img_job(body, engine.param_defaults(), engine.default_save_images())
    if spec.checkpoint is not None:
        spec.checkpoint = engine.resolve_title(spec.checkpoint)
    # The native size is only known once the model is loaded; validate the rest now with a stand-in.
    spec.params.validated(native_size=engine.native_size_hint(spec.checkpoint))
    from difusi.networks.job import check_job

    check_job(spec.params, engine.networks, allow_paths=False)  # an unknown LoRA or VAE is a 422 naming it, before the queue
    if spec.ignored:  # one line per request; the client reads the same list in `info["ignored_fields"]`
        log.warning("txt2img: ignoring request fields difusi does not support yet: %s", ", ".join(spec.ignored))
    return spec


def prepare_img2img(engine: Any, body: Any) -> a1111.Txt2ImgJob:
    """`prepare_txt2img` for an img2img request: its pictures decoded and checked (size, budget, format) too."""
    from difusi.init_images import check_pictures, sized_for

    spec = a1111.to_img2img_job(body, engine.param_defaults(), engine.default_save_images())
    check_pictures(spec.pictures, spec.mask)
    if spec.checkpoint is not None:
        spec.checkpoint = engine.resolve_title(spec.checkpoint)
    spec.params = sized_for(spec.params, spec.pictures[0])
    spec.params.validated()
    from difusi.networks.job import check_job

    check_job(spec.params, engine.networks, allow_paths=False)
    if spec.ignored:
        log.warning("img2img: ignoring request fields difusi does not support yet: %s", ", ".join(spec.ignored))
    return spec


def prepare_xyz(engine: Any, body: a1111.Txt2ImgRequest, axes: tuple[str | None, str | None, str | None] | None = None,
                ) -> a1111.XYZJob:
    """Map and check an X/Y/Z plot before it is queued: A1111's `script_args` (when `axes` is None) or difusi's
    `TYPE=VALUES` axis strings; every cell is validated now, so a bad axis or cell is a 422 naming it."""
    from difusi.batch import xyz

    spec = prepare_txt2img(engine, body)
    params = spec.params
    if axes is None:
        script = xyz.from_script_args((body.model_extra or {}).get("script_args"), prompt=params.prompt,
                                      negative_prompt=params.negative_prompt,
                                      resolve_checkpoint=engine.resolve_title)
        send_cells = script.include_lone_images
    else:
        parsed = []
        for name, text in zip("xyz", axes, strict=True):
            axis = xyz.parse_axis(text, name, prompt=params.prompt, negative_prompt=params.negative_prompt,
                                  models_dir=xyz.NO_CHECKPOINT_CHECK)
            if axis.type.kind == xyz.CHECKPOINT:  # requests name listed checkpoints only, by the server's rules
                try:
                    axis = xyz.dataclasses.replace(axis, values=tuple(engine.resolve_title(v) for v in axis.values))
                except ParamError as error:
                    raise ParamError(name, f"{name.upper()} axis (Checkpoint name): {error.message}") from None
            parsed.append(axis)
        if parsed[0].is_nothing:
            raise ParamError("x", "X axis: required (TYPE=VALUES, e.g. 'steps=10,20')")
        script = xyz.ScriptRequest(parsed[0], parsed[1], parsed[2])
        send_cells = True
    xyz.plan(params, script.x, script.y, script.z, native_size=engine.native_size_hint(spec.checkpoint))
    return a1111.XYZJob(spec, script, send_cells)


def not_implemented(what: str) -> ApiError:
    """The 501 of an A1111 endpoint difusi does not have (yet), naming it, instead of a bare 404."""
    return ApiError(501, "NotImplemented", f"{what} is not implemented in difusi yet (difusi does txt2img only); "
                                           "see GET /docs for what this server offers")


def job_error(job: Job) -> ApiError:
    """Turn a failed job's exception into the HTTP error a synchronous request should have seen."""
    error = job.error
    if isinstance(error, ParamError):
        return ApiError(422, "ParamError", str(error), error.field)
    if isinstance(error, CheckpointError):
        return ApiError(422, type(error).__name__, str(error), "sd_model_checkpoint")
    if isinstance(error, NetworkError):
        return ApiError(422, "NetworkError", str(error), error.field)
    if isinstance(error, StorageError):  # 507 Insufficient Storage: the request was fine, the disk is not
        return ApiError(507, "StorageError", str(error))
    if isinstance(error, NumericalError):
        return ApiError(500, "NumericalError", str(error), "sd_model_checkpoint")
    if job.status == CANCELLED:
        return ApiError(503, "Cancelled", "the job was cancelled before it started (server shutting down?)")
    return ApiError(500, type(error).__name__ if error else "Error", str(error) or "generation failed")


# -- images ------------------------------------------------------------------------------------------------------------
def png_base64_with_infotext(image: Any, infotext: str) -> str:
    """Raw base64 PNG carrying `infotext` in its `parameters` chunk, written by `difusi.infotext.write_png`
    so an API image has exactly the bytes layout of a saved file (one PNG writer for both)."""
    from difusi.infotext import write_png

    buffer = io.BytesIO()
    write_png(image, buffer, infotext)
    return base64.b64encode(buffer.getvalue()).decode("ascii")

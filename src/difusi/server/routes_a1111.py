"""AUTOMATIC1111's `/sdapi/v1` API: the request and response shapes of A1111's own server (`a1111`).

Handlers stay thin: map and check the request (`a1111`), submit a job to the queue, shape the answer.
The engine and the queue come from `request.app.state` (`EngineDep`, `QueueDep`), never from a closure.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from difusi.server import a1111
from difusi.server.queue import CANCELLED, FAILED, Job, JobQueue
from difusi.server.routes_common import (
    EngineDep,
    QueueDep,
    job_error,
    png_base64_with_infotext,
    prepare_txt2img,
    submit,
    wait_for_job,
)

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

EMPTY_LISTS = ("sd-vae", "upscalers", "latent-upscale-modes", "loras", "prompt-styles", "face-restorers")
"""A1111 listings difusi has nothing for; clients probe them, so they answer `[]` rather than 404."""


@router.post("/txt2img", response_model=a1111.Txt2ImgResponse, responses=a1111.ERROR_RESPONSES)
async def txt2img(body: a1111.Txt2ImgRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Generate images and wait for them (A1111). Seeds of a job with seed s are s, s+1, ... over batch_size x n_iter."""
    spec = await run_in_threadpool(prepare_txt2img, engine, body)
    job = submit(queue, "txt2img", spec)
    await wait_for_job(job)
    if job.result is None:
        raise job_error(job)
    return await run_in_threadpool(_txt2img_response, job)


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    from difusi.samplers import list_samplers

    return [sampler.to_a1111() for sampler in list_samplers()]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    from difusi.samplers import list_schedules

    return [schedule.to_a1111() for schedule in list_schedules()]


@router.get("/sd-models")
def sd_models(engine: EngineDep) -> list[dict[str, Any]]:
    return engine.sd_models()


@router.post("/refresh-checkpoints")
def refresh_checkpoints(engine: EngineDep) -> None:
    engine.refresh()


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


def _empty_list() -> list[Any]:
    return []


for _name in EMPTY_LISTS:
    router.add_api_route(f"/{_name}", _empty_list, methods=["GET"], summary=f"{_name} (none)")


@router.get("/options")
def get_options(engine: EngineDep) -> dict[str, Any]:
    return engine.options()


@router.post("/options", responses=a1111.ERROR_RESPONSES)
async def set_options(body: dict[str, Any], engine: EngineDep, queue: QueueDep) -> None:
    """Set options. `sd_model_checkpoint` loads that model in the worker (after queued jobs) before answering."""
    checkpoint = body.get("sd_model_checkpoint")
    title = await run_in_threadpool(engine.resolve_title, checkpoint) if checkpoint is not None else None
    engine.set_options({key: value for key, value in body.items() if key != "sd_model_checkpoint"})
    if title is not None:
        job = submit(queue, "load_model", title)
        await wait_for_job(job)
        if job.status in (FAILED, CANCELLED):
            raise job_error(job)
    return None


@router.get("/progress", response_model=a1111.ProgressResponse)
def progress(engine: EngineDep, queue: QueueDep, skip_current_image: bool = False) -> dict[str, Any]:
    return progress_body(engine, queue, queue.current, skip_current_image)


@router.post("/interrupt")
def interrupt(queue: QueueDep) -> None:
    job = queue.current
    if job is not None:
        job.interrupt()


@router.post("/skip")
def skip(queue: QueueDep) -> None:
    job = queue.current
    if job is not None:
        job.skip()


@router.post("/png-info", response_model=a1111.PngInfoResponse, responses=a1111.ERROR_RESPONSES)
def png_info(body: a1111.PngInfoRequest) -> dict[str, Any]:
    return _png_info(body.image)


# -- answers ------------------------------------------------------------------------------------------------------
def _txt2img_response(job: Job) -> dict[str, Any]:
    outcome = job.result
    spec: a1111.Txt2ImgJob = job.payload
    images = [png_base64_with_infotext(image.image, image.infotext) for image in outcome.images] if spec.send_images else []
    return {"images": images, "parameters": a1111.echo_parameters(spec), "info": a1111.info_json(outcome.info)}


def progress_body(engine: Any, queue: JobQueue, job: Job | None, skip_image: bool) -> dict[str, Any]:
    """A1111's /progress answer for `job` (the running one); the preview comes from the engine's per-step cache."""
    pending = len(queue.pending())
    if job is None or job.kind != "txt2img":
        state = a1111.ProgressState(queue_pending=pending, job=job.kind if job else "").model_dump()
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    p = job.progress
    state = a1111.ProgressState(
        skipped=job.skipped,
        interrupted=job.interrupted,
        job=f"txt2img {job.id}",
        job_count=p.n_iter,
        job_timestamp=a1111.job_timestamp(job.started),
        job_no=p.iteration,
        sampling_step=p.step,
        sampling_steps=p.steps,
        job_id=job.id,
        queue_pending=pending,
    ).model_dump()
    image = None if skip_image else engine.preview_png_b64(job)
    textinfo = p.textinfo or (f"Sampling step {p.step}/{p.steps}, batch {p.iteration + 1}/{p.n_iter}" if p.steps else "Loading model")
    return {"progress": job.fraction(), "eta_relative": job.eta_seconds(), "state": state, "current_image": image, "textinfo": textinfo}


def _png_info(data: str) -> dict[str, Any]:
    from difusi.infotext import parse_infotext

    image = a1111.decode_image(data, "image")
    items = a1111.png_text_items(image)
    text = items.get("parameters", "")
    if not isinstance(text, str):
        text = str(text)
    parsed: dict[str, Any] = {}
    if text:
        parsed, _unknown = parse_infotext(text)
    return {"info": text, "items": items, "parameters": parsed}

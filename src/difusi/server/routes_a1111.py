"""AUTOMATIC1111's `/sdapi/v1` API: the request and response shapes of A1111's own server (`a1111`).

Handlers stay thin: map and check the request (`a1111`), submit a job to the queue, shape the answer.
The engine and the queue come from `request.app.state` (`EngineDep`, `QueueDep`), never from a closure.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from difusi.batch.xyz import SCRIPT_TITLE, is_xyz_script
from difusi.server import a1111
from difusi.server.queue import CANCELLED, FAILED, Job, JobQueue
from difusi.server.routes_common import (
    EngineDep,
    QueueDep,
    job_error,
    not_implemented,
    png_base64_with_infotext,
    prepare_img2img,
    prepare_txt2img,
    prepare_xyz,
    submit,
    wait_for_job,
)

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

EMPTY_LISTS = ("prompt-styles", "face-restorers",
               "hypernetworks", "realesrgan-models", "script-info", "extensions")
"""A1111 listings difusi has nothing for; clients probe them, so they answer `[]` rather than 404."""

NOT_IMPLEMENTED = {  # A1111 endpoint (modules/api/api.py) -> what it does, for the 501 message
    "interrogate": "POST /sdapi/v1/interrogate (CLIP / DeepDanbooru captions)",
    "create/embedding": "POST /sdapi/v1/create/embedding (textual inversion)",
    "create/hypernetwork": "POST /sdapi/v1/create/hypernetwork",
    "train/embedding": "POST /sdapi/v1/train/embedding (textual inversion training)",
    "train/hypernetwork": "POST /sdapi/v1/train/hypernetwork",
}
"""A1111 actions difusi does not have yet: they answer 501 with a JSON body naming them, not a bare 404, so a
client can tell "this server cannot do that" from "wrong URL"."""


@router.post("/txt2img", response_model=a1111.Txt2ImgResponse, responses=a1111.ERROR_RESPONSES)
async def txt2img(body: a1111.Txt2ImgRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Generate images and wait for them (A1111). Seeds of a job with seed s are s, s+1, ... over batch_size x n_iter.
    With `script_name: "x/y/z plot"` and A1111's `script_args`, an X/Y/Z plot: the grid first, then the cells."""
    xyz = is_xyz_script((body.model_extra or {}).get("script_name"))
    spec = await run_in_threadpool(prepare_xyz if xyz else prepare_txt2img, engine, body)
    job = submit(queue, "xyz" if xyz else "txt2img", spec)
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
    """A1111's script titles, lower-case as A1111 lists them: clients check here before sending `script_name`."""
    return {"txt2img": [SCRIPT_TITLE.lower()], "img2img": []}


def _empty_list() -> list[Any]:
    return []


for _name in EMPTY_LISTS:
    router.add_api_route(f"/{_name}", _empty_list, methods=["GET"], summary=f"{_name} (none)")


def _not_implemented(request: Request) -> None:
    # One handler for all of them, naming the endpoint from the matched route (routes close over nothing).
    name = request.scope["route"].path.removeprefix(f"{router.prefix}/")
    raise not_implemented(NOT_IMPLEMENTED.get(name, f"POST {router.prefix}/{name}"))


for _name in NOT_IMPLEMENTED:
    # Left out of the OpenAPI schema: the schema lists what this server offers, and these are exactly what it does not.
    router.add_api_route(f"/{_name}", _not_implemented, methods=["POST"], status_code=501, include_in_schema=False)


@router.get("/loras")
def loras(engine: EngineDep) -> list[dict[str, Any]]:
    """A1111's LoRA listing (`extensions-builtin/Lora`): name, alias (from the file's metadata), path, metadata."""
    return [file.to_a1111() for file in engine.networks.loras()]


@router.post("/refresh-loras")
def refresh_loras(engine: EngineDep) -> None:
    """Scan the LoRA folders again (files added or removed since the last listing)."""
    engine.networks.refresh()


@router.get("/embeddings")
def embeddings(engine: EngineDep) -> dict[str, dict[str, Any]]:
    """A1111's textual-inversion listing for the loaded model: `loaded` and `skipped` (width does not fit), each
    name -> step, sd_checkpoint, sd_checkpoint_name, shape, vectors."""
    from difusi.networks.embeddings import embeddings_response

    model = engine.loaded_model()
    if model is None:
        return {"loaded": {}, "skipped": {}}
    return embeddings_response(engine.networks.embeddings(model))


@router.post("/refresh-embeddings")
def refresh_embeddings(engine: EngineDep) -> None:
    """Scan the embedding folders again (they are also rescanned before every job)."""
    engine.networks.refresh()


@router.get("/sd-vae")
def sd_vae(engine: EngineDep) -> list[dict[str, Any]]:
    """A1111's VAE listing: `model_name` (what `sd_vae` takes) and `filename` of each VAE file."""
    from difusi.models.vae_files import vae_dict

    return [{"model_name": name, "filename": str(path)} for name, path in vae_dict(engine.networks.vae_files()).items()]


@router.post("/refresh-vae")
def refresh_vae(engine: EngineDep) -> None:
    """Scan the VAE folders again."""
    engine.networks.refresh()


@router.get("/memory")
def memory() -> dict[str, Any]:
    """A1111's memory report: `ram` (this process's RSS as `used`, the machine's total) and `cuda` (torch's
    allocator statistics, or `{"error": "unavailable"}` without a GPU)."""
    return {"ram": _ram(), "cuda": _cuda_memory()}


@router.get("/cmd-flags")
def cmd_flags(engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """The server's settings under A1111's flag names where one exists (`ckpt_dir`, `ckpt`, `data_dir`), plus
    difusi's own. Credentials are never included (A1111 returns its --api-auth string here; difusi does not)."""
    current = engine.current_title()
    path = next((item["filename"] for item in engine.sd_models() if current and item["title"] == current), None)
    return {"api": True, "nowebui": False, "ckpt_dir": str(engine.models_dir), "ckpt": path,
            "data_dir": str(engine.outputs_dir), "device": str(engine.device), "queue_size": queue.max_pending}


@router.post("/unload-checkpoint", responses=a1111.ERROR_RESPONSES)
async def unload_checkpoint(queue: QueueDep) -> dict[str, Any]:
    """Free the model's memory (after the jobs already queued); the next job, or reload-checkpoint, loads it again."""
    await _run_model_job(queue, "unload_model")
    return {}


@router.post("/reload-checkpoint", responses=a1111.ERROR_RESPONSES)
async def reload_checkpoint(queue: QueueDep) -> dict[str, Any]:
    """Load the current checkpoint into memory again (A1111's answer to unload-checkpoint)."""
    await _run_model_job(queue, "reload_model")
    return {}


async def _run_model_job(queue: JobQueue, kind: str) -> None:
    # Only the worker thread touches the model, so these go through the queue like a model switch.
    job = submit(queue, kind, None)
    await wait_for_job(job)
    if job.status in (FAILED, CANCELLED):
        raise job_error(job)


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


@router.post("/img2img", response_model=a1111.Txt2ImgResponse, responses=a1111.ERROR_RESPONSES)
async def img2img(body: a1111.Img2ImgRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Redraw `init_images` (A1111's img2img; with `mask`, inpainting; with `outpaint_pixels`, outpainting) and wait
    for the images. Width and height default to the first picture's size."""
    spec = await run_in_threadpool(prepare_img2img, engine, body)
    job = submit(queue, "img2img", spec)
    await wait_for_job(job)
    if job.result is None:
        raise job_error(job)
    return await run_in_threadpool(_txt2img_response, job)


# -- answers ------------------------------------------------------------------------------------------------------
def _txt2img_response(job: Job) -> dict[str, Any]:
    outcome = job.result
    spec: a1111.Txt2ImgJob = getattr(job.payload, "spec", job.payload)  # an XYZJob wraps its txt2img job
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


def _ram() -> dict[str, Any]:
    """RAM in A1111's shape: `used` = this process's resident memory, `total` = the machine's, `free` = total - used
    (A1111's own arithmetic). psutil when installed, else Linux's /proc; `{"error": ...}` where neither works."""
    try:
        import psutil  # optional: not a difusi dependency
    except ImportError:
        psutil = None
    try:
        if psutil is not None:
            used, total = psutil.Process().memory_info().rss, psutil.virtual_memory().total
        else:
            used, total = _proc_kib("/proc/self/status", "VmRSS") * 1024, _proc_kib("/proc/meminfo", "MemTotal") * 1024
    except (OSError, ValueError) as error:
        import resource  # no /proc (macOS): peak RSS only, and no total
        try:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        except (OSError, ValueError):
            return {"error": str(error)}
        return {"error": f"total memory unknown ({error})", "used": peak * (1 if sys.platform == "darwin" else 1024)}
    return {"free": total - used, "used": used, "total": total}


def _proc_kib(path: str, key: str) -> int:
    with open(path, encoding="ascii") as lines:
        for line in lines:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise ValueError(f"{key} not in {path}")


def _cuda_memory() -> dict[str, Any]:
    import torch

    try:
        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name: str) -> dict[str, int]:
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
                "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
                "inactive": pair("inactive_split_bytes"),
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    except RuntimeError as error:  # a broken driver must not make the memory report a 500
        return {"error": str(error)}


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

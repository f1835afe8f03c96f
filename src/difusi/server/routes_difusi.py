"""difusi's own `/difusi/v1` API: non-blocking jobs, the history, output files and server status.

To add a route, decorate a function with `@router.get("/name")` (the prefix is already `/difusi/v1`)
and take `engine: EngineDep` / `queue: QueueDep` parameters for what it needs; `create_app` includes
this router as a whole, so nothing else has to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import Field

from difusi import __version__
from difusi.server import a1111
from difusi.server.queue import RUNNING, Job, JobQueue
from difusi.server.routes_common import (
    ApiError,
    EngineDep,
    QueueDep,
    error_body,
    job_error,
    png_base64_with_infotext,
    prepare_txt2img,
    prepare_xyz,
    submit,
)

router = APIRouter(prefix="/difusi/v1", tags=["difusi"])

MAX_OFFSET = 10**9
"""Largest history offset accepted: SQLite integers are 64-bit, so a huge offset must be a 422, not a 500."""


@router.post("/jobs", status_code=202, responses=a1111.ERROR_RESPONSES)
async def submit_job(body: a1111.Txt2ImgRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Queue a txt2img job (same body as /sdapi/v1/txt2img) and return its id at once."""
    spec = await run_in_threadpool(prepare_txt2img, engine, body)
    job = submit(queue, "txt2img", spec)
    return job_status(engine, queue, job, images=False, preview=False)


class XYZRequest(a1111.Txt2ImgRequest):
    """Body of `POST /difusi/v1/xyz`: the txt2img body every cell starts from, plus the axes in the CLI's syntax."""

    x: str = Field(description="X axis (columns), TYPE=VALUES, e.g. 'sampler_name=Euler a,DPM++ 2M' or 'steps=10-40 [4]'")
    y: str | None = Field(None, description="Y axis (rows), TYPE=VALUES")
    z: str | None = Field(None, description="Z axis (one grid per value), TYPE=VALUES")


@router.post("/xyz", status_code=202, responses=a1111.ERROR_RESPONSES)
async def submit_xyz(body: XYZRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Queue an X/Y/Z plot and return its job id at once; the finished job's result lists the grid(s) first,
    then every cell (GET /difusi/v1/jobs/{id})."""
    spec = await run_in_threadpool(prepare_xyz, engine, body, (body.x, body.y, body.z))
    job = submit(queue, "xyz", spec)
    return job_status(engine, queue, job, images=False, preview=False)


@router.get("/jobs")
def list_jobs(engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """The running job and the waiting ones, in order."""
    current = queue.current
    return {
        "current": job_status(engine, queue, current, False, False) if current else None,
        "pending": [job_status(engine, queue, job, False, False) for job in queue.pending()],
    }


@router.get("/jobs/{job_id}")
def get_job(job_id: str, engine: EngineDep, queue: QueueDep, images: bool = False, preview: bool = False) -> dict[str, Any]:
    """Status, progress and (when finished) result of a job. `images=true` adds base64 PNGs;
    `preview=true` adds the live preview of a running job."""
    return job_status(engine, queue, _find(queue, job_id), images, preview)


@router.delete("/jobs/{job_id}")
def cancel_job(job_id: str, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Drop a waiting job, or interrupt it if it is running (finished images are kept)."""
    job = queue.cancel(job_id)
    if job is None:
        raise ApiError(404, "NotFound", f"no job with id {job_id!r}", "job_id")
    return job_status(engine, queue, job, False, False)


@router.get("/history")
def history(engine: EngineDep, limit: int = 50, offset: int = 0, query: str | None = None) -> dict[str, Any]:
    """Saved images, newest first, each with its infotext and an `url` under /difusi/v1/outputs/."""
    if not 1 <= limit <= 1000:
        raise ApiError(422, "ParamError", f"limit: must be in [1, 1000], got {limit}", "limit")
    if not 0 <= offset <= MAX_OFFSET:
        raise ApiError(422, "ParamError", f"offset: must be in [0, {MAX_OFFSET}], got {offset}", "offset")
    return {"items": engine.history(limit=limit, offset=offset, query=query)}


@router.get("/outputs/{path:path}")
def output_file(path: str, engine: EngineDep) -> FileResponse:
    """A file from the outputs folder (the gallery's images)."""
    return FileResponse(safe_output_path(engine.outputs_dir, path))


@router.get("/status")
def status(engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    return {"version": __version__, "model": engine.current_title(), "queue_pending": len(queue.pending()),
            "queue_size": queue.max_pending, "busy": queue.current is not None}


# -- helpers -----------------------------------------------------------------------------------------------------------
def _find(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise ApiError(404, "NotFound", f"no job with id {job_id!r} (finished jobs are kept for a while only)", "job_id")
    return job


def safe_output_path(root: Path, relative: str) -> Path:
    """`relative` inside the outputs folder `root`, symlinks and `..` resolved; 404 for anything outside or missing."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise ApiError(404, "NotFound", f"no output file {relative!r}", "path")
    return target


def job_status(engine: Any, queue: JobQueue, job: Job, images: bool, preview: bool) -> dict[str, Any]:
    """The JSON view of one job: state, progress, error, result (and the live preview when asked)."""
    p = job.progress
    status: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "position": queue.position(job),
        "progress": job.fraction(),
        "eta_relative": job.eta_seconds(),
        "step": p.step,
        "steps": p.steps,
        "iteration": p.iteration,
        "n_iter": p.n_iter,
        "images_done": p.images_done,
        "total_images": p.total_images,
        "interrupted": job.interrupted,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "error": None,
        "result": None,
        "preview": None,
    }
    if job.error is not None and job.result is None:
        error = job_error(job)
        status["error"] = error_body(error.error, error.detail, error.field)
    if preview and job.status == RUNNING:
        status["preview"] = engine.preview_png_b64(job)
    if job.kind in ("txt2img", "xyz") and job.result is not None:
        status["result"] = _job_result(job, images)
    return status


def _job_result(job: Job, images: bool) -> dict[str, Any]:
    outcome = job.result
    spec: a1111.Txt2ImgJob = getattr(job.payload, "spec", job.payload)  # an XYZJob wraps its txt2img job
    entries = []
    for image, path in zip(outcome.images, outcome.files, strict=True):
        entry = {"index": image.index, "seed": image.seed, "infotext": image.infotext,
                 "url": f"/difusi/v1/outputs/{path}" if path else None, "path": path}
        if images or path is None:
            entry["image"] = png_base64_with_infotext(image.image, image.infotext)
        entries.append(entry)
    return {"images": entries, "info": outcome.info, "parameters": a1111.echo_parameters(spec)}


@router.get("/fields")
def job_fields(kind: str | None = None) -> dict[str, Any]:
    """The job field table: name, type, default, range, choices, help, CLI flags, infotext key, job kinds and UI
    hints of every field. The web UI builds its form from it, so a field declared once in `difusi.params` appears
    in every front end. `kind=txt2img` keeps the fields of one job kind."""
    from difusi.params import JOB_KINDS, field_table

    if kind is not None and kind not in JOB_KINDS:
        raise ApiError(422, "ParamError", f"kind: must be one of {', '.join(JOB_KINDS)}, got {kind!r}", "kind")
    return {"kinds": list(JOB_KINDS), "fields": field_table(kind)}


@router.get("/rng-sources")
def rng_sources() -> list[str]:
    """A1111's random number generator sources (the `rng` field's choices, `difusi.rng.RNG_SOURCES`): the web UI
    fills the RNG select from this list, as it fills the sampler select from /sdapi/v1/samplers."""
    from difusi.rng import RNG_SOURCES

    return list(RNG_SOURCES)

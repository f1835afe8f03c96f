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
    prepare_img2img,
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


@router.post("/img2img", status_code=202, responses=a1111.ERROR_RESPONSES)
async def submit_img2img(body: a1111.Img2ImgRequest, engine: EngineDep, queue: QueueDep) -> dict[str, Any]:
    """Queue an img2img / inpaint / outpaint job (same body as /sdapi/v1/img2img) and return its id at once; poll
    it at /difusi/v1/jobs/{id}."""
    spec = await run_in_threadpool(prepare_img2img, engine, body)
    job = submit(queue, "img2img", spec)
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
    if job.kind in ("txt2img", "img2img", "xyz") and job.result is not None:
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


@router.get("/backends")
def backends() -> list[str]:
    """The UNet backends (the `backend` field's choices, `difusi.speed.graph.BACKENDS`), for the web UI's select."""
    from difusi.speed.graph import BACKENDS

    return list(BACKENDS)


@router.get("/unet-precisions")
def unet_precisions() -> list[str]:
    """The `unet_precision` shortcut's choices (`difusi.speed.graph.precision.PRECISIONS`), for the web UI's select."""
    from difusi.speed.graph.precision import PRECISIONS

    return list(PRECISIONS)


# -- extra networks: the web UI's LoRA / Textual Inversion cards and the SD VAE choices -------------------------------
PREVIEW_KINDS = ("lora", "embedding")
"""What `GET /difusi/v1/networks/preview/{kind}/{name}` serves thumbnails of."""


@router.get("/networks")
def networks(engine: EngineDep) -> dict[str, Any]:
    """The extra networks the web UI shows as cards, and the SD VAE choices.

    - `loras`: every LoRA / LyCORIS file (`/sdapi/v1/loras`) as name, relative ("sub/name"), alias, hash (A1111's
      short LoRA hash), base_model, preview (thumbnail URL or null) and `prompt_name`: what a card writes into
      `<lora:NAME:1>`. As A1111's default "Alias from file" that is the metadata alias, but only when difusi's
      resolver (`difusi.networks.files.find_lora`: sub/name, then file name, then alias) turns it back into this
      very file; else the file name, else "sub/name".
    - `embeddings`: `loaded` (name, vectors, hash, preview) and `skipped` (name, reason) for the loaded model, as
      `/sdapi/v1/embeddings`; `checked` is true then. Before the first job has loaded a model, every readable file
      is listed in `loaded` with `checked: false` (whether it fits the model is not known yet). Files that cannot be
      read at all are in `skipped` with the reason either way.
    - `vaes`: "Automatic", "None" and the VAE files' names: the choices of the `sd_vae` field.
    """
    from difusi.models.vae_files import AUTOMATIC, NONE

    files = engine.networks.loras()
    return {"loras": [_lora_card(file, files) for file in files], "embeddings": _embedding_cards(engine),
            "vaes": [AUTOMATIC, NONE, *engine.networks.vae_names()]}


@router.get("/networks/preview/{kind}/{name:path}")
def network_preview(kind: str, name: str, engine: EngineDep) -> FileResponse:
    """The thumbnail (`NAME.preview.png`, `NAME.png`, ... next to the file) of a listed LoRA (by "sub/name", its
    `relative`) or embedding (by name). Only names of the listings are looked up, never a path: 404 otherwise."""
    path = None
    if kind == "lora":
        path = next((file.path for file in engine.networks.loras() if file.relative == name), None)
    elif kind == "embedding":
        path = next((item.path for item in _embedding_scan(engine).embeddings if item.name == name), None)
    else:
        raise ApiError(404, "NotFound", f"kind: must be one of {', '.join(PREVIEW_KINDS)}, got {kind!r}", "kind")
    if path is None:
        raise ApiError(404, "NotFound", f"no {kind} named {name!r} in the listing", "name")
    preview = _preview_next_to(path)
    if preview is None:
        raise ApiError(404, "NotFound", f"{kind} {name!r} has no preview image", "name")
    return FileResponse(preview, headers={"Cache-Control": "no-cache"})


def _preview_next_to(path: Path) -> Path | None:
    """A1111's thumbnail of a network file (`ui_extra_networks.find_preview`), as `NetworkFile.preview`."""
    from difusi.networks.files import PREVIEW_SUFFIXES

    stem = Path(path).with_suffix("")
    return next((found for suffix in PREVIEW_SUFFIXES if (found := Path(f"{stem}{suffix}")).is_file()), None)


def _preview_url(kind: str, name: str, path: Path) -> str | None:
    from urllib.parse import quote

    preview = _preview_next_to(path)
    if preview is None:
        return None
    # The file's mtime in the query: a replaced thumbnail is fetched again after a refresh, not taken from the cache.
    return f"/difusi/v1/networks/preview/{kind}/{quote(name)}?t={preview.stat().st_mtime_ns}"


def _lora_card(file: Any, files: list[Any]) -> dict[str, Any]:
    return {"name": file.name, "relative": file.relative, "alias": file.alias, "hash": file.shorthash,
            "base_model": file.base_model, "preview": _preview_url("lora", file.relative, file.path),
            "prompt_name": _prompt_name(file, files)}


def _prompt_name(file: Any, files: list[Any]) -> str:
    """The shortest spelling the resolver maps back to `file`: alias (A1111's default), file name, sub/name."""
    from difusi.errors import NetworkError
    from difusi.networks.files import find_lora

    for candidate in dict.fromkeys((file.alias, file.name)):
        try:
            if find_lora(candidate, files) == file:
                return candidate
        except NetworkError:
            continue
    return file.relative


def _embedding_scan(engine: Any) -> Any:
    from difusi.models.folders import kind_folders
    from difusi.networks.embeddings import scan_embeddings

    return scan_embeddings(kind_folders("embedding", engine.models_dir))


def _embedding_cards(engine: Any) -> dict[str, Any]:
    def card(item: Any) -> dict[str, Any]:
        return {"name": item.name, "vectors": item.vector_count, "hash": item.shorthash,
                "preview": _preview_url("embedding", item.name, item.path)}

    model = engine.loaded_model()
    if model is None:
        scan = _embedding_scan(engine)
        loaded, skipped, failed = list(scan.embeddings), [], scan.failed
    else:
        found = engine.networks.embeddings(model)
        loaded, failed = list(found.loaded.values()), found.failed
        skipped = [{"name": name, "reason": item.reason} for name, item in found.skipped.items()]
    skipped += [{"name": item.name, "reason": item.reason} for item in failed]
    return {"checked": model is not None, "loaded": [card(item) for item in loaded], "skipped": skipped}

"""The FastAPI application: A1111's `/sdapi/v1`, difusi's `/difusi/v1` job API, and the web UI at `/`.

Handlers stay thin: they validate and map the request (`a1111`), submit a job to the queue
(`queue`), and shape the answer. Only the worker thread touches the model (`engine`).

Errors are JSON `{"error": kind, "field": name-or-null, "detail": message}`: 422 for bad input
(malformed JSON, wrong types, out-of-range values, unknown sampler, schedule or model), 404 for an
unknown job or file, 503 when the queue is full, 401 without valid credentials when `--api-auth` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Iterable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from difusi import __version__
from difusi.errors import CheckpointError, NumericalError, ParamError, StorageError
from difusi.server import a1111
from difusi.server.preview import png_base64, preview_image
from difusi.server.queue import CANCELLED, FAILED, RUNNING, Job, JobQueue, QueueFull

STATIC_DIR = Path(__file__).with_name("static")
MAX_OFFSET = 10**9


class ApiError(Exception):
    """An HTTP error with difusi's JSON body."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.field = status, error, detail, field


def create_app(
    engine: Any = None,
    *,
    models_dir: str | Path | None = None,
    outputs_dir: str | Path | None = None,
    checkpoint: str | None = None,
    queue_size: int = 32,
    auth: dict[str, str] | None = None,
    device: str = "cpu",
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """Build the app. `engine` runs jobs (default: `difusi.server.engine.Engine` over the given folders);
    `auth` maps user names to passwords for HTTP basic auth on every route (None = open); `cors_origins`
    lists the browser origins allowed to call the API cross-site (None = no CORS headers at all)."""
    if engine is None:
        from difusi.server.engine import Engine

        engine = Engine(models_dir=models_dir, outputs_dir=outputs_dir, checkpoint=checkpoint, device=device)
    queue = JobQueue(engine.run_job, max_pending=queue_size, keep_finished=32)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        queue.start()
        try:
            yield
        finally:
            await run_in_threadpool(queue.stop)

    local_docs = _swagger_ui_folder()
    app = FastAPI(
        title="difusi",
        version=__version__,
        description="Local Stable Diffusion txt2img: AUTOMATIC1111-compatible `/sdapi/v1` API plus `/difusi/v1` jobs.",
        lifespan=lifespan,
        docs_url=None if local_docs else "/docs",
    )
    app.state.engine = engine
    app.state.queue = queue
    _install_error_handlers(app)
    if auth:
        _install_basic_auth(app, auth)
    if cors_origins:
        # Added after auth so it wraps it: a browser's preflight (OPTIONS, never credentialed) gets its answer,
        # and the real request still needs credentials.
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    _add_a1111_routes(app, engine, queue)
    _add_difusi_routes(app, engine, queue)
    _add_ui_routes(app)
    if local_docs:
        _add_local_docs(app, local_docs)
    return app


# -- errors --------------------------------------------------------------------------------------------------
def _error_body(error: str, detail: str, field: str | None = None) -> dict[str, Any]:
    return {"error": error, "field": field, "detail": detail}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.error, exc.detail, exc.field), status_code=exc.status)

    @app.exception_handler(ParamError)
    async def param_error(_: Request, exc: ParamError) -> JSONResponse:
        return JSONResponse(_error_body("ParamError", str(exc), exc.field), status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(_error_body("QueueFull", str(exc)), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (unknown route 404, wrong method 405, unparsable body 400) get difusi's body too.
        field = "body" if exc.status_code == 400 else None
        try:
            name = HTTPStatus(exc.status_code).phrase.replace(" ", "")  # e.g. "NotFound", "MethodNotAllowed"
        except ValueError:
            name = "HTTPError"
        return JSONResponse(_error_body(name, str(exc.detail), field), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(exc.errors()), status_code=422)


def _validation_body(errors: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """pydantic's error list -> one message naming the first bad field (all of them under `errors`)."""
    errors = list(errors)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        field, detail = "body", f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        field = location[0] if location else "body"
        got = first.get("input")
        detail = f"{'.'.join(location) or 'body'}: {first.get('msg')}" + (f", got {got!r}" if location else "")
    return {
        "error": "ValidationError",
        "field": field,
        "detail": detail,
        "errors": [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")} for e in errors],
    }


def _job_error(job: Job) -> ApiError:
    """Turn a failed job's exception into the HTTP error a synchronous request should have seen."""
    error = job.error
    if isinstance(error, ParamError):
        return ApiError(422, "ParamError", str(error), error.field)
    if isinstance(error, CheckpointError):
        return ApiError(422, type(error).__name__, str(error), "sd_model_checkpoint")
    if isinstance(error, StorageError):  # 507 Insufficient Storage: the request was fine, the disk is not
        return ApiError(507, "StorageError", str(error))
    if isinstance(error, NumericalError):
        return ApiError(500, "NumericalError", str(error), "sd_model_checkpoint")
    if job.status == CANCELLED:
        return ApiError(503, "Cancelled", "the job was cancelled before it started (server shutting down?)")
    return ApiError(500, type(error).__name__ if error else "Error", str(error) or "generation failed")


# -- auth ------------------------------------------------------------------------------------------------------
def parse_auth(text: str | None) -> dict[str, str] | None:
    """`user:pass[,user2:pass2]` (A1111's --api-auth) -> {user: pass}; ValueError on a malformed entry."""
    if not text:
        return None
    users: dict[str, str] = {}
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth entries must look like user:password, got {entry.strip()!r}")
        users[user] = password
    return users


def _install_basic_auth(app: FastAPI, users: dict[str, str]) -> None:
    challenge = {"WWW-Authenticate": 'Basic realm="difusi"'}

    def allowed(header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        expected = users.get(user)
        # compare_digest on equal-type bytes: constant time, so timing does not leak the password
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    @app.middleware("http")
    async def basic_auth(request: Request, call_next):
        if not allowed(request.headers.get("authorization")):
            body = _error_body("Unauthorized", "valid HTTP basic credentials are required (--api-auth)")
            return JSONResponse(body, status_code=401, headers=challenge)
        return await call_next(request)


# -- waiting for jobs without blocking the event loop -------------------------------------------------------------
async def _wait(job: Job) -> None:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake(_: Job) -> None:
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    job.add_done_callback(wake)
    await finished


def _submit(queue: JobQueue, kind: str, payload: Any) -> Job:
    return queue.submit(kind, payload)  # QueueFull -> 503 by the handler above


# -- /sdapi/v1 ----------------------------------------------------------------------------------------------------
def _add_a1111_routes(app: FastAPI, engine: Any, queue: JobQueue) -> None:
    @app.post("/sdapi/v1/txt2img", response_model=a1111.Txt2ImgResponse, tags=["sdapi"], responses=a1111.ERROR_RESPONSES)
    async def txt2img(body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        """Generate images and wait for them (A1111). Seeds of a job with seed s are s, s+1, ... over batch_size x n_iter."""
        spec = await run_in_threadpool(_prepare_txt2img, engine, body)
        job = _submit(queue, "txt2img", spec)
        await _wait(job)
        if job.result is None:
            raise _job_error(job)
        return await run_in_threadpool(_txt2img_response, job)

    @app.get("/sdapi/v1/samplers", tags=["sdapi"])
    def samplers() -> list[dict[str, Any]]:
        from difusi.samplers import list_samplers

        return [sampler.to_a1111() for sampler in list_samplers()]

    @app.get("/sdapi/v1/schedulers", tags=["sdapi"])
    def schedulers() -> list[dict[str, Any]]:
        from difusi.samplers import list_schedules

        return [schedule.to_a1111() for schedule in list_schedules()]

    @app.get("/sdapi/v1/sd-models", tags=["sdapi"])
    def sd_models() -> list[dict[str, Any]]:
        return engine.sd_models()

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
    def refresh_checkpoints() -> None:
        engine.refresh()

    @app.get("/sdapi/v1/scripts", tags=["sdapi"])
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    for empty in ("sd-vae", "upscalers", "latent-upscale-modes", "loras", "prompt-styles", "face-restorers"):
        app.add_api_route(f"/sdapi/v1/{empty}", _empty_list, methods=["GET"], tags=["sdapi"], summary=f"{empty} (none)")

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    def get_options() -> dict[str, Any]:
        return engine.options()

    @app.post("/sdapi/v1/options", tags=["sdapi"], responses=a1111.ERROR_RESPONSES)
    async def set_options(body: dict[str, Any]) -> None:
        """Set options. `sd_model_checkpoint` loads that model in the worker (after queued jobs) before answering."""
        checkpoint = body.get("sd_model_checkpoint")
        title = await run_in_threadpool(engine.resolve_title, checkpoint) if checkpoint is not None else None
        engine.set_options({key: value for key, value in body.items() if key != "sd_model_checkpoint"})
        if title is not None:
            job = _submit(queue, "load_model", title)
            await _wait(job)
            if job.status in (FAILED, CANCELLED):
                raise _job_error(job)
        return None

    @app.get("/sdapi/v1/progress", response_model=a1111.ProgressResponse, tags=["sdapi"])
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return _progress(engine, queue, queue.current, skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    def interrupt() -> None:
        job = queue.current
        if job is not None:
            job.interrupt()

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    def skip() -> None:
        job = queue.current
        if job is not None:
            job.skip()

    @app.post("/sdapi/v1/png-info", response_model=a1111.PngInfoResponse, tags=["sdapi"], responses=a1111.ERROR_RESPONSES)
    def png_info(body: a1111.PngInfoRequest) -> dict[str, Any]:
        return _png_info(body.image)


def _empty_list() -> list[Any]:
    return []


def _prepare_txt2img(engine: Any, body: a1111.Txt2ImgRequest) -> a1111.Txt2ImgJob:
    """Map and check a request before it is queued, so bad input fails fast with 422."""
    spec = a1111.to_txt2img_job(body, engine.param_defaults(), engine.default_save_images())
    if spec.checkpoint is not None:
        spec.checkpoint = engine.resolve_title(spec.checkpoint)
    # The native size is only known once the model is loaded; validate the rest now with a stand-in.
    spec.params.validated(native_size=engine.native_size_hint(spec.checkpoint))
    return spec


def _txt2img_response(job: Job) -> dict[str, Any]:
    outcome = job.result
    spec: a1111.Txt2ImgJob = job.payload
    images = [png_base64_with_text(image.image, image.infotext) for image in outcome.images] if spec.send_images else []
    return {"images": images, "parameters": a1111.echo_parameters(spec), "info": a1111.info_json(outcome.info)}


def png_base64_with_text(image: Any, infotext: str) -> str:
    """Raw base64 PNG carrying `infotext` in its `parameters` text chunk (as the saved file does)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_preview_cache: dict[str, Any] = {"key": None, "image": None}


def _progress(engine: Any, queue: JobQueue, job: Job | None, skip_image: bool) -> dict[str, Any]:
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
    image = None if skip_image else _preview_b64(engine, job)
    textinfo = p.textinfo or (f"Sampling step {p.step}/{p.steps}, batch {p.iteration + 1}/{p.n_iter}" if p.steps else "Loading model")
    return {"progress": job.fraction(), "eta_relative": job.eta_seconds(), "state": state, "current_image": image, "textinfo": textinfo}


def _preview_b64(engine: Any, job: Job) -> str | None:
    latents = job.latents
    if latents is None:
        return None
    key = (job.id, job.progress.iteration, job.progress.step)
    if _preview_cache["key"] != key:  # several pollers share one rendering per step
        _preview_cache["image"] = png_base64(preview_image(latents, engine.loaded_model()))
        _preview_cache["key"] = key
    return _preview_cache["image"]


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


# -- /difusi/v1 -----------------------------------------------------------------------------------------------------
def _add_difusi_routes(app: FastAPI, engine: Any, queue: JobQueue) -> None:
    @app.post("/difusi/v1/jobs", status_code=202, tags=["difusi"], responses=a1111.ERROR_RESPONSES)
    async def submit_job(body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        """Queue a txt2img job (same body as /sdapi/v1/txt2img) and return its id at once."""
        spec = await run_in_threadpool(_prepare_txt2img, engine, body)
        job = _submit(queue, "txt2img", spec)
        return _job_status(engine, queue, job, images=False, preview=False)

    @app.get("/difusi/v1/jobs", tags=["difusi"])
    def list_jobs() -> dict[str, Any]:
        """The running job and the waiting ones, in order."""
        current = queue.current
        return {
            "current": _job_status(engine, queue, current, False, False) if current else None,
            "pending": [_job_status(engine, queue, job, False, False) for job in queue.pending()],
        }

    @app.get("/difusi/v1/jobs/{job_id}", tags=["difusi"])
    def get_job(job_id: str, images: bool = False, preview: bool = False) -> dict[str, Any]:
        """Status, progress and (when finished) result of a job. `images=true` adds base64 PNGs;
        `preview=true` adds the live preview of a running job."""
        return _job_status(engine, queue, _find(queue, job_id), images, preview)

    @app.delete("/difusi/v1/jobs/{job_id}", tags=["difusi"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Drop a waiting job, or interrupt it if it is running (finished images are kept)."""
        job = queue.cancel(job_id)
        if job is None:
            raise ApiError(404, "NotFound", f"no job with id {job_id!r}", "job_id")
        return _job_status(engine, queue, job, False, False)

    @app.get("/difusi/v1/history", tags=["difusi"])
    def history(limit: int = 50, offset: int = 0, query: str | None = None) -> dict[str, Any]:
        """Saved images, newest first, each with its infotext and an `url` under /difusi/v1/outputs/."""
        if not 1 <= limit <= 1000:
            raise ApiError(422, "ParamError", f"limit: must be in [1, 1000], got {limit}", "limit")
        if not 0 <= offset <= MAX_OFFSET:  # SQLite integers are 64-bit: a huge offset must be a 422, not a 500
            raise ApiError(422, "ParamError", f"offset: must be in [0, {MAX_OFFSET}], got {offset}", "offset")
        return {"items": engine.history(limit=limit, offset=offset, query=query)}

    @app.get("/difusi/v1/outputs/{path:path}", tags=["difusi"])
    def output_file(path: str) -> FileResponse:
        """A file from the outputs folder (the gallery's images)."""
        return FileResponse(_safe_output_path(engine.outputs_dir, path))

    @app.get("/difusi/v1/status", tags=["difusi"])
    def status() -> dict[str, Any]:
        return {"version": __version__, "model": engine.current_title(), "queue_pending": len(queue.pending()),
                "queue_size": queue.max_pending, "busy": queue.current is not None}


def _find(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise ApiError(404, "NotFound", f"no job with id {job_id!r} (finished jobs are kept for a while only)", "job_id")
    return job


def _safe_output_path(root: Path, relative: str) -> Path:
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise ApiError(404, "NotFound", f"no output file {relative!r}", "path")
    return target


def _job_status(engine: Any, queue: JobQueue, job: Job, images: bool, preview: bool) -> dict[str, Any]:
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
        error = _job_error(job)
        status["error"] = _error_body(error.error, error.detail, error.field)
    if preview and job.status == RUNNING:
        status["preview"] = _preview_b64(engine, job)
    if job.kind == "txt2img" and job.result is not None:
        status["result"] = _job_result(job, images)
    return status


def _job_result(job: Job, images: bool) -> dict[str, Any]:
    outcome = job.result
    spec: a1111.Txt2ImgJob = job.payload
    entries = []
    for image, path in zip(outcome.images, outcome.files, strict=True):
        entry = {"index": image.index, "seed": image.seed, "infotext": image.infotext,
                 "url": f"/difusi/v1/outputs/{path}" if path else None, "path": path}
        if images or path is None:
            entry["image"] = png_base64_with_text(image.image, image.infotext)
        entries.append(entry)
    return {"images": entries, "info": outcome.info, "parameters": a1111.echo_parameters(spec)}


# -- /docs without a CDN ----------------------------------------------------------------------------------------------
def _swagger_ui_folder() -> Path | None:
    """Swagger UI 5 (OpenAPI 3.1) files shipped by the optional `swagger-ui-py` package, so /docs works
    offline. Only its folder is used, found without importing it. None: FastAPI's default /docs (CDN)."""
    import importlib.util

    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _add_local_docs(app: FastAPI, folder: Path) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=folder), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title="difusi API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


# -- the web UI --------------------------------------------------------------------------------------------------
def _add_ui_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["create_app", "parse_auth", "ApiError"]

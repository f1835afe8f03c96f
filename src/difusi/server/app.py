"""The FastAPI application: A1111's `/sdapi/v1`, difusi's `/difusi/v1` job API, and the web UI at `/`.

`create_app` builds the engine and the job queue, puts them on `app.state`, installs error handlers,
auth and CORS, and includes the routers: `routes_a1111` (/sdapi/v1), `routes_difusi` (/difusi/v1) and
`routes_ui` (/, /static, /docs). Routers read the engine and queue from `request.app.state`
(`routes_common.EngineDep` / `QueueDep`); only the worker thread touches the model (`engine`).

Errors are JSON `{"error": kind, "field": name-or-null, "detail": message}`: 422 for bad input
(malformed JSON, wrong types, out-of-range values, unknown sampler, schedule or model), 404 for an
unknown job or file, 503 when the queue is full, 401 without valid credentials when `--api-auth` is set.
"""

from __future__ import annotations

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
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from difusi import __version__
from difusi.errors import NetworkError, ParamError
from difusi.server import routes_a1111, routes_difusi, routes_extras
from difusi.server.queue import JobQueue, QueueFull
from difusi.server.routes_common import ApiError
from difusi.server.routes_common import error_body as _error_body
from difusi.server.routes_ui import STATIC_DIR, install_ui
from difusi.server.routes_ui import swagger_ui_folder as _swagger_ui_folder  # noqa: F401  (tests import it here)

__all__ = ["create_app", "parse_auth", "ApiError", "STATIC_DIR"]


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

    app = FastAPI(
        title="difusi",
        version=__version__,
        description="Local Stable Diffusion txt2img: AUTOMATIC1111-compatible `/sdapi/v1` API plus `/difusi/v1` jobs.",
        lifespan=lifespan,
        docs_url=None,  # routes_ui serves /docs (offline Swagger UI when swagger-ui-py is installed)
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
    app.include_router(routes_extras.router)  # first: its routes replace routes_a1111's [] / 501 placeholders
    app.include_router(routes_a1111.router)
    app.include_router(routes_difusi.router)
    install_ui(app)
    return app


# -- errors --------------------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.error, exc.detail, exc.field), status_code=exc.status)

    @app.exception_handler(ParamError)
    async def param_error(_: Request, exc: ParamError) -> JSONResponse:
        return JSONResponse(_error_body("ParamError", str(exc), exc.field), status_code=422)

    @app.exception_handler(NetworkError)
    async def network_error(_: Request, exc: NetworkError) -> JSONResponse:
        return JSONResponse(_error_body("NetworkError", str(exc), exc.field), status_code=422)

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

"""The web UI at `/` (one static page + its files under `/static`) and the API docs at `/docs`.

`/docs` serves Swagger UI 5 from the `swagger-ui-py` package's files when it is installed, so the docs
work offline (a local-first tool must not need a CDN); without it the same page loads Swagger UI from
FastAPI's default CDN. Static folders are mounted by `install_ui` rather than on the router: an
`APIRouter` only carries mounts into the app on recent FastAPI releases.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
DOCS_ASSETS = "/docs-assets"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico")
def favicon() -> Response:
    """The tab icon: browsers ask for /favicon.ico whatever the page links, and a 404 there is noise in every log."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon",
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get("/internal/ping")
def ping() -> dict[str, str]:
    """A1111's liveness probe (its UI registers it, modules/ui.py): an empty JSON object once the server answers."""
    return {}


@router.get("/docs")
def docs(request: Request) -> Response:
    """Swagger UI over the app's OpenAPI schema: local files when `install_ui` found them, else the CDN."""
    app = request.app
    if getattr(app.state, "docs_assets", None) is None:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI")
    return get_swagger_ui_html(
        openapi_url=app.openapi_url, title="difusi API", swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css", swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    )


def swagger_ui_folder() -> Path | None:
    """Swagger UI 5 (OpenAPI 3.1) files shipped by the optional `swagger-ui-py` package, so /docs works
    offline. Only its folder is used, found without importing it. None: /docs loads Swagger UI from a CDN."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def install_ui(app: FastAPI) -> None:
    """Add the UI and docs routes to `app` and mount their static folders (create the app with `docs_url=None`)."""
    folder = swagger_ui_folder()
    app.state.docs_assets = folder
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if folder is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=folder), name="docs-assets")

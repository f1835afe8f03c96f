"""Security defaults: loopback bind, --api-auth on every route (UI and static files too), CORS off unless asked
for, and no request can make the server read or write outside its models and outputs folders."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hardening_harness import serve

from loopback import free_port

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "alice", "s3cret:with:colons"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets LISTENing on `port`, from /proc/net/tcp{,6} (state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as handle:
            next(handle)
            for line in handle:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_serve_binds_loopback_only_by_default(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "DIFUSI_CONFIG": str(tmp_path / "none.json"), "DIFUSI_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "difusi", "serve", "--port", str(port), "--models-dir", str(tmp_path / "m"),
         "--outputs-dir", str(tmp_path / "o")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not listening_addresses(port):
            assert process.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.1)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on 0.0.0.0 or ::
    finally:
        process.terminate()
        process.wait(30)


# -- basic auth everywhere ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(bad_files, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("auth-outputs")
    (outputs / "2026-01-01").mkdir()
    (outputs / "2026-01-01" / "00000-1-x.png").write_bytes(b"not really a png")
    with serve(bad_files, outputs_dir=outputs, auth={USER: PASSWORD}) as url:
        yield url


def every_route(url: str) -> list[tuple[str, str]]:
    """(method, path) for every route the app has, from the app itself, plus static files and an unknown path."""
    spec = httpx.get(url + "/openapi.json", auth=(USER, PASSWORD)).json()
    routes = [(method.upper(), path.replace("{job_id}", "x").replace("{path}", "2026-01-01/00000-1-x.png"))
              for path, methods in spec["paths"].items() for method in methods]
    extra = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/style.css"), ("GET", "/static/index.html"),
             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/docs-assets/swagger-ui.css"), ("GET", "/redoc"),
             ("GET", "/no/such/page"), ("OPTIONS", "/sdapi/v1/txt2img")]
    return routes + extra


def test_api_auth_protects_every_route_ui_and_static_files(auth_server):
    routes = every_route(auth_server)
    assert len(routes) >= 30
    with httpx.Client(base_url=auth_server, timeout=60) as http:
        for method, path in routes:
            for auth in (None, (USER, "wrong"), ("mallory", PASSWORD)):
                response = http.request(method, path, auth=auth, json={} if method == "POST" else None)
                assert response.status_code == 401, (method, path, auth, response.status_code)
                assert response.headers["www-authenticate"] == 'Basic realm="difusi"'
                assert response.json()["error"] == "Unauthorized"
            garbled = http.request(method, path, headers={"Authorization": "Basic %%%not-base64"})
            assert garbled.status_code == 401
        # the right credentials open the UI, its files, the docs and the API
        for path in ("/", "/static/app.js", "/openapi.json", "/sdapi/v1/progress", "/difusi/v1/outputs/2026-01-01/00000-1-x.png"):
            assert http.get(path, auth=(USER, PASSWORD)).status_code == 200, path
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert http.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {token}"}).status_code == 200


# -- CORS -----------------------------------------------------------------------------------------------------


def preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options("/sdapi/v1/txt2img", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})


def test_cors_is_off_by_default(http):
    answer = preflight(http, "http://evil.example")
    assert "access-control-allow-origin" not in answer.headers and answer.status_code >= 400
    simple = http.get("/sdapi/v1/progress", headers={"Origin": "http://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_only_for_the_origins_asked_for(bad_files, tmp_path):
    with serve(bad_files, outputs_dir=tmp_path / "o", cors_origins=["http://good.example"], auth={USER: PASSWORD}) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        good = preflight(http, "http://good.example")
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "http://good.example"
        evil = preflight(http, "http://evil.example")
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        # CORS lets the browser read answers; it does not replace the credentials
        assert http.get("/sdapi/v1/progress", headers={"Origin": "http://good.example"}).status_code == 401
        real = http.get("/sdapi/v1/progress", headers={"Origin": "http://good.example"}, auth=(USER, PASSWORD))
        assert real.status_code == 200 and real.headers["access-control-allow-origin"] == "http://good.example"


def test_serve_option_enables_cors():
    from difusi.server import build_parser

    assert build_parser().parse_args([]).cors_allow_origins is None
    assert build_parser().parse_args(["--cors-allow-origins", "http://a,http://b"]).cors_allow_origins == "http://a,http://b"


# -- folders ----------------------------------------------------------------------------------------------------


def test_options_cannot_move_the_outputs_folder(bad_files, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    outputs = tmp_path / "outputs"
    with serve(bad_files, outputs_dir=outputs) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("/sdapi/v1/options", json={"outdir_samples": str(elsewhere),
                                                    "outdir_txt2img_samples": str(elsewhere)}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["outdir_samples"] == str(outputs)
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "where", "steps": 2, "seed": 4}).status_code == 200
        refused = http.post("/sdapi/v1/options", json={"samples_save": "no"})
        assert refused.status_code == 422 and refused.json()["field"] == "samples_save"
    assert not elsewhere.exists()
    assert len(list(outputs.glob("*/*.png"))) == 1


def test_models_listing_never_leaves_the_models_folder(http, bad_files):
    listed = http.get("/sdapi/v1/sd-models").json()
    models_root = bad_files.models.resolve()
    for item in listed:
        path = Path(item["filename"]).resolve()
        assert path.is_relative_to(models_root) or path.name == "difusi-mini.safetensors", item


def test_every_error_is_difusis_json_even_from_the_framework(http):
    unknown = http.get("/no/such/route")
    assert unknown.status_code == 404 and unknown.json() == {"error": "NotFound", "field": None, "detail": "Not Found"}
    wrong = http.delete("/sdapi/v1/txt2img")
    assert wrong.status_code == 405 and wrong.json()["error"] == "MethodNotAllowed"
    unparsable = http.post("/sdapi/v1/options", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert unparsable.status_code in (400, 422) and unparsable.json()["field"] == "body"

"""X/Y/Z plot over HTTP on a real server: A1111's `script_name` / `script_args` on /sdapi/v1/txt2img, and difusi's
queued `POST /difusi/v1/xyz` job."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from difusi.models import default_model_path
from difusi.server.app import create_app
from loopback import LoopbackServer


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server shares 2 cores with the test
    models = tmp_path_factory.mktemp("models")
    outputs = tmp_path_factory.mktemp("outputs")
    app = create_app(models_dir=models, outputs_dir=outputs, checkpoint=str(default_model_path()))
    server = LoopbackServer(app, start_timeout=30)
    try:
        yield server.url
    finally:
        server.ask_to_stop()
        server.stop()
        torch.set_num_threads(threads)


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _script_args(x_type, x_values, y_type=0, y_values="", z_type=0, z_values="", lone=True, sub=False):
    """A1111 1.10's positional list (scripts/xyz_grid.py `Script.run` after `p`)."""
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, [], True, lone, sub, False,
            False, False, False, 0, False]


BASE = {"prompt": "a red circle on a blue background", "seed": 5, "steps": 1, "save_images": True}


def test_a1111_script_args_make_grid_then_cells(url):
    body = {**BASE, "script_name": "x/y/z plot", "script_args": _script_args(9, "Euler a, Euler", 4, "1-2")}
    with httpx.Client(base_url=url, timeout=300) as http:
        answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    info = json.loads(data["info"])
    images = [_png(item) for item in data["images"]]
    assert len(images) == 1 + 4  # the grid first, then the cells (include_lone_images)
    cell = images[1]
    assert images[0].width == cell.width * 3 // 4 + 2 * cell.width and images[0].height > 2 * cell.height
    assert "Script: X/Y/Z plot" in images[0].text["parameters"]
    assert "X Type: Sampler" in images[0].text["parameters"]
    assert [i.text["parameters"].count("Script:") for i in images[1:]] == [0, 0, 0, 0]
    assert "Sampler: Euler a" in images[1].text["parameters"] and "Steps: 2" in images[4].text["parameters"]
    assert "script_name" not in info["ignored_fields"] and "script_args" not in info["ignored_fields"]
    assert info["index_of_first_image"] == 1 and info["infotexts"][0] == images[0].text["parameters"]
    assert info["files"][0].startswith("xyz-grids/")


def test_a1111_without_lone_images_returns_only_the_grid(url):
    body = {**BASE, "script_name": "X/Y/Z Plot", "script_args": _script_args(6, "3,7", lone=False)}
    with httpx.Client(base_url=url, timeout=300) as http:
        answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1


@pytest.mark.parametrize(("args", "needle"), [
    (_script_args(8, "10"), "Prompt order"),  # A1111 axis difusi lacks
    (_script_args(99, "1"), "index 99"),
    (_script_args(4, "0,5"), "'0'"),  # out of range
    (_script_args(7, "dog,cat"), "'dog'"),  # S/R search term not in the prompt
    ("not a list", "positional list"),
])
def test_unsupported_script_args_are_422_naming_script_args(url, args, needle):
    body = {**BASE, "script_name": "x/y/z plot", "script_args": args}
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "script_args" and needle in answer.json()["detail"]


def test_other_scripts_stay_ignored(url):
    body = {**BASE, "script_name": "prompt matrix", "script_args": [1]}
    with httpx.Client(base_url=url, timeout=300) as http:
        answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200
    assert "script_name" in json.loads(answer.json()["info"])["ignored_fields"]


def test_difusi_xyz_job_is_queued_and_lists_grid_then_cells(url):
    body = {**BASE, "x": "cfg_scale=3,7", "y": "Prompt S/R=red,green"}
    with httpx.Client(base_url=url, timeout=300) as http:
        queued = http.post("/difusi/v1/xyz", json=body)
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]
        assert queued.json()["kind"] == "xyz"
        deadline = time.monotonic() + 240
        while True:
            status = http.get(f"/difusi/v1/jobs/{job_id}").json()
            if status["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status["status"] == "done", status
        entries = status["result"]["images"]
        assert len(entries) == 1 + 4 and all(entry["url"] for entry in entries)
        assert "/xyz-grids/" in entries[0]["url"]
        grid = http.get(entries[0]["url"])
        assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
        assert "a green circle" in entries[4]["infotext"]
        bad = http.post("/difusi/v1/xyz", json={**BASE, "x": "steps=0"})
        assert bad.status_code == 422 and bad.json()["field"] == "x"


def test_difusi_xyz_job_can_be_interrupted_between_cells(url):
    body = {**BASE, "steps": 2, "x": "seed=1-40"}
    with httpx.Client(base_url=url, timeout=300) as http:
        job_id = http.post("/difusi/v1/xyz", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"/difusi/v1/jobs/{job_id}").json()["images_done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.delete(f"/difusi/v1/jobs/{job_id}").status_code == 200
        while True:
            status = http.get(f"/difusi/v1/jobs/{job_id}").json()
            if status["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert status["status"] == "interrupted", status
    assert 1 <= status["images_done"] < 40 and status["result"]["info"]["interrupted"] is True

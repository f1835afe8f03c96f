"""What the HTTP API does not do is said, not dropped (issue 19, defects 7 and 8).

- txt2img's `info` lists the request fields that asked for something difusi does not do (`ignored_fields`), and
  the server logs one line; a typical A1111 client body (mostly null/false/0/""/[]/{}) lists none.
- A1111 endpoints difusi lacks answer 501 with difusi's JSON error body naming them; the small endpoints clients
  probe (/internal/ping, memory, cmd-flags, unload/reload-checkpoint) answer in A1111's shapes.
- A queued job reports the batch count and image total it was asked for from the moment it is queued.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_a1111 import A1111_CLIENT_BODY

from difusi.networks.job import NetworkLibrary
from difusi.server import a1111

FAST = {"steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "save_images": False, "seed": 11}


def _info(client, body: dict) -> dict:
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])


def test_full_a1111_client_body_ignores_nothing_it_could_mean():
    assert a1111.ignored_fields(a1111.Txt2ImgRequest.model_validate(A1111_CLIENT_BODY)) == []


def test_honoured_keys_come_from_the_field_table_and_the_request_base():
    from difusi.params import FIELDS, TXT2IMG

    assert {name for name, spec in FIELDS.items() if spec.http and TXT2IMG in spec.kinds} | {"sampler_index", "override_settings",
                                                                   "save_images", "send_images"} == a1111.HONOURED_KEYS


@pytest.mark.parametrize(("sent", "listed"), [
    ({"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent"}, []),  # hires fix is honoured
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors", "hr_cfg": 5}, ["hr_checkpoint_name", "hr_cfg"]),
    ({"enable_hr": False, "hr_checkpoint_name": "other.safetensors"}, []),  # hires settings without hires: no effect
    ({"restore_faces": True, "tiling": True}, ["restore_faces", "tiling"]),
    ({"styles": ["cinematic"], "alwayson_scripts": {"controlnet": {"args": []}}}, ["styles", "alwayson_scripts"]),
    ({"script_name": "prompt matrix", "script_args": [1, 2]}, ["script_name", "script_args"]),
    ({"script_name": "X/Y/Z plot", "script_args": [1, 2]}, []),  # honoured (difusi.batch.xyz)
    ({"script_name": None, "script_args": [1, 2]}, []),
    ({"seed_resize_from_h": -1, "refiner_checkpoint": "None", "override_settings_restore_afterwards": False}, []),
    ({"override_settings": {"sd_vae": "kl-f8.vae.pt", "CLIP_stop_at_last_layers": 2}}, []),  # both honoured
    ({"override_settings": {"sd_hypernetwork": "h", "CLIP_stop_at_last_layers": 2}},
     ["override_settings.sd_hypernetwork"]),
    ({"made_up_key": {"x": 1}, "another": None}, ["made_up_key"]),
])
def test_ignored_fields_lists_only_what_asked_for_something(sent, listed):
    assert a1111.ignored_fields(a1111.Txt2ImgRequest.model_validate({"prompt": "x", **sent})) == listed


def test_txt2img_info_lists_ignored_fields_and_the_server_logs_one_line(client, caplog):
    body = {**FAST, "prompt": "a cat", "restore_faces": True, "styles": ["s"], "tiling": True,
            "alwayson_scripts": {"adetailer": {}}, "script_name": "prompt matrix"}
    with caplog.at_level(logging.WARNING, logger="difusi.server"):
        info = _info(client, body)
    assert info["ignored_fields"] == ["restore_faces", "styles", "tiling", "alwayson_scripts", "script_name"]
    lines = [record.getMessage() for record in caplog.records if record.name == "difusi.server"]
    assert lines == ["txt2img: ignoring request fields difusi does not support yet: restore_faces, "
                     "styles, tiling, alwayson_scripts, script_name"]
    assert _info(client, {**A1111_CLIENT_BODY, **FAST, "override_settings": {}})["ignored_fields"] == []


def test_job_api_result_info_lists_them_too(client):
    from server_helpers import wait_for

    job = client.post("/difusi/v1/jobs", json={**FAST, "prompt": "x", "tiling": True}).json()
    done = wait_for(lambda: (s := client.get(f"/difusi/v1/jobs/{job['id']}").json())["status"] == "done" and s)
    assert done["result"]["info"]["ignored_fields"] == ["tiling"]


def test_prompt_warnings_reach_the_info(client):
    info = _info(client, {**FAST, "prompt": "[red:blue:soon] <hypernet:detail:1>"})
    assert [w.split(" ", 2)[:2] for w in info["warnings"]] == [["prompt:", "removed"], ["prompt:", "'[red:blue:soon]'"]]
    assert info["infotexts"][0].startswith("[red:blue:soon] <hypernet:detail:1>\n")
    assert _info(client, {**FAST, "prompt": "a cat"})["warnings"] == []


@pytest.mark.parametrize("path", ["interrogate", "create/embedding", "train/hypernetwork"])
def test_a1111_endpoints_difusi_lacks_answer_501_naming_them(client, path):
    response = client.post(f"/sdapi/v1/{path}", json={"init_images": [], "image": ""})
    assert response.status_code == 501, response.text
    body = response.json()
    assert body["error"] == "NotImplemented" and body["field"] is None
    assert f"/sdapi/v1/{path}" in body["detail"] and "not implemented" in body["detail"]


def test_probe_endpoints(client):
    assert client.get("/internal/ping").json() == {}
    ram = client.get("/sdapi/v1/memory").json()["ram"]
    assert ram["total"] > ram["used"] > 0 and ram["free"] == ram["total"] - ram["used"]
    assert "cuda" in client.get("/sdapi/v1/memory").json()
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and Path(flags["ckpt_dir"]).is_dir() and Path(flags["ckpt"]).is_file()
    assert "api_auth" not in flags
    assert set(client.get("/sdapi/v1/embeddings").json()) == {"loaded", "skipped"}  # A1111's shape
    for listing in ("hypernetworks", "extensions", "script-info", "realesrgan-models"):
        assert client.get(f"/sdapi/v1/{listing}").json() == []


def test_unload_and_reload_checkpoint(server, client):
    engine = server.app.state.engine
    _info(client, {**FAST, "prompt": "load it"})
    assert engine.loaded_model() is not None
    assert client.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert engine.loaded_model() is None and engine._cache.current is None  # the weights are freed
    assert client.post("/sdapi/v1/reload-checkpoint").json() == {}
    assert engine.loaded_model() is not None and engine.loaded_model().title == engine.current_title()
    assert _info(client, {**FAST, "prompt": "still works"})["all_seeds"] == [11]


# -- defect 8: a queued job reports what it was asked for ----------------------------------------------------------
class _IdleEngine:
    """Enough of an Engine to accept a txt2img request; the worker never starts (TestClient without `with`)."""

    outputs_dir = Path(".")
    networks = NetworkLibrary(None)

    def param_defaults(self) -> dict:
        return {}

    def default_save_images(self) -> bool:
        return False

    def native_size_hint(self, _checkpoint) -> int:
        return 64

    def resolve_title(self, name: str) -> str:
        return name

    def run_job(self, job):  # never called
        raise AssertionError


def test_queued_job_reports_requested_batch_count_and_total():
    from fastapi.testclient import TestClient

    from difusi.server.app import create_app

    client = TestClient(create_app(_IdleEngine()))  # no lifespan: the job stays queued
    job = client.post("/difusi/v1/jobs", json={**FAST, "prompt": "x", "n_iter": 3, "batch_size": 2}).json()
    assert (job["status"], job["n_iter"], job["total_images"], job["images_done"]) == ("queued", 3, 6, 0)
    again = client.get(f"/difusi/v1/jobs/{job['id']}").json()
    assert (again["n_iter"], again["total_images"]) == (3, 6)
    assert client.get("/difusi/v1/jobs").json()["pending"][0]["total_images"] == 6

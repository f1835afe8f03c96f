"""The HTTP API against a real uvicorn server on loopback with a real model (see conftest)."""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from server_helpers import decode_png, sha256_of, wait_for

from difusi.infotext import read_infotext

FAST = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5}
LONG = {"steps": 1000, "width": 64, "height": 64, "sampler_name": "Euler", "n_iter": 3}
"""A job far longer than any test waits for: always interrupted once it has made some progress."""


def txt2img(client: httpx.Client, **body) -> tuple[list, dict]:
    response = client.post("/sdapi/v1/txt2img", json={**FAST, **body})
    assert response.status_code == 200, response.text
    data = response.json()
    return [decode_png(b64) for b64 in data["images"]], json.loads(data["info"])


@contextmanager
def long_job(client: httpx.Client, **body):
    """Submit LONG through /difusi/v1/jobs, wait until it samples, and always stop it afterwards."""
    job = client.post("/difusi/v1/jobs", json={**LONG, **body}).json()
    try:
        wait_for(lambda: client.get(f"/difusi/v1/jobs/{job['id']}").json()["step"] >= 2)
        yield job
    finally:
        client.delete(f"/difusi/v1/jobs/{job['id']}")
        wait_for(lambda: client.get(f"/difusi/v1/jobs/{job['id']}").json()["status"] != "running")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- txt2img --------------------------------------------------------------------------------------------------


def test_txt2img_seeds_images_infotext_and_saved_files(server, client):
    images, info = txt2img(client, prompt="a red circle", seed=1000, batch_size=2, n_iter=2, sampler_name="Euler a")
    assert len(images) == 4
    assert info["seed"] == 1000 and info["all_seeds"] == [1000, 1001, 1002, 1003]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["width"] == 64 and info["height"] == 64
    assert info["batch_size"] == 2 and info["n_iter"] == 2 and info["prompt"] == "a red circle"
    assert len(info["infotexts"]) == 4
    for image, seed, infotext in zip(images, info["all_seeds"], info["infotexts"], strict=True):
        assert image.size == (64, 64)
        assert image.info["parameters"] == infotext  # the PNG carries its own infotext
        assert f"Seed: {seed}," in infotext and "Sampler: Euler a" in infotext
    # saved exactly like the CLI: files in the outputs folder with the same infotext, rows in history
    history = client.get("/difusi/v1/history", params={"limit": 4}).json()["items"]
    assert sorted(item["seed"] for item in history) == [1000, 1001, 1002, 1003]
    for item in history:
        assert read_infotext(server.outputs / item["path"]) == item["infotext"]


def test_image_does_not_depend_on_its_batch(client):
    """docs/ARCHITECTURE.md contract 2 through the API: image 3 of a batched job equals a job of one image at seed s+3."""
    batched, _ = txt2img(client, seed=77, batch_size=2, n_iter=2, save_images=False)
    alone, info = txt2img(client, seed=80, save_images=False)
    assert info["all_seeds"] == [80]
    assert np.abs(pixels(batched[3]) - pixels(alone[0])).max() <= 1


def test_random_seed_is_resolved_and_reported(client):
    _, info = txt2img(client, seed=-1, batch_size=2, save_images=False)
    seed = info["seed"]
    assert 0 <= seed < 2**32 - 1 and info["all_seeds"] == [seed, seed + 1]


def test_save_images_false_adds_nothing_to_history(client):
    before = client.get("/difusi/v1/history", params={"limit": 1000}).json()["items"]
    images, _ = txt2img(client, seed=5, save_images=False)
    after = client.get("/difusi/v1/history", params={"limit": 1000}).json()["items"]
    assert len(images) == 1 and len(after) == len(before)


def test_send_images_false_returns_info_only(client):
    response = client.post("/sdapi/v1/txt2img", json={**FAST, "seed": 6, "send_images": False, "save_images": False})
    assert response.status_code == 200
    assert response.json()["images"] == [] and json.loads(response.json()["info"])["all_seeds"] == [6]


def test_a1111_client_body_with_nulls_and_unknown_keys(client):
    body = {**FAST, "seed": 9, "styles": [], "restore_faces": None, "enable_hr": False, "hr_scale": 2,
            "alwayson_scripts": {}, "eta": None, "s_noise": None, "script_args": [], "sampler_index": "Euler",
            "do_not_save_samples": False, "save_images": False, "made_up_key": {"x": 1}}
    images, info = txt2img(client, **body)
    assert len(images) == 1 and info["all_seeds"] == [9]


# -- listings and options ------------------------------------------------------------------------------------------


def test_samplers_schedulers_scripts(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= names
    assert all({"name", "aliases", "options"} <= set(s) for s in samplers)
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"Automatic", "Karras"} <= {s["label"] for s in schedulers}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot"], "img2img": []}


def test_sd_models_lists_both_checkpoints_with_their_hashes(client, models):
    listed = {m["filename"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    for path in (models.default, models.other):
        entry = next(m for f, m in listed.items() if f.endswith(path.name))
        sha = sha256_of(path)
        assert entry["sha256"] == sha and entry["hash"] == sha[:10]
        assert entry["title"] == f"{entry['model_name']} [{sha[:10]}]"


def test_switching_the_model_through_options(client, models):
    other_hash = sha256_of(models.other)[:10]
    default_hash = sha256_of(models.default)[:10]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].endswith(f"[{default_hash}]")
    try:
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models.other.stem})
        assert response.status_code == 200, response.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == f"{models.other.stem} [{other_hash}]"
        _, info = txt2img(client, seed=1, save_images=False)
        assert info["sd_model_hash"] == other_hash and f"Model hash: {other_hash}" in info["infotexts"][0]
        # a per-request override wins for that job only (A1111's override_settings)
        _, info = txt2img(client, seed=1, save_images=False, override_settings={"sd_model_checkpoint": default_hash})
        assert info["sd_model_hash"] == default_hash
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": default_hash})
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].endswith(f"[{default_hash}]")


def test_common_options_become_job_defaults(client):
    try:
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_save": False}).status_code == 200
        options = client.get("/sdapi/v1/options").json()
        assert options["CLIP_stop_at_last_layers"] == 2 and options["samples_save"] is False
        before = len(client.get("/difusi/v1/history", params={"limit": 1000}).json()["items"])
        _, info = txt2img(client, seed=8)
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        assert len(client.get("/difusi/v1/history", params={"limit": 1000}).json()["items"]) == before
        bad = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
        assert bad.status_code == 422 and bad.json()["field"] == "CLIP_stop_at_last_layers"
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "samples_save": True})


# -- progress, interrupt, skip ---------------------------------------------------------------------------------------


def test_idle_progress_is_zero(client):
    wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0)
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_progress_and_preview_while_running_then_interrupt(client):
    with long_job(client, seed=3) as job:
        progress = wait_for(lambda: (p := client.get("/sdapi/v1/progress").json())["current_image"] and p)
        state = progress["state"]
        assert 0 < progress["progress"] < 1 and state["job_count"] == 3 and state["sampling_steps"] == 1000
        assert state["sampling_step"] >= 2 and state["job_id"] == job["id"]
        preview = decode_png(progress["current_image"])
        assert preview.size[0] >= 64 and preview.mode == "RGB"
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        status = wait_for(lambda: (s := client.get(f"/difusi/v1/jobs/{job['id']}").json())["status"] != "running" and s)
    assert status["status"] == "interrupted" and status["step"] < 1000
    assert status["result"]["images"] == [] and status["result"]["info"]["interrupted"] is True


def test_blocking_txt2img_returns_finished_images_when_interrupted(client):
    """A1111 answers an interrupted txt2img with 200 and the images finished so far."""
    result = {}

    def run():
        result["response"] = client.post("/sdapi/v1/txt2img", json={**FAST, "steps": 10, "n_iter": 50, "seed": 500,
                                                                     "save_images": False})

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_no"] >= 1)
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    response = result["response"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    done = len(response.json()["images"])
    assert 1 <= done < 50 and info["interrupted"] is True
    assert [json.loads(response.json()["info"])["all_seeds"][i] for i in range(done)] == list(range(500, 500 + done))


def test_skip_abandons_only_the_current_batch(client):
    job = client.post("/difusi/v1/jobs", json={**FAST, "steps": 100, "n_iter": 2, "seed": 40, "save_images": False}).json()
    wait_for(lambda: client.get(f"/difusi/v1/jobs/{job['id']}").json()["step"] >= 2)
    assert client.post("/sdapi/v1/skip").status_code == 200
    status = wait_for(lambda: (s := client.get(f"/difusi/v1/jobs/{job['id']}").json())["status"] not in ("queued", "running") and s)
    assert status["status"] == "done"
    assert [image["seed"] for image in status["result"]["images"]] == [41]  # batch 1 (seed 40) was skipped
    assert status["result"]["info"]["all_seeds"] == [40, 41]


# -- jobs, history, files ------------------------------------------------------------------------------------------------


def test_job_api_returns_id_at_once_and_result_by_id(client):
    response = client.post("/difusi/v1/jobs", json={**FAST, "seed": 321, "batch_size": 2})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] in ("queued", "running") and len(job["id"]) == 32
    status = wait_for(lambda: (s := client.get(f"/difusi/v1/jobs/{job['id']}").json())["status"] == "done" and s)
    assert status["progress"] == 1 and status["result"]["info"]["all_seeds"] == [321, 322]
    for entry in status["result"]["images"]:
        fetched = client.get(entry["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert f"Seed: {entry['seed']}," in decode_png(base64.b64encode(fetched.content).decode()).info["parameters"]
    with_images = client.get(f"/difusi/v1/jobs/{job['id']}", params={"images": True}).json()
    assert all(decode_png(e["image"]).size == (64, 64) for e in with_images["result"]["images"])
    assert client.get("/difusi/v1/jobs/" + "0" * 32).status_code == 404


def test_outputs_route_refuses_paths_outside_the_folder(client):
    for path in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "history.sqlite3/../../x"):
        response = client.get(f"/difusi/v1/outputs/{path}")
        assert response.status_code == 404


def test_png_info_round_trip(client):
    images, info = txt2img(client, prompt="a blue square", negative_prompt="blur", seed=4242, save_images=False)
    buffer = __import__("io").BytesIO()
    images[0].save(buffer, format="PNG", pnginfo=_text_chunk(images[0].info["parameters"]))
    raw = base64.b64encode(buffer.getvalue()).decode()
    for body in ({"image": raw}, {"image": "data:image/png;base64," + raw}):
        data = client.post("/sdapi/v1/png-info", json=body).json()
        assert data["info"] == info["infotexts"][0]
        assert data["items"]["parameters"] == info["infotexts"][0]
        params = data["parameters"]
        assert (params["Prompt"], params["Negative prompt"], params["Seed"]) == ("a blue square", "blur", "4242")
        assert (params["Steps"], params["Sampler"], params["Size-1"], params["Size-2"]) == ("3", "Euler", "64", "64")


def _text_chunk(text):
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text("parameters", text)
    return chunk


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/difusi/v1/jobs/{job_id}"} <= set(paths)


# -- bad input ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": "many"}, "steps"),
        ({"steps": 0}, "steps"),
        ({"cfg_scale": 1000}, "cfg_scale"),
        ({"width": 65}, "width"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -5}, "seed"),
        ({"prompt": ["not", "text"]}, "prompt"),
        ({"sampler_name": "No Such Sampler"}, "sampler_name"),
        ({"scheduler": "wobbly"}, "scheduler"),
        ({"override_settings": {"sd_model_checkpoint": "no-such-model"}}, "sd_model_checkpoint"),
    ],
)
def test_bad_txt2img_input_is_422_naming_the_field(client, body, field):
    for path in ("/sdapi/v1/txt2img", "/difusi/v1/jobs"):
        response = client.post(path, json={**FAST, **body})
        assert response.status_code == 422, response.text
        data = response.json()
        assert data["field"] == field and data["detail"] and data["error"]


def test_malformed_json_and_wrong_shapes(client):
    for content in (b"{not json", b'{"steps": 3,}', b"[1, 2]", b'"text"'):
        response = client.post("/sdapi/v1/txt2img", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and response.json()["field"] == "body", response.text
    response = client.post("/sdapi/v1/png-info", json={"image": "definitely not an image"})
    assert response.status_code == 422 and response.json()["field"] == "image"
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert response.status_code == 422 and response.json()["field"] == "sd_model_checkpoint"
    images, _ = txt2img(client, seed=1, save_images=False)  # and the server keeps serving
    assert len(images) == 1


# -- concurrency, queue bound, auth -------------------------------------------------------------------------------------


def test_ten_concurrent_clients_all_get_their_own_seeds(server, client):
    results: dict[int, httpx.Response] = {}

    def one(index: int) -> None:
        with server.client() as own:
            results[index] = own.post("/sdapi/v1/txt2img", json={**FAST, "seed": 10_000 + 100 * index,
                                                                  "batch_size": 1 + index % 2, "save_images": False})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(results) == list(range(10))
    firsts = {}
    for index, response in results.items():
        assert response.status_code == 200
        info = json.loads(response.json()["info"])
        seed = 10_000 + 100 * index
        assert info["all_seeds"] == [seed + i for i in range(1 + index % 2)]
        images = [decode_png(b64) for b64 in response.json()["images"]]
        assert all(f"Seed: {s}," in image.info["parameters"] for s, image in zip(info["all_seeds"], images, strict=True))
        firsts[index] = images[0]
    # the right images: each equals the same seed generated alone, afterwards
    for index in (0, 7):
        alone, _ = txt2img(client, seed=10_000 + 100 * index, save_images=False)
        assert np.abs(pixels(alone[0]) - pixels(firsts[index])).max() <= 1


def test_full_queue_answers_503_and_recovers(start_server):
    small = start_server(queue_size=1)
    with small.client() as client, long_job(client, seed=1):
        waiting = client.post("/difusi/v1/jobs", json={**FAST, "seed": 2, "save_images": False})
        assert waiting.status_code == 202
        full = client.post("/sdapi/v1/txt2img", json={**FAST, "seed": 3})
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
    with small.client() as client:
        status = wait_for(lambda: (s := client.get(f"/difusi/v1/jobs/{waiting.json()['id']}").json())["status"] == "done" and s)
        assert status["result"]["info"]["all_seeds"] == [2]


def test_basic_auth(start_server):
    secured = start_server(auth={"alice": "s3cret", "bob": "pw:with:colons"})
    with secured.client() as anonymous:
        for path in ("/sdapi/v1/samplers", "/", "/difusi/v1/history", "/sdapi/v1/progress"):
            response = anonymous.get(path)
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    with secured.client(auth=("alice", "wrong")) as wrong:
        assert wrong.get("/sdapi/v1/samplers").status_code == 401
    for user, password in (("alice", "s3cret"), ("bob", "pw:with:colons")):
        with secured.client(auth=(user, password)) as good:
            assert good.get("/sdapi/v1/samplers").status_code == 200
            assert good.get("/").status_code == 200
            images, info = txt2img(good, seed=12, save_images=False)
            assert info["all_seeds"] == [12]


def test_no_auth_by_default(client):
    assert client.get("/sdapi/v1/samplers").status_code == 200
    assert "www-authenticate" not in client.get("/").headers


def test_broken_checkpoint_is_a_clear_error_and_the_server_keeps_serving(start_server, models, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    broken = start_server(models_dir=folder)
    with broken.client() as client:
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert any(t.startswith("broken [") for t in titles)
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
        assert response.status_code == 422 and response.json()["field"] == "sd_model_checkpoint"
        assert "broken" in response.json()["detail"]
        response = client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": "broken"}})
        assert response.status_code == 422 and response.json()["field"] == "sd_model_checkpoint"
        images, info = txt2img(client, seed=3, save_images=False)  # the default model still works
        assert info["all_seeds"] == [3] and len(images) == 1

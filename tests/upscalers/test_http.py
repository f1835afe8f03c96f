"""The Extras endpoints on a real server on loopback (tests/loopback.py), over a models folder of test upscalers."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from difusi.server.app import create_app
from loopback import LoopbackServer

INFOTEXT = "a dog\nSteps: 4, Sampler: Euler, Seed: 7, Size: 24x16, Version: difusi 1"


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    app = create_app(models_dir=models, outputs_dir=tmp_path_factory.mktemp("outputs"))
    server = LoopbackServer(app, start_timeout=30)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
    server.stop()


def _png(width=24, height=16, infotext=INFOTEXT) -> str:
    info = PngInfo()
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_listings(client):
    names = [item["name"] for item in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "RealESRGAN_x4plus" in names
    assert "not-an-upscaler" not in names
    modes = client.get("/sdapi/v1/latent-upscale-modes").json()
    assert modes[0] == {"name": "Latent"} and {"name": "Latent (nearest-exact)"} in modes


def test_single_image_with_a_model(client):
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": "data:image/png;base64," + _png(), "upscaling_resize": 2, "upscaler_1": "RealESRGAN_x4plus",
        "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5, "gfpgan_visibility": 0.3, "whatever": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    image = _image(body["image"])
    assert image.size == (48, 32)
    text = "Postprocess upscale by: 2, Postprocess upscaler: RealESRGAN_x4plus, Postprocess upscaler 2: Lanczos"
    assert image.text["parameters"] == INFOTEXT and image.text["postprocessing"] == text
    assert body["html_info"] == f"<p>{text}</p>"
    assert json.loads(body["info"])["ignored_fields"] == ["gfpgan_visibility"]


def test_batch_scale_to(client):
    response = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": _png(), "name": "a.png"}, {"data": _png(30, 30), "name": "b.png"}],
        "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 40, "upscaler_1": "Nearest"})
    assert response.status_code == 200, response.text
    sizes = [_image(data).size for data in response.json()["images"]]
    assert sizes == [(64, 40), (64, 40)]


@pytest.mark.parametrize(("body", "field"), [
    ({"image": _png(), "upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
    ({"image": _png(), "upscaler_1": "not-an-upscaler"}, "upscaler_1"),
    ({"image": _png(), "upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize"),
    ({"image": "bm90IGFuIGltYWdl", "upscaler_1": "Lanczos"}, "image"),
    ({"image": _png(), "upscaler_1": "Lanczos", "upscaling_resize": "2"}, "upscaling_resize"),
    ({"image": _png(), "upscaler_1": "/etc/passwd"}, "upscaler_1"),
])
def test_errors_are_422_naming_the_field(client, body, field):
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field

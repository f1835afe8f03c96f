"""LoRA tags, VAE choices and A1111's network listings through a real server: A1111 shapes, 422 JSON naming the field
for bad input, and the jobs' infotext."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from tests.networks.lora_builders import kohya_file

from difusi.models import load_model


@pytest.fixture(scope="module")
def lora_folder(models):
    folder = models.folder / "Lora"
    folder.mkdir(exist_ok=True)
    state = kohya_file(load_model(models.default), "sd1", ldm_names=False, seed=7)
    save_file(state, folder / "ink.safetensors",
              metadata={"ss_output_name": "InkStyle", "ss_network_dim": "4"})
    good = (folder / "ink.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(good[: len(good) // 3])
    return folder


def _txt2img(client, prompt, **fields):
    body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 3, "save_images": False, **fields}
    return client.post("/sdapi/v1/txt2img", json=body)


def test_loras_are_listed_in_a1111s_shape(client, lora_folder):
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    listed = {item["name"]: item for item in client.get("/sdapi/v1/loras").json()}
    ink = listed["ink"]
    assert ink["alias"] == "InkStyle" and ink["path"].endswith("ink.safetensors")
    assert ink["metadata"]["ss_network_dim"] == "4"


def test_a_lora_tag_changes_the_image_and_is_hashed_in_the_infotext(client, lora_folder):
    plain = _txt2img(client, "a red circle").json()
    tagged = _txt2img(client, "a red circle <lora:InkStyle:0.9>").json()
    assert tagged["images"][0] != plain["images"][0]
    infotext = json.loads(tagged["info"])["infotexts"][0]
    assert infotext.startswith("a red circle <lora:InkStyle:0.9>\n")
    assert 'Lora hashes: "InkStyle: ' in infotext
    again = _txt2img(client, "a red circle").json()  # the next job runs on the checkpoint's own weights
    assert again["images"][0] == plain["images"][0]


@pytest.mark.parametrize(("prompt", "words"), [
    ("a cat <lora:nope:1>", "no such LoRA"),
    ("a cat <lora:ink:lots>", "must be a number"),
    ("a cat <lora:cut:1>", "cannot be used"),
])
def test_bad_loras_are_422_json_naming_the_prompt(client, lora_folder, prompt, words):
    response = _txt2img(client, prompt)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "prompt" and words in body["detail"]


def test_vae_choice_reaches_the_job_and_unknown_or_path_vaes_are_refused(client, models):
    from tests.server.conftest import VAE_FILE

    listed = client.get("/sdapi/v1/sd-vae").json()
    assert {"model_name": VAE_FILE, "filename": str(models.folder / "VAE" / VAE_FILE)} in listed
    default = _txt2img(client, "a red circle").json()
    assert "VAE hash" not in json.loads(default["info"])["infotexts"][0]
    for how in ({"sd_vae": VAE_FILE}, {"override_settings": {"sd_vae": VAE_FILE}}):
        reply = _txt2img(client, "a red circle", **how).json()
        infotext = json.loads(reply["info"])["infotexts"][0]
        assert f"VAE: {VAE_FILE}" in infotext and "VAE hash: " in infotext
        assert reply["images"][0] != default["images"][0]
    for bad in ("no-such-vae.pt", str(models.default)):  # a path is not a listed VAE: never loaded from a request
        response = _txt2img(client, "a red circle", sd_vae=bad)
        assert response.status_code == 422 and response.json()["field"] == "sd_vae", response.text
    assert _txt2img(client, "a red circle", sd_vae="None").json()["images"][0] == default["images"][0]


def test_embeddings_are_listed_triggered_and_hashed(client, models):
    import torch

    model = load_model(models.default)
    width = model.text_encoders[0].model.get_input_embeddings().weight.shape[1]
    folder = models.folder / "embeddings"
    folder.mkdir(exist_ok=True)
    plain = _txt2img(client, "a zorbo circle", negative_prompt="blurry").json()  # "zorbo" is a word here
    generator = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, width, generator=generator)}, folder / "zorbo.safetensors")
    save_file({"emb_params": torch.randn(1, width + 8, generator=generator)}, folder / "too-wide.safetensors")
    try:
        _check_embedding_jobs(client, plain, width)
    finally:  # the session server's folder goes back to having no embeddings
        for name in ("zorbo", "too-wide"):
            (folder / f"{name}.safetensors").unlink()


def _check_embedding_jobs(client, plain, width):
    reply = _txt2img(client, "a zorbo circle", negative_prompt="blurry").json()  # ... and now an embedding
    assert reply["images"][0] != plain["images"][0]
    listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"]["zorbo"]["vectors"] == 2 and listing["loaded"]["zorbo"]["shape"] == width
    assert "too-wide" in listing["skipped"]
    infotext = json.loads(reply["info"])["infotexts"][0]
    assert 'TI hashes: "zorbo: ' in infotext
    negative = _txt2img(client, "a red circle", negative_prompt="zorbo").json()
    assert 'TI hashes: "zorbo: ' in json.loads(negative["info"])["infotexts"][0]

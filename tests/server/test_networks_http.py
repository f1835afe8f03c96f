"""`GET /difusi/v1/networks` and its thumbnails: what the web UI's extra-networks cards are built from.

A server of its own on a models folder of its own (`networks_folder`): a real LoRA for the default model with a
thumbnail, a second one in a sub-folder, embeddings (one that fits, one too wide, one unreadable) and the session
folder's VAE. The session server's folder stays as the other tests expect it (no embeddings, no LoRA).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

LORA = "tiny_style"
"""File name of the LoRA with a thumbnail; its metadata alias is `LORA_ALIAS`."""
LORA_ALIAS = "inkwash"
PLAIN = "sub/plain"
"""A second LoRA, in a sub-folder, no alias, no thumbnail."""
EMBEDDING = "tinyemb"
"""An embedding that fits the default model, with a thumbnail."""
WIDE = "wideemb"
"""An embedding one feature wider than the model's tokens: listed, then skipped once a model is loaded."""
BROKEN = "brokenemb"
"""Not an embedding at all: skipped with its reason."""
FAST = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 3}


def _thumbnail(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (32, 32), colour).save(path)


def write_lora(path: Path, checkpoint: Path, *, alias: str | None = None, rank: int = 2, seed: int = 0) -> None:
    """A kohya LoRA (`lora_unet_...` and `lora_te_...` down / up / alpha) for a few linear layers of `checkpoint`."""
    from difusi.models import load_model
    from difusi.networks.keys import module_index

    generator = torch.Generator().manual_seed(seed)
    index = module_index(load_model(checkpoint))
    names = [name for name, target in index.items() if name.startswith(("lora_unet_", "lora_te_"))
             and "attn" in name and isinstance(target.module, torch.nn.Linear)]
    state = {}
    for name in names[:4] + [name for name in names if name.startswith("lora_te_")][:2]:
        module = index[name].module
        state[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_output_name": alias} if alias else None)


def _token_width(checkpoint: Path) -> int:
    from difusi.models import load_model

    return int(load_model(checkpoint).text_encoders[0].model.get_input_embeddings().weight.shape[1])


@pytest.fixture(scope="module")
def networks_folder(models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("networks-models")
    write_lora(folder / "Lora" / f"{LORA}.safetensors", models.default, alias=LORA_ALIAS)
    _thumbnail(folder / "Lora" / f"{LORA}.preview.png", (200, 30, 30))
    write_lora(folder / "Lora" / f"{PLAIN}.safetensors", models.default, seed=1)
    width = _token_width(models.default)
    embeddings = folder / "embeddings"
    embeddings.mkdir()
    save_file({"emb_params": torch.randn(2, width)}, str(embeddings / f"{EMBEDDING}.safetensors"))
    _thumbnail(embeddings / f"{EMBEDDING}.png", (30, 30, 200))
    save_file({"emb_params": torch.randn(1, width + 1)}, str(embeddings / f"{WIDE}.safetensors"))
    (embeddings / f"{BROKEN}.pt").write_bytes(b"not a pickle")
    shutil.copytree(models.folder / "VAE", folder / "VAE")  # the session folder's VAE (conftest.VAE_FILE)
    return folder


@pytest.fixture(scope="module")
def networks_server(start_server, networks_folder):
    return start_server(models_dir=networks_folder)


@pytest.fixture()
def http(networks_server):
    with networks_server.client() as client:
        yield client


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def test_listing_before_any_model_is_loaded(networks_server, networks_folder, http):
    assert networks_server.app.state.engine.loaded_model() is None
    body = http.get("/difusi/v1/networks").json()
    assert set(body) == {"loras", "embeddings", "vaes"}
    loras = _by_name(body["loras"])
    assert set(loras) == {LORA, "plain", "difusi-mini-pink"}  # the shipped LoRA of difusi-mini is always listed
    assert set(loras[LORA]) == {"name", "relative", "alias", "hash", "base_model", "preview", "prompt_name"}
    a1111 = {item["name"]: item for item in http.get("/sdapi/v1/loras").json()}
    assert loras[LORA]["alias"] == a1111[LORA]["alias"] == LORA_ALIAS
    assert loras[LORA]["prompt_name"] == LORA_ALIAS  # A1111's default "Alias from file": unique, so usable
    assert loras["plain"]["relative"] == PLAIN and loras["plain"]["prompt_name"] == "plain"
    assert loras["plain"]["preview"] is None and loras[LORA]["preview"].startswith(f"/difusi/v1/networks/preview/lora/{LORA}?")
    assert len(loras[LORA]["hash"]) == 12 and loras[LORA]["hash"] != loras["plain"]["hash"]
    embeddings = body["embeddings"]
    assert embeddings["checked"] is False  # no model yet: every readable file listed, fit unknown
    assert set(_by_name(embeddings["loaded"])) == {EMBEDDING, WIDE}
    assert _by_name(embeddings["loaded"])[EMBEDDING]["vectors"] == 2
    assert _by_name(embeddings["loaded"])[EMBEDDING]["preview"].startswith(
        f"/difusi/v1/networks/preview/embedding/{EMBEDDING}?")
    assert [item["name"] for item in embeddings["skipped"]] == [BROKEN] and embeddings["skipped"][0]["reason"]
    vae_file = next((networks_folder / "VAE").iterdir()).name
    assert body["vaes"][:2] == ["Automatic", "None"] and vae_file in body["vaes"]
    assert body["vaes"][2:] == [item["model_name"] for item in http.get("/sdapi/v1/sd-vae").json()]


def test_embeddings_are_split_for_the_loaded_model(http):
    assert http.post("/sdapi/v1/txt2img", json={**FAST, "prompt": f"a cat {EMBEDDING}"}).status_code == 200
    embeddings = http.get("/difusi/v1/networks").json()["embeddings"]
    assert embeddings["checked"] is True
    assert [item["name"] for item in embeddings["loaded"]] == [EMBEDDING]
    assert {item["name"] for item in embeddings["skipped"]} == {WIDE, BROKEN}
    a1111 = http.get("/sdapi/v1/embeddings").json()
    assert set(a1111["loaded"]) == {EMBEDDING} and set(a1111["skipped"]) == {WIDE}


def test_preview_is_served_for_listed_files(http, networks_folder):
    body = http.get("/difusi/v1/networks").json()
    lora = _by_name(body["loras"])[LORA]
    response = http.get(lora["preview"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (networks_folder / "Lora" / f"{LORA}.preview.png").read_bytes()
    embedding = _by_name(body["embeddings"]["loaded"])[EMBEDDING]
    response = http.get(embedding["preview"])
    assert response.status_code == 200 and response.content == (networks_folder / "embeddings" /
                                                                 f"{EMBEDDING}.png").read_bytes()


@pytest.mark.parametrize("path", [
    "lora/plain",  # listed as sub/plain only
    "lora/sub/plain",  # listed, but no thumbnail
    "lora/nothing",
    f"lora/%2E%2E%2F{LORA}",  # ../tiny_style
    f"lora/sub%2F%2E%2E%2F{LORA}",  # sub/../tiny_style
    "lora/..%2F..%2FVAE%2Fmini-alt",
    f"lora/%2Fabsolute%2F{LORA}",
    f"embedding/%2E%2E%2Fembeddings%2F{EMBEDDING}",
    f"embedding/{BROKEN}",
    f"checkpoint/{LORA}",
    "vae/mini-alt",
])
def test_preview_of_anything_else_is_a_json_404(http, path):
    response = http.get(f"/difusi/v1/networks/preview/{path}")
    assert response.status_code == 404, path
    body = response.json()
    assert body["error"] == "NotFound" and body["detail"]


def test_prompt_name_falls_back_when_the_alias_names_another_file(tmp_path):
    """A1111 drops aliases two files share; difusi's resolver reads a file name before an alias, so an alias that is
    another file's name (or shared) would insert a tag for the wrong file: the card writes the file name instead, or
    sub/name when that is shared too."""
    from difusi.networks.files import NetworkFile
    from difusi.server.routes_difusi import _prompt_name

    def file(relative: str, alias: str | None = None) -> NetworkFile:
        metadata = {"ss_output_name": alias} if alias else {}
        return NetworkFile(Path(relative).name, relative, tmp_path / f"{relative}.safetensors", metadata)

    files = [file("a/style", "ink"), file("ink"), file("b/style"), file("solo", "unique"), file("x", "shared"),
             file("y", "shared")]
    assert [_prompt_name(item, files) for item in files] == ["a/style", "ink", "b/style", "unique", "x", "y"]

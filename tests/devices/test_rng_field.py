"""The `rng` job field (A1111's "Random number generator source"): declared once, validated, written to every
infotext, read back with A1111's default for texts without it, and used by the pipeline (issue 17 item 3)."""

from __future__ import annotations

import numpy as np
import pytest

from difusi.errors import ParamError
from difusi.infotext import format_infotext, recipe_from_infotext
from difusi.params import FIELDS, GenerationParams
from difusi.rng import RNG_SOURCES

A1111_TEXT = ("a cat\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 9, Size: 64x64, "
              "Model hash: 0123456789, Model: difusi-mini, Version: v1.10.1")


def test_declared_once_after_clip_skip_with_a1111_names():
    spec = FIELDS["rng"]
    assert (spec.type, spec.default, spec.label, spec.choices) == (str, "CPU", "RNG", "rng_sources")
    assert (spec.flags, spec.infotext, spec.option, spec.widget) == (("--rng",), "RNG", "randn_source", "select")
    names = list(FIELDS)
    assert names.index("rng") == names.index("clip_skip") + 1  # A1111's infotext order: RNG after Clip skip


@pytest.mark.parametrize("source", RNG_SOURCES)
def test_every_source_validates(source):
    assert GenerationParams(prompt="x", rng=source).validated(native_size=64).rng == source


@pytest.mark.parametrize("bad", ["cpu", "CUDA", "", "Philox"])
def test_other_values_are_refused_naming_the_choices(bad):
    with pytest.raises(ParamError) as info:
        GenerationParams(prompt="x", rng=bad).validated(native_size=64)
    assert info.value.field == "rng" and "CPU, GPU, NV" in info.value.message


def test_infotext_always_names_the_source_after_clip_skip():
    params = GenerationParams(prompt="x", width=64, height=64, clip_skip=2)
    default = format_infotext(params, 1, 0, "m", "0123456789", "difusi 1")
    assert "Clip skip: 2, RNG: CPU, Version: difusi 1" in default  # written even for the default
    assert "RNG: NV," in format_infotext(params.replace(rng="NV"), 1, 0, "m", "0123456789", "1")


def test_reading_back_a_difusi_text_keeps_its_source():
    for source in RNG_SOURCES:
        text = format_infotext(GenerationParams(prompt="x", width=64, height=64, rng=source), 1, 0, "m", "h", "1")
        recipe = recipe_from_infotext(text)
        assert recipe.params().rng == source and recipe.notes == []


def test_old_difusi_text_without_rng_means_cpu():
    text = A1111_TEXT.replace("Version: v1.10.1", "Version: difusi 0.1.0")
    recipe = recipe_from_infotext(text)
    assert recipe.params().rng == "CPU" and recipe.notes == []


@pytest.mark.parametrize("version", ["Version: v1.10.1", "Version: f2.0.1v1.10.1-previous", None])
def test_a1111_text_without_rng_is_remade_with_nv_and_says_so(version):
    text = A1111_TEXT if version == "Version: v1.10.1" else (
        A1111_TEXT.replace("Version: v1.10.1", version) if version else A1111_TEXT.replace(", Version: v1.10.1", ""))
    recipe = recipe_from_infotext(text)
    assert recipe.params().rng == "NV"
    assert len(recipe.notes) == 1 and "NV" in recipe.notes[0] and "GPU" in recipe.notes[0]
    assert "RNG" not in recipe.ignored


def test_prompt_only_text_assumes_nothing():
    recipe = recipe_from_infotext("just a prompt")
    assert "rng" not in recipe.values and recipe.notes == []


def test_pipeline_draws_from_the_chosen_source():
    from difusi.api import get_model
    from difusi.pipeline import txt2img

    model = get_model(device="cpu")
    params = GenerationParams(prompt="a red circle", seed=11, steps=3, sampler_name="Euler a")
    cpu, nv = txt2img(model, params), txt2img(model, params.replace(rng="NV"))
    again = txt2img(model, params.replace(rng="NV"))
    assert "RNG: CPU" in cpu.infotexts[0] and "RNG: NV" in nv.infotexts[0]
    assert not np.array_equal(np.asarray(cpu.images[0].image), np.asarray(nv.images[0].image))
    assert np.array_equal(np.asarray(nv.images[0].image), np.asarray(again.images[0].image))
    # GPU on a CPU job is the CPU generator, as in A1111 (only the infotext differs).
    gpu = txt2img(model, params.replace(rng="GPU"))
    assert np.array_equal(np.asarray(gpu.images[0].image), np.asarray(cpu.images[0].image))
    assert "RNG: GPU" in gpu.infotexts[0]


def test_field_table_json_and_the_ui_source_of_choices():
    from pathlib import Path

    from difusi.params import field_table

    entry = next(e for e in field_table() if e["name"] == "rng")
    assert (entry["choices"], entry["widget"], entry["default"]) == ("rng_sources", "select", "CPU")
    app_js = (Path(__file__).parents[2] / "src/difusi/server/static/app.js").read_text()
    assert 'rng_sources: { url: "/difusi/v1/rng-sources"' in app_js  # the UI fills the select from the route


def test_rng_sources_route():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from difusi.server import routes_difusi

    app = FastAPI()
    app.include_router(routes_difusi.router)
    with TestClient(app) as client:
        assert client.get("/difusi/v1/rng-sources").json() == ["CPU", "GPU", "NV"]


def test_http_takes_the_source_as_a_field_or_as_a1111_option_randn_source():
    from difusi.server import a1111

    def job(body):
        return a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate(body)).params

    assert job({"prompt": "x"}).rng == "CPU"
    assert job({"prompt": "x", "rng": "GPU"}).rng == "GPU"
    assert job({"prompt": "x", "override_settings": {"randn_source": "NV"}}).rng == "NV"  # A1111 clients' way

"""Wrong types are refused at every front end, naming the field, before any model is loaded.

A float batch size, a whole-number float width, a fractional batch count, a boolean step count or a number where
text belongs are not converted: Python raises ParamError, the CLI prints one line and exits 2, HTTP answers 422.
"""

from __future__ import annotations

import pytest

import difusi.api
from difusi import cli, generate
from difusi.errors import ParamError

PYTHON_CASES = [
    ("batch_size", 2.5, "must be an integer, got 2.5"),
    ("width", 64.0, "must be an integer, got 64.0"),
    ("n_iter", 1.5, "must be an integer, got 1.5"),
    ("steps", True, "must be a number, got True"),
    ("cfg_scale", "7", "must be a number, got '7'"),
    ("deepcache_interval", 2.0, "must be an integer, got 2.0"),
    ("eta", False, "must be a number, got False"),
    ("negative_prompt", 5, "must be a string"),
    ("sampler_name", 3, "must be a string, got 3"),
    ("scheduler", None, "must not be null"),
    ("seed", 1.0, "must be an integer (-1 for random), got 1.0"),
]


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that should have been refused")

    monkeypatch.setattr(difusi.api, "get_model", refuse)


@pytest.mark.parametrize(("field", "value", "message"), PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_python_api_refuses_wrong_types_before_loading(field, value, message, no_model_load):
    with pytest.raises(ParamError) as caught:
        generate("x", **{field: value})
    assert caught.value.field == field and message in str(caught.value)


CLI_CASES = [
    (["--batch-size", "2.5"], "--batch-size: must be an integer, got '2.5'"),
    (["--width", "64.0"], "--width: must be an integer, got '64.0'"),
    (["--batch-count", "1.5"], "--batch-count: must be an integer, got '1.5'"),
    (["--steps", "true"], "--steps: must be an integer, got 'true'"),
    (["--cfg-scale", "nan"], "--cfg-scale: must be a number, got 'nan'"),
]


@pytest.mark.parametrize(("flags", "message"), CLI_CASES, ids=[c[0][0] for c in CLI_CASES])
def test_cli_refuses_wrong_types_in_one_line(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a cat", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"difusi: error: {message}"]


HTTP_CASES = [
    ({"steps": True}, "steps", "valid integer"),
    ({"width": 64.0}, "width", "valid integer, got a float"),
    ({"width": 64.5}, "width", "fractional part"),
    ({"batch_size": 2.5}, "batch_size", "fractional part"),
    ({"n_iter": "2"}, "n_iter", "valid integer"),
    ({"cfg_scale": True}, "cfg_scale", "valid number"),
    ({"cfg_scale": "7"}, "cfg_scale", "valid number"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"sampler_name": ["Euler"]}, "sampler_name", "valid string"),
    ({"deepcache_interval": 2.0}, "deepcache_interval", "valid integer"),
    ({"s_min_uncond": False}, "s_min_uncond", "valid number"),
]


@pytest.mark.parametrize(("body", "field", "message"), HTTP_CASES, ids=[str(c[0]) for c in HTTP_CASES])
@pytest.mark.parametrize("route", ["/sdapi/v1/txt2img", "/difusi/v1/jobs"])
def test_http_refuses_wrong_types_with_422(route, body, field, message, client):
    response = client.post(route, json={"prompt": "x", "steps": 1, **body})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field and message in error["detail"]


def test_http_still_accepts_integers_for_float_fields(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "cfg_scale": 7, "eta": 0,
                                                      "save_images": False})
    assert response.status_code == 200, response.text

"""Issue 19 defect 3: every JSON the server emits is strict JSON (no `Infinity` / `NaN`), checked with a strict
parser on a real server; infinity is written as null (difusi.strict_json), which reads back as the default."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from server_helpers import wait_for

from difusi.params import SEED_MAX, GenerationParams
from difusi.server import a1111
from difusi.strict_json import dumps, to_strict

FAST = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 3}


def strict_loads(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def running(start_server):
    return start_server()


def _post_raw(client, path: str, body: str):
    # httpx refuses to encode infinity itself; a client that sends `1e999` or `Infinity` gets float('inf') in
    # Python's json, so the echo of the request must not turn it back into `Infinity`.
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def test_txt2img_response_info_and_parameters_are_strict(running):
    body = json.dumps(FAST)[:-1] + ', "s_tmax": 1e999, "not_a_field": NaN, "other": -Infinity}'
    with running.client() as client:
        response = _post_raw(client, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text
    data = strict_loads(response.text)
    strict_loads(data["info"])
    assert data["parameters"]["s_tmax"] is None
    assert data["parameters"]["not_a_field"] is None and data["parameters"]["other"] is None


def test_history_job_result_fields_and_status_are_strict(running):
    with running.client() as client:
        job = _post_raw(client, "/difusi/v1/jobs", json.dumps(FAST)[:-1] + ', "seed": ' + str(SEED_MAX) + "}")
        assert job.status_code == 202, job.text
        done = wait_for(lambda: (r := client.get(f"/difusi/v1/jobs/{job.json()['id']}")).json()["result"] and r)
        result = strict_loads(done.text)["result"]
        assert result["images"][0]["seed"] == SEED_MAX and result["parameters"]["s_tmax"] is None
        history = client.get("/difusi/v1/history", params={"limit": 5})
        items = strict_loads(history.text)["items"]
        assert items and all(item["params"]["s_tmax"] is None for item in items)
        assert items[0]["seed"] == SEED_MAX  # the largest seed went through SQLite and JSON unchanged
        params, _ = GenerationParams.from_mapping(items[0]["params"])
        assert params.s_tmax == math.inf  # null reads back as the default: no upper bound
        for path in ("/difusi/v1/fields", "/difusi/v1/status", "/difusi/v1/jobs", "/sdapi/v1/options",
                     "/sdapi/v1/progress", "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/openapi.json"):
            strict_loads(client.get(path).text)


def test_info_string_is_strict_even_with_a_non_finite_value():
    text = a1111.info_json({"seed": 1, "s_tmax": math.inf, "nested": [math.nan, {"x": -math.inf}]})
    assert strict_loads(text) == {"seed": 1, "s_tmax": None, "nested": [None, {"x": None}]}


def test_strict_json_helper():
    assert to_strict({"a": (1.5, math.inf), "b": [math.nan]}) == {"a": [1.5, None], "b": [None]}
    assert dumps({"s_tmax": math.inf}) == '{"s_tmax": null}'

"""Fuzz every HTTP operation from the server's own OpenAPI spec (schemathesis), against a real server on loopback.

For each operation schemathesis generates requests that fit the schema (positive) and requests that break it
(negative). The server must never answer 5xx (except 503 "QueueFull", the documented answer of a full queue),
every error must be difusi's JSON body, and the server must still generate an image afterwards.

Valid but expensive values are made cheap before sending (steps <= 3, n_iter and batch_size <= 2, sizes <= 128):
the fuzzer is after crashes, not after a 1000-step 4096-pixel job. Invalid values are sent as generated.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
from hardening_harness import serve
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from difusi.params import LIMITS

EXAMPLES = int(os.environ.get("DIFUSI_FUZZ_EXAMPLES", "15"))
"""Examples per operation and mode in the default tier; the slow tier runs 100 (set the variable to change)."""
CAPS = {"steps": 3, "n_iter": 2, "batch_size": 2, "width": 128, "height": 128}


def cheap(body):
    """Lower valid-but-expensive values; leave everything else (including invalid values) as generated."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for name, cap in CAPS.items():
        value = body.get(name)
        low, high = LIMITS[name]
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            body[name] = min(value, cap) if name not in ("width", "height") else min(value - value % 8, cap) or 64
    return body


@pytest.fixture(scope="module")
def fuzz_server(bad_files, tmp_path_factory):
    with serve(bad_files, outputs_dir=tmp_path_factory.mktemp("fuzz-outputs"), queue_size=4) as url:
        yield url


def operations(url: str):
    import schemathesis

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(url: str, examples: int) -> dict[str, int]:
    """Run every operation in both modes; returns {"cases": n, "operations": m, "503": k}."""
    counts = {"cases": 0, "operations": 0, "503": 0}
    failures: list[str] = []
    for operation in operations(url):
        counts["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_one(operation, mode, url, examples, counts, failures)
            except Unsatisfiable:  # nothing in this operation can be made invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert failures == [], "\n".join(failures[:20])
    return counts


def _fuzz_one(operation, mode, url: str, examples: int, counts: dict[str, int], failures: list[str]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        if isinstance(case.body, dict):
            case.body = cheap(case.body)
        response = case.call(base_url=url, timeout=120)
        counts["cases"] += 1
        status = response.status_code
        label = f"{case.method} {case.formatted_path} {mode.value} body={str(case.body)[:300]!r}"
        if status >= 500:
            body = _json(response)
            if status == 503 and isinstance(body, dict) and body.get("error") == "QueueFull":
                counts["503"] += 1
                return
            failures.append(f"{label} -> {status} {response.text[:300]}")
        elif status >= 400:
            body = _json(response)
            if not (isinstance(body, dict) and {"error", "field", "detail"} <= set(body)):
                failures.append(f"{label} -> {status} without difusi's error body: {response.text[:200]}")

    check()


def _json(response):
    try:
        return response.json()
    except ValueError:
        return None


def _still_serves(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "samples_save": True})
        # Fuzzed jobs may still fill the bounded queue (503 is its documented answer): wait for it to drain.
        for _ in range(60):
            response = http.post("/sdapi/v1/txt2img", json={"prompt": "after the fuzz", "steps": 2, "seed": 1})
            if response.status_code != 503:
                break
            time.sleep(1)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1


def test_fuzz_every_operation(fuzz_server, capsys):
    counts = fuzz(fuzz_server, EXAMPLES)
    with capsys.disabled():
        print(f"\nschemathesis: {counts['cases']} requests over {counts['operations']} operations "
              f"({counts['503']} answered 503 QueueFull)")
    assert counts["operations"] >= 20 and counts["cases"] >= counts["operations"] * 2
    _still_serves(fuzz_server)


@pytest.mark.slow
def test_fuzz_every_operation_long(fuzz_server, capsys):
    counts = fuzz(fuzz_server, 100)
    with capsys.disabled():
        print(f"\nschemathesis (slow tier): {counts['cases']} requests over {counts['operations']} operations "
              f"({counts['503']} answered 503 QueueFull)")
    assert counts["cases"] >= 1000
    _still_serves(fuzz_server)

"""The bad-input matrix (tests/hardening/matrix.py): every case gives its clear error and the server keeps serving.

Each row names the surface (CLI, Python API, HTTP), the input, and the expected outcome, field and message
fragment; `tools/hardening_matrix.py` runs the same rows and writes docs/hardening.md with what was observed.
"""

from __future__ import annotations

import base64
import io

import pytest
from hardening_harness import run_case
from matrix import CASES
from PIL import Image


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case, bad_files, matrix_server, http):
    observed = run_case(case, bad_files, http if case.surface == "http" else None)
    assert observed.problems(case.expect) == [], f"{case.what}: observed {observed}"
    if case.surface == "cli":
        assert observed.extra["stdout"] == ""  # nothing was generated
    if case.surface == "http":
        assert http.get("/sdapi/v1/progress").status_code == 200  # still serving
        if case.expect.outcome == "200":  # accepted odd prompts: the PNG carries the same infotext
            image = Image.open(io.BytesIO(base64.b64decode(observed.extra["images"][0])))
            assert image.info["parameters"] == observed.message
    assert not bad_files.sentinel.exists(), "a pickle's code ran"


def test_matrix_is_broad():
    surfaces = {surface: sum(case.surface == surface for case in CASES) for surface in ("cli", "api", "http")}
    assert len(CASES) >= 40 and min(surfaces.values()) >= 15, surfaces


def test_pickle_payload_is_real(bad_files, tmp_path):
    """The sentinel check means something: the same kind of file, loaded the unsafe way, does run its code."""
    import shlex

    import torch
    from hardening_harness import _Payload

    from difusi.errors import CheckpointError
    from difusi.models import load_model

    assert bad_files.sentinel.name.encode() in (bad_files.models / "evil.ckpt").read_bytes()  # payload names it
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(f"touch {shlex.quote(str(marker))}")},
               tmp_path / "probe.ckpt")
    with pytest.raises(CheckpointError, match="NOT executed"):
        load_model(tmp_path / "probe.ckpt")
    assert not marker.exists()
    torch.load(tmp_path / "probe.ckpt", weights_only=False)  # unsafe on purpose, in a temp folder
    assert marker.exists()


def test_server_still_generates_after_the_matrix(http, bad_files):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 9, "save_images": False})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1
    models = {item["model_name"] for item in http.get("/sdapi/v1/sd-models").json()}
    assert "link-out" not in models  # the symlink out of the models folder is not even listed
    assert {"evil", "empty", "truncated"} <= models  # bad files are listed (and refused when loaded)

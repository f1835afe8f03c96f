"""LocalRunner: jobs grouped by checkpoint, each model loaded once; an unusable model fails its own rows only."""

from __future__ import annotations

from pathlib import Path

import pytest

from difusi.batch import build_jobs
from difusi.batch.local import LocalRunner
from difusi.batch.rows import BatchRow


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    return None


def test_each_checkpoint_loads_once_and_a_broken_one_fails_its_rows(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import difusi.api
    from difusi.models.synthetic import write_tiny_checkpoint

    models = tmp_path / "models"
    models.mkdir()
    write_tiny_checkpoint(models / "tiny.safetensors", family="sd1")
    broken = models / "broken.safetensors"
    write_tiny_checkpoint(broken, family="sd1", seed=1)  # other weights: its own group (groups go by sha256)
    rows = [BatchRow(number, {"prompt": f"row {number}", "seed": number, "steps": 2, "width": 64, "height": 64,
                              "model": model})
            for number, model in enumerate(["difusi-mini", "tiny", "difusi-mini", "broken", "tiny"], start=1)]
    jobs, _ = build_jobs(rows, {}, models_dir=models)
    broken.write_bytes(b"not a checkpoint any more")  # breaks after the check: the load fails, not the batch
    loads: list[str | None] = []
    real = difusi.api.get_model

    def counting(model: object = None, models_dir: object = None, **options: object) -> object:
        loads.append(str(model))
        return real(model, models_dir, **options)

    monkeypatch.setattr(difusi.api, "get_model", counting)
    outputs = list(LocalRunner(device="cpu").run(jobs, models))
    assert loads == ["difusi-mini", "tiny", "broken"]  # grouped: three loads for five rows
    assert [output.row for output in outputs] == [1, 3, 2, 5, 4]
    assert [len(output.images) for output in outputs] == [1, 1, 1, 1, 0]
    assert outputs[4].error is not None and outputs[4].error.startswith("model: ")
    assert all(output.images[0].png.startswith(b"\x89PNG") for output in outputs[:4])
    assert [output.images[0].seed for output in outputs[:4]] == [1, 3, 2, 5]

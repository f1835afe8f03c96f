"""Batch files -> rows -> jobs: every format, every error naming its row and field, all before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from difusi.batch import BatchError, build_jobs, read_rows
from difusi.batch.jobs import job_id_for
from difusi.errors import ParamError


@pytest.fixture()
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: validation must happen before."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded while checking rows")

    monkeypatch.setattr("difusi.models.loader.load_model", refuse)
    monkeypatch.setattr("difusi.models.cache.load_model", refuse)
    monkeypatch.setattr("difusi.api.get_model", refuse)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


PARSE_CASES = [
    ("jsonl", "rows.jsonl", '{"prompt": "a cat", "steps": 3}\n\n# a comment\n{"prompt": "a dog", "seed": 5}\n',
     [(1, {"prompt": "a cat", "steps": 3}), (4, {"prompt": "a dog", "seed": 5})]),
    ("json array", "rows.json", '[{"prompt": "a cat"}, {"prompt": "b", "cfg_scale": 4.5}]',
     [(1, {"prompt": "a cat"}), (2, {"prompt": "b", "cfg_scale": 4.5})]),
    ("csv with quoted comma and newline", "rows.csv",
     'prompt,steps,negative_prompt\n"a cat, sitting",3,\n"two\nlines",4,"blurry, dark"\n',
     [(2, {"prompt": "a cat, sitting", "steps": "3"}),
      (3, {"prompt": "two\nlines", "steps": "4", "negative_prompt": "blurry, dark"})]),
    ("csv empty cells are unset", "rows.csv", "prompt,seed,model\na,,\n,,\nb,7,\n",
     [(2, {"prompt": "a"}), (4, {"prompt": "b", "seed": "7"})]),
    ("txt plain prompts", "prompts.txt", "a red circle\n\na blue square, (big:1.2)\n",
     [(1, {"prompt": "a red circle"}), (3, {"prompt": "a blue square, (big:1.2)"})]),
    ("txt A1111 options", "prompts.txt",
     '--prompt "a red cat" --steps 20 --seed 5 --negative_prompt "blurry, dark" --cfg_scale 4.5\n',
     [(1, {"prompt": "a red cat", "steps": "20", "seed": "5", "negative_prompt": "blurry, dark",
           "cfg_scale": "4.5"})]),
    ("txt unquoted prompt runs to the next flag", "prompts.txt",
     "--prompt a red cat --sampler_name 'Euler a' --n_iter 2 --batch_size 3 --width 64 --height 72\n",
     [(1, {"prompt": "a red cat", "sampler_name": "Euler a", "n_iter": "2", "batch_size": "3", "width": "64",
           "height": "72"})]),
    ("txt words before flags, difusi spellings, sd_model", "prompts.txt",
     "a cat on a mat --cfg-scale 3 --batch-count 2 --sd_model difusi-mini\n",
     [(1, {"prompt": "a cat on a mat", "cfg_scale": "3", "n_iter": "2", "model": "difusi-mini"})]),
]


@pytest.mark.parametrize(("name", "filename", "text", "expected"), PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_read_rows(tmp_path: Path, name: str, filename: str, text: str, expected: list) -> None:
    rows = read_rows(write(tmp_path, filename, text))
    assert [(row.number, row.values) for row in rows] == expected


ERROR_CASES = [
    ("unknown csv column", "rows.csv", "prompt,stpes\na,3\n", 1, "stpes", "unknown field 'stpes'"),
    ("unknown jsonl key", "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b", "colour": "red"}\n', 2, "colour",
     "unknown field 'colour'"),
    ("malformed JSON line", "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b",,}\n', 2, None, "malformed JSON"),
    ("NaN is not JSON", "rows.jsonl", '{"prompt": "a", "cfg_scale": NaN}\n', 1, None, "NaN is not valid JSON"),
    ("row not an object", "rows.jsonl", '["a", 3]\n', 1, None, "must be a JSON object"),
    ("too many csv cells", "rows.csv", "prompt\na\nb,c\n", 3, None, "2 cells but the header names 1"),
    ("unknown txt option", "prompts.txt", "a cat\n--prompt b --restore_faces true\n", 2, "restore_faces",
     "unknown option --restore_faces"),
    ("txt unbalanced quote", "prompts.txt", '--prompt "a cat --steps 3\n', 1, None, "cannot read the options"),
    ("txt flag without value", "prompts.txt", "--prompt a --steps\n", 1, "steps", "--steps needs a value"),
]


@pytest.mark.parametrize(("name", "filename", "text", "row", "field", "needle"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_read_rows_errors_name_row_and_field(tmp_path: Path, name: str, filename: str, text: str, row: int,
                                             field: str | None, needle: str) -> None:
    with pytest.raises(BatchError) as caught:
        read_rows(write(tmp_path, filename, text))
    assert caught.value.row == row
    assert caught.value.field_name == field
    assert needle in str(caught.value)
    assert str(caught.value).startswith(f"row {row}: ")
    assert isinstance(caught.value, ParamError)  # front ends that handle ParamError handle these too


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="must be one of"):
        read_rows(write(tmp_path, "rows.yaml", "prompt: a\n"))
    with pytest.raises(ParamError, match="cannot read"):
        read_rows(tmp_path / "missing.jsonl")
    assert [row.values for row in read_rows(write(tmp_path, "rows.data", '{"prompt": "x"}\n'), fmt="jsonl")] == [
        {"prompt": "x"}]


def test_bad_value_names_row_three_and_steps_before_any_model(tmp_path: Path, no_model_loads: None) -> None:
    path = write(tmp_path, "rows.jsonl",
                 '{"prompt": "a", "steps": 2}\n{"prompt": "b", "steps": 2}\n{"prompt": "c", "steps": 0}\n')
    with pytest.raises(BatchError) as caught:
        build_jobs(read_rows(path), {})
    assert (caught.value.row, caught.value.field) == (3, "steps")
    assert str(caught.value) == "row 3: steps: must be in [1, 1000], got 0"


def test_skip_invalid_reports_and_continues(tmp_path: Path, no_model_loads: None) -> None:
    path = write(tmp_path, "rows.csv", "prompt,steps,cfg_scale,model\na,2,,\nb,0,,\nc,2,abc,\nd,2,,no-such-model\ne,3,,\n")
    jobs, failures = build_jobs(read_rows(path), {}, skip_invalid=True, models_dir=tmp_path / "models")
    assert [job.row for job in jobs] == [2, 6]
    assert [(failure.row, failure.job_id) for failure in failures] == [(3, ""), (4, ""), (5, "")]
    assert "steps: must be in [1, 1000], got 0" in failures[0].reason
    assert "cfg_scale: must be a number, got 'abc'" in failures[1].reason
    assert failures[2].reason.startswith("row 5: model: ") and "no-such-model" in failures[2].reason


def test_unknown_model_names_row_and_model(tmp_path: Path, no_model_loads: None) -> None:
    path = write(tmp_path, "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b", "model": "no-such-model"}\n')
    with pytest.raises(BatchError) as caught:
        build_jobs(read_rows(path), {}, models_dir=tmp_path / "models")
    assert (caught.value.row, caught.value.field) == (2, "model")


def test_defaults_apply_and_rows_override(tmp_path: Path, no_model_loads: None) -> None:
    path = write(tmp_path, "prompts.txt", "a cat\n--prompt a dog --steps 4\n")
    jobs, _ = build_jobs(read_rows(path), {"steps": 2, "cfg_scale": 3.0, "seed": 10})
    assert [(job.params.prompt, job.params.steps, job.params.cfg_scale, job.params.seed) for job in jobs] == [
        ("a cat", 2, 3.0, 10), ("a dog", 4, 3.0, 10)]
    assert all(job.checkpoint is None and len(job.model_sha256) == 64 for job in jobs)


def test_job_ids_and_derived_seeds_are_stable(tmp_path: Path, no_model_loads: None) -> None:
    text = '{"prompt": "a cat"}\n{"prompt": "a cat"}\n{"prompt": "a dog", "seed": 7}\n'
    first, _ = build_jobs(read_rows(write(tmp_path, "one.jsonl", text)), {"steps": 2})
    again, _ = build_jobs(read_rows(write(tmp_path, "two.jsonl", text)), {"steps": 2})
    shifted, _ = build_jobs(read_rows(write(tmp_path, "three.jsonl", '{"prompt": "new row"}\n' + text)), {"steps": 2})
    assert [(job.job_id, job.params.seed, job.params.subseed) for job in first] == [
        (job.job_id, job.params.seed, job.params.subseed) for job in again]
    # Identical rows with seed -1 get different seeds, hence different ids; a row inserted above changes neither.
    assert first[0].params.seed != first[1].params.seed and first[0].job_id != first[1].job_id
    assert [job.job_id for job in shifted[1:]] == [job.job_id for job in first]
    assert all(0 <= job.params.seed <= 2**32 - 2 for job in first)
    assert first[2].params.seed == 7  # explicit seeds are kept
    edited, _ = build_jobs(read_rows(write(tmp_path, "four.jsonl", text)), {"steps": 3})
    assert {job.job_id for job in edited}.isdisjoint(job.job_id for job in first)
    assert first[2].job_id == job_id_for(first[2].params, first[2].model_sha256)


def test_sizes_left_out_stay_for_the_model(tmp_path: Path, no_model_loads: None) -> None:
    jobs, _ = build_jobs(read_rows(write(tmp_path, "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b", "width": 72}\n')), {})
    assert [(job.params.width, job.params.height) for job in jobs] == [(None, None), (72, None)]
    with pytest.raises(BatchError) as caught:  # the budget is still checked, with the model's native size
        build_jobs(read_rows(write(tmp_path, "big.jsonl", '{"prompt": "a", "width": 4096, "height": 4096}\n')), {})
    assert caught.value.row == 1 and caught.value.field == "width"

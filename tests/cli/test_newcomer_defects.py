"""Issue 19, what a new user hit: seeds difusi writes must read back (2), strict JSON from the CLI (3), and
`difusi mini --help` (10). Reproductions are the issue's own commands, on difusi-mini at 64x64, 2 steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cli_generate import difusi, in_process, pixels, results

from difusi import cli
from difusi.errors import ParamError
from difusi.infotext import parse_infotext, read_infotext
from difusi.params import RANDOM_SEED_MAX, SEED_MAX, GenerationParams, resolve_seed


def strict_loads(text: str) -> Any:
    """json.loads that refuses `Infinity`, `-Infinity` and `NaN`, as JSON.parse and jq do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("newcomer")
    (path / "models").mkdir()
    return path


@pytest.fixture(scope="module")
def past_2_32(root) -> list[tuple[Path, int]]:
    """The issue's reproduction: seeds 2^32 - 1 ... 2^32 + 2, written by one real `difusi generate` process."""
    done = difusi(root, "generate", "a red circle", "--seed", "4294967295", "--batch-size", "2", "--batch-count", "2",
                  "--steps", "2", "--sampler", "Euler a")
    assert done.returncode == 0, done.stderr
    return results(done)


# ----------------------------------------------------------------------------- 2. seeds read back


def test_seeds_past_2_32_are_written(past_2_32):
    assert [seed for _, seed in past_2_32] == [4294967295, 4294967296, 4294967297, 4294967298]
    for path, seed in past_2_32:
        fields, _ = parse_infotext(read_infotext(path))
        assert fields["Seed"] == str(seed)


def test_from_an_image_past_2_32_regenerates_its_pixels(root, past_2_32, monkeypatch, capsys):
    # Image 2 starts the second batch: regenerating with the original batch size gives images 2 and 3 again
    # (a batched CPU matmul may round unlike a single one, see test_cli_generate's module doc).
    (third, third_seed), (fourth, fourth_seed) = past_2_32[2], past_2_32[3]
    done = in_process(root, monkeypatch, capsys, "generate", "--from", str(third), "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    (a, a_seed), (b, b_seed) = results(done)
    assert (a_seed, b_seed) == (third_seed, fourth_seed) == (4294967297, 4294967298)
    assert np.array_equal(pixels(a), pixels(third)) and np.array_equal(pixels(b), pixels(fourth))
    assert read_infotext(a) == read_infotext(third)


def test_every_written_seed_is_accepted_back(past_2_32, root, monkeypatch, capsys):
    """Each image's own infotext validates (the seed is the job's first; one image)."""
    for path, seed in past_2_32:
        fields, _ = parse_infotext(read_infotext(path))
        params, _ = GenerationParams.from_mapping({"prompt": fields["Prompt"], "seed": fields["Seed"]})
        assert params.validated(native_size=64).seed == seed


def test_seed_range_and_the_last_image_must_fit():
    assert SEED_MAX == 2**53 - 1  # exact in every JSON parser (JavaScript's Number.MAX_SAFE_INTEGER)
    assert int(float(SEED_MAX)) == SEED_MAX  # a double (JS number, OpenAPI bound) holds it exactly
    assert GenerationParams(prompt="x", seed=SEED_MAX).validated(native_size=64).seed == SEED_MAX
    assert GenerationParams(prompt="x", seed=SEED_MAX - 3, batch_size=2, n_iter=2).validated(native_size=64)
    for field in ("seed", "subseed"):
        with pytest.raises(ParamError) as info:
            GenerationParams(prompt="x", batch_size=2, n_iter=2, **{field: SEED_MAX - 2}).validated(native_size=64)
        assert info.value.field == field
        assert f"must be -1 (random) or in [0, {SEED_MAX - 3}] for a job of 4 images" in info.value.message
        with pytest.raises(ParamError, match=r"must be -1 \(random\) or in \[0, "):
            GenerationParams(prompt="x", **{field: SEED_MAX + 1}).validated(native_size=64)


def test_cli_refuses_a_job_whose_last_seed_overflows(root, monkeypatch, capsys):
    done = in_process(root, monkeypatch, capsys, "generate", "x", "--seed", str(SEED_MAX), "--batch-count", "2")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"difusi: error: --seed: must be -1 (random) or in [0, {SEED_MAX - 1}] for a job of 2 images "
                           f"(image i uses seed + i, at most {SEED_MAX}), got {SEED_MAX}\n")


def test_random_seeds_stay_32_bit(monkeypatch):
    import random

    monkeypatch.setattr(random.SystemRandom, "randint", lambda self, low, high: high)
    assert resolve_seed(-1) == RANDOM_SEED_MAX == 2**32 - 2


# ----------------------------------------------------------------------------- 3. strict JSON


def test_history_json_is_strict_json(root, past_2_32, monkeypatch, capsys):
    done = in_process(root, monkeypatch, capsys, "history", "--json", "--limit", "3")
    assert done.returncode == 0, done.stderr
    rows = [strict_loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 3
    # JSON has no infinity: the default s_tmax ("no upper bound") is null, which reads back as that default.
    assert all(row["params"]["s_tmax"] is None for row in rows)
    params, _ = GenerationParams.from_mapping(rows[0]["params"])
    assert params.s_tmax == GenerationParams().s_tmax == float("inf")


def test_info_json_is_strict_json(root, past_2_32, monkeypatch, capsys):
    done = in_process(root, monkeypatch, capsys, "info", "--json", str(past_2_32[0][0]))
    assert done.returncode == 0, done.stderr
    assert strict_loads(done.stdout)["fields"]["Seed"] == "4294967295"


# ----------------------------------------------------------------------------- 10. mini --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_mini_help_prints_help_and_exits_0(flag, capsys):
    assert cli.main(["mini", flag]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.startswith("usage: difusi mini {train,evaluate,train-lora,evaluate-lora,evaluate-img2img}")
    assert "train " in out.out and "evaluate " in out.out


def test_mini_help_from_a_real_process(root):
    done: subprocess.CompletedProcess = difusi(root, "mini", "--help", timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert "difusi mini train --help" in done.stdout and "difusi mini evaluate --help" in done.stdout

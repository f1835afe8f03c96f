"""Every invalid flag value: one line `difusi: error: FLAG: ...` on stderr, exit code 2, no traceback.

Most cases run `cli.main` in-process (same code path as the console script, 100x faster); a few run the real
`python -m difusi` to prove the process-level behaviour (exit status, nothing else printed).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from difusi import cli
from difusi.params import SEED_MAX

BAD_VALUES = [
    (["--steps", "0"], "--steps: must be in [1, 1000], got 0"),
    (["--steps", "1001"], "--steps: must be in [1, 1000], got 1001"),
    (["--steps", "abc"], "--steps: must be an integer, got 'abc'"),
    (["--steps", "2.5"], "--steps: must be an integer, got '2.5'"),
    (["--cfg-scale", "-1"], "--cfg-scale: must be in [0, 100], got -1"),
    (["--cfg-scale", "100.5"], "--cfg-scale: must be in [0, 100], got 100.5"),
    (["--cfg-scale", "nan"], "--cfg-scale: must be a number, got 'nan'"),
    (["--cfg-scale", "x"], "--cfg-scale: must be a number, got 'x'"),
    (["--seed", "-2"], f"--seed: must be -1 (random) or in [0, {SEED_MAX}], got -2"),
    (["--seed", str(SEED_MAX + 1)], f"--seed: must be -1 (random) or in [0, {SEED_MAX}], got {SEED_MAX + 1}"),
    (["--seed", "1e3"], "--seed: must be an integer, got '1e3'"),
    (["--subseed", "-7"], f"--subseed: must be -1 (random) or in [0, {SEED_MAX}], got -7"),
    (["--subseed-strength", "1.5"], "--subseed-strength: must be in [0, 1], got 1.5"),
    (["--subseed-strength", "-0.1"], "--subseed-strength: must be in [0, 1], got -0.1"),
    (["--width", "56"], "--width: must be in [64, 4096], got 56"),
    (["--width", "4104"], "--width: must be in [64, 4096], got 4104"),
    (["--width", "100"], "--width: must be a multiple of 8, got 100"),
    (["--width", "wide"], "--width: must be an integer, got 'wide'"),
    (["--height", "0"], "--height: must be in [64, 4096], got 0"),
    (["--height", "68"], "--height: must be a multiple of 8, got 68"),
    (["--batch-size", "0"], "--batch-size: must be in [1, 64], got 0"),
    (["--batch-size", "65"], "--batch-size: must be in [1, 64], got 65"),
    (["--batch-count", "0"], "--batch-count: must be in [1, 1000], got 0"),
    (["--batch-count", "1001"], "--batch-count: must be in [1, 1000], got 1001"),
    (["--eta", "-0.5"], "--eta: must be in [0, 10], got -0.5"),
    (["--eta", "11"], "--eta: must be in [0, 10], got 11"),
    (["--s-noise", "-1"], "--s-noise: must be in [0, 10], got -1"),
    (["--s-churn", "-1"], "--s-churn: must be in [0, 1000], got -1"),
    (["--s-tmin", "-1"], "--s-tmin: must be in [0, inf], got -1"),
    (["--s-tmin", "5", "--s-tmax", "2"], "--s-tmax: must be >= s_tmin (5), got 2"),
    (["--clip-skip", "0"], "--clip-skip: must be in [1, 12], got 0"),
    (["--clip-skip", "13"], "--clip-skip: must be in [1, 12], got 13"),
    (["--output", "picture.jpg"], "--output: must name a .png file, got 'picture.jpg'"),
    (["--from", "no-such-image.png"], "--from: no such file: no-such-image.png"),
    (["--from", "a.png", "--infotext", "x"], "--infotext: not allowed with argument --from"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]


def _run_main(argv: list[str], capsys) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err.splitlines(), captured.out


@pytest.mark.parametrize(("flags", "message"), BAD_VALUES, ids=[" ".join(f) for f, _ in BAD_VALUES])
def test_bad_flag_value_is_one_line_exit_2(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err_lines, out = _run_main(["generate", "a cat", *flags], capsys)
    assert code == 2
    assert err_lines == [f"difusi: error: {message}"]
    assert out == ""
    assert not (tmp_path / "outputs").exists()  # nothing was generated or created


@pytest.mark.parametrize(
    ("flags", "flag"),
    [(["--sampler", "Eulerr"], "--sampler"), (["--scheduler", "Karass"], "--scheduler")],
)
def test_unknown_sampler_or_schedule_names_flag(flags, flag, capsys, tmp_path, monkeypatch):
    pytest.importorskip("difusi.samplers")
    monkeypatch.chdir(tmp_path)
    code, err_lines, _ = _run_main(["generate", "a cat", *flags], capsys)
    assert code == 2
    assert len(err_lines) == 1 and err_lines[0].startswith(f"difusi: error: {flag}: ")


def test_missing_prompt_is_reported(capsys):
    code, err_lines, _ = _run_main(["generate", "--steps", "3"], capsys)
    assert code == 2
    assert err_lines == ["difusi: error: PROMPT: required (or start from an image with --from IMAGE or --infotext TEXT)"]


def test_bad_value_from_infotext_names_its_source(capsys):
    code, err_lines, _ = _run_main(["generate", "--infotext", "cat\nSteps: 0, Sampler: Euler, Seed: 1"], capsys)
    assert code == 2
    assert err_lines == ["difusi: error: --infotext 'Steps': must be in [1, 1000], got 0"]


def test_unknown_model_names_flag(capsys, tmp_path):
    pytest.importorskip("difusi.samplers")
    code, err_lines, _ = _run_main(
        ["generate", "a cat", "--model", "nope-model", "--models-dir", str(tmp_path), "--outputs-dir", str(tmp_path)],
        capsys,
    )
    assert code == 2
    assert len(err_lines) == 1 and err_lines[0].startswith("difusi: error: --model: ")
    assert "nope-model" in err_lines[0]


def test_history_limit_must_be_positive(capsys):
    code, err_lines, _ = _run_main(["history", "--limit", "0"], capsys)
    assert code == 2
    assert err_lines == ["difusi: error: --limit: must be >= 1, got 0"]


def test_info_on_missing_and_plain_images(capsys, tmp_path):
    from PIL import Image

    code, err_lines, _ = _run_main(["info", str(tmp_path / "x.png")], capsys)
    assert (code, err_lines) == (2, [f"difusi: error: IMAGE: no such file: {tmp_path / 'x.png'}"])
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    code, err_lines, _ = _run_main(["info", str(plain)], capsys)
    assert code == 2
    assert err_lines == [f"difusi: error: IMAGE: {plain} has no generation parameters (no PNG 'parameters' text)"]


def test_broken_config_file_is_one_line(capsys, tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text("{not json")
    monkeypatch.setenv("DIFUSI_CONFIG", str(config))
    monkeypatch.delenv("DIFUSI_OUTPUTS_DIR", raising=False)
    code, err_lines, _ = _run_main(["history"], capsys)
    assert code == 2
    assert err_lines == [f"difusi: error: config file {config}: invalid JSON at line 1: Expecting property name "
                         "enclosed in double quotes"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "a cat", "--steps", "0"], "difusi: error: --steps: must be in [1, 1000], got 0"),
        (["generate", "a cat", "--width", "abc"], "difusi: error: --width: must be an integer, got 'abc'"),
        (["frobnicate"], None),
    ],
)
def test_real_process_exit_2_and_no_traceback(argv, message, tmp_path):
    env = {**os.environ, "DIFUSI_OUTPUTS_DIR": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, "-m", "difusi", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("difusi: error: ")
    if message:
        assert lines[0] == message
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_unusable_outputs_folder_fails_before_generating(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err_lines, out = _run_main(["generate", "a cat", "--outputs-dir", str(blocker / "out")], capsys)
    assert code == 1
    assert err_lines == [f"difusi: error: {blocker / 'out'}: Not a directory"]
    assert out == ""

"""`difusi models`, `difusi samplers`, and the model lookup of --from/--infotext (in-process: nothing is generated)."""

from __future__ import annotations

import hashlib

import pytest

from difusi import cli
from difusi.models import default_model_path


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DIFUSI_OUTPUTS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("DIFUSI_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    return tmp_path


def test_models_lists_default_and_folder_checkpoints_with_a1111_hash(folders, capsys):
    from difusi.models.synthetic import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(folders / "models" / "sub" / "tiny.safetensors", "sd1", "safetensors").path
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"models folder: {folders / 'models'}"
    default_sha = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    tiny_sha = hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert lines[1].split() == ["difusi-mini", default_sha[:10], "sd1", str(default_model_path()), "(default)"]
    assert lines[2].split() == ["sub/tiny", tiny_sha[:10], "sd1", str(tiny)]


def test_models_flag_beats_environment(folders, capsys, tmp_path):
    assert cli.main(["models", "--models-dir", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"models folder: {tmp_path / 'elsewhere'}  (does not exist)"


def test_samplers_lists_names_aliases_and_schedules(capsys):
    from difusi.samplers import list_samplers, list_schedules

    assert cli.main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0]: line for line in lines[1:] if line}
    for sampler in list_samplers():
        row = rows[sampler.name]
        assert sampler.default_schedule in row
        assert all(alias in row for alias in sampler.aliases)
    assert rows["Euler a"].split()[-3:] == ["k_euler_a,", "k_euler_ancestral,", "euler_ancestral"]
    assert lines[-1] == "schedules: " + ", ".join(s.name for s in list_schedules())


def test_infotext_with_unknown_model_hash_is_one_line_error(folders, capsys):
    text = "a cat\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Model hash: 0000000000, Model: lost, Version: x"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--infotext", text])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"difusi: error: --infotext: model with hash 0000000000 (lost) not found in {folders / 'models'}; "
        "pass --model to choose one"
    ]


def test_samplers_report_forwards_dir_and_quick(monkeypatch, capsys, tmp_path):
    import difusi.samplers.report as report

    calls = []

    def fake_write_report(out_dir, quick=False):
        calls.append((out_dir, quick))
        return out_dir / "samplers-report.md"

    monkeypatch.setattr(report, "write_report", fake_write_report)
    assert cli.main(["samplers", "--report", str(tmp_path / "r"), "--quick"]) == 0
    assert calls == [(tmp_path / "r", True)]
    assert capsys.readouterr().out == f"report written to {tmp_path / 'r' / 'samplers-report.md'}\n"


@pytest.mark.parametrize(
    ("argv", "module", "forwarded"),
    [
        (["serve", "--port", "7999", "--listen"], "difusi.server", ["--port", "7999", "--listen"]),
        (["mini", "train", "--out", "x", "--steps", "3"], "difusi.mini.train", ["--out", "x", "--steps", "3"]),
        (["mini", "evaluate", "--quick"], "difusi.mini.evaluate", ["--quick"]),
    ],
)
def test_serve_and_mini_forward_their_arguments(argv, module, forwarded, monkeypatch):
    imported = pytest.importorskip(module)
    seen = []
    monkeypatch.setattr(imported, "main", lambda args: seen.append(list(args)) or 0)
    assert cli.main(argv) == 0
    assert seen == [forwarded]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "{tmp}", "--terminal-fraction", "2"], "mini train: terminal_fraction: must be in [0, 1], got 2.0"),
        (["evaluate", "--sampler-steps", "0"], "mini evaluate: sampler_steps: must be at least 1, got 0"),
    ],
)
def test_mini_bad_option_is_one_line_error_from_both_entry_points(argv, message, capsys, tmp_path):
    from difusi.mini.__main__ import main as python_m_main

    argv = [arg.replace("{tmp}", str(tmp_path / "run")) for arg in argv]
    for run in (lambda: cli.main(["mini", *argv]), lambda: python_m_main(argv)):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"difusi: error: {message}\n"


def test_mini_without_subcommand_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mini"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "difusi: error: mini: expected `train` or `evaluate`, e.g. `difusi mini train --help`\n"

"""`difusi generate` prints the job's warnings on stderr (issue 19, defect 9); stdout stays the list of saved files."""

from __future__ import annotations

from test_cli_generate import in_process, results


def test_generate_prints_prompt_warnings_on_stderr(tmp_path, monkeypatch, capsys):
    done = in_process(tmp_path, monkeypatch, capsys, "generate", "[red:blue:soon] <hypernet:detail:0.8>", "--steps", "1",
                      "--seed", "5", "--sampler", "Euler")
    assert done.returncode == 0, done.stderr
    assert len(results(done)) == 1  # stdout: only the saved file
    warnings = [line for line in done.stderr.splitlines() if line.startswith("difusi: warning: ")]
    assert len(warnings) == 2, done.stderr
    assert warnings[0].startswith("difusi: warning: prompt: removed <hypernet:detail:0.8>: hypernet networks")
    assert warnings[1].startswith("difusi: warning: prompt: '[red:blue:soon]' is not prompt editing")


def test_plain_prompt_prints_no_warning(tmp_path, monkeypatch, capsys):
    done = in_process(tmp_path, monkeypatch, capsys, "generate", "a red circle", "--steps", "1", "--seed", "5",
                      "--sampler", "Euler")
    assert done.returncode == 0 and "warning" not in done.stderr

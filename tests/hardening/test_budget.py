"""The memory budget: where it comes from (flag > environment > config file > default) and what it refuses."""

from __future__ import annotations

import json

import pytest

from difusi import budget, cli
from difusi.errors import ParamError
from difusi.params import GenerationParams
from difusi.settings import ConfigError


@pytest.fixture(autouse=True)
def clean_budget(monkeypatch, tmp_path):
    for name in budget.ENV_NAMES.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFUSI_CONFIG", str(tmp_path / "config.json"))
    budget.set_budget(None)
    yield
    budget.set_budget(None)


def params(width, height, batch_size=1) -> GenerationParams:
    return GenerationParams(prompt="x", width=width, height=height, batch_size=batch_size)


def test_defaults_allow_the_sizes_people_use_and_refuse_the_rest():
    assert budget.current_budget() == budget.Budget(2048 * 2048, 2048 * 2048)
    for width, height, batch in ((512, 512, 16), (1024, 1024, 4), (2048, 2048, 1), (1216, 832, 4)):
        params(width, height, batch).validated()
    with pytest.raises(ParamError) as error:
        params(512, 512, 17).validated()
    assert error.value.field == "batch_size" and "4456448 pixels in one batch" in str(error.value)
    with pytest.raises(ParamError) as error:
        params(4096, 2056).validated()
    assert error.value.field == "width" and "4096x2056 = 8421376 pixels" in str(error.value)


def test_config_file_then_environment_then_set_budget(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"max_pixels": 128 * 128, "max_batch_pixels": 20000}))
    assert budget.current_budget() == budget.Budget(16384, 20000)
    with pytest.raises(ParamError, match="over the budget of 16384 pixels per image"):
        params(136, 128).validated()
    monkeypatch.setenv("DIFUSI_MAX_BATCH_PIXELS", "40_000")
    assert budget.current_budget() == budget.Budget(16384, 40000)
    budget.set_budget(budget.Budget(64 * 64, 64 * 64))
    with pytest.raises(ParamError, match="2 x 64x64 = 8192 pixels in one batch is over the budget of 4096"):
        params(64, 64, 2).validated()


@pytest.mark.parametrize("value", ["lots", "1.5e6", "100", "-5"])
def test_bad_budget_values_name_their_source(monkeypatch, value):
    monkeypatch.setenv("DIFUSI_MAX_PIXELS", value)
    with pytest.raises(ConfigError, match="DIFUSI_MAX_PIXELS: must be"):
        budget.current_budget()


def test_cli_flag_beats_environment_and_is_undone_after_the_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DIFUSI_MAX_BATCH_PIXELS", str(10**9))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a cat", "--width", "128", "--height", "128", "--max-batch-pixels", "16000",
                  "--outputs-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "difusi: error: --batch-size: 1 x 128x128 = 16384 pixels in one batch is over the budget of 16000; use a "
        "smaller batch_size with more batches (n_iter / --batch-count), or raise the budget (--max-batch-pixels, "
        "DIFUSI_MAX_BATCH_PIXELS or 'max_batch_pixels' in the config file)"]
    assert budget.current_budget().max_batch_pixels == 10**9  # in-process callers get their budget back
    assert not (tmp_path / "out").exists()


def test_broken_budget_setting_is_one_line_for_generate_and_serve(monkeypatch, capsys):
    monkeypatch.setenv("DIFUSI_MAX_PIXELS", "huge")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a cat"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "difusi: error: DIFUSI_MAX_PIXELS: must be a whole number of pixels, got 'huge'"]
    from difusi.server import main as serve_main

    assert serve_main(["--port", "1"]) == 2
    assert "DIFUSI_MAX_PIXELS: must be a whole number of pixels" in capsys.readouterr().err

"""Models/outputs folder resolution: flag > environment > config file > ./models, ./outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difusi import settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (settings.MODELS_ENV, settings.OUTPUTS_ENV, settings.CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return monkeypatch


def test_defaults_without_anything(clean_env):
    assert settings.models_dir() == Path("models")
    assert settings.outputs_dir() == Path("outputs")


def test_xdg_config_file_is_used(clean_env, tmp_path):
    config = tmp_path / "xdg" / "difusi" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"models_dir": "/abs/models", "outputs_dir": "rel/out"}))
    assert settings.config_path() == config
    assert settings.models_dir() == Path("/abs/models")
    # Relative to the config file's folder, so the file means the same from any working directory.
    assert settings.outputs_dir() == config.parent / "rel" / "out"


def test_env_beats_config_and_flag_beats_env(clean_env, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models_dir": "/from/config", "outputs_dir": "/from/config-out"}))
    clean_env.setenv(settings.CONFIG_ENV, str(config))
    assert settings.models_dir() == Path("/from/config")
    clean_env.setenv(settings.MODELS_ENV, "/from/env")
    assert settings.models_dir() == Path("/from/env")
    assert settings.models_dir("/from/flag") == Path("/from/flag")
    assert settings.outputs_dir() == Path("/from/config-out")
    clean_env.setenv(settings.OUTPUTS_ENV, "~/out")
    assert settings.outputs_dir() == Path.home() / "out"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"models_dir": 3}', "'models_dir' must be a non-empty string path"),
        ("{", "invalid JSON at line 1"),
    ],
)
def test_broken_config_names_the_file(clean_env, tmp_path, content, message):
    config = tmp_path / "c.json"
    config.write_text(content)
    clean_env.setenv(settings.CONFIG_ENV, str(config))
    with pytest.raises(settings.ConfigError) as info:
        settings.models_dir()
    assert str(info.value).startswith(f"config file {config}: ")
    assert message in str(info.value)


def test_flag_skips_a_broken_config(clean_env, tmp_path):
    config = tmp_path / "c.json"
    config.write_text("{")
    clean_env.setenv(settings.CONFIG_ENV, str(config))
    assert settings.outputs_dir("given") == Path("given")

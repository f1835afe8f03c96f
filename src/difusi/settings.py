"""Where difusi keeps models and outputs: one resolution rule shared by the CLI and the server.

Order, first that is set wins: command-line flag > environment variable (DIFUSI_MODELS_DIR,
DIFUSI_OUTPUTS_DIR) > config file > default (./models, ./outputs relative to the working directory).

The config file is JSON, `{"models_dir": "...", "outputs_dir": "..."}`, at `$DIFUSI_CONFIG` if set, else
`$XDG_CONFIG_HOME/difusi/config.json` (XDG_CONFIG_HOME defaults to ~/.config). `~` is expanded everywhere;
a relative path in the config file is relative to the file's own folder, so the file means the same thing
from any working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from difusi.errors import DifusiError

MODELS_ENV = "DIFUSI_MODELS_DIR"
OUTPUTS_ENV = "DIFUSI_OUTPUTS_DIR"
CONFIG_ENV = "DIFUSI_CONFIG"
DEFAULT_MODELS_DIR = Path("models")
DEFAULT_OUTPUTS_DIR = Path("outputs")


class ConfigError(DifusiError):
    """The config file exists but is not valid JSON of the expected shape."""


def config_path() -> Path:
    """The config file difusi reads (it need not exist)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "difusi" / "config.json"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The config file's object, {} when there is no file; ConfigError (naming the file) when it is broken."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a JSON object, got {type(data).__name__}")
    return data


def models_dir(flag: str | Path | None = None) -> Path:
    """Folder scanned for checkpoints (`--models-dir` > DIFUSI_MODELS_DIR > config "models_dir" > ./models)."""
    return _resolve(flag, MODELS_ENV, "models_dir", DEFAULT_MODELS_DIR)


def outputs_dir(flag: str | Path | None = None) -> Path:
    """Folder for images and history (`--outputs-dir` > DIFUSI_OUTPUTS_DIR > config "outputs_dir" > ./outputs)."""
    return _resolve(flag, OUTPUTS_ENV, "outputs_dir", DEFAULT_OUTPUTS_DIR)


def _resolve(flag: str | Path | None, env_name: str, config_key: str, default: Path) -> Path:
    if flag:
        return Path(flag).expanduser()
    if os.environ.get(env_name):
        return Path(os.environ[env_name]).expanduser()
    path = config_path()
    value = load_config(path).get(config_key)
    if value is not None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config file {path}: {config_key!r} must be a non-empty string path")
        configured = Path(value).expanduser()
        return configured if configured.is_absolute() else path.parent / configured
    return default

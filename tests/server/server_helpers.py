"""Small helpers shared by the server tests (imported as a plain module; conftest holds the fixtures)."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def wait_for(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.02):
    """Poll until predicate() is truthy; return its value (fails the test on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s")

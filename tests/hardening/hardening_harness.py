"""Runs the bad-input matrix (`matrix.CASES`) against the real CLI, Python API and HTTP server.

Shared by the tests (`test_matrix.py`) and `tools/hardening_matrix.py`, which writes docs/hardening.md with the
observed messages. Everything is real: `difusi.cli.main`, `difusi.generate` / `difusi.models.load_model`, and a
uvicorn server on loopback whose models folder holds the bad files below next to nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shlex
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loopback import LoopbackServer

SECRET_TEXT = "outside secret: never served\n"


@dataclass(frozen=True)
class Expect:
    outcome: str
    """"exit 2" (CLI), an exception class name (API), an HTTP status "422" (HTTP)."""
    field: str | None
    """The flag (CLI), ParamError.field (API) or the JSON "field" (HTTP) that must be named; None: not checked."""
    text: str
    """A fragment the message must contain (for accepted HTTP requests: a fragment of the first infotext)."""


@dataclass(frozen=True)
class Case:
    id: str
    surface: str
    """"cli", "api" or "http"."""
    what: str
    """The input, in words (the table's first column)."""
    run: dict[str, Any]
    expect: Expect


@dataclass
class Observed:
    outcome: str
    field: str | None
    message: str
    lines: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self, expect: Expect) -> list[str]:
        """Why this observation does not meet `expect` (empty when it does)."""
        found = []
        if self.outcome != expect.outcome:
            found.append(f"outcome {self.outcome!r} != {expect.outcome!r}")
        if expect.field is not None and self.field != expect.field:
            found.append(f"field {self.field!r} != {expect.field!r}")
        if expect.text not in self.message:
            found.append(f"message lacks {expect.text!r}")
        if self.lines != 1:
            found.append(f"{self.lines} lines of output, expected one")
        if "Traceback" in self.message:
            found.append("a traceback was printed")
        return found


# -- files -----------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command: the classic malicious `.ckpt`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@dataclass
class Files:
    root: Path
    models: Path
    outside: Path
    outputs: Path
    sentinel: Path
    """Created only if a pickle's code ever runs."""


def build_files(root: Path) -> Files:
    """The bad checkpoints, a symlink out of the models folder, a leaky symlink in the outputs folder."""
    import torch

    from difusi.models.synthetic import write_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    models, outside, outputs = root / "models", root / "outside", root / "outputs"
    for folder in (models, outside, outputs):
        folder.mkdir(exist_ok=True)
    sentinel = root / "SENTINEL-pickle-code-ran"
    good = outside / "valid.safetensors"
    write_tiny_checkpoint(good, "sd1", seed=3)
    write_tiny_checkpoint(outside / "valid.ckpt", "sd1", "ckpt", seed=3)
    data = good.read_bytes()
    (models / "empty.safetensors").write_bytes(b"")
    (models / "zero.ckpt").write_bytes(b"")
    (models / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[8:40] = b"}" * 32
    (models / "corrupt-header.safetensors").write_bytes(bytes(corrupt))
    ckpt = (outside / "valid.ckpt").read_bytes()
    (models / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (models / "random.ckpt").write_bytes(bytes(range(256)) * 64)
    command = f"touch {shlex.quote(str(sentinel))}"
    state = {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "hook": _Payload(command)}
    torch.save(state, models / "evil.ckpt")
    torch.save(state, models / "evil-legacy.ckpt", _use_new_zipfile_serialization=False)
    (models / "link-out.safetensors").symlink_to(good)
    (outside / "secret.txt").write_text(SECRET_TEXT)
    (outputs / "leak.png").symlink_to(outside / "secret.txt")
    (root / "link.png").symlink_to(outside / "secret.txt")
    (root / "binary.png").write_bytes(os.urandom(2048))
    return Files(root, models, outside, outputs, sentinel)


def bomb_png_base64() -> str:
    """A valid 1-bit PNG of 30000 x 30000 pixels (900 Mpx) in a few kilobytes: a decompression bomb."""
    width = height = 30_000
    raw = zlib.compress(b"".join(b"\x00" + bytes((width + 7) // 8) for _ in range(height)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


# -- a server on loopback ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(files: Files, **options: Any) -> Iterator[str]:
    """A real uvicorn server for `files` (difusi-mini as the operator's --model); yields its base URL."""
    from difusi.models import default_model_path
    from difusi.server.app import create_app

    settings = {"models_dir": files.models, "outputs_dir": files.outputs, "checkpoint": str(default_model_path())}
    server = LoopbackServer(create_app(**{**settings, **options}))
    try:
        yield server.url
    finally:
        server.stop()


# -- running one case ---------------------------------------------------------------------------------------------


def _expand(value: Any, files: Files) -> Any:
    """Fill {models}, {outside}, {root}, {bomb} placeholders in strings, lists and dicts."""
    if isinstance(value, str):
        if value == "{bomb}":
            return bomb_png_base64()
        for name in ("models", "outside", "root"):
            value = value.replace("{" + name + "}", str(getattr(files, name)))
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):  # argv; not deep JSON bodies
        return [_expand(item, files) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, files) for key, item in value.items()}
    return value


def run_case(case: Case, files: Files, http: httpx.Client | None) -> Observed:
    run = _expand(case.run, files)
    if case.surface == "cli":
        return _run_cli(run, files)
    if case.surface == "api":
        return _run_api(run)
    if case.surface == "http":
        assert http is not None, "HTTP cases need a server"
        return _run_http(run, http)
    raise ValueError(f"unknown surface {case.surface!r}")


def _run_cli(run: dict[str, Any], files: Files) -> Observed:
    from difusi import cli

    argv = [*run["argv"], "--models-dir", str(files.models), "--outputs-dir", str(files.root / "cli-outputs")]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    lines = err.getvalue().splitlines()
    message = "\n".join(lines)
    label = None
    if lines and lines[0].startswith("difusi: error: "):
        head = lines[0].removeprefix("difusi: error: ")
        label = head.split(":", 1)[0] if head.startswith(("--", "PROMPT")) else None
    return Observed(f"exit {code}", label, message, lines=len(lines), extra={"stdout": out.getvalue()})


def _run_api(run: dict[str, Any]) -> Observed:
    from difusi import generate
    from difusi.models import load_model

    try:
        if run["call"] == "generate":
            args = dict(run["args"])
            prompt = args.pop("prompt", "a red circle")
            if isinstance(prompt, dict) and "hex" in prompt:
                prompt = bytes.fromhex(prompt["hex"])
            generate(prompt, **args)
        elif run["call"] == "load_model":
            load_model(run["path"])
        else:
            raise ValueError(run["call"])
    except Exception as error:  # noqa: BLE001 - the matrix records whatever is raised
        return Observed(type(error).__name__, getattr(error, "field", None), str(error), lines=str(error).count("\n") + 1)
    return Observed("returned", None, "")


def _run_http(run: dict[str, Any], http: httpx.Client) -> Observed:
    kwargs: dict[str, Any] = {}
    if "json" in run:
        kwargs["json"] = run["json"]
    if "content" in run:
        kwargs["content"] = run["content"].encode("utf-8", "surrogatepass")
        kwargs["headers"] = {"Content-Type": "application/json"}
    if "params" in run:
        kwargs["params"] = run["params"]
    response = http.request(run.get("method", "POST"), run["path"], **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:200]}
    if response.status_code == 200 and isinstance(body, dict) and "info" in body:
        info = json.loads(body["info"])
        text = info["infotexts"][0] if info.get("infotexts") else ""
        return Observed("200", None, text, lines=1, extra={"info": info, "images": body.get("images", [])})
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    detail = str(body.get("detail", ""))
    return Observed(str(response.status_code), body.get("field"), detail, lines=detail.count("\n") + 1)

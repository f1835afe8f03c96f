"""--device / --precision / --offload / --compile on `difusi generate` and `difusi serve`, and the keyword arguments of
the Python API: validated up front, one line, exit 2, no traceback (issue 17 item 1, issue 19 item 1)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from difusi import cli
from difusi.errors import ParamError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DIFUSI_OUTPUTS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("DIFUSI_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    return tmp_path


def _run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


@NO_CUDA
@pytest.mark.parametrize(("device", "message"), [
    ("cuda", "--device: 'cuda' is not available here (torch built without CUDA); this machine has: cpu"),
    ("cuda:1", "--device: 'cuda:1' is not available here (torch built without CUDA); this machine has: cpu"),
    ("banana", "--device: unknown device 'banana'; use one of auto, cpu, cuda, cuda:N, mps (this machine has: cpu)"),
    ("meta", "--device: unknown device 'meta'; use one of auto, cpu, cuda, cuda:N, mps (this machine has: cpu)"),
])
def test_generate_device_errors_are_one_line(folders, capsys, device, message):
    if device.startswith("cuda") and torch.version.cuda is not None:
        message = message.replace("torch built without CUDA", "no CUDA GPU found")
    code, lines = _run_main(["generate", "a cat", "--device", device], capsys)
    assert (code, lines) == (2, [f"difusi: error: {message}"])
    assert not (folders / "outputs").exists()  # refused before anything was touched


@pytest.mark.parametrize(("flags", "message"), [
    (["--precision", "half"], "--precision: invalid choice: 'half' (choose from auto, fp32, fp16, bf16)"),
    (["--offload", "medvram"], "--offload: invalid choice: 'medvram' (choose from none, model, sequential)"),
    (["--rng", "cuda"], "--rng: unknown random number generator source 'cuda'; use one of CPU, GPU, NV"),
])
def test_generate_precision_offload_rng_errors_are_one_line(folders, capsys, flags, message):
    code, lines = _run_main(["generate", "a cat", *flags], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].replace("'", "") == f"difusi: error: {message}".replace("'", "")


@NO_CUDA
def test_generate_device_cuda_in_a_real_process_has_no_traceback(folders):
    done = subprocess.run([sys.executable, "-m", "difusi", "generate", "x", "--device", "cuda"], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "difusi: error: --device: 'cuda' is not available here (torch built without CUDA); this machine has: cpu"]


def test_generate_runs_with_device_precision_offload_and_the_flags_reach_the_model(folders, capsys, monkeypatch):
    from difusi.models import loader

    seen = {}
    original = loader.load_model

    def spy(path, **kwargs):
        model = original(path, **kwargs)
        seen.update(kwargs, model=model)
        return model

    monkeypatch.setattr(loader, "load_model", spy)
    monkeypatch.setattr("difusi.models.load_model", spy)
    compiled = []
    monkeypatch.setattr("difusi.speed.compile.compile_unet", lambda model: compiled.append(model))
    code = cli.main(["generate", "a red circle", "--steps", "2", "--seed", "1", "--device", "cpu", "--precision",
                     "bf16", "--offload", "model", "--compile", "--rng", "NV"])
    assert code == 0
    assert (seen["device"], seen["precision"], seen["offload"]) == (torch.device("cpu"), "bf16", "model")
    assert compiled == [seen["model"]] and seen["model"].precision.name == "bf16"
    saved = list((folders / "outputs").rglob("*.png"))
    from difusi.infotext import read_infotext

    assert len(saved) == 1 and "RNG: NV" in read_infotext(saved[0])


def test_from_an_a1111_image_uses_nv_and_notes_it(folders, capsys):
    text = ("a red circle\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 3, Size: 64x64, "
            "Model: difusi-mini, Version: v1.10.1")
    assert cli.main(["generate", "--infotext", text, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "difusi: note: no RNG in the parameters" in err and "RNG: NV" in err
    from difusi.infotext import read_infotext

    (saved,) = list((folders / "outputs").rglob("*.png"))
    assert "RNG: NV" in read_infotext(saved)
    assert cli.main(["generate", "--infotext", text, "--device", "cpu", "--rng", "CPU"]) == 0
    assert "note" not in capsys.readouterr().err  # --rng given: nothing assumed, nothing said


@NO_CUDA
def test_serve_with_an_absent_device_refuses_to_start(folders, capsys):
    from difusi.server import main as serve_main

    assert serve_main(["--device", "cuda", "--port", "1"]) == 2  # port 1 would fail later: it never gets there
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["difusi serve: --device: 'cuda' is not available here (torch built without CUDA); "
                     "this machine has: cpu"]


def test_serve_parser_has_the_device_flags_with_auto_default():
    from difusi.server import build_parser

    args = build_parser().parse_args(["--precision", "fp16", "--offload", "sequential", "--compile"])
    assert (args.device, args.precision, args.offload, args.compile) == ("auto", "fp16", "sequential", True)


def test_engine_validates_up_front_and_loads_with_its_precision(folders, monkeypatch):
    from difusi.server.engine import Engine

    with pytest.raises(ParamError, match="device: unknown device 'banana'"):
        Engine(device="banana")
    with pytest.raises(ParamError, match="precision"):
        Engine(device="cpu", precision="half")
    compiled = []
    monkeypatch.setattr("difusi.speed.compile.compile_unet", lambda model: compiled.append(model))
    engine = Engine(device="cpu", precision="bf16", compile=True)
    model = engine._load(engine._current)
    assert model.precision.name == "bf16" and compiled == [model]


def test_python_api_keywords(monkeypatch):
    import difusi
    from difusi import api

    with pytest.raises(ParamError) as info:
        difusi.generate("a cat", device="banana", steps=2)
    assert info.value.field == "device"
    with pytest.raises(ParamError, match="offload"):
        api.get_model(device="cpu", offload="medvram")
    result = difusi.generate("a red circle", seed=4, steps=2, device="cpu", precision="bf16")
    model = api.get_model(device="cpu", precision="bf16")  # the cached one
    assert model.precision.name == "bf16" and model.device == torch.device("cpu")
    fp32 = difusi.generate("a red circle", seed=4, steps=2, device="cpu")
    assert result.infotexts == fp32.infotexts
    assert not np.array_equal(np.asarray(result.images[0].image), np.asarray(fp32.images[0].image))


def test_compile_falls_back_with_one_warning_when_torch_compile_fails(monkeypatch, caplog, tmp_path):
    """No real compile here (minutes on 2 cores): torch.compile is made to fail, at setup and at the first call."""
    from difusi.api import get_model
    from difusi.models import default_model_path, load_model
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img
    from difusi.speed.compile import compile_state, compile_unet, inductor_cache_dir

    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored (unset) afterwards
    params = GenerationParams(prompt="a red circle", seed=2, steps=2)
    expected = np.asarray(txt2img(get_model(device="cpu"), params).images[0].image)

    def refuse(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", refuse)
    model = load_model(default_model_path(), device="cpu")
    with caplog.at_level(logging.WARNING, logger="difusi.speed"):
        compile_unet(model)
    assert model.compiled is False and compile_state(model).failed
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (RuntimeError: no C++ compiler found); the UNet runs uncompiled"]
    assert np.array_equal(np.asarray(txt2img(model, params).images[0].image), expected)
    assert inductor_cache_dir() == tmp_path / "inductor" and inductor_cache_dir().is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")

    # Compilation that fails only when first run (where inductor really fails) falls back the same way.
    calls = []

    def lazy_failure(function, **kwargs):
        calls.append(kwargs)

        def compiled(*_args, **_kwargs):
            raise RuntimeError("inductor: unsupported op")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy_failure)
    other = load_model(default_model_path(), device="cpu")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difusi.speed"):
        compile_unet(other)
        assert other.compiled is True  # set up fine; the failure comes at the first call
        image = np.asarray(txt2img(other, params).images[0].image)
    assert other.compiled is False
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    assert np.array_equal(image, expected)
    assert len(caplog.records) == 1 and "unsupported op" in caplog.records[0].getMessage()
    compile_unet(other)  # idempotent: no second wrapper
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]

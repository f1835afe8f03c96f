"""Opt-in lower precision of the compiled UNet graph (issue 18 item 6, `difusi.speed.graph.precision`): bf16 / int8
change the image a little (bounded by PSNR on difusi-mini), fp32 stays the exact graph, the infotext says when a
lower precision ran, and without the backend the job runs exact fp32 with a warning. difusi-mini (5.9 M UNet
parameters, converted inline in ~4 s); skips without openvino (and nncf for int8, a CPU with bf16 for bf16).

Bound: measured on difusi-mini (bench/results/graph-precision.md), 20 steps, 8 prompts: bf16 images are 50.9-54.6 dB
(median) from the exact image, int8 49.1-51.6 dB (max 6 / 9 of 255 on a few edge pixels); the 8-step job used here
measured 47.7 dB (bf16) / 51.8 dB (int8). 30 dB (RMS error 8/255: visibly the same picture) leaves a wide margin for
other CPUs' bf16 kernels while still requiring the same picture; the tests also require the image to differ from
the exact one (else the precision did not apply)."""

import inspect

import numpy as np
import pytest

import difusi  # noqa: F401
from difusi.errors import ParamError
from difusi.models import default_model_path, load_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.speed import graph
from difusi.speed.graph import backends, cache, precision

needs_openvino = pytest.mark.skipif(not backends.installed("openvino"), reason="openvino is not installed")
needs_bf16 = pytest.mark.skipif(not (backends.installed("openvino") and precision.bf16_supported()),
                                reason="OpenVINO reports no native bf16 on this CPU (or is not installed)")
needs_nncf = pytest.mark.skipif(not (backends.installed("openvino") and precision.nncf_installed()),
                                reason="int8 needs openvino and nncf")
PSNR_MIN_DB = 30.0
KEY = "UNet precision"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("graph-precision-cache")


@pytest.fixture(autouse=True)
def graph_cache(shared_cache, monkeypatch):
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(shared_cache))
    monkeypatch.delenv(graph.CONVERT_ENV, raising=False)
    for key in graph.STATS:
        monkeypatch.setitem(graph.STATS, key, 0)
    return shared_cache


@pytest.fixture(scope="module")
def mini():
    return load_model(default_model_path())


def params(**changes) -> GenerationParams:
    base = dict(prompt="a red circle on a blue background", seed=11, steps=8, cfg_scale=7.0,
                sampler_name="DPM++ 2M", scheduler="Karras")
    return GenerationParams(**{**base, **changes})


def run(model, **changes):
    result = txt2img(model, params(**changes))
    return np.asarray(result.images[0].image, dtype=np.float64), result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def exact(mini):
    return run(mini, backend="torch")[0]


def _pipeline_follows_choice() -> bool:
    """Whether `difusi.pipeline` writes the precision that ran (not the request) into the infotext."""
    import difusi.pipeline

    return "choice.precision" in inspect.getsource(difusi.pipeline) or "unet_precision=" in inspect.getsource(
        difusi.pipeline)


def test_field_declared_and_validated():
    spec = difusi.params.FIELDS["unet_precision"]
    assert spec.default == "fp32" and spec.group == "speed" and spec.infotext == KEY
    assert spec.flags == ("--unet-precision",)
    for name in precision.PRECISIONS:
        assert params(unet_precision=name).validated(native_size=64).unet_precision == name
    with pytest.raises(ParamError) as error:
        params(unet_precision="fp16").validated(native_size=64)
    assert error.value.field == "unet_precision" and "bf16" in error.value.message


def test_fp32_writes_no_key_and_parses_back():
    from difusi.infotext import format_infotext, recipe_from_infotext

    fp32 = format_infotext(params(width=64, height=64), 1, 1, "m", "h")
    assert KEY not in fp32
    bf16 = format_infotext(params(width=64, height=64, unet_precision="bf16"), 1, 1, "m", "h")
    assert f"{KEY}: bf16" in bf16
    assert recipe_from_infotext(bf16).params().unet_precision == "bf16"


@needs_openvino
def test_fp32_graph_stays_exact(mini, exact):
    image, result = run(mini, backend="openvino", unet_precision="fp32")
    assert result.warnings == []
    assert np.abs(image - exact).max() <= 2
    assert KEY not in result.images[0].infotext
    assert graph.unet_for(mini, params(backend="openvino")).precision == "fp32"


@pytest.mark.parametrize("name", [pytest.param("bf16", marks=needs_bf16), pytest.param("int8", marks=needs_nncf)])
def test_lower_precision_changes_the_image_a_little(mini, exact, name):
    image, result = run(mini, unet_precision=name)  # backend auto: the opt-in asks for the graph
    assert result.warnings == []
    choice = graph.unet_for(mini, params(unet_precision=name))
    assert choice.backend == "openvino" and choice.precision == name and choice.unet.precision == name
    assert not np.array_equal(image, exact), f"{name} made the exact image: the precision did not apply"
    assert psnr(image, exact) > PSNR_MIN_DB
    assert f"{KEY}: {name}" in result.images[0].infotext


@needs_nncf
def test_int8_is_its_own_cache_entry_and_bf16_shares_f32(mini):
    version = backends.backend_version("openvino")
    f32 = cache.entry_for(mini, "openvino", version)
    int8 = cache.entry_for(mini, "openvino", version, "int8")
    assert f32.folder != int8.folder and "precision" not in f32.facts
    graph.graph_unet(mini, "openvino", "int8")
    assert cache.is_valid(int8) and cache.is_valid(f32)
    assert (int8.folder / "unet.bin").stat().st_size < (f32.folder / "unet.bin").stat().st_size
    # one compiled copy per model, keyed by precision: an fp32 job never gets the int8 graph
    assert graph.graph_unet(mini, "openvino", "fp32").precision == "fp32"
    if precision.bf16_supported():
        bf16 = graph.graph_unet(mini, "openvino", "bf16")
        assert bf16.precision == "bf16" and bf16.entry.folder == f32.folder


def test_torch_backend_runs_exact_fp32_with_a_warning(mini, exact):
    image, result = run(mini, backend="torch", unet_precision="bf16")
    assert np.array_equal(image, exact)
    assert len(result.warnings) == 1 and "not applied" in result.warnings[0] and "\n" not in result.warnings[0]
    choice = graph.unet_for(mini, params(backend="torch", unet_precision="int8"))
    assert choice.backend == "torch" and choice.precision == "fp32" and choice.unet is mini.unet
    if not _pipeline_follows_choice():
        pytest.xfail("difusi.pipeline still writes the requested unet_precision (see the report of issue 18 item 6)")
    assert KEY not in result.images[0].infotext


def test_missing_package_runs_exact_fp32_with_a_warning(mini, exact, monkeypatch):
    def missing(name):
        raise backends.BackendMissing(f"backend {name!r} needs the Python package {backends.PACKAGES[name]!r} "
                                      "(pip install 'difusi[graph]'): ModuleNotFoundError")

    monkeypatch.setattr(backends, "import_backend", missing)
    for name in ("bf16", "int8"):
        for backend in ("auto", "openvino"):
            choice = graph.unet_for(mini, params(backend=backend, unet_precision=name))
            assert choice.backend == "torch" and choice.precision == "fp32" and choice.unet is mini.unet
            assert len(choice.warnings) == 1 and "not applied" in choice.warnings[0]
            assert "openvino" in choice.warnings[0]
    image, result = run(mini, unet_precision="bf16")
    assert np.array_equal(image, exact) and any("not applied" in w for w in result.warnings)


@needs_openvino
def test_unavailable_precision_falls_back_to_the_fp32_rule(mini, monkeypatch):
    monkeypatch.setitem(precision._BF16, "cpu", False)  # a CPU without native bf16
    choice = graph.unet_for(mini, params(backend="openvino", unet_precision="bf16"))
    assert choice.backend == "openvino" and choice.precision == "fp32"
    assert len(choice.warnings) == 1 and "bf16" in choice.warnings[0] and "not applied" in choice.warnings[0]
    monkeypatch.setattr(precision, "nncf_installed", lambda: False)
    choice = graph.unet_for(mini, params(backend="auto", unet_precision="int8"))
    assert choice.precision == "fp32" and "nncf" in choice.warnings[0]


@pytest.mark.parametrize("name", [pytest.param("bf16", marks=needs_bf16), pytest.param("int8", marks=needs_nncf)])
def test_lora_with_lower_precision(name):
    """bf16 takes a LoRA like fp32 (same IR, weights spliced in); the int8 graph's weights are compressed constants,
    so a LoRA that changes UNet weights runs the job on exact fp32 torch, with the warning."""
    model = load_model(default_model_path())
    job = dict(prompt="a red circle on a blue background <lora:difusi-mini-pink:1>")
    exact_lora, _ = run(model, backend="torch", **job)
    image, result = run(model, unet_precision=name, **job)
    if name == "bf16":
        assert result.warnings == [] and not np.array_equal(image, exact_lora)
        assert psnr(image, exact_lora) > PSNR_MIN_DB
    else:
        assert np.array_equal(image, exact_lora)
        assert len(result.warnings) == 1 and "int8" in result.warnings[0] and "not applied" in result.warnings[0]

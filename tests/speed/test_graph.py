"""Compiled-graph UNet backends (issue 18): same images as the torch path, conversion cached once, LoRA switches
without re-conversion, clear fallbacks. Tiny checkpoints; every test skips with a reason when its backend's package is
not installed (`pip install 'difusi[graph]'`)."""

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import difusi  # noqa: F401
from difusi.models import default_model_path, load_model
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.speed import graph
from difusi.speed.graph import backends, cache

GRAPH = [pytest.param(name, marks=pytest.mark.skipif(not backends.installed(name),
                                                     reason=f"{backends.PACKAGES[name]} is not installed"))
         for name in backends.GRAPH_BACKENDS]
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("graph-cache")


@pytest.fixture(autouse=True)
def graph_cache(shared_cache, monkeypatch):
    """This module's cache folder (tests that count conversions take `fresh_cache`) and fresh counters per test;
    conversions inline (tiny UNets) unless a test says."""
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(shared_cache))
    monkeypatch.delenv(graph.CONVERT_ENV, raising=False)
    for key in graph.STATS:
        monkeypatch.setitem(graph.STATS, key, 0)
    return shared_cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def slow_for_openvino() -> list:
    """The backends, with OpenVINO's run marked slow (its conversion of a tiny UNet takes ~4 s, ONNX's ~1 s)."""
    return [pytest.param(*param.values, marks=[*param.marks, pytest.mark.slow]) if param.values[0] == "openvino"
            else param for param in GRAPH]


def params(**changes) -> GenerationParams:
    base = dict(prompt="a photo of a red cat", negative_prompt="blurry", seed=7, steps=4, cfg_scale=6.0,
                sampler_name="Euler", scheduler="Karras", width=64, height=64)
    return GenerationParams(**{**base, **changes})


def pixels(model, job) -> np.ndarray:
    return np.asarray(txt2img(model, job).images[0].image, dtype=np.float32) / 255


def graph_of(model):
    return model.derived.get("graph_unet")


def counting(model):
    """Count the graph runner's calls (to prove the graph, not the torch module, made the image)."""
    runner = graph_of(model).runner
    calls = {"n": 0}
    original = runner.run

    def run(feeds):
        calls["n"] += 1
        return original(feeds)

    runner.run = run
    return calls


@pytest.mark.parametrize("backend", GRAPH)
@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_graph_image_equals_torch_image(tiny_file, family, backend):
    model = load_model(tiny_file(family))
    job = params(steps=3)
    reference = pixels(model, job)
    choice = graph.unet_for(model, job.replace(backend=backend))
    assert choice.backend == backend and choice.warnings == []
    calls = counting(model)
    image = pixels(model, job.replace(backend=backend))
    assert calls["n"] == 3 and graph_of(model).torch_calls == 0  # 3 Euler steps, one CFG call each
    assert np.abs(image - reference).max() <= TOLERANCE
    if family == "sd1":  # another size and a CFG-free batch of 2 (other dynamic dims) on the same graph
        other = job.replace(backend=backend, width=96, height=64, batch_size=2, cfg_scale=1.0)
        assert np.abs(pixels(model, other) - pixels(model, other.replace(backend="torch"))).max() <= TOLERANCE
    assert graph.STATS["conversions"] <= 1 and graph_of(model).torch_calls == 0


@pytest.mark.parametrize("backend", GRAPH)
def test_graph_output_within_float_rounding(tiny_file, backend):
    model = load_model(tiny_file("sd1"))
    unet = graph.unet_for(model, params(backend=backend)).unet
    x, t, context = torch.randn(2, 4, 16, 24), torch.tensor([999.0, 10.0]), torch.randn(2, 154, 64)
    with torch.inference_mode():
        expected = model.unet(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, encoder_hidden_states=context).sample
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max()))
    odd = torch.randn(1, 4, 15, 16)  # not divisible by the UNet's downsampling: the torch module takes it
    with torch.inference_mode():
        assert torch.equal(unet(odd, t[:1], encoder_hidden_states=context[:1]).sample,
                           model.unet(odd, t[:1], encoder_hidden_states=context[:1]).sample)
    assert graph_of(model).torch_calls == 1


@pytest.mark.parametrize("backend", GRAPH)
def test_second_use_loads_cached_graph_without_converting(tiny_file, fresh_cache, backend):
    path = tiny_file("sd1")
    graph.unet_for(load_model(path), params(backend=backend))
    assert graph.STATS == {"conversions": 1, "loads": 1, "rebuilt_corrupt": 0}
    model = load_model(path)  # a new process would see the same: only the disk cache is shared
    started = time.perf_counter()
    choice = graph.unet_for(model, params(backend="auto"))  # auto: a cached graph exists, so it is used
    assert choice.backend == backend
    assert graph.STATS["conversions"] == 1 and graph.STATS["loads"] == 2
    assert time.perf_counter() - started < 5
    graph.unet_for(model, params(backend=backend))  # the same model again: kept in memory, nothing rebuilt
    assert graph.STATS["conversions"] == 1


@pytest.mark.parametrize("backend", slow_for_openvino())
def test_changed_checkpoint_file_is_converted_again(tmp_path, fresh_cache, backend):
    path = tmp_path / "changing.safetensors"
    write_tiny_checkpoint(path, "sd1", seed=1)
    first = load_model(path)
    graph.unet_for(first, params(backend=backend))
    write_tiny_checkpoint(path, "sd1", seed=2)
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime, so the file's hash is recomputed
    second = load_model(path)
    assert second.sha256 != first.sha256
    graph.unet_for(second, params(backend=backend))
    assert graph.STATS["conversions"] == 2
    assert np.abs(pixels(second, params(backend=backend)) - pixels(second, params(backend="torch"))).max() <= TOLERANCE


@pytest.mark.parametrize("backend", slow_for_openvino())
@pytest.mark.parametrize("damage", ["truncate", pytest.param("garbage", marks=pytest.mark.slow),
                                    pytest.param("no-entry-file", marks=pytest.mark.slow)])
def test_corrupt_cache_entry_is_rebuilt(tiny_file, fresh_cache, backend, damage):
    path = tiny_file("sd1")
    graph.unet_for(load_model(path), params(backend=backend))
    folder = next(p for p in cache.cache_root().iterdir() if not p.name.startswith("."))
    graph_file, weights_file = ("unet.xml", "unet.bin") if backend == "openvino" else ("unet.onnx", "unet.onnx.data")
    if damage == "truncate":
        with (folder / weights_file).open("r+b") as handle:
            handle.truncate(100)
    elif damage == "garbage":  # same size, wrong bytes: passes the size check, fails to load
        size = (folder / graph_file).stat().st_size
        (folder / graph_file).write_bytes(b"\x00" * size)
    else:
        (folder / "entry.json").unlink()
    model = load_model(path)
    choice = graph.unet_for(model, params(backend=backend))
    assert choice.backend == backend and choice.warnings == []
    assert graph.STATS["conversions"] == 2 and graph.STATS["rebuilt_corrupt"] == 1
    assert cache.is_valid(graph_of(model).entry)
    assert np.abs(pixels(model, params(backend=backend)) - pixels(model, params(backend="torch"))).max() <= TOLERANCE


@pytest.mark.parametrize("backend", GRAPH)
def test_lora_switch_on_graph_equals_torch_without_reconversion(fresh_cache, backend):
    model = load_model(default_model_path())
    jobs = [params(prompt=f"a red cat{tag}", width=64, height=64, steps=3)
            for tag in (" <lora:difusi-mini-pink:1>", "", " <lora:difusi-mini-pink:0.5>", " <lora:difusi-mini-pink:1>")]
    torch_images = [pixels(model, job.replace(backend="torch")) for job in jobs[:3]]
    graph_images = [pixels(model, job.replace(backend=backend)) for job in jobs]
    for expected, got in zip(torch_images + torch_images[:1], graph_images, strict=True):
        assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(torch_images[0] - torch_images[1]).max() > 10 / 255  # the LoRA does change the image
    assert graph.STATS["conversions"] == 1 and graph.STATS["loads"] == 1
    assert graph_of(model).builds == 4  # one build per weight set
    pixels(model, jobs[3].replace(backend=backend, seed=8))  # same LoRA again: weights not re-uploaded
    assert graph_of(model).builds == 4


@pytest.mark.parametrize("backend", GRAPH)
def test_release_drops_the_compiled_graph(tiny_file, backend):
    model = load_model(tiny_file("sd1"))
    assert graph.unet_for(model, params(backend=backend)).backend == backend
    graph.release(model)
    assert graph_of(model) is None
    assert graph.unet_for(model, params(backend="torch")).unet is model.unet


def test_missing_package_warns_once_and_runs_torch(tiny_file, monkeypatch):
    def missing(name):
        raise backends.BackendMissing(f"backend {name!r} needs the Python package {backends.PACKAGES[name]!r} "
                                      "(pip install 'difusi[graph]'): ModuleNotFoundError")

    monkeypatch.setattr(backends, "import_backend", missing)
    model = load_model(tiny_file("sd1"))
    for name in backends.GRAPH_BACKENDS:
        choice = graph.unet_for(model, params(backend=name))
        assert choice.backend == "torch" and choice.unet is model.unet
        assert len(choice.warnings) == 1 and "\n" not in choice.warnings[0]
        assert backends.PACKAGES[name] in choice.warnings[0] and "runs on torch" in choice.warnings[0]
    assert graph.unet_for(model, params(backend="auto")).backend == "torch"
    assert graph.unet_for(model, params(backend="auto")).warnings == []
    assert txt2img(model, params(backend="openvino")).images
    assert graph.STATS["conversions"] == 0


@pytest.mark.parametrize("backend", GRAPH)
def test_deepcache_and_tome_fall_back_to_torch_with_a_warning(tiny_file, backend):
    model = load_model(tiny_file("sd1"))
    for changes in ({"deepcache_interval": 3}, {"token_merging_ratio": 0.5}):
        choice = graph.unet_for(model, params(backend=backend, **changes))
        assert choice.backend == "torch" and choice.unet is model.unet
        assert len(choice.warnings) == 1 and "DeepCache and ToMe" in choice.warnings[0]
    assert graph.STATS["conversions"] == 0  # decided before any conversion


def test_auto_keeps_small_jobs_on_torch_and_converts_big_ones(tiny_file, fresh_cache):
    model = load_model(tiny_file("sd1"))
    if not graph.available_backends():
        assert graph.unet_for(model, params()).backend == "torch"
        pytest.skip("no graph backend installed")
    assert graph.unet_for(model, params()).backend == "torch"  # tiny UNet, nothing cached: not worth a conversion
    assert graph.STATS["conversions"] == 0
    saved, cost = graph.estimates(model, params())
    assert saved < cost
    # The rule at SD 1.5 size (860 M parameters): sixteen 512 px 20-step CFG images pay, a 256 px 4-step one does not.
    sd15, eight = graph.SD15_PARAMS, SimpleNamespace(vae_scale_factor=8)
    big = graph.SAVED_S_PER_MPIX_CALL * graph.job_work(eight, params(width=512, height=512, steps=20, n_iter=16))
    small = graph.SAVED_S_PER_MPIX_CALL * graph.job_work(eight, params(width=256, height=256, steps=4))
    cost = graph.CONVERT_FIXED_S + graph.CONVERT_S_PER_GPARAM * sd15 / 1e9
    assert small < cost < big


def test_cache_eviction_removes_least_recently_used(fresh_cache):
    root = cache.cache_root()
    for number, age in ((1, 300), (2, 200), (3, 100)):
        folder = root / f"entry{number}"
        folder.mkdir(parents=True)
        (folder / "unet.onnx.data").write_bytes(b"x" * 1000)
        os.utime(folder, (time.time() - age, time.time() - age))
    removed = cache.evict(keep=root / "entry1", cap=2000)
    assert [p.name for p in removed] == ["entry2"]
    assert sorted(p.name for p in root.iterdir()) == ["entry1", "entry3"]


@pytest.mark.parametrize("backend", GRAPH[1:] if backends.installed("onnx") else GRAPH[:1])
def test_conversion_in_a_fresh_process_shows_its_stages(tiny_file, fresh_cache, monkeypatch, capfd, backend):
    monkeypatch.setenv(graph.CONVERT_ENV, "process")
    model = load_model(tiny_file("sd1"))
    choice = graph.unet_for(model, params(backend=backend))
    assert choice.backend == backend and graph.STATS["conversions"] == 1
    err = capfd.readouterr().err
    for stage in ("stage 1/4: loading the checkpoint", "stage 2/4: tracing the UNet", "stage 4/4: checking the graph"):
        assert stage in err
    assert np.abs(pixels(model, params(backend=backend)) - pixels(model, params(backend="torch"))).max() <= TOLERANCE


def test_graph_and_inductor_caches_live_in_difusis_one_cache_folder(monkeypatch, tmp_path):
    from difusi.models.hashing import cache_dir
    from difusi.speed.compile import inductor_cache_dir

    monkeypatch.delenv("DIFUSI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == cache_dir() / "graph" == tmp_path / "xdg" / "difusi" / "graph"
    assert inductor_cache_dir() == tmp_path / "xdg" / "difusi" / "inductor"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIFUSI_CACHE_DIR", "~/mine")
    assert cache.cache_root() == tmp_path / "mine" / "graph"

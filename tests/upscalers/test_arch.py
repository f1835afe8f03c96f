"""difusi's RRDBNet / SRVGGNetCompact against spandrel's on the same random weights, read from saved files."""

from __future__ import annotations

import os

import pytest
import torch
from builders import rrdbnet_basicsr, srvgg_compact, to_old_esrgan, write_model

from difusi.errors import ParamError
from difusi.upscalers import arch, loading


@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("layout", ["basicsr", "esrgan"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_rrdbnet_matches_spandrel(tmp_path, spandrel_arches, scale, layout, suffix):
    state = rrdbnet_basicsr(num_feat=16, num_blocks=2, scale=scale, seed=scale)
    if layout == "esrgan":
        state = to_old_esrgan(state)
    path = write_model(tmp_path / f"model{suffix}", state)
    loaded = loading.load_upscaler(path)
    assert loaded.spec.scale == scale and loaded.spec.num_blocks == 2 and loaded.spec.num_feat == 16
    assert loaded.spec.layout == layout and loaded.spec.unshuffle == {4: 1, 2: 2, 1: 4}[scale]
    reference = spandrel_arches.esrgan.load(dict(state))
    assert reference.scale == scale
    x = torch.rand(1, 3, 21, 18, generator=torch.Generator().manual_seed(0))  # odd size: unshuffle padding
    with torch.inference_mode():
        ours, theirs = loaded.module(x), reference.model.eval()(x)
    assert ours.shape == theirs.shape == (1, 3, 21 * scale, 18 * scale)
    assert ours.std() > 0.05  # not a constant image: the comparison sees real values
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [4, 2])
def test_compact_matches_spandrel(tmp_path, spandrel_arches, scale):
    state = srvgg_compact(num_feat=16, num_conv=3, scale=scale, seed=scale)
    loaded = loading.load_upscaler(write_model(tmp_path / "compact.pth", state))
    assert (loaded.spec.architecture, loaded.spec.scale, loaded.spec.num_blocks) == (arch.COMPACT, scale, 3)
    x = torch.rand(1, 3, 17, 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = loaded.module(x), spandrel_arches.compact.load(dict(state)).model.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_detection_reads_shapes_only():
    shapes = {key: tuple(value.shape) for key, value in rrdbnet_basicsr(num_feat=24, num_blocks=3).items()}
    spec = arch.detect(shapes)
    assert (spec.num_feat, spec.num_blocks, spec.num_grow, spec.scale, spec.in_nc) == (24, 3, 32, 4, 3)
    assert arch.detect({k: tuple(v.shape) for k, v in srvgg_compact(num_conv=5).items()}).num_blocks == 5


@pytest.mark.parametrize(("state", "found"), [
    ({"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "LoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, "Stable Diffusion checkpoint"),
    ({"a": torch.zeros(3), "b": torch.zeros(2)}, "2 tensors with other keys"),
])
def test_other_files_are_refused_naming_what_was_expected(tmp_path, state, found):
    path = write_model(tmp_path / "thing.safetensors", state)
    with pytest.raises(ParamError) as caught:
        loading.load_upscaler(path, field="upscaler_1")
    assert caught.value.field == "upscaler_1"
    assert "thing.safetensors is not an upscaler model" in caught.value.message
    assert found in caught.value.message and "RRDBNet" in caught.value.message


def test_wrong_shapes_are_refused_not_half_loaded(tmp_path):
    state = rrdbnet_basicsr(num_blocks=1)
    state["conv_hr.weight"] = torch.zeros(16, 8, 3, 3)
    with pytest.raises(ParamError, match="weights do not fit"):
        loading.load_upscaler(write_model(tmp_path / "bad.pth", state))


class _Payload:
    """Unpickling this calls os.system: the classic malicious-checkpoint trick."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": rrdbnet_basicsr(num_blocks=1), "hook": _Payload(marker)}, path)
    with pytest.raises(ParamError, match="NOT executed") as caught:
        loading.load_upscaler(path, field="upscaler_1")
    assert caught.value.field == "upscaler_1" and "evil.pth" in caught.value.message
    assert not marker.exists()

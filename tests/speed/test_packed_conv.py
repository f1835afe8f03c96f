"""Reordered convolution weights (difusi.speed.packed_conv), part of the exact CPU path.

Claims under test: a `PackedConv2d` gives exactly the bits of the plain channels_last convolution for every shape,
whichever way the timing went; its copy follows every in-place write of the weight (a LoRA merge); it keeps a copy
only where one was measured faster, never without memory, and never travels in a deepcopy.
"""

import copy

import numpy as np
import pytest
import torch
from speed_helpers import difusi_pixels

from difusi.models import load_model
from difusi.networks import apply
from difusi.params import GenerationParams
from difusi.speed import packed_conv, prepare_model, restore_model
from difusi.speed.packed_conv import PackedConv2d

pytestmark = pytest.mark.skipif(not packed_conv.available(), reason="torch built without oneDNN convolutions")

LAYERS = [
    dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    dict(in_channels=32, out_channels=64, kernel_size=1),
    dict(in_channels=64, out_channels=32, kernel_size=3, stride=2, padding=1),
    dict(in_channels=64, out_channels=4, kernel_size=3, padding=1),  # a shape torch runs elsewhere at batch 1
    dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, groups=2, bias=False),
]
SHAPES = [(2, 8, 8), (1, 8, 8), (2, 9, 7), (1, 16, 16)]


def _pair(config):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(**config).requires_grad_(False).to(memory_format=torch.channels_last)
    packed = copy.deepcopy(plain)
    packed.__class__ = PackedConv2d
    return plain, packed


def _calls(plain, packed, shapes, repeats=4):
    for _ in range(repeats):
        for batch, height, width in shapes:
            x = torch.randn(batch, plain.in_channels, height, width)
            with torch.inference_mode():
                expected, got = plain(x), packed(x)
            assert torch.equal(got, expected), (batch, height, width, float((got - expected).abs().max()))


@pytest.mark.parametrize("mode", ["1", ""])
@pytest.mark.parametrize("config", LAYERS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_same_bits_as_the_plain_channels_last_convolution(config, mode, monkeypatch):
    monkeypatch.setenv(packed_conv.ENV, mode)
    plain, packed = _pair(config)
    _calls(plain, packed, [(b, h, w) for b, h, w in SHAPES])


def test_batch_one_shapes_with_other_kernels_never_use_the_copy(monkeypatch):
    """torch runs this batch-1 shape through another kernel (different last bits): the copy must not serve it."""
    monkeypatch.setenv(packed_conv.ENV, "1")
    plain, packed = _pair(LAYERS[3])
    x = torch.randn(1, 64, 8, 8)
    with torch.inference_mode():
        packed(x)
        state = packed_conv._STATE[packed]
        reordered = torch._C._nn.mkldnn_reorder_conv2d_weight(
            plain.weight.contiguous().to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        other = torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), reordered, plain.bias, [1, 1], [1, 1], [1, 1], 1,
            "none", [], "")
        assert state.faster[tuple(x.shape)] is torch.equal(other, plain(x))
        assert torch.equal(packed(x), plain(x))


def test_the_copy_follows_in_place_writes_of_the_weight(monkeypatch):
    monkeypatch.setenv(packed_conv.ENV, "1")
    plain, packed = _pair(LAYERS[0])
    x = torch.randn(2, 64, 8, 8)
    with torch.inference_mode():
        packed(x)
    assert packed_conv.kept_copies(packed) == 1
    torch.manual_seed(1)
    merged, bias = plain.weight + 0.1 * torch.randn_like(plain.weight), plain.bias - 0.5
    apply._write(packed, merged, bias)  # the LoRA merge's writer
    with torch.no_grad():
        plain.weight.copy_(merged)
        plain.bias.copy_(bias)
    _calls(plain, packed, [(2, 8, 8)], repeats=2)
    with torch.no_grad():
        packed.state_dict()["weight"].mul_(0.5)  # a state-dict tensor shares the version counter
        plain.weight.mul_(0.5)
    _calls(plain, packed, [(2, 8, 8)], repeats=2)


@pytest.mark.parametrize("gain, kept", [(-1e9, 1), (1.0, 0)])
def test_measured_mode_keeps_a_copy_only_where_it_was_faster(gain, kept, monkeypatch):
    monkeypatch.setenv(packed_conv.ENV, "")
    monkeypatch.setattr(packed_conv, "MIN_GAIN", gain)  # -1e9: always "faster"; 1.0: never
    plain, packed = _pair(LAYERS[0])
    _calls(plain, packed, [(2, 8, 8)], repeats=3)
    state = packed_conv._STATE[packed]
    assert state.faster == {(2, 64, 8, 8): bool(kept)} and not state.calls and not state.plain_seconds
    assert packed_conv.kept_copies(packed) == kept
    _calls(plain, packed, [(2, 8, 8)], repeats=2)


def test_no_copy_without_memory_and_none_in_a_deepcopy(monkeypatch):
    monkeypatch.setenv(packed_conv.ENV, "1")
    plain, packed = _pair(LAYERS[0])
    monkeypatch.setattr(packed_conv, "_room_for", lambda nbytes: False)
    _calls(plain, packed, [(2, 8, 8)], repeats=2)
    assert packed_conv.kept_copies(packed) == 0
    monkeypatch.undo()
    monkeypatch.setenv(packed_conv.ENV, "1")
    fresh = copy.deepcopy(plain)
    fresh.__class__ = PackedConv2d
    _calls(plain, fresh, [(2, 8, 8)], repeats=1)
    assert packed_conv.kept_copies(fresh) == 1
    twin = copy.deepcopy(fresh)
    assert type(twin) is PackedConv2d and packed_conv.kept_copies(twin) == 0
    _calls(plain, twin, [(2, 8, 8)], repeats=1)


def test_no_copy_larger_than_the_available_memory():
    assert not packed_conv._room_for(1 << 60)  # no machine has an exbibyte available


def test_images_on_the_exact_path_do_not_depend_on_the_copies(tiny_file, monkeypatch):
    """One model per setting, same job (NGMS makes batch-1 and batch-2 calls): never, always, measured."""
    params = GenerationParams(prompt="a red circle", seed=3, steps=4, width=64, height=64, batch_size=2,
                              s_min_uncond=2.0)
    images = {}
    for mode in ("0", "1", ""):
        monkeypatch.setenv(packed_conv.ENV, mode)
        model = load_model(tiny_file("sd1"))
        images[mode], _ = difusi_pixels(model, params)  # float pixels: not hidden by 8-bit rounding
        convs = {type(sub) for sub in model.unet.modules() if isinstance(sub, torch.nn.Conv2d)}
        assert convs == ({torch.nn.Conv2d} if mode == "0" else {PackedConv2d})
        if mode == "1":
            assert packed_conv.kept_copies(model.unet) > 0 and packed_conv.kept_copies(model.vae) > 0
            restore_model(model)
            assert {type(s) for s in model.unet.modules() if isinstance(s, torch.nn.Conv2d)} == {torch.nn.Conv2d}
            assert packed_conv.kept_copies(model.unet) == 0
            assert prepare_model(model, force=True)
    assert np.array_equal(images["0"], images["1"]) and np.array_equal(images["0"], images[""])


def test_inference_tensor_weights_have_no_version_counter_and_stay_plain(monkeypatch):
    monkeypatch.setenv(packed_conv.ENV, "1")
    plain, packed = _pair(LAYERS[0])
    with torch.inference_mode():  # e.g. a module moved or converted inside inference_mode
        packed.weight = torch.nn.Parameter(packed.weight.clone(), requires_grad=False)
    assert packed.weight.is_inference()
    _calls(plain, packed, [(2, 8, 8)], repeats=2)
    assert packed_conv.kept_copies(packed) == 0

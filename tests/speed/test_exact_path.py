"""The exact CPU fast path (difusi.speed.exact) is on by default and gives diffusers' eager output.

Claim under test: oneDNN linears + channels_last weights change only summation order, so the final image
stays within 1e-3 (max abs, float pixels in [0, 1]) of diffusers' eager pipeline on the same weights.
"""

import numpy as np
import pytest
import torch
from speed_helpers import diffusers_pixels, difusi_pixels, euler_params

from difusi.models import load_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.speed import exact, prepare_model, restore_model
from difusi.speed.exact import OneDNNLinear

pytestmark = pytest.mark.skipif(not exact.onednn_linear_available(), reason="torch built without oneDNN")


def _linear_classes(module):
    return {type(sub) for sub in module.modules() if isinstance(sub, torch.nn.Linear)}


def _conv_weights_channels_last(module):
    weights = [sub.weight for sub in module.modules() if isinstance(sub, torch.nn.Conv2d) and sub.weight.shape[-1] > 1]
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in weights) and bool(weights)


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (3, 4, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_torch_linear(shape, bias):
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 96, bias=bias).eval()
    fast = torch.nn.Linear(64, 96, bias=bias).eval()
    fast.load_state_dict(reference.state_dict())
    fast.__class__ = OneDNNLinear
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = reference(x)
        got = fast(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_onednn_linear_falls_back_for_half_and_autograd():
    layer = torch.nn.Linear(8, 4)
    layer.__class__ = OneDNNLinear
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # the oneDNN op has no autograd: the fallback must be taken
    assert x.grad is not None and x.grad.shape == x.shape
    half = layer.half()
    assert half(torch.randn(3, 8).half()).dtype == torch.float16


def test_txt2img_prepares_the_model_and_restore_gives_eager_modules_back(tiny_file):
    model = load_model(tiny_file("sd1"))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    assert _linear_classes(model.unet) == {torch.nn.Linear}
    txt2img(model, GenerationParams(prompt="x", seed=1, steps=1, width=64, height=64))
    assert _linear_classes(model.unet) == {OneDNNLinear}
    assert _linear_classes(model.text_encoders[0].model) == {OneDNNLinear}
    assert _conv_weights_channels_last(model.unet) and _conv_weights_channels_last(model.vae)
    after = model.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    restore_model(model)
    assert _linear_classes(model.unet) == {torch.nn.Linear}
    assert not _conv_weights_channels_last(model.unet)
    txt2img(model, GenerationParams(prompt="x", seed=1, steps=1, width=64, height=64))
    assert _linear_classes(model.unet) == {torch.nn.Linear}, "a restored model stays eager"
    assert prepare_model(model, force=True) and _linear_classes(model.unet) == {OneDNNLinear}


def test_difusi_eager_environment_variable_keeps_diffusers_modules(tiny_file, monkeypatch):
    monkeypatch.setenv("DIFUSI_EAGER", "1")
    model = load_model(tiny_file("sd1"))
    txt2img(model, GenerationParams(prompt="x", seed=1, steps=1, width=64, height=64))
    assert _linear_classes(model.unet) == {torch.nn.Linear}


@pytest.mark.parametrize("family", ["sd1"])
def test_fast_path_image_matches_diffusers_eager(tiny_file, family):
    """difusi on the fast path vs diffusers' StableDiffusionPipeline on a separately loaded, eager copy."""
    fast_model = load_model(tiny_file(family))
    eager_model = load_model(tiny_file(family))
    restore_model(eager_model)
    params = euler_params()
    ours, _ = difusi_pixels(fast_model, params)
    assert _linear_classes(fast_model.unet) == {OneDNNLinear}
    theirs = diffusers_pixels(eager_model, params)
    assert _linear_classes(eager_model.unet) == {torch.nn.Linear}
    assert np.abs(ours - theirs).max() <= 1e-3


@pytest.mark.slow
def test_full_size_sd15_unet_fast_path_matches_eager(tmp_path):
    """The real SD 1.5 UNet (random weights) at 32x32 latents: fast path vs eager module outputs."""
    from difusi.models.synthetic import write_random_ldm_file

    path = write_random_ldm_file(tmp_path / "sd15.safetensors")
    model = load_model(path)
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 32, 32), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 768)
    with torch.inference_mode():
        eager = model.unet(x, t, encoder_hidden_states=context).sample
        prepare_model(model)
        fast = model.unet(x, t, encoder_hidden_states=context).sample
    assert _linear_classes(model.unet) == {OneDNNLinear}
    assert float((fast - eager).abs().max()) <= 1e-3 * float(eager.abs().max())


@pytest.mark.slow
def test_full_size_sd15_reordered_conv_weights_give_the_plain_exact_bits(tmp_path, monkeypatch):
    """The real SD 1.5 UNet at 32x32 latents: the exact path with reordered convolution weights (where the copies
    are used) computes exactly the plain exact path's bits (difusi.speed.packed_conv)."""
    from difusi.models.synthetic import write_random_ldm_file
    from difusi.speed import packed_conv

    model = load_model(write_random_ldm_file(tmp_path / "sd15.safetensors"))
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 32, 32), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 768)
    monkeypatch.setenv(packed_conv.ENV, "0")
    prepare_model(model)  # outside inference_mode, as txt2img does: weights made inside it would be inference
    with torch.inference_mode():  # tensors, which have no version counter, so they never get a copy
        plain = model.unet(x, t, encoder_hidden_states=context).sample
    restore_model(model)
    monkeypatch.setenv(packed_conv.ENV, "1")
    prepare_model(model, force=True)
    with torch.inference_mode():
        first = model.unet(x, t, encoder_hidden_states=context).sample  # decides per layer, plain bits
        reordered = model.unet(x, t, encoder_hidden_states=context).sample
    assert packed_conv.kept_copies(model.unet) > 0
    assert torch.equal(first, plain) and torch.equal(reordered, plain)

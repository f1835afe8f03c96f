"""Half precision on the CPU (torch 2.x runs fp16 and bf16 convolutions, attention and norms there): the same code
paths a GPU run takes, measured against float32 on difusi-mini (issue 17 item 1/2).

Measured on this machine (difusi-mini, 64x64, 8 steps DPM++ 2M, seed 3, CFG 7): fp16 vs fp32 max 2/255, mean
0.15/255; bf16 vs fp32 max 15/255, mean 1.7/255 (bfloat16 keeps 8 mantissa bits to fp16's 11). The bounds below
leave room for other seeds and BLAS builds, and require a difference: a zero would mean the half-precision path
never ran.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difusi.models import default_model_path, load_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img

PARAMS = GenerationParams(prompt="a big red circle on a blue background", seed=3, steps=8, batch_size=1)

# (max, mean) bounds in 8-bit levels, per precision.
BOUNDS = {"fp16": (12, 1.0), "bf16": (48, 5.0)}


@pytest.fixture(scope="module")
def fp32_result():
    return txt2img(load_model(default_model_path(), device="cpu", precision="fp32"), PARAMS)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_end_to_end_is_close_to_fp32_and_not_equal(fp32_result, precision):
    model = load_model(default_model_path(), device="cpu", precision=precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert model.precision.name == precision and model.dtype == dtype
    assert {p.dtype for p in model.unet.parameters()} == {dtype}
    assert {p.dtype for p in model.text_encoders[0].model.parameters()} == {dtype}
    assert {p.dtype for p in model.vae.parameters()} == {dtype}

    seen: list[torch.dtype] = []
    result = txt2img(model, PARAMS, progress=lambda p: seen.append(p.latents.dtype))
    assert set(seen) == {torch.float32}  # the sampler works in float32; only the UNet call is cast

    difference = np.abs(_pixels(result) - _pixels(fp32_result))
    most, mean = BOUNDS[precision]
    assert 0 < difference.max() <= most, difference.max()
    assert 0 < difference.mean() <= mean, difference.mean()
    # Device and precision never reach the infotext (the noise source does: RNG: CPU).
    assert result.infotexts == fp32_result.infotexts
    assert "RNG: CPU" in result.infotexts[0]


def test_the_unet_call_is_where_the_cast_happens(monkeypatch):
    """Latents reach the UNet in its dtype and leave it as float32."""
    model = load_model(default_model_path(), device="cpu", precision="bf16")
    original = model.unet.forward
    inputs: list[torch.dtype] = []
    outputs: list[torch.dtype] = []

    def spy(sample, *args, **kwargs):
        inputs.append(sample.dtype)
        out = original(sample, *args, **kwargs)
        outputs.append(out.sample.dtype)
        return out

    monkeypatch.setattr(model.unet, "forward", spy)
    txt2img(model, PARAMS.replace(steps=2))
    assert set(inputs) == {torch.bfloat16} and set(outputs) == {torch.bfloat16} and len(inputs) == 2


def test_attention_is_pytorch_sdpa_everywhere(monkeypatch):
    import difusi.models.layers as layers

    model = load_model(default_model_path(), device="cpu")
    calls = []
    fused = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.inference_mode():
        model.unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]),
                   encoder_hidden_states=torch.zeros(1, 77, model.text_encoders[0].width))
        unet_calls = len(calls)
        model.vae.decode(torch.zeros(1, model.latent_channels, 8, 8))
    assert unet_calls > 0 and len(calls) > unet_calls  # difusi's own UNet and VAE attend through the fused kernel
    assert model.text_encoders[0].model.config._attn_implementation == "sdpa"


def test_dtype_argument_still_sets_every_network(tiny_checkpoint):
    model = load_model(tiny_checkpoint("sd1"), device="cpu", precision="fp16", dtype=torch.bfloat16)
    assert model.precision.name == "bf16"  # dtype wins over precision, as the older callers expect
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}


def test_cache_reloads_for_another_precision_and_keeps_the_same(tiny_checkpoint):
    from difusi.models import ModelCache

    cache = ModelCache()
    fp32 = cache.get(tiny_checkpoint("sd1"), device="cpu")
    assert cache.get(tiny_checkpoint("sd1"), device="auto", precision="auto") is fp32  # auto = cpu, fp32 here
    assert cache.get(tiny_checkpoint("sd1"), device="cpu", precision="fp32") is fp32
    half = cache.get(tiny_checkpoint("sd1"), device="cpu", precision="fp16")
    assert half is not fp32 and half.precision.name == "fp16"
    sequential = cache.get(tiny_checkpoint("sd1"), device="cpu", precision="fp16", offload="sequential")
    assert sequential is not half and sequential.offload == "sequential"
    with pytest.raises(Exception, match="device: 'cuda' is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        cache.get(tiny_checkpoint("sd1"), device="cuda")
    assert cache.current is sequential  # a refused device leaves the held model alone

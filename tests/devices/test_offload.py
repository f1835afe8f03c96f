"""Offload hooks (`difusi.models.offload`): counted on the CPU, and proven to move weights with the `meta` device.

There is no GPU here, so two stand-ins test what a GPU run relies on:
- with device "cpu" the hooks run for real (every load/unload happens, each move is a no-op), so the counts and the
  unchanged image show *when* each block is loaded;
- with device "meta" a block only computes if its weights and inputs really were moved (meta tensors carry shapes,
  no data), and its weights must be back on the CPU afterwards; that shows *what* is moved.
Peak GPU memory per mode is measured by tools/gpu-check.sh on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from difusi.models import load_model
from difusi.models.offload import Offload, _blocks, apply_offload, model_unit, sequential_units
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.speed import prepare_model

META = torch.device("meta")


class Net(nn.Module):
    """A stem, a list of blocks and a head: the shape of a UNet, small enough to trace by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])
        self.act = nn.SiLU()  # no tensors: never a unit
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.act(x))


def _text_models(model):
    return [encoder.model for encoder in model.text_encoders]


def test_blocks_are_the_called_children_and_cover_every_parameter(tiny_checkpoint):
    net = Net()
    assert [type(b).__name__ for b in _blocks(net)] == ["Linear", "Sequential", "Sequential", "Sequential", "Linear"]
    model = load_model(tiny_checkpoint("sdxl"), device="cpu")
    for network in (model.unet, model.vae, *_text_models(model)):
        blocks = list(_blocks(network))
        covered = {id(p) for block in blocks for p in block.parameters()}
        assert covered == {id(p) for p in network.parameters()}, type(network).__name__
        assert len(blocks) > 3
    unet_blocks = list(_blocks(model.unet))
    assert all(block in unet_blocks for block in model.unet.down_blocks)  # split at the block lists


def test_sequential_hooks_move_each_block_to_the_device_and_back():
    net = Net()
    offload = Offload("sequential", META)
    sequential_units(net, offload)
    assert all(p.device.type == "cpu" for p in net.parameters())
    out = net(torch.randn(2, 4))
    assert out.device == META and out.shape == (2, 2)  # every block computed on moved weights and inputs
    assert all(p.device.type == "cpu" for p in net.parameters())  # ... and each went back after its forward
    assert (offload.loads, offload.unloads) == (5, 5)
    offload.remove()
    assert net(torch.randn(2, 4)).device.type == "cpu"  # hooks gone: plain CPU module again


def test_model_mode_keeps_one_component_resident_and_the_unet_evicts_it():
    unet, text, vae = Net(), Net(), Net()
    offload = Offload("model", META)
    unet.to(META)
    from difusi.models.offload import evict_on_forward

    evict_on_forward(unet, offload)
    text_unit = model_unit([text], [text], offload)
    vae_unit = model_unit([vae.stem, vae.head], [vae], offload)
    text(torch.randn(1, 4))  # encoding: the text encoder loads and stays for the call
    assert offload.resident is text_unit and next(text.parameters()).device == META
    unet(torch.randn(1, 4))  # the first UNet call sends it back to the CPU
    assert offload.resident is None and next(text.parameters()).device.type == "cpu"
    vae(torch.randn(1, 4))  # decoding: the whole VAE comes, through any entry module
    assert offload.resident is vae_unit and all(p.device == META for p in vae.parameters())
    text(torch.randn(1, 4))  # the next job's encoding evicts the VAE
    assert all(p.device.type == "cpu" for p in vae.parameters()) and offload.resident is text_unit
    assert (text_unit.loads, text_unit.unloads, vae_unit.loads, vae_unit.unloads) == (2, 1, 1, 1)


def test_a_converted_network_keeps_its_new_dtype_through_offload():
    """The VAE's float32 NaN fallback converts the module in place; offload must not bring the old fp16 back."""
    net = Net().half()
    offload = Offload("sequential", torch.device("cpu"))
    sequential_units(net, offload)
    net.float()
    net(torch.randn(1, 4))
    assert {p.dtype for p in net.parameters()} == {torch.float32}


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_the_same_image_with_the_hooks_running(tiny_checkpoint, mode):
    params = GenerationParams(prompt="a red circle", seed=5, steps=3, width=64, height=64, batch_size=2)
    plain = load_model(tiny_checkpoint("sd1"), device="cpu")
    expected = [np.asarray(image.image) for image in txt2img(plain, params).images]

    model = load_model(tiny_checkpoint("sd1"), device="cpu")
    prepare_model(model)  # the exact CPU path first (it rewrites modules), then the hooks, as on a real CPU run
    offload = apply_offload(model.unet, model.vae, _text_models(model), mode, torch.device("cpu"), force=True)
    result = txt2img(model, params)
    for got, want in zip(result.images, expected, strict=True):
        assert np.array_equal(np.asarray(got.image), want)
    assert offload.loads > 0 and offload.loads == offload.unloads + (1 if mode == "model" else 0)
    if mode == "sequential":
        # Every UNet block visits the device once per model call: 3 DPM++ 2M steps = 3 batched CFG calls.
        unet_blocks = len(list(_blocks(model.unet)))
        assert offload.loads >= unet_blocks * 3


def test_load_model_records_the_mode_and_installs_nothing_on_the_cpu(tiny_checkpoint):
    model = load_model(tiny_checkpoint("sd1"), device="cpu", offload="sequential")
    assert model.offload == "sequential" and model.offload_hooks is None
    assert model.device == torch.device("cpu")
    assert not model.unet._forward_pre_hooks
    with pytest.raises(Exception, match="offload: must be one of none, model, sequential"):
        load_model(tiny_checkpoint("sd1"), device="cpu", offload="lowvram")

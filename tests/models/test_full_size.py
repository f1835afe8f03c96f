"""Full SD 1.5 architecture (random weights): write, load, compare. Slow (~4 GB of RAM, a minute)."""

from __future__ import annotations

import pytest
import torch

from difusi.models import load_model
from difusi.models.synthetic import write_tiny_checkpoint


@pytest.mark.slow
def test_sd15_size_fp16_file_loads_with_every_weight(tmp_path):
    synth = write_tiny_checkpoint(tmp_path / "sd15.safetensors", "sd1", size="sd15", dtype=torch.float16)
    model = load_model(synth.path)
    assert list(model.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert sum(p.numel() for p in model.unet.parameters()) == sum(p.numel() for p in synth.unet.parameters())
    for original, loaded in ((synth.unet, model.unet), (synth.vae, model.vae), (synth.text_encoders[0], model.text_encoders[0].model)):
        got = loaded.state_dict()
        for name, value in original.state_dict().items():
            assert torch.equal(got[name], value.half().float()), name

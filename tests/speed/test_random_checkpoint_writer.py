"""The streaming random-checkpoint writer used by the benches writes valid safetensors files difusi loads."""

import torch
from safetensors.torch import load_file

from difusi.models import load_model
from difusi.models.synthetic import write_random_ldm_file


def test_streamed_file_is_valid_safetensors_and_loads(tmp_path):
    path = write_random_ldm_file(tmp_path / "a.safetensors", size="tiny", seed=3)
    state = load_file(path)  # the reference reader validates header, offsets and size
    assert state and all(v.dtype == torch.float16 for v in state.values())
    generator = torch.Generator().manual_seed(3)
    first_key = next(iter(state))  # header order is generation order
    expected = (torch.randn(state[first_key].shape, generator=generator) * 0.02).half()
    assert torch.equal(state[first_key], expected)
    again = load_file(write_random_ldm_file(tmp_path / "b.safetensors", size="tiny", seed=3))
    assert all(torch.equal(again[k], v) for k, v in state.items())
    model = load_model(path)
    assert model.family == "sd1"
    assert sum(p.numel() for p in model.unet.parameters()) > 0

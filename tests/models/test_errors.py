"""Bad files get a clear CheckpointError naming the file; pickles that need code are never executed."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from difusi.errors import CheckpointError, UnsupportedModelError
from difusi.models import load_model


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file"):
        load_model(path)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers model"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.ckpt", "junk.bin"])
def test_not_a_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is a text file, not model weights\n" * 10)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        load_model(path)
    assert "not" in str(info.value)


def test_truncated_safetensors(tmp_path, checkpoint_factory):
    data = checkpoint_factory("sd1").path.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: .*truncated or corrupt"):
        load_model(path)


def test_corrupt_safetensors_header(tmp_path, checkpoint_factory):
    data = bytearray(checkpoint_factory("sd1").path.read_bytes())
    data[8:40] = b"}" * 32  # the JSON header is garbage now
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a valid safetensors file"):
        load_model(path)


def test_truncated_ckpt(tmp_path, checkpoint_factory):
    data = checkpoint_factory("sd1", "ckpt").path.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt"):
        load_model(path)


class _Payload:
    """Unpickling this calls os.system — the classic malicious-checkpoint trick."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_code_is_refused_and_not_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = {"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "hook": _Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "evil.ckpt" in message and "NOT executed" in message and "refused" in message
    assert not marker.exists()
    # Sanity check of the test itself: a plain unpickler *would* run the payload.
    if legacy:
        return
    with open(tmp_path / "raw.pkl", "wb") as handle:
        pickle.dump(_Payload(marker), handle)
    with open(tmp_path / "raw.pkl", "rb") as handle:
        pickle.load(handle)  # noqa: S301 (deliberately unsafe, in a temp dir)
    assert marker.exists()


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "numbers.ckpt"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(CheckpointError, match=r"numbers\.ckpt: not a checkpoint: the pickle holds no tensors"):
        load_model(path)


def test_unknown_architecture_names_what_it_saw(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1), "lora_unet_down.lora_up.weight": torch.ones(4, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion checkpoint.*saw 2 tensors: lora_unet_down\.\* \(2\)"):
        load_model(path)


def test_unsupported_family_names_it(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.ones(3, 3)}, str(path))
    with pytest.raises(UnsupportedModelError, match="not supported yet: detected SD3"):
        load_model(path)


def test_inpainting_file_loads_as_its_family(tmp_path, checkpoint_factory):
    """A 9-input-channel UNet is an inpainting checkpoint of its family (no longer refused), and says so."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint_factory("sd1").path))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, 3, 3)
    path = tmp_path / "inpaint.safetensors"
    save_file(state, str(path))
    model = load_model(path)
    assert model.family == "sd1" and model.inpainting
    assert not load_model(checkpoint_factory("sd1").path).inpainting


def test_tensor_with_wrong_shape_is_a_clear_error(tmp_path, checkpoint_factory):
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint_factory("sd1").path))
    state["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"VAE: the checkpoint's tensors do not fit.*wrong shape.*quant_conv\.bias"):
        load_model(path)

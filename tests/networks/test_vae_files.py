"""Separate VAE files (`difusi.models.vae_files`): reading every layout, swapping in place, restoring bit for bit,
refusing what is not a VAE, and A1111's "SD VAE" resolution rules.

The reference for a swapped VAE is diffusers' own `AutoencoderKL` built from the same config with the other VAE's
state dict loaded; the LDM-layout files are written with `convert.vae_diffusers_to_ldm` (the project's converter).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before any Hugging Face import)
from difusi.errors import NetworkError
from difusi.models import convert
from difusi.models.loader import load_model
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.models.vae_files import (
    apply_vae_setting,
    find_vae_near_checkpoint,
    list_vae_files,
    load_vae_file,
    loaded_vae,
    read_vae_file,
    resolve_vae,
    set_vae,
    vae_names,
)


@pytest.fixture(autouse=True)
def _quiet(one_torch_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))  # file_sha256's hash cache stays in the test


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    return write_tiny_checkpoint(root / "tiny.safetensors", "sd1")


def _other_vae(config: dict, seed: int):
    """A VAE of the same architecture with other random weights (every parameter perturbed, norms too)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 if param.ndim <= 1 else 0.02))
    return vae.eval()


def _reference(config: dict, state: dict):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(state)
    return vae.eval()


LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _decode(vae) -> torch.Tensor:
    return vae.decode(LATENT).sample


def _params(vae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _write_layouts(folder: Path, vae) -> dict[str, Path]:
    """The same VAE as (a) diffusers safetensors, (b) LDM safetensors, (c) LDM + prefix .pt, (d) .ckpt wrapper."""
    folder.mkdir(parents=True, exist_ok=True)
    diffusers_state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    ldm = {k: v.contiguous() for k, v in convert.vae_diffusers_to_ldm(diffusers_state, vae.config).items()}
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    paths = {
        "diffusers": folder / "diffusion_pytorch_model.safetensors",
        "ldm": folder / "ldm.safetensors",
        "prefixed_pt": folder / "prefixed.vae.pt",
        "ckpt": folder / "wrapped.ckpt",
    }
    save_file(diffusers_state, str(paths["diffusers"]))
    save_file(ldm, str(paths["ldm"]))
    torch.save({convert.VAE_PREFIX + k: v for k, v in ldm.items()}, paths["prefixed_pt"])
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5),
              "loss.logvar": torch.zeros(())}  # keys A1111's load_vae_dict drops
    torch.save({"state_dict": {**ldm, **extras}, "global_step": 840000}, paths["ckpt"])
    return paths


@pytest.fixture(scope="module")
def other(sd1, tmp_path_factory):
    vae = _other_vae(sd1.vae_config, seed=11)
    return vae, _write_layouts(tmp_path_factory.mktemp("vae_b"), vae)


@pytest.fixture()
def model(sd1):
    return load_model(sd1.path, device="cpu")


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", ["diffusers", "ldm", "prefixed_pt", "ckpt"])
def test_every_layout_reads_to_the_same_diffusers_state(other, sd1, layout):
    vae, paths = other
    state = read_vae_file(paths[layout], expected=_reference(sd1.vae_config, vae.state_dict()))
    reference = vae.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("layout", ["diffusers", "ldm", "prefixed_pt", "ckpt"])
def test_swapped_vae_decodes_like_diffusers_with_that_state(model, other, sd1, layout):
    vae, paths = other
    module, params_before = model.vae, {k: p for k, p in model.vae.named_parameters()}
    load_vae_file(model, paths[layout])
    assert model.vae is module  # same module object, same parameter objects: weights copied in place
    assert all(p is params_before[k] for k, p in model.vae.named_parameters())
    expected = _decode(_reference(sd1.vae_config, vae.state_dict()))
    assert torch.allclose(_decode(model.vae), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(_decode(_reference(sd1.vae_config, sd1.vae.state_dict())), expected, atol=1e-3)


def test_none_restores_bit_for_bit(model, other):
    before_image, before = _decode(model.vae), _params(model.vae)
    load_vae_file(model, other[1]["ldm"])
    assert not torch.equal(_decode(model.vae), before_image)
    set_vae(model, None)
    assert loaded_vae(model) is None
    assert torch.equal(_decode(model.vae), before_image)
    after = _params(model.vae)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    set_vae(model, None)  # restoring twice is harmless
    assert torch.equal(_decode(model.vae), before_image)


def test_a_then_b_then_a_gives_a_bit_for_bit(model, other, sd1, tmp_path):
    paths_a = other[1]
    paths_b = _write_layouts(tmp_path / "c", _other_vae(sd1.vae_config, seed=23))
    load_vae_file(model, paths_a["ldm"])
    image_a, params_a = _decode(model.vae), _params(model.vae)
    load_vae_file(model, paths_b["diffusers"])
    assert not torch.equal(_decode(model.vae), image_a)
    load_vae_file(model, paths_a["ckpt"])  # the same weights as A, from another file
    assert torch.equal(_decode(model.vae), image_a)
    assert all(torch.equal(v, params_a[k]) for k, v in model.vae.state_dict().items())


def test_loaded_vae_records_name_path_and_a1111_hash(model, other):
    path = other[1]["ldm"]
    assert loaded_vae(model) is None
    info = load_vae_file(model, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info == loaded_vae(model)
    assert (info.name, info.path, info.sha256, info.short_hash) == ("ldm.safetensors", path, sha, sha[:10])


def test_setting_the_same_file_again_is_a_no_op(model, other):
    path = other[1]["ldm"]
    state = read_vae_file(path, expected=model.vae)
    set_vae(model, state, path=path)
    weight = model.vae.decoder.conv_out.bias
    with torch.no_grad():
        weight.add_(1.0)  # a marker: a second write of the file would undo it
    marked = weight.detach().clone()
    set_vae(model, state, path=path)
    load_vae_file(model, path)
    assert torch.equal(weight, marked)
    with torch.no_grad():
        weight.sub_(1.0)


def test_dtype_and_channels_last_are_kept(model, other):
    torch.nn.Module.to(model.vae, torch.bfloat16)
    model.vae.to(memory_format=torch.channels_last)
    original = _params(model.vae)
    load_vae_file(model, other[1]["ldm"])
    conv = model.vae.decoder.conv_in.weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    reference = other[0].state_dict()
    assert all(torch.equal(v, reference[k].to(torch.bfloat16)) for k, v in model.vae.state_dict().items())
    set_vae(model, None)
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, original[k]) for k, v in model.vae.state_dict().items())


def test_swap_with_model_offload_lands_in_the_cpu_masters(model, other, sd1):
    from difusi.models.offload import apply_offload

    encoders = [getattr(e, "model", e) for e in model.text_encoders]
    model.offload_hooks = apply_offload(model.unet, model.vae, encoders, "model", torch.device("cpu"), force=True)
    _decode(model.vae)  # the VAE's unit is now the resident one
    assert model.offload_hooks.resident is not None
    load_vae_file(model, other[1]["ldm"])
    assert model.offload_hooks.resident is None
    expected = _decode(_reference(sd1.vae_config, other[0].state_dict()))
    assert torch.allclose(_decode(model.vae), expected, atol=1e-6, rtol=0)
    model.offload_hooks.remove()


def test_sdxl_model_takes_a_vae_file(tmp_path):
    synth = write_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    model = load_model(synth.path, device="cpu")
    before = _decode(model.vae)
    vae = _other_vae(synth.vae_config, seed=5)
    paths = _write_layouts(tmp_path / "xlvae", vae)
    load_vae_file(model, paths["prefixed_pt"])
    assert torch.allclose(_decode(model.vae), _decode(_reference(synth.vae_config, vae.state_dict())), atol=1e-6, rtol=0)
    set_vae(model, None)
    assert torch.equal(_decode(model.vae), before)


# ----------------------------------------------------------------------------- refusals


def test_a_vae_of_another_architecture_says_what_does_not_fit(model, sd1, tmp_path):
    bigger = _other_vae({**sd1.vae_config, "block_out_channels": [64, 64]}, seed=3)
    paths = _write_layouts(tmp_path / "big", bigger)
    before = _params(model.vae)
    for path in (paths["ldm"], paths["diffusers"]):
        with pytest.raises(NetworkError) as caught:
            load_vae_file(model, path)
        text = str(caught.value)
        assert path.name in text and "does not fit" in text
        assert "[64, 64]" in text and "[32, 64]" in text and "another shape" in text
    assert loaded_vae(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.vae.state_dict().items())


def test_a_whole_checkpoint_is_not_a_vae(sd1, model):
    with pytest.raises(NetworkError, match="is a whole checkpoint, not a VAE: .*UNet.*put it in the checkpoints folder"):
        read_vae_file(sd1.path, expected=model.vae)


def test_a_pickle_that_needs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.vae.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "x": Payload()}}, path)
    with pytest.raises(NetworkError, match="evil.vae.pt.*NOT executed"):
        read_vae_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["ldm", "ckpt"])
def test_a_truncated_file_names_the_file(other, tmp_path, layout):
    source = other[1][layout]
    cut = tmp_path / ("cut" + source.suffix)
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetworkError) as caught:
        read_vae_file(cut)
    assert caught.value.name == cut.name and str(cut) in str(caught.value)


def test_a_file_that_is_not_a_vae(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(NetworkError, match="not a VAE"):
        read_vae_file(path)


# ----------------------------------------------------------------------------- finding and resolving


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_vae_files_follows_a1111_globs(tmp_path):
    vae_dir, ckpt_dir = tmp_path / "VAE", tmp_path / "Stable-diffusion"
    for name in ("vae10.safetensors", "vae2.pt", "sub/deep.ckpt", "notes.txt", "x.sft", "x.bin"):
        _touch(vae_dir / name)
    for name in ("model.safetensors", "model.vae.pt", "other/m2.vae.safetensors"):
        _touch(ckpt_dir / name)
    found = list_vae_files([vae_dir], [ckpt_dir])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["VAE/sub/deep.ckpt", "VAE/vae2.pt", "VAE/vae10.safetensors",
                   "Stable-diffusion/model.vae.pt", "Stable-diffusion/other/m2.vae.safetensors"]
    assert vae_names(found) == ["deep.ckpt", "vae2.pt", "vae10.safetensors", "model.vae.pt", "m2.vae.safetensors"]
    assert list_vae_files([vae_dir, vae_dir]) == list_vae_files([vae_dir])
    assert list_vae_files([tmp_path / "missing"]) == []


def test_automatic_prefers_the_vae_next_to_the_checkpoint_in_a1111_order(tmp_path):
    checkpoint = _touch(tmp_path / "ckpts" / "model.safetensors")
    assert resolve_vae("Automatic", checkpoint, []) is None  # nothing near: the checkpoint's own VAE
    safetensors = _touch(tmp_path / "ckpts" / "model.vae.safetensors")
    assert resolve_vae("Automatic", checkpoint, []) == safetensors
    ckpt = _touch(tmp_path / "ckpts" / "model.vae.ckpt")
    assert resolve_vae("Automatic", checkpoint, []) == ckpt
    pt = _touch(tmp_path / "ckpts" / "model.vae.pt")
    assert find_vae_near_checkpoint(checkpoint) == pt
    assert resolve_vae("auto", checkpoint, []) == pt  # A1111's old config value


def test_automatic_takes_a_vae_folder_file_of_the_checkpoints_name(tmp_path):
    checkpoint = _touch(tmp_path / "ckpts" / "sd.safetensors")
    files = [_touch(tmp_path / "VAE" / "sdxl_vae.safetensors"), _touch(tmp_path / "VAE" / "sd.vae.pt")]
    assert resolve_vae("Automatic", checkpoint, files) == files[1]
    assert resolve_vae("Automatic", checkpoint, files[:1]) is None  # no bare prefix match
    assert resolve_vae("Automatic", None, files) is None


def test_a_name_picks_a_listed_vae(tmp_path):
    checkpoint = _touch(tmp_path / "ckpts" / "model.safetensors")
    _touch(tmp_path / "ckpts" / "model.vae.pt")
    files = [_touch(tmp_path / "VAE" / "mse.safetensors"), _touch(tmp_path / "VAE" / "sub" / "anime.vae.pt")]
    assert resolve_vae("None", checkpoint, files) is None
    assert resolve_vae("mse.safetensors", checkpoint, files) == files[0]  # a name overrides the near-checkpoint VAE
    assert resolve_vae("mse", checkpoint, files) == files[0]
    assert resolve_vae("MSE.safetensors", checkpoint, files) == files[0]
    assert resolve_vae("anime.vae.pt", checkpoint, files) == files[1]
    assert resolve_vae("anime", checkpoint, files) == files[1]
    assert resolve_vae("sub/anime.vae.pt", checkpoint, files) == files[1]
    assert resolve_vae("sub\\anime", checkpoint, files) == files[1]
    elsewhere = _touch(tmp_path / "elsewhere" / "x.safetensors")
    assert resolve_vae(str(elsewhere), checkpoint, files) == elsewhere


def test_an_unknown_name_lists_the_vaes_there_are(tmp_path):
    files = [_touch(tmp_path / "VAE" / "mse.safetensors"), _touch(tmp_path / "VAE" / "anime.vae.pt")]
    with pytest.raises(NetworkError) as caught:
        resolve_vae("nope", None, files)
    text = str(caught.value)
    assert caught.value.name == "nope" and caught.value.field == "sd_vae" and "mse.safetensors" in text and "anime.vae.pt" in text
    assert "Automatic" in text and "None" in text
    with pytest.raises(NetworkError, match="mse.safetensors"):
        resolve_vae("sub/mse", None, files)  # the sub-folder must match too
    with pytest.raises(NetworkError, match="no VAE files were found"):
        resolve_vae("mse", None, [])


def test_apply_vae_setting_automatic_then_none(sd1, other, tmp_path):
    checkpoint = tmp_path / "mine.safetensors"
    checkpoint.write_bytes(sd1.path.read_bytes())
    near = tmp_path / "mine.vae.safetensors"
    near.write_bytes(other[1]["ldm"].read_bytes())
    model = load_model(checkpoint, device="cpu")
    before = _decode(model.vae)
    info = apply_vae_setting(model, "Automatic", [])
    assert info is not None and info.path == near and info.name == "mine.vae.safetensors"
    assert not torch.equal(_decode(model.vae), before)
    assert apply_vae_setting(model, "None", []) is None
    assert torch.equal(_decode(model.vae), before)

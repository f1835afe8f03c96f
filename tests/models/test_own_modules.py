"""difusi's own UNet / VAE (`difusi.models.unet`, `difusi.models.autoencoder`) against diffusers on the same weights.

The reference is diffusers' `UNet2DConditionModel` / `AutoencoderKL` built from the same config dict; both get the
same random (or difusi-mini's trained) weights through a strict `load_state_dict`, then module trees, state-dict
keys (in order) and shapes, configs and float32 outputs are compared.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before any Hugging Face import)
from difusi.models.autoencoder import AutoencoderKL
from difusi.models.synthetic import sd15_configs, sdxl_configs, tiny_configs
from difusi.models.unet import UNet

ATOL = 1e-5
FAMILIES = ("sd1", "sd2", "sdxl")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (norm scales/biases too) so swapped or unused weights show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 if param.ndim <= 1 else 0.05))


def _plain(config) -> dict:
    """A config as plain data: without diffusers' bookkeeping keys, tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def _same_structure(reference: torch.nn.Module, mine: torch.nn.Module) -> None:
    ref, got = reference.state_dict(), mine.state_dict()
    assert list(got) == list(ref)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert [n for n, _ in mine.named_modules()] == [n for n, _ in reference.named_modules()]
    for (name, a), (_, b) in zip(reference.named_modules(), mine.named_modules(), strict=True):
        for kind in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            assert isinstance(a, kind) == isinstance(b, kind), name  # LoRA targets are found by these types
        if isinstance(a, torch.nn.GroupNorm | torch.nn.LayerNorm):
            assert a.eps == b.eps, name
        if isinstance(a, torch.nn.GroupNorm):
            assert a.num_groups == b.num_groups, name
        if isinstance(a, torch.nn.Conv2d):
            assert (a.stride, a.padding) == (b.stride, b.padding), name


def _pair_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    reference = UNet2DConditionModel.from_config(config).eval()
    _randomize(reference, seed + 1)
    mine = UNet.from_config(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    return reference, mine


def _pair_vae(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL as Reference

    torch.manual_seed(seed)
    reference = Reference.from_config(config).eval()
    _randomize(reference, seed + 1)
    mine = AutoencoderKL.from_config(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    return reference, mine


def _unet_inputs(config: dict, batch: int = 3, size: int = 8, seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, config["in_channels"], size, size, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, config["cross_attention_dim"], generator=generator),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]] * batch),
        }
    return inputs


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max().item()


@pytest.fixture(scope="module", params=FAMILIES)
def unet_pair(request):
    config = tiny_configs(request.param)[0]
    return config, *_pair_unet(config)


@pytest.fixture(scope="module", params=FAMILIES)
def vae_pair(request):
    config = tiny_configs(request.param)[1]
    return config, *_pair_vae(config)


# ----------------------------------------------------------------------------- UNet


def test_unet_structure_and_config_match_diffusers(unet_pair):
    config, reference, mine = unet_pair
    _same_structure(reference, mine)
    assert _plain(mine.config) == _plain(reference.config)
    assert mine.config.in_channels == config["in_channels"] and mine.config["block_out_channels"] == [32, 64]
    assert mine.dtype == torch.float32 and mine.device == torch.device("cpu")
    assert sum(isinstance(m, difusi.models.unet.BasicTransformerBlock) for m in mine.modules()) == sum(
        type(m).__name__ == "BasicTransformerBlock" for m in reference.modules()) > 0


@pytest.mark.parametrize("timestep", ["batch", "scalar-tensor", "int", "float"])
def test_unet_output_matches_diffusers(unet_pair, timestep):
    config, reference, mine = unet_pair
    inputs = _unet_inputs(config)
    t = {"batch": torch.tensor([1.0, 500.0, 999.0]), "scalar-tensor": torch.tensor(321.5), "int": 999,
         "float": 17.25}[timestep]
    with torch.no_grad():
        want = reference(timestep=t, **inputs).sample
        got = mine(timestep=t, **inputs).sample
    _assert_close(got, want)


def test_unet_odd_size_batch_one_and_tuple_output(unet_pair):
    """A latent size that is no multiple of 2**levels takes diffusers' upsample-to-skip-size path."""
    config, reference, mine = unet_pair
    inputs = _unet_inputs(config, batch=1, size=9)
    with torch.no_grad():
        want = reference(timestep=torch.tensor([250]), return_dict=False, **inputs)[0]
        got = mine(timestep=torch.tensor([250]), return_dict=False, **inputs)
    assert isinstance(got, tuple) and len(got) == 1
    _assert_close(got[0], want)


def test_unet_controlnet_residuals_and_text_mask(unet_pair):
    config, reference, mine = unet_pair
    inputs = _unet_inputs(config, batch=2)
    with torch.no_grad():
        res = _residual_shapes(mine, inputs)
        generator = torch.Generator().manual_seed(9)
        down = tuple(torch.randn(shape, generator=generator) for shape in res[:-1])
        extra = {"down_block_additional_residuals": down,
                 "mid_block_additional_residual": torch.randn(res[-1], generator=generator),
                 "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]])}
        want = reference(timestep=torch.tensor([10, 900]), **inputs, **extra).sample
        got = mine(timestep=torch.tensor([10, 900]), **inputs, **extra).sample
    _assert_close(got, want)


def _residual_shapes(unet: UNet, inputs: dict) -> list[tuple[int, ...]]:
    """Shapes of the skip connections, then of the mid-block output (what a ControlNet adds to), via hooks."""
    shapes: list[tuple[int, ...]] = []
    handles = [block.register_forward_hook(lambda m, a, out: shapes.extend(tuple(t.shape) for t in out[1]))
               for block in unet.down_blocks]
    handles.append(unet.mid_block.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape))))
    conv_in = unet.conv_in.register_forward_hook(lambda m, a, out: shapes.insert(0, tuple(out.shape)))
    try:
        unet(timestep=torch.tensor([1, 1]), **inputs)
    finally:
        for handle in (*handles, conv_in):
            handle.remove()
    return shapes


def test_unet_deepcache_and_sequential_offload_work_unchanged(unet_pair):
    """The speed mode and memory mode that reach into the module tree give diffusers' results on difusi's UNet."""
    from difusi.models.offload import apply_offload
    from difusi.speed.deepcache import deepcache

    config = unet_pair[0]
    reference, mine = _pair_unet(config)  # own copies: offloading replaces the parameters (frozen CPU masters)
    inputs = _unet_inputs(config, batch=2)
    with torch.no_grad():
        with deepcache(reference, 2):
            want = [reference(timestep=torch.tensor([t, t]), **inputs).sample for t in (900, 800, 700)]
        with deepcache(mine, 2):
            got = [mine(timestep=torch.tensor([t, t]), **inputs).sample for t in (900, 800, 700)]
        for g, w in zip(got, want, strict=True):
            _assert_close(g, w)
        reference_vae, vae = _pair_vae(tiny_configs("sd1")[1])
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        offload = apply_offload(mine, vae, [], "sequential", torch.device("cpu"), force=True)
        try:
            assert offload is not None and len(offload.units) > 0
            _assert_close(mine(timestep=torch.tensor([900, 900]), **inputs).sample, want[0])
            _assert_close(vae.decode(latents).sample, reference_vae.decode(latents).sample)
        finally:
            for handle in offload.handles:
                handle.remove()


def test_unet_gradients_and_deepcopy_match_diffusers(unet_pair):
    """difusi-mini trains these modules (with an EMA copy made by deepcopy): gradients must be diffusers' too."""
    import copy

    config, reference, mine = unet_pair
    inputs = _unet_inputs(config, batch=2)
    t = torch.tensor([100, 600])
    for model in (reference, mine):
        model.zero_grad()
        model(timestep=t, **inputs).sample.square().mean().backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    for name, param in mine.named_parameters():
        assert param.grad is not None, name
        assert torch.allclose(param.grad, grads[name], atol=1e-6, rtol=1e-4), name
    for model in (reference, mine):
        model.zero_grad(set_to_none=True)
    twin = copy.deepcopy(mine)
    assert twin.config == mine.config and twin is not mine
    with torch.no_grad():
        _assert_close(twin(timestep=t, **inputs).sample, mine(timestep=t, **inputs).sample)


@pytest.mark.parametrize("configs", [sd15_configs, sdxl_configs], ids=["sd15", "sdxl"])
def test_full_size_state_dict_keys_and_shapes(configs):
    """The real SD 1.5 and SDXL architectures, built on the meta device (no memory, not run)."""
    from diffusers import AutoencoderKL as ReferenceVAE
    from diffusers import UNet2DConditionModel

    unet_config, vae_config, _ = configs()
    with torch.device("meta"):
        pairs = [(UNet2DConditionModel.from_config(unet_config), UNet.from_config(unet_config)),
                 (ReferenceVAE.from_config(vae_config), AutoencoderKL.from_config(vae_config))]
    for reference, mine in pairs:
        _same_structure(reference, mine)
        assert _plain(mine.config) == _plain(reference.config)


def test_unsupported_config_raises():
    config = tiny_configs("sd1")[0]
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet.from_config({**config, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet.from_config({**config, "num_attention_heads": 8})
    with pytest.raises(ValueError, match="down block type"):
        UNet.from_config({**config, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    # diffusers bookkeeping keys are accepted and dropped
    assert "_class_name" not in UNet.from_config({**config, "_class_name": "UNet2DConditionModel"}).config


def test_config_is_read_only_but_register_to_config_updates():
    vae = AutoencoderKL.from_config(tiny_configs("sd1")[1])
    with pytest.raises(TypeError):
        vae.config["scaling_factor"] = 1.0
    vae.register_to_config(scaling_factor=0.5)
    assert vae.config.scaling_factor == 0.5 and dict(vae.config)["latent_channels"] == 4
    with pytest.raises(AttributeError):
        _ = vae.config.no_such_key
    import copy
    import pickle

    assert copy.deepcopy(vae.config) == vae.config == pickle.loads(pickle.dumps(vae.config))


# ----------------------------------------------------------------------------- VAE


def test_vae_structure_and_config_match_diffusers(vae_pair):
    _, reference, mine = vae_pair
    _same_structure(reference, mine)
    assert _plain(mine.config) == _plain(reference.config)
    assert mine.use_slicing is False and mine.use_tiling is False


def test_vae_encode_decode_match_diffusers(vae_pair):
    _, reference, mine = vae_pair
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    with torch.no_grad():
        want, got = reference.encode(images).latent_dist, mine.encode(images).latent_dist
        _assert_close(got.mean, want.mean)
        _assert_close(got.mode(), want.mode())
        _assert_close(got.std, want.std)
        _assert_close(got.sample(torch.Generator().manual_seed(4)), want.sample(torch.Generator().manual_seed(4)))
        _assert_close(mine.decode(latents).sample, reference.decode(latents).sample)
        mine.use_slicing = True
        try:
            _assert_close(mine.decode(latents).sample, reference.decode(latents).sample)
            _assert_close(mine.encode(images).latent_dist.mean, want.mean)
        finally:
            mine.use_slicing = False
        _assert_close(mine.decode(latents[:1, :, :7, :9]).sample, reference.decode(latents[:1, :, :7, :9]).sample)


# ----------------------------------------------------------------------------- difusi-mini's trained weights


@pytest.fixture(scope="module")
def mini():
    from difusi.models import default_model_path, load_model

    return load_model(default_model_path(), device="cpu", precision="fp32")


def test_difusi_mini_real_weights_match_diffusers(mini):
    unet = UNet.from_config(dict(mini.unet.config)).eval()
    unet.load_state_dict(mini.unet.state_dict(), strict=True)
    vae = AutoencoderKL.from_config(dict(mini.vae.config)).eval()
    vae.load_state_dict(mini.vae.state_dict(), strict=True)
    _same_structure(mini.unet, unet)
    _same_structure(mini.vae, vae)
    assert vae.config.scaling_factor == mini.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(11)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    images = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        t = torch.tensor([999, 20])
        _assert_close(unet(sample, t, encoder_hidden_states=context).sample,
                      mini.unet(sample, t, encoder_hidden_states=context).sample)
        _assert_close(vae.encode(images).latent_dist.mean, mini.vae.encode(images).latent_dist.mean)
        _assert_close(vae.decode(sample).sample, mini.vae.decode(sample).sample)


# ----------------------------------------------------------------------------- import cost


def test_importing_own_modules_pulls_in_no_hugging_face_or_scipy():
    """The modules themselves add nothing but each other to what `difusi.models` (the package) imports, and no
    Hugging Face library or scipy gets imported at all."""
    code = ("import sys, difusi.models; before = set(sys.modules); "
            "import difusi.models.unet, difusi.models.autoencoder; "
            "print(sorted(set(sys.modules) - before)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('diffusers', 'transformers', 'huggingface_hub', 'accelerate', 'peft', 'scipy', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added, banned = out.stdout.strip().splitlines()
    assert added == "['difusi.models.autoencoder', 'difusi.models.layers', 'difusi.models.unet']", out.stderr
    assert banned == "[]", out.stderr

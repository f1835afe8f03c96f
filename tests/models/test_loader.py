"""load_model on synthesized checkpoints of every family and layout, through the public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_same_weights
from difusi.models import load_model
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.models.text_encoders import RawTextEncoder

LAYOUTS = [(f, fmt) for f in ("sd1", "sd2-v", "sdxl") for fmt in ("safetensors", "ckpt", "diffusers")]
EXPECTED = {  # family, prediction, native size, scaling factor (SD defaults; sd2-v files carry the v_pred marker)
    "sd1": ("sd1", "epsilon", 512, 0.18215),
    "sd2-v": ("sd2", "v_prediction", 768, 0.18215),
    "sdxl": ("sdxl", "epsilon", 1024, 0.13025),
}


def _encoder_model(encoder):
    return encoder.model if hasattr(encoder, "model") else encoder.text_model


@pytest.mark.parametrize(("family", "fmt"), LAYOUTS)
def test_load_every_layout_gives_the_original_weights(checkpoint_factory, family, fmt):
    synth = checkpoint_factory(family, fmt)
    model = load_model(synth.path)
    assert (model.family, model.prediction_type, model.native_size, model.scaling_factor) == EXPECTED[family]
    assert model.vae_scale_factor == 2 and model.latent_channels == 4
    assert_same_weights(synth.unet, model.unet)
    assert_same_weights(synth.vae, model.vae)
    assert len(model.text_encoders) == len(synth.text_encoders)
    for original, wrapped in zip(synth.text_encoders, model.text_encoders, strict=True):
        # difusi's own CLIP class (difusi.models.clip) standing in for transformers' class of the same name
        assert type(_encoder_model(wrapped)).__name__ == type(original).__name__
        assert_same_weights(original, _encoder_model(wrapped))
    assert not any(p.requires_grad for p in model.unet.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_loaded_modules_compute_the_same_outputs(checkpoint_factory, family):
    """Beyond equal tensors: same forward results (catches buffers or configs the state dict does not hold)."""
    synth = checkpoint_factory(family, "safetensors")
    model = load_model(synth.path)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 8, synth.unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if family == "sdxl":
        pooled = synth.text_encoders[1].config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context, **kwargs).sample, synth.unet(x, t, context, **kwargs).sample)
        image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
        assert torch.equal(model.vae.encode(image).latent_dist.mean, synth.vae.encode(image).latent_dist.mean)
        ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
        for original, wrapped in zip(synth.text_encoders, model.text_encoders, strict=True):
            ours = _encoder_model(wrapped)(ids, output_hidden_states=True)
            theirs = original(ids, output_hidden_states=True)
            assert torch.equal(ours.hidden_states[-2], theirs.hidden_states[-2])


def test_text_encoder_settings_per_family(checkpoint_factory):
    """Family rules from docs/ARCHITECTURE.md: (pad id, hidden layer, final layer norm, pooled)."""
    def settings(family):
        return [(e.pad_token_id, e.hidden_layer, e.final_layer_norm, e.pooled)
                for e in load_model(checkpoint_factory(family).path).text_encoders]

    assert settings("sd1") == [(49407, -1, True, False)]
    assert settings("sd2-v") == [(0, -2, True, False)]
    assert settings("sdxl") == [(49407, -2, False, False), (0, -2, False, True)]
    sd2 = load_model(checkpoint_factory("sd2-v").path).text_encoders[0]
    assert sd2.tokenizer("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


def test_fp16_file_is_cast_to_the_requested_dtype(tmp_path):
    synth = write_tiny_checkpoint(tmp_path / "half.safetensors", "sd1", dtype=torch.float16)
    model = load_model(synth.path)  # default float32
    for name, value in synth.unet.state_dict().items():
        loaded = model.unet.state_dict()[name]
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, value.half().float()), name
    bf16 = load_model(synth.path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in _encoder_model(bf16.text_encoders[0]).parameters()} == {torch.bfloat16}


def test_sidecar_overrides_detected_values(tmp_path):
    synth = write_tiny_checkpoint(tmp_path / "mini.safetensors", "sd1")
    factors = [[0.1, 0.2, 0.3]] * 4
    (tmp_path / "mini.difusi.json").write_text(json.dumps({
        "name": "difusi-mini", "prediction_type": "v_prediction", "native_size": 256, "scaling_factor": 0.5,
        "latent_rgb_factors": factors, "latent_rgb_bias": [0.0, 0.1, 0.2], "attention_heads": 4,
    }))
    model = load_model(synth.path)
    assert (model.name, model.prediction_type, model.native_size, model.scaling_factor) == ("difusi-mini", "v_prediction", 256, 0.5)
    assert model.latent_rgb_factors == factors and model.latent_rgb_bias == [0.0, 0.1, 0.2]
    assert model.vae.config.scaling_factor == 0.5
    assert model.unet.config.attention_head_dim == 4
    assert_same_weights(synth.unet, model.unet)


def test_bad_sidecar_is_a_clear_error(tmp_path):
    from difusi.errors import CheckpointError

    synth = write_tiny_checkpoint(tmp_path / "m.safetensors", "sd1")
    (tmp_path / "m.difusi.json").write_text(json.dumps({"prediction_type": "x0"}))
    with pytest.raises(CheckpointError, match=r"m\.difusi\.json: prediction_type must be one of"):
        load_model(synth.path)


def test_default_latent_preview_factors(checkpoint_factory):
    sd1 = load_model(checkpoint_factory("sd1").path)
    sdxl = load_model(checkpoint_factory("sdxl").path)
    assert len(sd1.latent_rgb_factors) == 4 and all(len(row) == 3 for row in sd1.latent_rgb_factors)
    assert sd1.latent_rgb_bias is None and len(sdxl.latent_rgb_bias) == 3
    assert sdxl.latent_rgb_factors != sd1.latent_rgb_factors


def test_model_hash_is_sha256_prefix(checkpoint_factory):
    import hashlib

    synth = checkpoint_factory("sd1")
    model = load_model(synth.path)
    digest = hashlib.sha256(synth.path.read_bytes()).hexdigest()
    assert model.sha256 == digest and model.short_hash == digest[:10]
    assert model.title == f"{synth.path.stem} [{digest[:10]}]"


def test_wrapper_is_clip_text_encoder_when_available(checkpoint_factory):
    model = load_model(checkpoint_factory("sd1").path)
    try:
        from difusi.prompts.conditioning import ClipTextEncoder
    except ImportError:
        assert isinstance(model.text_encoders[0], RawTextEncoder)
    else:
        assert isinstance(model.text_encoders[0], ClipTextEncoder)


def test_works_offline_with_an_empty_hub_cache(tmp_path, checkpoint_factory):
    """HF_HUB_OFFLINE=1, an empty HF_HOME and an unreachable endpoint: every family and format loads and encodes."""
    layouts = [("sd1", "safetensors"), ("sd2-v", "ckpt"), ("sdxl", "diffusers")]  # every family and format once
    paths = [str(checkpoint_factory(f, fmt).path) for f, fmt in layouts]
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    script = textwrap.dedent(f"""
        import difusi, torch
        from difusi.models import load_model
        for path in {paths!r}:
            model = load_model(path)
            for encoder in model.text_encoders:
                ids = encoder.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
                net = encoder.model if hasattr(encoder, "model") else encoder.text_model
                net(ids)
        print("ok", len({paths!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hf_home),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(hf_home / "hub")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(paths)}"
    assert not any((hf_home / "hub").glob("models--*"))


def test_sd2_epsilon_file(checkpoint_factory):
    model = load_model(checkpoint_factory("sd2").path)  # metadata says epsilon, no v_pred key
    assert (model.family, model.prediction_type, model.native_size) == ("sd2", "epsilon", 512)


def test_unmarked_sd2_uses_a1111_output_test():
    """A1111's rule: mean(unet(0.5, t=999) - 0.5) < -1 means v-prediction."""
    from types import SimpleNamespace

    from difusi.models.loader import guess_sd2_prediction

    class FakeUnet(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.offset = offset
            self.config = SimpleNamespace(in_channels=4, cross_attention_dim=8)

        def forward(self, x, t, encoder_hidden_states):
            assert t.tolist() == [999] and torch.all(x == 0.5) and torch.all(encoder_hidden_states == 0.5)
            return SimpleNamespace(sample=x + self.offset)

    assert guess_sd2_prediction(FakeUnet(-1.5)) == "v_prediction"
    assert guess_sd2_prediction(FakeUnet(-0.5)) == "epsilon"


def test_legacy_pickle_format_and_ldm_extras(tmp_path, checkpoint_factory):
    """Old (non-zip) torch.save files load too; EMA copies and VAE loss weights are ignored."""
    from safetensors.torch import load_file

    synth = checkpoint_factory("sd1")
    state = load_file(str(synth.path))
    state["model_ema.decay"] = torch.tensor(0.999)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    model = load_model(path)
    assert_same_weights(synth.unet, model.unet)
    assert_same_weights(synth.text_encoders[0], _encoder_model(model.text_encoders[0]))

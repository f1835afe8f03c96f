"""The model-family table: each family recognised from a synthesized checkpoint, the records' facts, difusi-mini
without its sidecar, and that a new family is one new record."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from difusi.errors import UnsupportedModelError
from difusi.models import FAMILIES, FamilySpec, default_model_path, family_spec, load_model
from difusi.models import families as families_module
from difusi.models.convert import UNET_PREFIX, ldm_checkpoint_from_modules
from difusi.models.detect import detect_family_spec
from difusi.models.families import Detection, detect_diffusers, spec_of, variant_for
from difusi.models.files import CheckpointFile, read_json
from difusi.models.synthetic import build_modules


def _file_shapes(path) -> dict[str, tuple[int, ...]]:
    reader = CheckpointFile(path)
    try:
        return dict(reader.shapes)
    finally:
        reader.close()


@pytest.mark.parametrize(("family", "key", "arch", "native"), [
    ("sd1", "sd1", "sd1", 512),
    ("sd2", "sd2", "sd2", 512),
    ("sd2-v", "sd2-v", "sd2", 768),
    ("sdxl", "sdxl", "sdxl", 1024),
])
def test_each_family_is_recognised_from_a_synthesized_checkpoint(checkpoint_factory, family, key, arch, native):
    synth = checkpoint_factory(family)
    assert detect_family_spec(_file_shapes(synth.path)).key == arch  # shapes give the architecture's record
    model = load_model(synth.path)
    assert model.family_spec.key == key and model.family == arch and model.native_size == native
    assert model.scaling_factor == model.family_spec.scaling_factor
    assert len(model.text_encoders) == len(model.family_spec.text_encoders)


def test_diffusers_folders_use_the_same_records(checkpoint_factory):
    for family, key in (("sd1", "sd1"), ("sd2-v", "sd2"), ("sdxl", "sdxl")):
        root = checkpoint_factory(family, "diffusers").path
        unet = read_json(root / "unet" / "config.json")
        assert detect_diffusers(root, read_json(root / "model_index.json"), unet).key == key
    assert load_model(checkpoint_factory("sd2-v", "diffusers").path).family_spec.key == "sd2-v"


def test_record_facts():
    sd1, sd2, sd2v, sdxl, mini = (family_spec(k) for k in ("sd1", "sd2", "sd2-v", "sdxl", "difusi-mini"))
    assert [s.honours_clip_skip for s in (sd1, sd2, sd2v, sdxl, mini)] == [True, False, False, False, True]
    assert [s.size_conditioning for s in (sd1, sd2, sdxl)] == [False, False, True]
    assert sdxl.zero_empty_negative and not sd1.zero_empty_negative
    assert [(t.kind, t.with_projection, t.hidden_layer) for t in sdxl.text_encoders] == [("clip", False, -2), ("openclip", True, -2)]
    assert [(t.kind, t.hidden_layer) for t in sd2.text_encoders] == [("openclip", -2)]
    # kohya LoRA key prefixes (the LoRA loader reads these)
    assert sd1.lora_prefixes == ("lora_unet_", "lora_te_") and sd2.lora_prefixes == ("lora_unet_", "lora_te_")
    assert sdxl.lora_prefixes == ("lora_unet_", "lora_te1_", "lora_te2_")
    assert (sd1.scaling_factor, sdxl.scaling_factor, sd1.vae_scale_factor, mini.vae_scale_factor) == (0.18215, 0.13025, 8, 4)
    assert sdxl.latent_rgb_bias is not None and sd1.latent_rgb_bias is None and sd2.latent_rgb_factors == sd1.latent_rgb_factors
    assert variant_for(sd2, "v_prediction") is sd2v and variant_for(sd2, "epsilon") is sd2 and variant_for(sd1, "v_prediction") is sd1
    keys = [s.key for s in FAMILIES]
    assert len(keys) == len(set(keys))
    for spec in FAMILIES:
        if spec.supported:
            assert spec.text_encoders and spec.latent_rgb_factors is not None, spec.key
            assert len(spec.latent_rgb_factors) == spec.latent_channels
    with pytest.raises(KeyError, match="unknown model family 'sd9'"):
        family_spec("sd9")


def test_stand_in_models_get_their_base_record():
    assert spec_of(SimpleNamespace(family="sdxl")).key == "sdxl"
    assert spec_of(SimpleNamespace(family="sd1", family_spec=family_spec("difusi-mini"))).key == "difusi-mini"
    assert spec_of(SimpleNamespace()).key == "sd1"
    from difusi.server.preview import projection_for

    assert projection_for(SimpleNamespace(family="flux", latent_rgb_factors=None), 4)[0] is None  # no table: grey


@pytest.fixture(scope="module")
def sd1_shapes():
    return {k: tuple(v.shape) for k, v in ldm_checkpoint_from_modules("sd1", *build_modules("sd1")).items()}


@pytest.mark.parametrize(("edit", "message"), [
    ("in8", "instruct-pix2pix (8 input channels)"),
    ("unclip", "SD1 with class/image embedding (unCLIP)"),
    ("refiner", "SDXL refiner"),
])
def test_unsupported_records_are_detected_and_refused(sd1_shapes, edit, message):
    shapes = dict(sd1_shapes)
    conv = UNET_PREFIX + "input_blocks.0.0.weight"
    if edit.startswith("in"):
        shapes[conv] = (shapes[conv][0], int(edit[2:]), 3, 3)
    elif edit == "unclip":
        shapes[UNET_PREFIX + "label_emb.0.0.weight"] = (128, 768)
    else:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("cond_stage_model.")}
        shapes["conditioner.embedders.0.model.token_embedding.weight"] = (49408, 1280)
    with pytest.raises(UnsupportedModelError, match="not supported yet: detected " + re.escape(message)):
        detect_family_spec(shapes)


# -- difusi-mini ----------------------------------------------------------------------------------------------


def test_mini_record_matches_the_shipped_sidecar():
    """The record is what the weights cannot say; it must agree with the sidecar the trainer wrote."""
    sidecar = json.loads(default_model_path().with_name("difusi-mini.difusi.json").read_text())
    mini = family_spec("difusi-mini")
    assert detect_family_spec(_file_shapes(default_model_path())) is mini
    assert (mini.family, mini.native_size, mini.scaling_factor, mini.unet_heads, mini.text_encoders[0].heads) == (
        sidecar["family"], sidecar["native_size"], sidecar["scaling_factor"], sidecar["attention_heads"],
        sidecar["text_encoder_heads"])
    assert [list(row) for row in mini.latent_rgb_factors] == sidecar["latent_rgb_factors"]
    assert list(mini.latent_rgb_bias) == sidecar["latent_rgb_bias"]
    assert mini.prediction_type == sidecar["prediction_type"]


def test_mini_without_its_sidecar_is_recognised_by_its_weights(tmp_path, caplog):
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    bare = tmp_path / "difusi-mini.safetensors"
    shutil.copy(default_model_path(), bare)
    with caplog.at_level(logging.WARNING, logger="difusi.models"):
        copy = load_model(bare)
    shipped = load_model(default_model_path())
    assert not caplog.records  # recognised: nothing to warn about
    assert copy.sidecar == {} and copy.family_spec.key == "difusi-mini" and copy.family == "sd1"
    for attribute in ("native_size", "scaling_factor", "latent_rgb_factors", "latent_rgb_bias", "prediction_type",
                      "vae_scale_factor", "unet_config", "text_encoder_configs"):
        assert getattr(copy, attribute) == getattr(shipped, attribute), attribute
    assert copy.native_size == 64
    params = GenerationParams(prompt="a red circle", seed=3, steps=3)
    ours, theirs = txt2img(copy, params).images[0].image, txt2img(shipped, params).images[0].image
    assert ours.size == (64, 64)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_an_unrecognised_small_vae_without_sidecar_warns(checkpoint_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="difusi.models"):
        load_model(checkpoint_factory("sd1").path)  # the tiny test VAE downscales 2x, not SD1's 8x
    assert any("no sidecar states its native size" in r.getMessage() for r in caplog.records)


# -- a new family is one record ---------------------------------------------------------------------------------


def test_adding_a_family_is_adding_one_record(checkpoint_factory, monkeypatch):
    synth = checkpoint_factory("sd1")
    shapes = _file_shapes(synth.path)
    conv = UNET_PREFIX + "input_blocks.0.0.weight"
    sd1 = family_spec("sd1")
    wide = dataclasses.replace(sd1, key="sd1-test", label="SD1 test variant", native_size=256, scaling_factor=0.5,
                               detection=Detection(requires=sd1.detection.requires, shapes={conv: shapes[conv]}))
    monkeypatch.setattr(families_module, "FAMILIES", (wide, *FAMILIES))
    model = load_model(synth.path)
    assert isinstance(model.family_spec, FamilySpec)
    assert (model.family_spec.key, model.family, model.native_size, model.scaling_factor) == ("sd1-test", "sd1", 256, 0.5)


def test_the_pipeline_reads_the_record_not_the_name():
    from difusi.pipeline import _sdxl_time_ids

    size = (96, 64)  # (height, width)
    conditioned = SimpleNamespace(family="sd1", family_spec=family_spec("sdxl"))
    assert _sdxl_time_ids(conditioned, size, size).tolist() == [[96, 64, 0, 0, 96, 64]]
    assert _sdxl_time_ids(SimpleNamespace(family="sdxl", family_spec=family_spec("sd1")), size, size) is None

"""The pink LoRA: reproducible, resumable training; kohya's key layout; exact merge/restore; the shipped file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import difusi
from difusi.mini import data, lora

SHIPPED = Path(difusi.__file__).parent / "assets" / "models" / "Lora" / "difusi-mini-pink.safetensors"
TINY = dict(steps=4, rank=4, alpha=2.0, batch=4, checkpoint_every=2, warmup=2, lr=1e-2)
KEY = re.compile(r"^(lora_unet_[a-z0-9_]+|lora_te_text_model_encoder_layers_\d+_[a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (see tests/conftest.py's one_torch_thread: the 2 CPU cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(_one_thread):
    return lora.load_base_model()


@pytest.fixture(scope="module")
def tiny_file(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "a.safetensors"
    return lora.train_lora(out, lora.LoraConfig(**TINY), model=model)


def _snapshot(model) -> dict[str, torch.Tensor]:
    modules = {"unet": model.unet, "text": model.text_encoders[0].model, "vae": model.vae}
    return {f"{m}.{k}": v.detach().clone() for m, module in modules.items() for k, v in module.state_dict().items()}


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def test_pink_data_is_extra_and_leaves_the_base_data_alone():
    assert "pink" not in data.COLOURS and "pink" not in data.COLOUR_NAMES
    pink = [lora.lora_sample(0, i, 1.0) for i in range(40)]
    assert all("pink" in {s.scene.background, *(shape.colour for shape in s.scene.shapes)} for s in pink)
    assert sum("pink" in s.caption for s in pink) >= 25  # most captions name the colour
    plain = lora.lora_sample(0, 3, 0.0)
    reference = data.make_sample(1_000_000, 3)
    assert plain.caption == reference.caption and np.array_equal(plain.image, reference.image)


def test_training_is_reproducible_and_resume_matches_an_uninterrupted_run(model, tiny_file, tmp_path):
    before = _snapshot(model)
    again = lora.train_lora(tmp_path / "b.safetensors", lora.LoraConfig(**TINY), model=model)
    assert again.read_bytes() == tiny_file.read_bytes()
    halves = tmp_path / "c.safetensors"
    lora.train_lora(halves, lora.LoraConfig(**TINY), model=model, until=2)
    assert halves.read_bytes() != tiny_file.read_bytes()  # half-way file: 2 steps
    with pytest.raises(difusi.errors.ParamError):
        lora.train_lora(halves, lora.LoraConfig(**TINY), model=model)  # state exists: needs resume
    lora.train_lora(halves, lora.LoraConfig(**TINY), model=model, resume=True)
    assert halves.read_bytes() == tiny_file.read_bytes()
    assert _bit_identical(before, _snapshot(model))  # training never writes the base weights
    other_seed = lora.train_lora(tmp_path / "d.safetensors", lora.LoraConfig(**{**TINY, "seed": 1}), model=model)
    assert other_seed.read_bytes() != tiny_file.read_bytes()


def test_saved_file_follows_kohya_layout(model, tiny_file):
    tensors, meta = lora.read_kohya(tiny_file)
    assert tensors and all(KEY.match(key) for key in tensors)
    names = {key.split(".", 1)[0] for key in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    table = lora.module_table(model.unet, model.text_encoders[0].model)
    for name in names:
        down, up, alpha = (tensors[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        weight = table[name].weight
        assert alpha.dim() == 0 and float(alpha) == 2.0
        assert down.shape[0] == up.shape[1] == 4
        if weight.dim() == 4:
            assert down.shape == (4, weight.shape[1], 1, 1) and up.shape == (weight.shape[0], 4, 1, 1)
        else:
            assert down.shape == (4, weight.shape[1]) and up.shape == (weight.shape[0], 4)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert meta["ss_output_name"] == "difusi-mini-pink" and meta["ss_base_model_version"] == "sd_v1"
    assert (meta["ss_steps"], meta["ss_seed"]) == ("4", "0")


def test_merge_is_kohyas_rule_and_restores_bit_for_bit(model, tiny_file):
    tensors = lora.read_kohya(tiny_file)[0]
    before = _snapshot(model)
    with lora.merged(model, tiny_file, 0.0):
        assert _bit_identical(before, _snapshot(model))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    module = lora.module_table(model.unet, model.text_encoders[0].model)[name]
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    expected = module(x) + 0.7 * (2.0 / 4) * (x @ down.T @ up.T)
    with lora.merged(model, tiny_file, 0.7):
        assert not _bit_identical(before, _snapshot(model))
        assert torch.allclose(module(x), expected, atol=1e-5)
    assert _bit_identical(before, _snapshot(model))


def test_shipped_lora_has_the_documented_keys_and_changes_a_pink_prompt(model):
    from difusi.mini.lora_eval import pipeline_generator

    assert SHIPPED.is_file()
    tensors, meta = lora.read_kohya(SHIPPED)
    expected = set(lora.target_modules(model.unet, model.text_encoders[0].model))
    assert {key.split(".", 1)[0] for key in tensors} == expected
    assert all(KEY.match(key) for key in tensors) and len(tensors) == 3 * len(expected)
    rank = int(meta["ss_network_dim"])
    assert all(tensors[f"{n}.lora_down.weight"].shape[0] == rank for n in expected)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == "difusi-mini-pink"
    generate = pipeline_generator(model)
    prompt = "a big pink circle in the center on a blue background"
    base = generate(prompt, 7, 1)[0]
    with lora.merged(model, SHIPPED, 1.0):
        adapted = generate(prompt, 7, 1)[0]
    assert np.abs(base.astype(int) - adapted.astype(int)).mean() > 5
    assert np.array_equal(generate(prompt, 7, 1)[0], base)  # restored


def test_cli_refuses_bad_values(tmp_path, capsys):
    from difusi import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mini", "train-lora", "--out", str(tmp_path / "x.safetensors"), "--rank", "0"])
    assert exit_info.value.code == 2
    assert "rank" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_lora_meets_its_adherence_targets(model):
    from difusi.mini.lora_eval import evaluate_lora

    result = evaluate_lora(SHIPPED, model=model)
    assert result.pink_base <= 0.1
    assert result.pink_full >= 0.9
    assert result.pink_base < result.pink_half < result.pink_full or result.pink_half >= 0.9
    assert abs(result.old_delta_points) <= 2.0

"""LoRAs as jobs use them: prompt tags, folders users already have, merge and exact restore, hashes, bad files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tests.networks.lora_builders import kohya_file, lora_layers

from difusi.errors import NetworkError, ParamError
from difusi.models import load_model
from difusi.models.catalog import list_checkpoints
from difusi.models.folders import kind_folders
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.networks.apply import merge_state
from difusi.networks.files import list_loras
from difusi.networks.job import NetworkLibrary
from difusi.networks.tags import parse_network_tags
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.speed.exact import OneDNNLinear, onednn_linear_available

# --------------------------------------------------------------------------------------------------- prompt tags


def test_tags_follow_a1111_argument_rules():
    parsed = parse_network_tags("a cat <lora:ink:0.5>, <lora:sub/glow:0.3:0.8> <lyco:x:te=0.2:unet=0.9> <lora:plain>")
    assert parsed.prompt == "a cat ,   "  # only the tags go, as A1111's re.sub
    assert [(t.name, t.te_multiplier, t.unet_multiplier) for t in parsed.loras] == [
        ("ink", 0.5, 0.5), ("sub/glow", 0.3, 0.8), ("x", 0.2, 0.9), ("plain", 1.0, 1.0)]
    assert parsed.warnings == ()


def test_tags_inside_prompt_editing_are_removed_before_it_is_parsed():
    parsed = parse_network_tags("[a <lora:ink:1>:b <lora:glow:1>:5]")
    assert parsed.prompt == "[a :b :5]" and [tag.name for tag in parsed.loras] == ["ink", "glow"]


def test_other_tags_are_removed_and_reported_and_bad_multipliers_refused():
    parsed = parse_network_tags("x <hypernet:h:1> <lora:a:1:1:8>")
    assert parsed.prompt == "x  " and len(parsed.loras) == 1
    assert "hypernet networks are not supported" in parsed.warnings[0] and "dyn" in parsed.warnings[1]
    for bad in ("<lora:a:strong>", "<lora:a:1:nan>", "<lora:a:te=x>", "<lora::1>"):
        with pytest.raises(ParamError) as error:
            parse_network_tags(f"p {bad}")
        assert error.value.field == "prompt" and bad.split(":")[0] in str(error.value)


# ------------------------------------------------------------------------------------------------------ folders


def _tiny(path, family="sd1", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(path, family=family, seed=seed)
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-jobs")
    model = load_model(_tiny(folder / "tiny.safetensors"))
    return folder, model


def _write_lora(model, path, *, seed=0, metadata=None, family="sd1"):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_file(model, family, ldm_names=False, seed=seed), path, metadata=metadata)
    return path


def test_a1111_and_comfyui_installs_are_found_without_copying(sd1, tmp_path):
    _, model = sd1
    a1111 = tmp_path / "webui"
    _tiny(a1111 / "models" / "Stable-diffusion" / "sd" / "base.safetensors")
    _write_lora(model, a1111 / "models" / "Lora" / "styles" / "ink.safetensors")
    _write_lora(model, a1111 / "models" / "LyCORIS" / "glow.safetensors", seed=1)
    (a1111 / "embeddings").mkdir()
    (a1111 / "models" / "VAE").mkdir()
    for root in (a1111, a1111 / "models"):  # the install, or its models/ folder
        assert [info.name for info in list_checkpoints(root)] == ["sd/base"]
        assert [item.relative for item in list_loras(root)
                if "assets" not in str(item.path)] == ["glow", "styles/ink"]
        assert kind_folders("embedding", root, shipped=False) == [a1111 / "embeddings"]
        assert kind_folders("vae", root, shipped=False) == [a1111 / "models" / "VAE"]

    comfy = tmp_path / "ComfyUI"
    _tiny(comfy / "models" / "checkpoints" / "base.safetensors")
    _write_lora(model, comfy / "models" / "loras" / "ink.safetensors")
    (comfy / "models" / "embeddings").mkdir()
    assert [info.name for info in list_checkpoints(comfy)] == ["base"]
    assert [item.name for item in list_loras(comfy) if "assets" not in str(item.path)] == ["ink"]
    assert kind_folders("embedding", comfy, shipped=False) == [comfy / "models" / "embeddings"]

    flat = tmp_path / "flat"  # difusi's own folder: checkpoints at the top, a LoRA is never listed as one
    _tiny(flat / "base.safetensors")
    _write_lora(model, flat / "Lora" / "ink.safetensors")
    assert [info.name for info in list_checkpoints(flat)] == ["base"]


def test_names_resolve_by_file_sub_folder_and_alias_and_ties_are_errors(sd1, tmp_path):
    _, model = sd1
    _write_lora(model, tmp_path / "Lora" / "a" / "ink.safetensors", metadata={"ss_output_name": "InkStyle"})
    _write_lora(model, tmp_path / "Lora" / "b" / "ink.safetensors", seed=1)
    _write_lora(model, tmp_path / "Lora" / "glow.safetensors", seed=2, metadata={"ss_output_name": "Glowy"})
    library = NetworkLibrary(tmp_path)
    assert library.find_lora("a/ink").path == tmp_path / "Lora" / "a" / "ink.safetensors"
    assert library.find_lora("Glowy").name == "glow" and library.find_lora("glow").alias == "Glowy"
    with pytest.raises(NetworkError, match="a/ink, b/ink"):
        library.find_lora("ink")
    with pytest.raises(NetworkError, match="available: .*glow"):
        library.find_lora("nothing-like-it")


def test_lora_hash_is_a1111s_hash_of_the_tensor_data(sd1, tmp_path):
    _, model = sd1
    path = _write_lora(model, tmp_path / "Lora" / "ink.safetensors", metadata={"note": "one"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header:]).hexdigest()
    file = NetworkLibrary(tmp_path).find_lora("ink")
    assert file.sha256 == expected and file.shorthash == expected[:12]


# ------------------------------------------------------------------------------------------ merge and restore


def _image(model, prompt, library, **fields):
    params = GenerationParams(prompt=prompt, steps=3, seed=11, width=64, height=64, **fields)
    result = txt2img(model, params, networks=library)
    return np.asarray(result.images[0].image), result


def _state(model):
    tensors = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for number, encoder in enumerate(model.text_encoders):
        tensors.update({f"te{number}.{k}": v.clone() for k, v in encoder.model.state_dict().items()})
    return tensors


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def two_loras(sd1):
    folder, model = sd1
    _write_lora(model, folder / "Lora" / "ink.safetensors", seed=1)
    _write_lora(model, folder / "Lora" / "glow.safetensors", seed=2)
    return NetworkLibrary(folder)


def test_removing_every_lora_restores_the_weights_and_pixels_bit_for_bit(sd1, two_loras):
    _, model = sd1
    library = two_loras
    plain, _ = _image(model, "a red circle", library)
    before = _state(model)
    ink, result = _image(model, "a red circle <lora:ink:0.8>", library)
    assert not np.array_equal(ink, plain)
    assert 'Lora hashes: "ink: ' in result.images[0].infotext
    glow, _ = _image(model, "a red circle <lora:glow:0.8>", library)
    ink_again, _ = _image(model, "a red circle <lora:ink:0.8>", library)
    assert np.array_equal(ink_again, ink) and not np.array_equal(glow, ink)  # A -> B -> A gives A's bits
    both, _ = _image(model, "a red circle <lora:ink:0.8> <lora:glow:0.5>", library)
    assert not np.array_equal(both, ink)
    assert np.array_equal(_image(model, "a red circle", library)[0], plain)
    assert _same_state(_state(model), before)
    assert merge_state(model).saved == {}  # nothing held once nothing is merged


def test_only_touched_layers_are_saved_and_te_and_unet_multipliers_split(sd1, two_loras):
    _, model = sd1
    before = _state(model)
    _image(model, "x <lora:ink:0:1>", two_loras)  # text encoder 0, UNet 1
    changed = {key.split(".", 1)[0] for key, value in _state(model).items() if not torch.equal(value, before[key])}
    assert changed == {"unet"}
    state = merge_state(model)
    touched = [module for component, _, module in lora_layers(model) if component == "unet"]
    assert len(state.saved) == len(touched) and state.saved_bytes > 0
    _image(model, "x <lora:ink:1:0>", two_loras)
    changed = {key.split(".", 1)[0] for key, value in _state(model).items() if not torch.equal(value, before[key])}
    assert changed == {"te0"}
    zero, _ = _image(model, "a red circle <lora:ink:0>", two_loras)  # multiplier 0: disabled
    assert np.array_equal(zero, _image(model, "a red circle", two_loras)[0])


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")
def test_merge_reaches_the_exact_cpu_paths_linears(sd1, two_loras):
    _, model = sd1
    _image(model, "x <lora:ink:1>", two_loras)
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(layer) is OneDNNLinear  # the pipeline switched the exact fast path on
    saved = merge_state(model).saved[id(layer)]
    assert not torch.equal(layer.weight, saved.weight)
    x = torch.randn(2, 5, layer.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert not torch.allclose(layer(x), torch.nn.functional.linear(x, saved.weight, saved.bias))
    _image(model, "x", two_loras)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_lora_files_fail_clearly_and_leave_the_model_as_it_was(sd1, tmp_path):
    folder, model = sd1
    library = NetworkLibrary(tmp_path)
    good = _write_lora(model, tmp_path / "Lora" / "good.safetensors")
    truncated = tmp_path / "Lora" / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    sdxl_model = load_model(_tiny(tmp_path / "xl" / "xl.safetensors", family="sdxl"))
    _write_lora(sdxl_model, tmp_path / "Lora" / "for-xl.safetensors", family="sdxl")
    odd = kohya_file(model, "sd1", ldm_names=False)
    odd["lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks"] = torch.zeros(2, 2)
    save_file(odd, tmp_path / "Lora" / "odd.safetensors")
    partial = kohya_file(model, "sd1", ldm_names=False)
    partial["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 2)
    save_file(partial, tmp_path / "Lora" / "partial.safetensors")

    _image(model, "a red circle <lora:good:1>", library)
    merged = _state(model)
    for tag, message in [("cut", "cannot be used"), ("for-xl", "another model family"), ("odd", "oft_blocks"),
                         ("missing", "no such LoRA")]:
        with pytest.raises(NetworkError, match=message):
            _image(model, f"a red circle <lora:{tag}:1>", library)
        assert _same_state(_state(model), merged)  # a refused network changes nothing
    _, result = _image(model, "a red circle <lora:partial:1>", library)
    assert any("not_a_layer" in warning for warning in result.warnings)
    _image(model, "a red circle", library)


def test_cli_and_http_report_a_bad_lora_in_one_line(sd1, tmp_path, capsys):
    from difusi import cli

    folder, model = sd1
    _write_lora(model, tmp_path / "Lora" / "good.safetensors")
    (tmp_path / "Lora" / "cut.safetensors").write_bytes((tmp_path / "Lora" / "good.safetensors").read_bytes()[:300])
    checkpoint = folder / "tiny.safetensors"
    for prompt, extra, message in [("<lora:cut:1>", [], "cannot be used"), ("<lora:nope:1>", [], "no such LoRA"),
                                   ("<lora:good:much>", [], "must be a number"),
                                   ("", ["--vae", str(checkpoint)], "whole checkpoint, not a VAE"),
                                   ("", ["--vae", "nope.pt"], "no VAE of that name")]:
        try:
            code = cli.main(["generate", f"a cat {prompt}", "--model", str(checkpoint), "--models-dir",
                             str(tmp_path), "--steps", "1", "--outputs-dir", str(tmp_path / "out"), *extra])
        except SystemExit as exit_:  # errors found while generating leave through the CLI's one-line exit
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not list((tmp_path / "out").rglob("*.png"))  # nothing half-made was saved


def test_infotext_reproduces_the_image_with_the_same_lora(sd1, two_loras, tmp_path):
    from difusi import cli
    from difusi.infotext import read_infotext

    folder, model = sd1
    argv = ["generate", "a red circle <lora:ink:0.7>", "--model", str(folder / "tiny.safetensors"), "--models-dir",
            str(folder), "--steps", "2", "--seed", "4", "--width", "64", "--height", "64", "--outputs-dir",
            str(tmp_path / "out")]
    assert cli.main([*argv, "--output", str(tmp_path / "first.png")]) == 0
    text = read_infotext(tmp_path / "first.png")
    assert "Lora hashes" in text
    again = ["generate", "--from", str(tmp_path / "first.png"), "--model", str(folder / "tiny.safetensors"),
             "--models-dir", str(folder), "--outputs-dir", str(tmp_path / "out"), "--output", str(tmp_path / "2.png")]
    assert cli.main(again) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")), np.asarray(Image.open(tmp_path / "2.png")))
    assert read_infotext(tmp_path / "2.png") == text


def test_a_changed_lora_file_is_noted_when_remaking_an_image(sd1, tmp_path):
    from difusi.networks.job import lora_hash_notes

    _, model = sd1
    _write_lora(model, tmp_path / "Lora" / "ink.safetensors", seed=1)
    library = NetworkLibrary(tmp_path)
    same = library.find_lora("ink").shorthash
    assert lora_hash_notes(f"ink: {same}", library) == []
    notes = lora_hash_notes("ink: 0123456789ab, gone: 0123456789ab", library)
    assert len(notes) == 1 and "0123456789ab" in notes[0] and same in notes[0]


def test_merges_land_in_the_offload_masters(tmp_path):
    """With an offload mode a unit on the device points at copies its next unload drops: merging parks every unit
    first, so the weights written are the CPU masters the next load copies from."""
    from difusi.models.offload import apply_offload

    model = load_model(_tiny(tmp_path / "tiny.safetensors"))
    _write_lora(model, tmp_path / "Lora" / "ink.safetensors")
    library = NetworkLibrary(tmp_path)
    model.offload_hooks = apply_offload(model.unet, model.vae, [e.model for e in model.text_encoders], "model",
                                        torch.device("cpu"), force=True)
    for unit in model.offload_hooks.units:
        unit.load()
    plain = _state(model)
    _image(model, "x <lora:ink:1>", library)
    model.offload_hooks.park()
    merged = _state(model)  # what every unit points at once unloaded: the masters
    assert not _same_state(merged, plain)
    _image(model, "x", library)
    model.offload_hooks.park()
    assert _same_state(_state(model), plain)


def test_shipped_mini_lora_through_the_prompt_equals_its_trainers_own_merge():
    """The prompt tag path (difusi.networks: file lookup, key mapping, algorithms, merge) gives the same pixels as the
    trainer's independent merge of its own file (`difusi.mini.lora.merged`: W += m * alpha/rank * up @ down)."""
    from difusi.mini.lora import merged
    from difusi.models import default_model_path

    model = load_model(default_model_path())
    library = NetworkLibrary(None)
    prompt = "a big pink circle on the left on a blue background"
    tagged, result = _image(model, f"{prompt} <lora:difusi-mini-pink:1>", library, cfg_scale=7.0)
    assert result.warnings == []  # all 96 modules (84 UNet, 12 text encoder) matched
    assert len(merge_state(model).saved) == 96
    path = library.find_lora("difusi-mini-pink").path
    _image(model, prompt, library)  # back to the checkpoint's own weights
    with merged(model, path, 1.0):
        reference, _ = _image(model, prompt, library, cfg_scale=7.0)
    assert np.abs(tagged.astype(int) - reference.astype(int)).max() <= 1

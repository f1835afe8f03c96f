"""LoRA files applied by difusi equal diffusers' own LoRA loader (`load_lora_weights` + `fuse_lora`, peft underneath)
on the same random weights: kohya files with diffusers-style and LDM-style layer names (LoCon conv layers included),
diffusers / PEFT files, on tiny SD1 and SDXL; weights to float rounding, images within 2/255."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tests.networks.lora_builders import kohya_file, peft_file

from difusi.models import load_model
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.networks.apply import remove_networks
from difusi.networks.job import NetworkLibrary
from difusi.params import GenerationParams
from difusi.pipeline import txt2img


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"lora-{request.param}")
    write_tiny_checkpoint(folder / "tiny.safetensors", family=request.param, seed=3)
    return folder, request.param


def diffusers_fused(model, family, state, scale):
    """The UNet and text encoders after diffusers loads `state` and fuses it at `scale` (copies of difusi's own
    modules, so both start from the same weights)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from difusi.models.synthetic import reference_modules

    copies = reference_modules(model)  # diffusers' / transformers' own classes with the model's weights
    unet, encoders = copies.unet, copies.text_encoders
    parts = dict(vae=copies.vae, unet=unet, scheduler=DDIMScheduler(), tokenizer=copies.tokenizers[0],
                 text_encoder=encoders[0])
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=copies.tokenizers[1])
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    # SD1's loader maps LDM block names only when given the UNet config; SDXL's always does it itself.
    extra = {} if family == "sdxl" else {"unet_config": unet.config}
    # diffusers names CLIP's layers from `text_model` (transformers 4); transformers 5's CLIPTextModel has no such
    # level, so the reference gets the names its loader can place (the tensors are the same).
    state = {_reference_key(key, model): value for key, value in state.items()}
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="ref", **extra)
    pipe.fuse_lora(lora_scale=scale, components=["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl"
                                                                            else []))
    pipe.unload_lora_weights()
    return unet, encoders


def _reference_key(key: str, model) -> str:
    """The key with CLIP's `text_model` level removed for the text encoders whose modules lack it."""
    for number, (kohya, dotted) in enumerate([(("lora_te_", "lora_te1_"), "text_encoder."), (("lora_te2_",),
                                                                                           "text_encoder_2.")]):
        if number >= len(model.text_encoders) or hasattr(model.text_encoders[number].model, "text_model"):
            continue
        if key.startswith(kohya):
            return key.replace("_text_model_", "_", 1)
        if key.startswith(dotted):
            return key.replace(".text_model.", ".", 1)
    return key


def _assert_close_weights(ours: torch.nn.Module, reference: torch.nn.Module, what: str) -> None:
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=f"{what} {key}")


@pytest.mark.parametrize("layout", ["kohya-diffusers-names", "kohya-ldm-names", "peft"])
def test_lora_equals_diffusers_loader(checkpoint, layout):
    folder, family = checkpoint
    model = load_model(folder / "tiny.safetensors")
    original = {key: value.clone() for key, value in model.unet.state_dict().items()}
    if layout == "peft":
        state = peft_file(model)
    else:
        state = kohya_file(model, family, ldm_names=layout == "kohya-ldm-names")
    (folder / "Lora").mkdir(exist_ok=True)
    save_file(state, folder / "Lora" / f"{layout}.safetensors")
    library = NetworkLibrary(folder)
    scale = 0.7
    unet, encoders = diffusers_fused(model, family, state, scale)  # from the checkpoint's own weights
    params = GenerationParams(prompt=f"a red circle <lora:{layout}:{scale}>", steps=3, seed=5, width=64, height=64,
                              cfg_scale=5.0)
    ours = txt2img(model, params, networks=library)
    assert ours.warnings == [], ours.warnings  # every key matched a layer

    changed = sum(not torch.equal(original[key], value) for key, value in model.unet.state_dict().items())
    assert changed > 0
    _assert_close_weights(model.unet, unet, "unet")
    for number, encoder in enumerate(model.text_encoders):
        _assert_close_weights(encoder.model, encoders[number], f"text encoder {number}")

    # The same pipeline on diffusers' fused weights makes the same picture (the only difference is the weights).
    remove_networks(model)
    for target, source in [(model.unet, unet), *zip((e.model for e in model.text_encoders), encoders, strict=True)]:
        target.load_state_dict(source.state_dict())
    for encoder in model.text_encoders:
        encoder._empty_states.clear()
    plain = params.replace(prompt="a red circle ")
    reference = txt2img(model, plain, networks=NetworkLibrary(None))  # no tags: nothing merged, nothing restored
    a = np.asarray(ours.images[0].image, dtype=int)
    b = np.asarray(reference.images[0].image, dtype=int)
    assert np.abs(a - b).max() <= 2

"""LoRA files for tests: random factors in the real key layouts, for the layers of a loaded model."""

from __future__ import annotations

import torch

from difusi.models.convert import unet_diffusers_to_ldm

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONVS = ("conv1", "conv2")


def lora_layers(model):
    """(component, path, module) of every layer these LoRAs touch: attention / feed-forward linears and resnet
    convolutions of the UNet, attention and MLP linears of every text encoder."""
    for path, module in model.unet.named_modules():
        if path.endswith(ATTENTION) or (path.endswith(CONVS) and "resnets" in path):
            yield "unet", path, module
    for number, encoder in enumerate(model.text_encoders):
        for path, module in encoder.model.named_modules():
            if path.endswith(TEXT):
                yield number, path, module


def lora_factors(module, rank, generator):
    if isinstance(module, torch.nn.Conv2d):
        kernel = module.kernel_size
        down = torch.randn(rank, module.in_channels, *kernel, generator=generator) * 0.2
        return down, torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.2
    return (torch.randn(rank, module.in_features, generator=generator) * 0.2,
            torch.randn(module.out_features, rank, generator=generator) * 0.2)


def kohya_file(model, family, *, ldm_names: bool, rank=4, alpha=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ldm = {}
    if ldm_names:  # LDM names from the state-dict converter (itself checked against diffusers' checkpoints)
        paths = [path for component, path, _ in lora_layers(model) if component == "unet"]
        converted = unet_diffusers_to_ldm({f"{p}.weight": torch.zeros(1) for p in paths}, model.unet_config)
        ldm = dict(zip(paths, (key.removesuffix(".weight") for key in converted), strict=True))
    state = {}
    for component, path, module in lora_layers(model):
        if component == "unet":
            name = "lora_unet_" + ldm.get(path, path).replace(".", "_")
        else:
            prefix = "lora_te_" if family == "sd1" else f"lora_te{component + 1}_"
            name = prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")  # kohya's names
        down, up = lora_factors(module, rank, generator)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def peft_file(model, rank=4, seed=1):
    """diffusers' own LoRA layout: `unet.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder[_2].<path>...`
    (linear layers only, no alpha: scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, path, module in lora_layers(model):
        if isinstance(module, torch.nn.Conv2d):
            continue
        prefix = "unet" if component == "unet" else ("text_encoder" if component == 0 else "text_encoder_2")
        down, up = lora_factors(module, rank, generator)
        if component != "unet":  # diffusers' files name CLIP's layers from `text_model` (transformers 4)
            path = "text_model." + path.removeprefix("text_model.")
        state[f"{prefix}.{path}.lora_A.weight"], state[f"{prefix}.{path}.lora_B.weight"] = down, up
    return state



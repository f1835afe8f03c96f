"""Random checkpoints of every supported layout, for tests and benches (no download, no hub).

`write_tiny_checkpoint` builds diffusers / transformers modules from small configs (channel
counts divisible by 32, as GroupNorm(32) in real SD needs), randomises *every* parameter
(norm scales and biases too, so a wrong key mapping cannot hide behind identical values), and
writes them in the requested on-disk layout. The returned `SyntheticCheckpoint` keeps the
modules, so a test can build the diffusers reference pipeline on exactly the same weights
(`reference_pipeline`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difusi.models import convert
from difusi.models.detect import BOS_TOKEN_ID, CLIP_VOCAB_SIZE, EOS_TOKEN_ID
from difusi.models.text_encoders import reference_tokenizer

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
FORMATS = ("safetensors", "ckpt", "diffusers")
SIZES = ("tiny", "sd15")


@dataclass
class SyntheticCheckpoint:
    """What `write_tiny_checkpoint` wrote, with the modules whose weights it holds."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str
    fmt: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_configs: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- configs


def _text_config(width: int, layers: int, act: str, projection: int | None = None, heads: int | None = None) -> dict[str, Any]:
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": width,
        "intermediate_size": 2 * width if width < 768 else 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads or max(1, width // 64),
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection or width,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": 1,
    }


def _tiny_vae(scaling: float) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": scaling,
    }


def tiny_configs(family: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(unet, vae, [text encoders]) configs of the tiny variant of `family` ("sd1", "sd2", "sdxl").

    Head counts follow each family's rule so detection recovers them from shapes alone:
    SD1 8 heads everywhere, SD2/SDXL and all text encoders 64 channels per head (minimum 1).
    """
    if family == "sd1":
        text = [_text_config(64, 2, "quick_gelu")]
        unet = _tiny_unet(context=64, heads=8, linear=False)
        return unet, _tiny_vae(0.18215), text
    if family == "sd2":
        text = [_text_config(64, 3, "gelu")]
        unet = _tiny_unet(context=64, heads=[1, 1], linear=True)
        return unet, _tiny_vae(0.18215), text
    if family == "sdxl":
        text = [_text_config(64, 2, "quick_gelu"), _text_config(64, 3, "gelu", projection=32)]
        unet = {
            **_tiny_unet(context=128, heads=[1, 1], linear=True),
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        }
        return unet, _tiny_vae(0.13025), text
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _tiny_unet(context: int, heads: int | list[int], linear: bool) -> dict[str, Any]:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "norm_num_groups": 32,
    }


def sd15_configs() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The real SD 1.5 architecture (CompVis v1-inference.yaml): 860M UNet, 83M VAE, CLIP ViT-L/14 text."""
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "use_linear_projection": False,
        "norm_num_groups": 32,
    }
    vae = {**_tiny_vae(0.18215), "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    return unet, vae, [_text_config(768, 12, "quick_gelu", heads=12)]


def sdxl_configs() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The real SDXL 1.0 base architecture: 2.57B UNet, the SD VAE, CLIP ViT-L + OpenCLIP ViT-bigG text encoders."""
    unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    }
    vae = {**sd15_configs()[1], "scaling_factor": 0.13025, "sample_size": 1024}
    texts = [_text_config(768, 12, "quick_gelu", heads=12), _text_config(1280, 32, "gelu", projection=1280, heads=20)]
    return unet, vae, texts


# ----------------------------------------------------------------------------- modules


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every parameter: LayerNorm/GroupNorm start at exactly 1/0, which would hide swapped keys."""
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            scale = 0.1 if param.ndim <= 1 else 0.02
            param.add_(noise.to(param.dtype) * scale)


def build_modules(family: str, size: str = "tiny", seed: int = 0, inpainting: bool = False) -> tuple[Any, Any, list[Any]]:
    """Randomly initialised (unet, vae, [text encoders]) for a family, deterministic in `seed`; `inpainting` gives
    the UNet the 9 input channels of an inpainting checkpoint (latents, mask, masked-picture latents)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = family.removesuffix("-v")
    if size == "sd15" and base != "sd1":
        raise ValueError("size='sd15' exists only for family 'sd1'")
    unet_cfg, vae_cfg, text_cfgs = sd15_configs() if size == "sd15" else tiny_configs(base)
    if inpainting:
        unet_cfg = {**unet_cfg, "in_channels": unet_cfg.get("out_channels", 4) + 5}
    torch.manual_seed(seed)  # default inits draw from the global generator
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    texts = []
    for i, cfg in enumerate(text_cfgs):
        cls = CLIPTextModelWithProjection if (base == "sdxl" and i == 1) else CLIPTextModel
        texts.append(cls(CLIPTextConfig(**cfg)))
    generator = torch.Generator().manual_seed(seed + 1)
    for module in (unet, vae, *texts):
        _randomize(module, generator)
        module.eval()
    return unet, vae, texts


# ----------------------------------------------------------------------------- writers


def write_tiny_checkpoint(
    path: str | Path,
    family: str = "sd1",
    fmt: str = "safetensors",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    inpainting: bool = False,
) -> SyntheticCheckpoint:
    """Write a random checkpoint of `family` ("sd1", "sd2" (eps), "sd2-v", "sdxl") in layout `fmt`
    (`inpainting`: a 9-input-channel UNet, as sd-v1-5-inpainting and the SDXL inpainting model).

    `fmt`: "safetensors" / "ckpt" (single-file LDM layout; a `.ckpt` holds `{"state_dict": ...}`
    like Lightning checkpoints) or "diffusers" (a pipeline folder at `path`). `size="sd15"` gives
    the full SD 1.5 architecture (sd1 only). SD2-v files carry the `v_pred` marker key (ComfyUI's
    convention); SD2 safetensors also state `modelspec.prediction_type` in their metadata (an
    unmarked SD2 .ckpt falls back to A1111's test run, meaningless on random weights); diffusers
    folders put the prediction type in `scheduler/scheduler_config.json`.
    Weights are stored in `dtype`; the returned modules stay float32.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    path = Path(path)
    base = family.removesuffix("-v")
    prediction = "v_prediction" if family.endswith("-v") else "epsilon"
    unet, vae, texts = build_modules(family, size, seed, inpainting)
    if fmt == "diffusers":
        _write_diffusers(path, base, prediction, unet, vae, texts, dtype)
    else:
        state = convert.ldm_checkpoint_from_modules(base, unet, vae, texts)
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        if prediction == "v_prediction":
            state["v_pred"] = torch.tensor([])
        _write_single_file(path, fmt, state, {"modelspec.prediction_type": prediction} if base == "sd2" else {})
    return SyntheticCheckpoint(
        path=path,
        family=base,
        prediction_type=prediction,
        fmt=fmt,
        unet=unet,
        vae=vae,
        text_encoders=texts,
        unet_config=dict(unet.config),
        vae_config=dict(vae.config),
        text_encoder_configs=[t.config.to_dict() for t in texts],
    )


def _write_single_file(path: Path, fmt: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", **metadata})
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)


def _write_diffusers(path: Path, family: str, prediction: str, unet: Any, vae: Any, texts: list[Any], dtype: torch.dtype) -> None:
    """A diffusers pipeline folder, written with the libraries' own `save_pretrained` (offline)."""
    path.mkdir(parents=True, exist_ok=True)
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, module in (("unet", unet), ("vae", vae)):
        _save_pretrained(module, path / name, dtype)
        index[name] = ["diffusers", type(module).__name__]
    for i, model in enumerate(texts):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        _save_pretrained(model, path / name, dtype)
        index[name] = ["transformers", type(model).__name__]
        tokenizer = reference_tokenizer(openclip=(family == "sd2" or i == 1))
        tokenizer.save_pretrained(path / ("tokenizer" if i == 0 else "tokenizer_2"))
        index["tokenizer" if i == 0 else "tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "steps_offset": 1,
    }
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _save_pretrained(module: Any, folder: Path, dtype: torch.dtype) -> None:
    """The library's own writer, in `dtype`; the module is left in float32."""
    if dtype == torch.float32:
        module.save_pretrained(folder)
        return
    module.to(dtype).save_pretrained(folder)
    module.to(torch.float32)


def write_random_ldm_file(path: str | Path, size: str = "sd15", dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A single-file safetensors of random weights at `size`, without building real modules.

    `size`: "sd15" (SD 1.5 architecture, ~2.1 GB fp16), "sdxl" (SDXL base architecture, ~6.9 GB fp16) or
    "tiny" (tiny SD1). The key set and shapes come from modules constructed on the meta device (no
    memory), so a file costs about its own size in RAM to write. For benches; no reference modules returned.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = "sdxl" if size == "sdxl" else "sd1"
    unet_cfg, vae_cfg, text_cfgs = {"sd15": sd15_configs, "sdxl": sdxl_configs}.get(size, lambda: tiny_configs("sd1"))()
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
        texts = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**cfg))
                 for i, cfg in enumerate(text_cfgs)]
    shapes = {k: v.shape for k, v in convert.ldm_checkpoint_from_modules(family, unet, vae, texts).items()}
    generator = torch.Generator().manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _stream_safetensors(path, shapes, dtype, lambda shape: (torch.randn(shape, generator=generator) * 0.02).to(dtype))
    return path


_SAFETENSORS_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def _stream_safetensors(path: Path, shapes: dict[str, Any], dtype: torch.dtype, make: Any) -> None:
    """Write a safetensors file one tensor at a time (`make(shape)` builds each), so RAM stays at one tensor.

    Layout per the safetensors spec: 8-byte little-endian header length, JSON header (space-padded to a
    multiple of 8) with dtype, shape and data_offsets of each tensor, then the raw little-endian data.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = int(torch.Size(shape).numel()) * itemsize
        header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for shape in shapes.values():
            handle.write(make(shape).contiguous().view(torch.uint8).numpy().tobytes())


# ----------------------------------------------------------------------------- reference


def reference_pipeline(synth: SyntheticCheckpoint) -> Any:
    """The diffusers reference pipeline (Euler, SD scaled-linear schedule) on exactly `synth`'s weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=synth.prediction_type, steps_offset=1,  # as in SD's released scheduler configs
    )
    if synth.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=synth.vae, text_encoder=synth.text_encoders[0], text_encoder_2=synth.text_encoders[1],
            tokenizer=reference_tokenizer(False), tokenizer_2=reference_tokenizer(True), unet=synth.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionPipeline(
        vae=synth.vae, text_encoder=synth.text_encoders[0], tokenizer=reference_tokenizer(synth.family == "sd2"),
        unet=synth.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@dataclass
class ReferenceModules:
    """diffusers' and transformers' own classes holding a loaded model's exact weights: what the equality tests
    compare difusi's modules (`difusi.models.unet`, `autoencoder`, `clip`) and pipeline with."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]


def reference_modules(model: Any) -> ReferenceModules:
    """Copies of `model`'s UNet, VAE and text encoders as diffusers / transformers modules (same configs, same
    tensors), with transformers' tokenizers (OpenCLIP's pad for encoders that pad with 0)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difusi.models.families import OPENCLIP_PAD_ID

    def copy_into(reference: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
        reference.load_state_dict({key: value.detach().clone() for key, value in source.state_dict().items()})
        first = next(source.parameters())
        return reference.to(device=first.device, dtype=first.dtype).eval()

    unet = copy_into(UNet2DConditionModel.from_config(dict(model.unet.config)), model.unet)
    vae = copy_into(AutoencoderKL.from_config(dict(model.vae.config)), model.vae)
    texts, tokenizers = [], []
    for encoder in model.text_encoders:
        config = CLIPTextConfig(**encoder.model.config.to_dict())
        with_projection = hasattr(encoder.model, "text_projection")
        texts.append(copy_into((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config),
                               encoder.model))
        tokenizers.append(reference_tokenizer(encoder.pad_token_id == OPENCLIP_PAD_ID))
    return ReferenceModules(unet, vae, texts, tokenizers)


def reference_pipeline_for(model: Any, scheduler: Any, *, force_zeros_for_empty_prompt: bool = False) -> Any:
    """A diffusers `StableDiffusion(XL)Pipeline` of diffusers' / transformers' own classes holding `model`'s exact
    weights (`reference_modules`), with `scheduler`; the VAE's scaling factor is the model's and SDXL's VAE is not
    upcast (difusi decodes in the loaded precision)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    copies = reference_modules(model)
    parts = dict(vae=copies.vae, unet=copies.unet, scheduler=scheduler, text_encoder=copies.text_encoders[0],
                 tokenizer=copies.tokenizers[0])
    if len(copies.text_encoders) == 2:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=copies.text_encoders[1],
                                         tokenizer_2=copies.tokenizers[1],
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        pipe.vae.register_to_config(scaling_factor=model.scaling_factor, force_upcast=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.vae.register_to_config(scaling_factor=model.scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe

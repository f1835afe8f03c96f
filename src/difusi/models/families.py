"""The model-family table: one frozen record per family, the only place SD1/SD2/SDXL facts live.

Loader, detection, conversion, pipeline, previews and (next) LoRA loading all read a `FamilySpec`
instead of comparing family names, so adding a family means adding one record to `FAMILIES`.
A record says how the family is recognised from tensor names/shapes (or a diffusers folder), how
its text encoders are laid out and read (LDM prefix, CLIP/OpenCLIP, projection, layer, padding,
clip-skip rule), its native size, whether the UNet takes SDXL size conditioning, its VAE's
downscale and scaling factors, latent -> RGB preview factors, and its kohya LoRA key prefixes.

Values follow the families' released configs (CompVis `v1-inference.yaml`, Stability
`v2-inference*.yaml`, `sd_xl_base.yaml`) and A1111's behaviour; preview factors are the published
linear fits of ComfyUI's `latent_formats.py` (SD15, SDXL; SD2 shares SD1's VAE). difusi-mini's
values are its trained calibration (the same numbers its shipped sidecar states, which stays an
override), so a copy of its weights without the sidecar is still recognised by its architecture
signature and runs at 64 px instead of producing noise at 512 px.

`LoadedModel.family` stays the architecture name ("sd1" | "sd2" | "sdxl"); `LoadedModel.family_spec`
is the record (e.g. key "sd2-v" or "difusi-mini").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difusi.errors import CheckpointError, UnsupportedModelError

# Key prefixes of single-file LDM checkpoints (CompVis / Stability layouts); `difusi.models.convert` re-exports them.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

Shapes = Mapping[str, tuple[int, ...]]
Factors = tuple[tuple[float, float, float], ...]
Bias = tuple[float, float, float]

EOS_TOKEN_ID = 49407  # OpenAI CLIP pads with <|endoftext|>
OPENCLIP_PAD_ID = 0  # OpenCLIP's tokenizer zero-fills ("!")


@dataclass(frozen=True)
class TextEncoderLayout:
    """One text encoder of a family: where it lives in each file layout and how the pipeline reads it."""

    ldm_prefix: str
    """Key prefix in single-file LDM checkpoints."""
    kind: str
    """LDM key style: "clip" (transformers-style OpenAI CLIP) or "openclip" (OpenCLIP resblocks)."""
    with_projection: bool
    """Built as `CLIPTextModelWithProjection` (SDXL's bigG: its pooled, projected output conditions the UNet)."""
    diffusers_folder: str
    """Sub-folder in a diffusers pipeline folder ("text_encoder", "text_encoder_2")."""
    hidden_act: str
    """Activation: OpenAI CLIP "quick_gelu", OpenCLIP "gelu" (also how diffusers folders tell SD1 from SD2)."""
    pad_token_id: int
    hidden_layer: int
    """Hidden state the UNet reads: -1 last layer, -2 penultimate."""
    final_layer_norm: bool
    pooled: bool
    """Whether this encoder's pooled output is part of the conditioning (SDXL's second encoder)."""
    lora_prefix: str
    """kohya LoRA key prefix for this encoder ("lora_te_", "lora_te1_", "lora_te2_")."""
    heads: int | None = None
    """Attention heads when not width // 64 (shapes cannot say; difusi-mini uses 4 at width 128)."""


@dataclass(frozen=True)
class Detection:
    """How a family shows in a single-file checkpoint: every condition must hold."""

    requires: tuple[str, ...] = ()
    """Key prefixes that must each be present."""
    excludes: tuple[str, ...] = ()
    """Key prefixes that must all be absent."""
    segments: tuple[str, ...] = ()
    """Dotted name parts some key must contain at a component boundary (e.g. "double_blocks." for Flux)."""
    unet_in_channels: int | None = None
    """UNet input channels (9 inpainting, ...); None: any (other counts are checked against the latent)."""
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Exact tensor shapes: an architecture signature (difusi-mini)."""
    needs_unet: bool = True
    """False for non-UNet families (Flux, SD3), which are recognised before looking for an LDM UNet."""

    def matches(self, shapes: Shapes) -> bool:
        """True when `shapes` (key -> shape) satisfies every condition."""
        keys = list(shapes)
        if any(not any(k.startswith(p) for k in keys) for p in self.requires):
            return False
        if any(k.startswith(p) for p in self.excludes for k in keys):
            return False
        if any(not any(("." + k).find("." + s) >= 0 for k in keys) for s in self.segments):
            return False
        if any(tuple(shapes.get(k, ())) != tuple(v) for k, v in self.shapes.items()):
            return False
        if self.unet_in_channels is not None:
            conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
            return conv_in is not None and conv_in[1] == self.unet_in_channels
        return True


@dataclass(frozen=True)
class FamilySpec:
    """Everything difusi knows about one model family (or a variant of one)."""

    key: str
    """Record id: "sd1", "sd2", "sd2-v", "sdxl", "difusi-mini", "sdxl-refiner", ..."""
    family: str
    """Architecture name (`LoadedModel.family`, LDM conversion, sampler tables): "sd1" | "sd2" | "sdxl"."""
    label: str
    """Human name, used in messages ("not supported yet: detected <label>")."""
    detection: Detection = field(default_factory=Detection)
    supported: bool = True
    variant_of: str | None = None
    """Variants share the base's architecture and are picked after loading (by prediction type), not by shapes."""
    text_encoders: tuple[TextEncoderLayout, ...] = ()
    honours_clip_skip: bool = False
    """A1111 applies clip skip to SD1 only: SD2 and SDXL already read the penultimate layer."""
    prediction_type: str = "epsilon"
    guess_v_prediction: bool = False
    """Unmarked files may be v-models: run A1111's SD2 test (`loader.guess_sd2_prediction`)."""
    native_size: int = 512
    size_conditioning: bool = False
    """The UNet takes SDXL's added size/crop embedding (`time_ids`) and the pooled text embedding."""
    zero_empty_negative: bool = False
    """An empty negative prompt is all-zero conditioning (SDXL in A1111 and diffusers), not the encoded ""."""
    upcast_attention: bool = False
    """SD2's released configs compute attention scores in fp32 (fp16 overflows otherwise)."""
    unet_heads: int | None = None
    """Fixed attention heads per level (SD1: 8); None: channels // `unet_head_dim`."""
    unet_head_dim: int = 64
    vae_scale_factor: int = 8
    """Pixels per latent pixel of the family's standard VAE (the loader uses the file's actual VAE)."""
    scaling_factor: float = 0.18215
    latent_channels: int = 4
    latent_rgb_factors: Factors | None = None
    """[latent_channels][3] rows: rgb = latent @ factors + bias, in about [-1, 1] (cheap previews)."""
    latent_rgb_bias: Bias | None = None
    lora_unet_prefix: str = "lora_unet_"
    diffusers_classes: tuple[str, ...] = ()
    """Prefixes of the `model_index.json` `_class_name`s of this family's diffusers folders."""

    @property
    def lora_prefixes(self) -> tuple[str, ...]:
        """Every kohya LoRA key prefix: the UNet's, then each text encoder's in pipeline order."""
        return (self.lora_unet_prefix, *(t.lora_prefix for t in self.text_encoders))

    def unsupported(self, where: str = "") -> UnsupportedModelError:
        """The error for a recognised family difusi does not run yet."""
        return UnsupportedModelError(f"{where}not supported yet: detected {self.label}")


# ----------------------------------------------------------------------------- shared values

_SD1_FACTORS: Factors = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS: Factors = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS: Bias = (0.1084, -0.0175, -0.0011)

_MINI_FACTORS: Factors = (
    (0.3099605659284034, 0.02702942676281684, 0.6705206382849477),
    (0.0504333724717303, 0.8497334839475281, -1.358475914568178),
    (0.010626634040943455, -0.8880994777925051, 0.3239706987682404),
    (-0.0792379344584083, -0.20987039462184928, -0.13849976393758467),
)
_MINI_BIAS: Bias = (0.1400132996126617, 0.00833142957853375, -0.43348796515934973)

_SD1_CLIP = TextEncoderLayout(SD1_CLIP_PREFIX, "clip", False, "text_encoder", "quick_gelu", EOS_TOKEN_ID, -1, True, False,
                              "lora_te_")
_SD2_OPENCLIP = TextEncoderLayout(SD2_OPENCLIP_PREFIX, "openclip", False, "text_encoder", "gelu", OPENCLIP_PAD_ID, -2, True,
                                  False, "lora_te_")
_SDXL_CLIP_L = TextEncoderLayout(SDXL_CLIP_L_PREFIX, "clip", False, "text_encoder", "quick_gelu", EOS_TOKEN_ID, -2, False,
                                 False, "lora_te1_")
_SDXL_BIGG = TextEncoderLayout(SDXL_OPENCLIP_PREFIX, "openclip", True, "text_encoder_2", "gelu", OPENCLIP_PAD_ID, -2, False,
                               True, "lora_te2_")
# The refiner's only encoder is bigG at embedders.0 (Stability `sd_xl_refiner.yaml`).
_REFINER_BIGG = TextEncoderLayout("conditioner.embedders.0.model.", "openclip", True, "text_encoder_2", "gelu",
                                  OPENCLIP_PAD_ID, -2, False, True, "lora_te2_")

# difusi-mini's architecture signature (difusi.mini.model): SD1 key layout, 64-channel UNet input, 3-level VAE
# (4x downscale) starting at 32 channels, a 2-layer CLIP of width 128. No SD1/SD2/SDXL release has these shapes.
_MINI_SIGNATURE: dict[str, tuple[int, ...]] = {
    UNET_PREFIX + "input_blocks.0.0.weight": (64, 4, 3, 3),
    UNET_PREFIX + "out.2.weight": (4, 64, 3, 3),
    VAE_PREFIX + "encoder.conv_in.weight": (32, 3, 3, 3),
    VAE_PREFIX + "decoder.conv_in.weight": (64, 4, 3, 3),
    SD1_CLIP_PREFIX + "embeddings.token_embedding.weight": (49408, 128),
    SD1_CLIP_PREFIX + "encoder.layers.1.mlp.fc1.weight": (512, 128),
}

_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


# ----------------------------------------------------------------------------- the table

FAMILIES: tuple[FamilySpec, ...] = (
    # Recognised before any UNet is looked for: transformer families without an LDM UNet.
    FamilySpec("flux", "flux", "Flux (double_blocks transformer)", Detection(segments=("double_blocks.",), needs_unet=False),
               supported=False, diffusers_classes=("Flux",)),
    FamilySpec("sd3", "sd3", "SD3 (MMDiT joint_blocks transformer)", Detection(segments=("joint_blocks.",), needs_unet=False),
               supported=False, diffusers_classes=("StableDiffusion3",)),
    # UNet input channels other than the latent's: conditioning variants of any family. Inpainting UNets (latent + 5:
    # the mask and the masked picture's latents) are no record: they load as their family (`LoadedModel.inpainting`).
    FamilySpec("instruct-pix2pix", "sd1", "instruct-pix2pix (8 input channels)", Detection(unet_in_channels=8),
               supported=False),
    FamilySpec("depth", "sd2", "depth-conditioned (5 input channels)", Detection(unet_in_channels=5), supported=False),
    # The shipped default model, by its exact architecture (an SD1 layout, so it must come before SD1).
    FamilySpec(
        "difusi-mini", "sd1", "difusi-mini",
        Detection(requires=(SD1_CLIP_PREFIX, VAE_PREFIX + "encoder.down.2."), shapes=_MINI_SIGNATURE,
                  excludes=(SD1_CLIP_PREFIX + "encoder.layers.2.", VAE_PREFIX + "encoder.down.3.")),
        text_encoders=(TextEncoderLayout(SD1_CLIP_PREFIX, "clip", False, "text_encoder", "quick_gelu", EOS_TOKEN_ID, -1,
                                         True, False, "lora_te_", heads=4),),
        honours_clip_skip=True, native_size=64, unet_heads=4, vae_scale_factor=4, scaling_factor=0.9113158583641052,
        latent_rgb_factors=_MINI_FACTORS, latent_rgb_bias=_MINI_BIAS,
    ),
    FamilySpec(
        "sdxl", "sdxl", "SDXL base", Detection(requires=(SDXL_CLIP_L_PREFIX, SDXL_OPENCLIP_PREFIX)),
        text_encoders=(_SDXL_CLIP_L, _SDXL_BIGG), native_size=1024, size_conditioning=True, zero_empty_negative=True,
        scaling_factor=0.13025, latent_rgb_factors=_SDXL_FACTORS, latent_rgb_bias=_SDXL_BIAS,
        diffusers_classes=("StableDiffusionXL",),
    ),
    FamilySpec(
        "sdxl-refiner", "sdxl", "SDXL refiner (OpenCLIP bigG only, no CLIP-L)",
        Detection(requires=("conditioner.embedders.0.model.",)), supported=False, text_encoders=(_REFINER_BIGG,),
        native_size=1024, size_conditioning=True, scaling_factor=0.13025,
    ),
    FamilySpec("sd2-unclip", "sd2", "SD2 with class/image embedding (unCLIP)",
               Detection(requires=(SD2_OPENCLIP_PREFIX, UNET_PREFIX + "label_emb.")), supported=False),
    FamilySpec(
        "sd2", "sd2", "SD 2.x", Detection(requires=(SD2_OPENCLIP_PREFIX,)), text_encoders=(_SD2_OPENCLIP,),
        guess_v_prediction=True, upcast_attention=True, latent_rgb_factors=_SD1_FACTORS, diffusers_classes=_SD_CLASSES,
    ),
    FamilySpec(
        "sd2-v", "sd2", "SD 2.x (v-prediction)", variant_of="sd2", text_encoders=(_SD2_OPENCLIP,),
        prediction_type="v_prediction", native_size=768, upcast_attention=True, latent_rgb_factors=_SD1_FACTORS,
    ),
    FamilySpec("sd1-unclip", "sd1", "SD1 with class/image embedding (unCLIP)",
               Detection(requires=(SD1_CLIP_PREFIX, UNET_PREFIX + "label_emb.")), supported=False),
    FamilySpec(
        "sd1", "sd1", "SD 1.x", Detection(requires=(SD1_CLIP_PREFIX,)), text_encoders=(_SD1_CLIP,), honours_clip_skip=True,
        unet_heads=8, latent_rgb_factors=_SD1_FACTORS, diffusers_classes=_SD_CLASSES,
    ),
    # Room for more: SDXL Turbo / Lightning share SDXL base's architecture, so no shape tells them apart. They need
    # one record each (`variant_of="sdxl"`, their own native size / defaults) plus the marker that picks it, e.g.
    # safetensors metadata `modelspec.architecture`, read where `variant_for` picks "sd2-v" by prediction type today.
)

_BY_KEY = {spec.key: spec for spec in FAMILIES}
_BASE_BY_FAMILY = {spec.family: spec for spec in FAMILIES if spec.supported and spec.key == spec.family}
ARCHITECTURES: tuple[str, ...] = tuple(_BASE_BY_FAMILY)
"""The architecture names difusi runs ("sdxl", "sd2", "sd1"): each has a plain record (key == family)."""


def family_spec(key: str) -> FamilySpec:
    """The record named `key` ("sd1", "sd2-v", "difusi-mini", ...) or architecture name ("sd1" | "sd2" | "sdxl")."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown model family {key!r}; known: {', '.join(_BY_KEY)}") from None


def base_spec(family: str) -> FamilySpec:
    """The plain record of an architecture name ("sd1" -> SD 1.x)."""
    return _BASE_BY_FAMILY[family]


def find_spec_of(model: Any) -> FamilySpec | None:
    """The record of a loaded model, or of its `.family` name (stand-in objects); None for an unknown family."""
    spec = getattr(model, "family_spec", None)
    if isinstance(spec, FamilySpec):
        return spec
    return _BASE_BY_FAMILY.get(getattr(model, "family", None) or "")


def spec_of(model: Any) -> FamilySpec:
    """`find_spec_of`, with SD 1.x's record for objects without a known family (SD1 is what difusi's rules default to)."""
    return find_spec_of(model) or _BY_KEY["sd1"]


def variant_for(spec: FamilySpec, prediction_type: str) -> FamilySpec:
    """The variant of `spec` for a prediction type found after loading (SD2 + v-prediction -> "sd2-v"), else `spec`."""
    for candidate in FAMILIES:
        if candidate.variant_of == spec.key and candidate.prediction_type == prediction_type:
            return candidate
    return spec


def match_shapes(shapes: Shapes, *, unet: bool) -> FamilySpec | None:
    """The first record (in table order) whose detection fits `shapes`; `unet` picks UNet or non-UNet families.

    Unsupported records are returned too; the caller raises their `unsupported()` error.
    """
    for spec in FAMILIES:
        if spec.variant_of is None and spec.detection.needs_unet == unet and spec.detection.matches(shapes):
            return spec
    return None


def detect_diffusers(root: Path, index: Mapping[str, Any], unet_config: Mapping[str, Any]) -> FamilySpec:
    """The record of a diffusers pipeline folder, from `model_index.json`, the UNet config and its text encoders.

    Raises UnsupportedModelError for recognised unsupported families, CheckpointError when nothing fits.
    """
    from difusi.models.files import read_json

    where = f"{root}: "
    class_name = str(index.get("_class_name", ""))
    for spec in FAMILIES:
        if not spec.supported and spec.diffusers_classes and class_name.startswith(spec.diffusers_classes):
            raise spec.unsupported(where)
    in_channels = unet_config.get("in_channels", 4)
    for spec in FAMILIES:
        if spec.detection.unet_in_channels is not None and spec.detection.unet_in_channels == in_channels:
            raise spec.unsupported(where)
    folders = tuple(name for name in ("text_encoder", "text_encoder_2") if (root / name).is_dir())
    if not folders:
        raise CheckpointError(f"{root}: diffusers folder without text_encoder/")
    first = root / folders[0] / "config.json"
    # transformers' CLIPTextConfig defaults to OpenAI CLIP's quick_gelu when a config leaves it out
    act = (read_json(first).get("hidden_act") if first.is_file() else None) or "quick_gelu"
    for spec in FAMILIES:
        if spec.variant_of is not None or spec.detection.shapes or not spec.text_encoders:
            continue
        layout_folders = tuple(t.diffusers_folder for t in spec.text_encoders)
        if layout_folders == folders and (len(folders) > 1 or act == spec.text_encoders[0].hidden_act):
            if not spec.supported:
                raise spec.unsupported(where)
            return spec
    raise CheckpointError(f"{root}: diffusers folder with text encoders {list(folders)} ({act}) fits no known family")

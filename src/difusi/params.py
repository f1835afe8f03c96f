"""GenerationParams: the one validated description of a job, with A1111's field names — and the field table.

Every job field is declared exactly once, below, as a dataclass field of `GenerationParams` whose metadata is a
`FieldSpec`: A1111 name, Python type, default, allowed range or choices, help text, CLI flag(s), infotext key,
UI hints and the job kinds that use it. Everything else is derived from that declaration:

- `GenerationParams.validated()` checks types and ranges (the only place ranges are checked);
- `difusi.cli` builds the `generate` flags from `FIELDS`;
- `difusi.infotext` writes and parses the A1111 keys named here (`KEY_TO_FIELD`);
- `difusi.server.a1111` builds the pydantic request model of the HTTP API;
- the web UI builds its form from `GET /difusi/v1/fields` (`field_table()`).

Adding a field means adding one declaration here (plus, when it changes generation, the code that uses it).
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from difusi.errors import ParamError
from difusi.strict_json import to_strict

SEED_MAX = 2**53 - 1
"""Largest seed (and variation seed) accepted, for every image of a job: image i of seed s uses s + i, and A1111
keeps counting past 2**32, so difusi must read back every seed it writes (a job whose last image seed would pass
SEED_MAX is refused, naming the field). 2**53 - 1 is JavaScript's Number.MAX_SAFE_INTEGER: the largest range every
consumer of difusi's JSON keeps exact (the web UI's numbers, JSON.parse, OpenAPI's float bounds), well inside what
the seed's other users take (torch's CPU generator and NV/GPU Philox: 64-bit keys; torchsde's Brownian tree; the
history database's signed 64-bit INTEGER)."""

RANDOM_SEED_MAX = 2**32 - 2
"""A random seed (-1) is drawn from [0, RANDOM_SEED_MAX], as A1111 does (so random seeds stay 32-bit)."""

SIZE_MULTIPLE = 8

MAX_PROMPT_CHARS = 10_000
"""Longest prompt / negative prompt accepted: about 40 CLIP chunks; longer text costs memory and time in every
cross-attention layer at every step, and no real prompt needs it."""

TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
JOB_KINDS = (TXT2IMG, IMG2IMG, INPAINT)
"""Job kinds a field can belong to: txt2img (hires fix is part of it, as in A1111), img2img (from init images) and
inpaint (img2img with a mask; outpainting makes one). An inpaint job uses every img2img field too."""
ALL_KINDS = frozenset(JOB_KINDS)
PICTURE_KINDS = frozenset({IMG2IMG, INPAINT})
"""The kinds that start from init images (A1111's img2img tab)."""

INFOTEXT_ALWAYS = "always"
INFOTEXT_CHANGED = "changed"
INFOTEXT_HEADER = "header"
INFOTEXT_NETWORKS = "networks"
"""Written by the job's extra networks (`difusi.networks.job`) only when a file is in use; read like any other key."""


@dataclass(frozen=True)
class FieldSpec:
    """Everything every front end needs to know about one job field (derived from its one declaration)."""

    name: str
    """A1111 API name: the GenerationParams attribute, the HTTP request key and the `ParamError.field`."""
    type: type
    """int, float or str (the value's type once validated)."""
    default: Any
    nullable: bool
    """None is allowed (and means something: the model's native size, the sampler's own eta, the default model)."""
    label: str
    """The label A1111's UI shows."""
    help: str
    range: tuple[float, float] | None = None
    """Closed interval of allowed values (numbers only)."""
    multiple_of: int | None = None
    choices: str | None = None
    """Named list the value must come from: "samplers", "schedulers", "checkpoints", "rng_sources", "vaes" or "backends" (checked
    by their registries)."""
    flags: tuple[str, ...] = ()
    """CLI spellings, canonical first; "PROMPT" is the positional argument; () = not on the command line."""
    metavar: str | None = None
    infotext: str | None = None
    """A1111 infotext key this field is read from ("Size-1"/"Size-2": A1111 splits "Size: WxH"); None = not in it."""
    infotext_when: str = INFOTEXT_CHANGED
    """"always" written, written when "changed" from the default, or the prompt "header" lines."""
    option: str | None = None
    """A1111 option (`override_settings` key) that sets this field per job, e.g. CLIP_stop_at_last_layers."""
    http: bool = True
    """Part of the A1111 request body (the checkpoint travels in override_settings instead)."""
    kinds: frozenset[str] = ALL_KINDS
    """Job kinds that use the field: its request model (txt2img or img2img), its UI tab, whether its infotext key
    is written for an image."""
    requires: str | None = None
    """A bool field of the same job that must be on for this one to act and be written (the hires fields need
    `enable_hr`; in img2img jobs, which have no `enable_hr`, the condition does not apply)."""
    labels: tuple[str, ...] | None = None
    """Names of an int or bool field's values, A1111's: the infotext writes `labels[value]` ("Masked content:
    original") and reads either the name or the number."""
    group: str = "advanced"
    """UI section: prompt, sampling, size, batch, seed, variation, advanced, speed, hires, img2img, inpaint,
    outpaint."""
    widget: str = "number"
    """UI control: textarea, select, number, seed, checkbox, slider."""
    step: float | None = None
    """UI increment for number inputs."""

    def range_text(self) -> str:
        """"[1, 1000]" for help texts and errors."""
        if self.range is None:
            return ""
        return f"[{format_value(self.range[0])}, {format_value(self.range[1])}]"

    def to_json(self) -> dict[str, Any]:
        """The JSON the web UI builds its form from (`GET /difusi/v1/fields`); infinity becomes null."""
        low, high = self.range if self.range is not None else (None, None)
        return to_strict({
            "name": self.name, "type": {int: "integer", float: "number", str: "string", bool: "boolean"}[self.type],
            "nullable": self.nullable, "default": self.default, "label": self.label, "help": self.help,
            "min": low, "max": high, "multiple_of": self.multiple_of,
            "step": self.step or self.multiple_of, "choices": self.choices, "flags": list(self.flags),
            "infotext": self.infotext, "option": self.option, "http": self.http, "kinds": sorted(self.kinds),
            "requires": self.requires, "labels": list(self.labels) if self.labels else None,
            "group": self.group, "widget": self.widget,
        })


def param(default: Any, *, label: str, help: str, **spec: Any) -> Any:
    """Declare a GenerationParams field: its default plus its FieldSpec attributes (name and type come from the
    annotation)."""
    return field(default=default, metadata={"spec": {"label": label, "help": help, **spec}})


@dataclass
class GenerationParams:
    """One job. Field names and meanings follow AUTOMATIC1111's API; declaration order is A1111's infotext order.

    `width`/`height` of None mean the model's native size. `seed`/`subseed` of -1 mean "draw a
    random one" (the resolved value is reported in the result). `eta` of None means the sampler's
    own default. `model` names a checkpoint (path, name, "name [hash]" or short hash); None = default.
    """

    prompt: str = param("", label="Prompt", help="the prompt (A1111 syntax)", flags=("PROMPT",), infotext="Prompt",
                        infotext_when=INFOTEXT_HEADER, group="prompt", widget="textarea")
    negative_prompt: str = param("", label="Negative prompt", help="what to steer away from",
                                 flags=("--negative-prompt", "-n"), infotext="Negative prompt",
                                 infotext_when=INFOTEXT_HEADER, group="prompt", widget="textarea")
    steps: int = param(20, label="Sampling steps", help="sampling steps", range=(1, 1000), flags=("--steps",),
                       infotext="Steps", infotext_when=INFOTEXT_ALWAYS, group="sampling")
    sampler_name: str = param("DPM++ 2M", label="Sampling method", help="sampler name, A1111 or ComfyUI style",
                              choices="samplers", flags=("--sampler", "--sampler-name"), infotext="Sampler",
                              infotext_when=INFOTEXT_ALWAYS, group="sampling", widget="select")
    scheduler: str = param("Automatic", label="Schedule type", help='noise schedule, e.g. "Karras"',
                           choices="schedulers", flags=("--scheduler",), infotext="Schedule type",
                           infotext_when=INFOTEXT_ALWAYS, group="sampling", widget="select")
    cfg_scale: float = param(7.0, label="CFG scale", help="classifier-free guidance scale", range=(0.0, 100.0),
                             flags=("--cfg-scale",), infotext="CFG scale", infotext_when=INFOTEXT_ALWAYS,
                             group="sampling", step=0.5)
    seed: int = param(-1, label="Seed", help="seed; -1 draws a random one", range=(-1, SEED_MAX), flags=("--seed",),
                      infotext="Seed", infotext_when=INFOTEXT_ALWAYS, group="seed", widget="seed")
    width: int | None = param(None, label="Width", help="width in pixels (default: the model's native size)",
                              range=(64, 4096), multiple_of=SIZE_MULTIPLE, flags=("--width", "-W"),
                              infotext="Size-1", infotext_when=INFOTEXT_ALWAYS, group="size")
    height: int | None = param(None, label="Height", help="height in pixels (default: the model's native size)",
                               range=(64, 4096), multiple_of=SIZE_MULTIPLE, flags=("--height", "-H"),
                               infotext="Size-2", infotext_when=INFOTEXT_ALWAYS, group="size")
    model: str | None = param(None, label="Checkpoint",
                              help="checkpoint: path, file name, name or short hash in the models folder "
                                   "(default difusi-mini)",
                              choices="checkpoints", flags=("--model", "-m"), option="sd_model_checkpoint",
                              http=False, group="model", widget="select")
    subseed: int = param(-1, label="Variation seed", help="variation seed; -1 draws a random one",
                         range=(-1, SEED_MAX), flags=("--subseed",), infotext="Variation seed",
                         infotext_when=INFOTEXT_ALWAYS, group="variation", widget="seed")
    subseed_strength: float = param(0.0, label="Variation strength", help="variation strength", range=(0.0, 1.0),
                                    flags=("--subseed-strength",), infotext="Variation seed strength",
                                    group="variation", step=0.01)
    clip_skip: int = param(1, label="Clip skip", help="stop CLIP this many layers from the end", range=(1, 12),
                           flags=("--clip-skip",), infotext="Clip skip", option="CLIP_stop_at_last_layers")
    rng: str = param("CPU", label="RNG",
                     help="random number generator source: CPU (the same image on every device), GPU (torch's "
                          "generator on the job's device, A1111's default) or NV (NVIDIA's GPU numbers, computed "
                          "on any device)",
                     choices="rng_sources", flags=("--rng",), infotext="RNG", infotext_when=INFOTEXT_ALWAYS,
                     option="randn_source", group="advanced", widget="select")
    """A1111's "Random number generator source" (`difusi.rng.RNG_SOURCES`); always written to the infotext, so an
    A1111 user who pastes a difusi image gets the same noise source (A1111 omits its default "GPU")."""
    sd_vae: str = param("Automatic", label="SD VAE",
                        help="VAE file: Automatic (NAME.vae.safetensors next to the checkpoint, else its own), None "
                             "(the checkpoint's own), or a file name from the VAE folder",
                        choices="vaes", flags=("--vae",), metavar="VAE", infotext="VAE",
                        infotext_when=INFOTEXT_NETWORKS, option="sd_vae", group="model", widget="select")
    """A1111's "SD VAE" setting (`difusi.models.vae_files.resolve_vae`); the infotext has `VAE` and `VAE hash` only when
    a VAE file is in use, as A1111's."""
    eta: float | None = param(None, label="Eta", help="ancestral/SDE noise amount (default: the sampler's)",
                              range=(0.0, 10.0), flags=("--eta",), infotext="Eta", option="eta_ancestral", step=0.01)
    s_churn: float = param(0.0, label="Sigma churn", help="Euler/Heun churn", range=(0.0, 1000.0),
                           flags=("--s-churn",), infotext="Sigma churn", step=0.01)
    s_tmin: float = param(0.0, label="Sigma tmin", help="churn lower sigma bound", range=(0.0, math.inf),
                          flags=("--s-tmin",), infotext="Sigma tmin", step=0.01)
    s_tmax: float = param(math.inf, label="Sigma tmax", help="churn upper sigma bound", range=(0.0, math.inf),
                          flags=("--s-tmax",), infotext="Sigma tmax", step=0.01)
    s_noise: float = param(1.0, label="Sigma noise", help="noise multiplier", range=(0.0, 10.0), flags=("--s-noise",),
                           infotext="Sigma noise", option="s_noise", step=0.01)
    s_min_uncond: float = param(0.0, label="NGMS", help="NGMS: below SIGMA, every other step skips the uncond pass "
                                                        "(0 = off)",
                                range=(0.0, 100.0), flags=("--s-min-uncond",), metavar="SIGMA", infotext="NGMS",
                                option="s_min_uncond", group="speed", step=0.1)
    """Opt-in speed-up (A1111 "NGMS"): below this sigma every other step skips the uncond pass. 0 = off."""
    token_merging_ratio: float = param(0.0, label="Token merging ratio",
                                       help="ToMe: merge this fraction of tokens before self-attention (0 = off)",
                                       range=(0.0, 0.75), flags=("--token-merging-ratio",), metavar="RATIO",
                                       infotext="Token merging ratio", option="token_merging_ratio", group="speed",
                                       step=0.05)
    """Opt-in speed-up (A1111's ToMe ratio): fraction of tokens merged before self-attention. 0 = off."""
    deepcache_interval: int = param(1, label="DeepCache interval",
                                    help="DeepCache: recompute the UNet's deep blocks every N-th step (1 = off)",
                                    range=(1, 50), flags=("--deepcache-interval",), metavar="N",
                                    infotext="DeepCache interval", group="speed")
    """Opt-in speed-up (DeepCache): recompute the UNet's deep blocks every N-th call. 1 = off."""
    unet_precision: str = param("fp32", label="UNet precision",
                                help="UNet graph precision: fp32 (exact), bf16 (OpenVINO bf16 inference, CPUs with "
                                     "AMX / AVX512-BF16) or int8 (NNCF int8 weights); needs the openvino backend",
                                choices="unet_precisions", flags=("--unet-precision",), infotext="UNet precision",
                                group="speed", widget="select")
    """Opt-in speed-up (`difusi.speed.graph.precision`): the compiled OpenVINO UNet in bf16 or with int8 weights.
    "fp32" = off; written to the infotext only when it ran (a job that fell back to fp32 says so in its warnings)."""
    backend: str = param("auto", label="UNet backend",
                         help="how the UNet runs: auto (a compiled graph where it pays and is installed, else "
                              "torch), torch, openvino or onnx; never changes the infotext",
                         choices="backends", flags=("--backend",), group="speed", widget="select")
    """Where the UNet runs on the CPU (`difusi.speed.graph`): the same numbers within float rounding, so it is not in
    the infotext (an image made with any backend is remade by any other)."""
    # -- hires fix (txt2img): A1111's second pass, an img2img of the upscaled first image --------------------------
    enable_hr: bool = param(False, label="Hires. fix",
                            help="upscale the first image and redraw it (A1111's hires fix; the fields below)",
                            flags=("--enable-hr",), kinds=frozenset({TXT2IMG}), group="hires", widget="checkbox")
    """No infotext key of its own: A1111 reads hires fix from the "Hires upscale" / "Hires resize" keys."""
    denoising_strength: float = param(0.75, label="Denoising strength",
                                      help="how much of the picture is redrawn: 0 keeps it, 1 redraws it all "
                                           "(img2img, and the hires pass)",
                                      range=(0.0, 1.0), flags=("--denoising-strength",), infotext="Denoising strength",
                                      infotext_when=INFOTEXT_ALWAYS, requires="enable_hr", group="img2img",
                                      widget="slider", step=0.01)
    hr_scale: float = param(2.0, label="Upscale by", help="hires fix: scale of the second pass (unless a resize is "
                                                          "given)",
                            range=(1.0, 8.0), flags=("--hr-scale",), infotext="Hires upscale",
                            infotext_when=INFOTEXT_ALWAYS, kinds=frozenset({TXT2IMG}), requires="enable_hr",
                            group="hires", step=0.05)
    hr_resize_x: int = param(0, label="Resize width to", help="hires fix: target width (0 = from the height / scale)",
                             range=(0, 4096), flags=("--hr-resize-x",), infotext="Hires resize-1",
                             kinds=frozenset({TXT2IMG}), requires="enable_hr", group="hires", step=8)
    hr_resize_y: int = param(0, label="Resize height to", help="hires fix: target height (0 = from the width / scale)",
                             range=(0, 4096), flags=("--hr-resize-y",), infotext="Hires resize-2",
                             kinds=frozenset({TXT2IMG}), requires="enable_hr", group="hires", step=8)
    hr_upscaler: str = param("Latent", label="Upscaler",
                             help="hires fix upscaler: a latent mode (Latent, Latent (bicubic), ...), None, Lanczos, "
                                  "Nearest or a model upscaler's name",
                             choices="upscalers", flags=("--hr-upscaler",), infotext="Hires upscaler",
                             infotext_when=INFOTEXT_ALWAYS, kinds=frozenset({TXT2IMG}), requires="enable_hr",
                             group="hires", widget="select")
    hr_second_pass_steps: int = param(0, label="Hires steps", help="hires fix: steps of the second pass (0 = steps)",
                                      range=(0, 1000), flags=("--hr-second-pass-steps", "--hr-steps"),
                                      infotext="Hires steps", kinds=frozenset({TXT2IMG}), requires="enable_hr",
                                      group="hires")
    hr_sampler_name: str = param("", label="Hires sampling method",
                                 help="hires fix: sampler of the second pass (empty = the same sampler)",
                                 choices="samplers", flags=("--hr-sampler",), infotext="Hires sampler",
                                 kinds=frozenset({TXT2IMG}), requires="enable_hr", group="hires", widget="select")
    hr_scheduler: str = param("", label="Hires schedule type",
                              help="hires fix: schedule of the second pass (empty = the same schedule)",
                              choices="schedulers", flags=("--hr-scheduler",), infotext="Hires schedule type",
                              kinds=frozenset({TXT2IMG}), requires="enable_hr", group="hires", widget="select")
    hr_prompt: str = param("", label="Hires prompt", help="hires fix: prompt of the second pass (empty = the prompt)",
                           flags=("--hr-prompt",), infotext="Hires prompt", kinds=frozenset({TXT2IMG}),
                           requires="enable_hr", group="hires", widget="textarea")
    hr_negative_prompt: str = param("", label="Hires negative prompt",
                                    help="hires fix: negative prompt of the second pass (empty = the negative prompt)",
                                    flags=("--hr-negative-prompt",), infotext="Hires negative prompt",
                                    kinds=frozenset({TXT2IMG}), requires="enable_hr", group="hires",
                                    widget="textarea")
    # -- img2img: from init images ---------------------------------------------------------------------------------
    resize_mode: int = param(0, label="Resize mode",
                             help="how init images meet the job's size: 0 just resize, 1 crop and resize, 2 resize "
                                  "and fill, 3 latent upscale",
                             range=(0, 3), flags=("--resize-mode",), infotext="Resize mode", kinds=PICTURE_KINDS,
                             labels=("Just resize", "Crop and resize", "Resize and fill",
                                     "Just resize (latent upscale)"),
                             group="img2img", widget="select")
    initial_noise_multiplier: float = param(1.0, label="Noise multiplier for img2img",
                                            help="scales the noise added to the init latents", range=(0.0, 2.0),
                                            flags=("--initial-noise-multiplier",), infotext="Noise multiplier",
                                            option="initial_noise_multiplier", kinds=PICTURE_KINDS, group="img2img",
                                            step=0.01)
    img2img_fix_steps: bool = param(False, label="Do exactly the steps the slider specifies",
                                    help="img2img: run `steps` sampler steps whatever the strength (A1111's option; "
                                         "off: strength x steps)",
                                    flags=("--img2img-fix-steps",), infotext="Img2img fix steps",
                                    option="img2img_fix_steps", kinds=PICTURE_KINDS, group="img2img",
                                    widget="checkbox")
    """A1111 keeps this an option and writes nothing; difusi writes it when on, so --from remakes the image."""
    # -- inpainting: img2img with a mask ---------------------------------------------------------------------------
    mask_blur: int = param(4, label="Mask blur", help="Gaussian blur of the mask, in pixels", range=(0, 64),
                           flags=("--mask-blur",), infotext="Mask blur", infotext_when=INFOTEXT_ALWAYS,
                           kinds=frozenset({INPAINT}), group="inpaint")
    mask_blur_x: int | None = param(None, label="Mask blur x", help="horizontal mask blur (default: mask blur)",
                                    range=(0, 64), flags=("--mask-blur-x",), kinds=frozenset({INPAINT}),
                                    group="inpaint")
    mask_blur_y: int | None = param(None, label="Mask blur y", help="vertical mask blur (default: mask blur)",
                                    range=(0, 64), flags=("--mask-blur-y",), kinds=frozenset({INPAINT}),
                                    group="inpaint")
    inpainting_mask_invert: int = param(0, label="Mask mode", help="0 inpaint the masked area, 1 the rest",
                                        range=(0, 1), flags=("--inpainting-mask-invert",), infotext="Mask mode",
                                        kinds=frozenset({INPAINT}), labels=("Inpaint masked", "Inpaint not masked"),
                                        group="inpaint", widget="select")
    inpainting_fill: int = param(1, label="Masked content",
                                 help="what the masked area starts from: 0 fill (the picture's colours), 1 original, "
                                      "2 latent noise, 3 latent nothing",
                                 range=(0, 3), flags=("--inpainting-fill",), infotext="Masked content",
                                 kinds=frozenset({INPAINT}), labels=("fill", "original", "latent noise",
                                                                     "latent nothing"),
                                 group="inpaint", widget="select")
    inpaint_full_res: bool = param(False, label="Inpaint area",
                                   help="only masked: crop to the mask's box (plus padding), redraw it at the job's "
                                        "size, paste it back",
                                   flags=("--inpaint-full-res", "--only-masked"), infotext="Inpaint area",
                                   kinds=frozenset({INPAINT}), labels=("Whole picture", "Only masked"),
                                   group="inpaint", widget="checkbox")
    inpaint_full_res_padding: int = param(32, label="Only masked padding, pixels",
                                          help="only masked: margin around the mask's box", range=(0, 256),
                                          flags=("--inpaint-full-res-padding",), infotext="Masked area padding",
                                          infotext_when=INFOTEXT_ALWAYS, kinds=frozenset({INPAINT}),
                                          requires="inpaint_full_res", group="inpaint")
    inpainting_mask_weight: float = param(1.0, label="Inpainting conditioning mask strength",
                                          help="inpainting checkpoints: how much of the masked picture the model "
                                               "is shown (1 hides the masked area, 0 shows it all)",
                                          range=(0.0, 1.0), flags=("--inpainting-mask-weight",),
                                          infotext="Conditional mask weight", option="inpainting_mask_weight",
                                          group="inpaint", step=0.01)
    # -- outpainting: extend the canvas and inpaint the new area (A1111's "Poor man's outpainting") ----------------
    outpaint_pixels: int = param(0, label="Outpaint pixels", help="extend the canvas by this many pixels (0 = off)",
                                 range=(0, 1024), flags=("--outpaint",), metavar="PIXELS", kinds=PICTURE_KINDS,
                                 group="outpaint", step=8)
    outpaint_directions: str = param("left,right,up,down", label="Outpaint directions",
                                     help="the sides to extend: any of left, right, up, down, comma separated",
                                     flags=("--outpaint-directions",), kinds=PICTURE_KINDS, group="outpaint")
    batch_size: int = param(1, label="Batch size", help="images per batch", range=(1, 64), flags=("--batch-size",),
                            group="batch")
    n_iter: int = param(1, label="Batch count", help="batches, run one after the other", range=(1, 1000),
                        flags=("--batch-count", "--n-iter"), group="batch")
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Values a front end wants echoed but difusi does not interpret (never used for generation)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return list(FIELDS)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> tuple[GenerationParams, list[str]]:
        """Build from a dict of text or JSON values (parsed infotext, CLI, HTTP); None values are skipped.

        Returns the params and the list of keys that are not GenerationParams fields, so callers
        can ignore them (HTTP, as A1111 does) or report them (CLI `--infotext`). Text is converted
        ("20" -> 20); a value that cannot be converted raises ParamError naming the field.
        """
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in values.items():
            if key not in FIELDS:
                unknown.append(key)
                continue
            if value is None:
                continue
            kwargs[key] = _convert(FIELDS[key], value)
        return cls(**kwargs), unknown

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def validated(self, native_size: int | None = None) -> GenerationParams:
        """Check every field; return a copy with width/height filled from `native_size` when None.

        Raises ParamError(field, message) naming the field and its allowed range. Types are strict (a float
        batch size, a bool width or a numeric prompt is refused, not converted). Sampler and schedule names
        are checked against the sampler registry.
        """
        for name in ("prompt", "negative_prompt"):
            _check_text(name, getattr(self, name))
        _check_seed("seed", self.seed)
        _check_seed("subseed", self.subseed)
        width = self.width if self.width is not None else native_size
        height = self.height if self.height is not None else native_size
        if width is None or height is None:
            raise ParamError("width" if width is None else "height", "is required when the model's native size is unknown")
        checked = dataclasses.replace(self, width=width, height=height)
        for spec in FIELDS.values():
            check_field(spec, getattr(checked, spec.name))
        if checked.s_tmax < checked.s_tmin:
            raise ParamError("s_tmax", f"must be >= s_tmin ({format_value(checked.s_tmin)}), got {format_value(checked.s_tmax)}")
        _check_last_seed("seed", checked.seed, checked.total_images)
        _check_last_seed("subseed", checked.subseed, checked.total_images)
        _check_budget(checked)
        _check_prompt_syntax(checked)
        _check_sampler_and_schedule(checked)
        _check_rng(checked)
        _check_backend(checked)
        _check_unet_precision(checked)
        _check_outpaint(checked)
        _check_hires(checked)
        return checked

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter


def _build_table() -> dict[str, FieldSpec]:
    hints = typing.get_type_hints(GenerationParams)
    table: dict[str, FieldSpec] = {}
    for declared in fields(GenerationParams):
        if "spec" not in declared.metadata:
            continue
        members = [arg for arg in typing.get_args(hints[declared.name]) if arg is not type(None)] or [hints[declared.name]]
        table[declared.name] = FieldSpec(name=declared.name, type=members[0], default=declared.default,
                                         nullable=type(None) in typing.get_args(hints[declared.name]),
                                         **declared.metadata["spec"])
    return table


FIELDS: dict[str, FieldSpec] = _build_table()
"""The field table: every job field by A1111 name, in declaration (= infotext) order."""

LIMITS: dict[str, tuple[float, float]] = {
    name: spec.range for name, spec in FIELDS.items() if spec.range is not None and spec.type is not str
}
"""Allowed closed ranges per numeric field (derived from FIELDS); front ends show these in their help and errors."""


def field_table(kind: str | None = None) -> list[dict[str, Any]]:
    """The field table as JSON (optionally only the fields of one job kind), for `GET /difusi/v1/fields`."""
    return [spec.to_json() for spec in FIELDS.values() if kind is None or kind in spec.kinds]


def resolve_seed(seed: int) -> int:
    """-1 (or any negative) draws a random seed in [0, RANDOM_SEED_MAX] = [0, 2**32 - 2], as A1111; others pass
    through."""
    if seed is None or seed < 0:
        return random.SystemRandom().randint(0, RANDOM_SEED_MAX)
    return int(seed)


def format_value(value: float) -> str:
    """A number as help texts and errors show it: 7.0 -> "7", inf -> "inf"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_field(spec: FieldSpec, value: Any) -> None:
    """Strict type, then range and multiple: the one check every front end's values go through."""
    if value is None:
        if spec.nullable:
            return
        raise ParamError(spec.name, "must not be null")
    if spec.type is str:
        if not isinstance(value, str):
            raise ParamError(spec.name, f"must be a string, got {value!r}")
        if spec.name in ("sampler_name", "scheduler") and not value.strip():
            raise ParamError(spec.name, "must be a non-empty string")
        return
    if spec.type is bool:
        if not isinstance(value, bool):
            raise ParamError(spec.name, f"must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(spec.name, f"must be a number, got {value!r}")
    if spec.type is int and not isinstance(value, int):
        raise ParamError(spec.name, f"must be an integer, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ParamError(spec.name, f"must be a number in {spec.range_text()}, got NaN")
    if spec.range is not None and not spec.range[0] <= value <= spec.range[1]:
        raise ParamError(spec.name, f"must be in {spec.range_text()}, got {format_value(value)}")
    if spec.multiple_of and value % spec.multiple_of:
        raise ParamError(spec.name, f"must be a multiple of {spec.multiple_of}, got {value}")


def _check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer (-1 for random), got {value!r}")
    if not (value == -1 or 0 <= value <= SEED_MAX):
        raise ParamError(name, f"must be -1 (random) or in [0, {SEED_MAX}], got {value}")


def _check_last_seed(name: str, value: int, total_images: int) -> None:
    """Image i uses seed + i (contract 2): the job's last seed must be in range too, or difusi would write a seed
    into an image's infotext that it then refuses to read back."""
    last_allowed = SEED_MAX - (total_images - 1)
    if value > last_allowed:
        raise ParamError(name, f"must be -1 (random) or in [0, {last_allowed}] for a job of {total_images} images "
                               f"(image i uses {name} + i, at most {SEED_MAX}), got {value}")


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ParamError(name, "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise ParamError(name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # Lone surrogates (undecodable command-line bytes, JSON "\ud800") cannot go into a tokenizer, PNG or database.
        raise ParamError(name, f"must be valid Unicode text; character {error.start} is an unpaired surrogate "
                               f"{value[error.start]!r}") from None


def _check_budget(params: GenerationParams) -> None:
    from difusi.budget import check_budget

    check_budget(params.width, params.height, params.batch_size)  # memory budget, before anything is allocated


def _check_prompt_syntax(params: GenerationParams) -> None:
    from difusi.prompts.parser import get_prompt_schedule, parse_prompt_attention

    # Bad editing steps and emphasis weights fail here, before a model is loaded, not after.
    for text in (params.prompt, params.negative_prompt):
        for _, scheduled in get_prompt_schedule(text, params.steps):
            parse_prompt_attention(scheduled)


def _check_sampler_and_schedule(params: GenerationParams) -> None:
    from difusi.samplers import get_sampler, get_schedule

    get_sampler(params.sampler_name)  # raises ParamError("sampler_name", ...) listing valid names
    get_schedule(params.scheduler)  # raises ParamError("scheduler", ...); "Automatic" is a schedule too
    if (hires_sampler := same_as_first(params.hr_sampler_name)) is not None:
        _renamed("hr_sampler_name", get_sampler, hires_sampler)
    if (hires_schedule := same_as_first(params.hr_scheduler)) is not None:
        _renamed("hr_scheduler", get_schedule, hires_schedule)


def same_as_first(value: str) -> str | None:
    """A hires-pass choice, or None for "the first pass's" (empty, or A1111's "Use same sampler" / "Use same
    scheduler")."""
    text = value.strip()
    return None if not text or text.lower().startswith("use same") else text


def _renamed(field_name: str, lookup: Any, value: str) -> None:
    """`lookup(value)`, its ParamError re-issued under `field_name` (the hires fields share the first pass's lists)."""
    try:
        lookup(value)
    except ParamError as error:
        raise ParamError(field_name, error.message) from None


def _check_rng(params: GenerationParams) -> None:
    from difusi.rng import check_source

    check_source(params.rng)  # raises ParamError("rng", ...) naming CPU, GPU, NV


OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


def outpaint_sides(params: GenerationParams) -> tuple[str, ...]:
    """The sides `outpaint_directions` names, in OUTPAINT_DIRECTIONS order; ParamError for anything else."""
    named = [part.strip().lower() for part in params.outpaint_directions.split(",") if part.strip()]
    unknown = [part for part in named if part not in OUTPAINT_DIRECTIONS]
    if unknown or not named:
        raise ParamError("outpaint_directions", f"must name some of {', '.join(OUTPAINT_DIRECTIONS)} (comma "
                                                f"separated), got {params.outpaint_directions!r}")
    return tuple(side for side in OUTPAINT_DIRECTIONS if side in named)


def _check_outpaint(params: GenerationParams) -> None:
    if params.outpaint_pixels:
        outpaint_sides(params)


def _check_hires(params: GenerationParams) -> None:
    """The second pass's size must fit the memory budget too, before anything runs."""
    if not params.enable_hr:
        return
    from difusi.budget import check_budget
    from difusi.hires import hires_size

    size = hires_size(params)
    try:
        check_budget(size.width, size.height, params.batch_size)
    except ParamError as error:
        field_name = "hr_scale" if not (params.hr_resize_x or params.hr_resize_y) else "hr_resize_x"
        raise ParamError(field_name, f"the hires pass ({size.width}x{size.height}): {error.message}") from None


def _convert_bool(value: Any) -> bool:
    """true/false, 1/0 (A1111 clients send `inpaint_full_res: 0`), and the CLI's and infotext's words."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise TypeError


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "on": True,
               "off": False}


def _check_backend(params: GenerationParams) -> None:
    from difusi.speed.graph import check_backend

    check_backend(params.backend)  # raises ParamError("backend", ...) naming the backends


def _check_unet_precision(params: GenerationParams) -> None:
    from difusi.speed.graph.precision import check_precision

    check_precision(params.unet_precision)  # raises ParamError("unet_precision", ...) naming fp32, bf16, int8


def _convert(spec: FieldSpec, value: Any) -> Any:
    """Text (infotext, CLI, config) -> the field's type. Integral floats pass for ints ("20.0" is 20); bools never
    count as numbers. Anything that does not convert is a ParamError naming the field."""
    if spec.labels is not None and isinstance(value, str) and value.strip() in spec.labels:
        index = spec.labels.index(value.strip())  # an infotext's "Masked content: original"
        return bool(index) if spec.type is bool else index
    try:
        if spec.type is bool:
            return _convert_bool(value)
        if spec.type is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float):
                if not value.is_integer():
                    raise TypeError
                return int(value)
            return int(str(value).strip())
        if spec.type is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(spec.type, "a string")
        raise ParamError(spec.name, f"must be {kind}, got {value!r}") from None

"""Super-resolution networks, written for difusi: ESRGAN / Real-ESRGAN RRDBNet and Real-ESRGAN's SRVGGNetCompact.

The models A1111 lists under `ESRGAN/` and `RealESRGAN/` are one of two architectures:

- **RRDBNet** (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks", ECCV
  workshops, arXiv:1809.00219): a first 3x3 conv, `nb` Residual-in-Residual Dense Blocks (each three dense blocks
  of five convs with growth `gc`, residuals scaled by 0.2), a trunk conv added back to the first features, then
  nearest x2 upsampling + conv per factor of two, an HR conv and the last conv; LeakyReLU(0.2) throughout.
  Real-ESRGAN (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic
  Data", ICCVW, arXiv:2107.10833) keeps this network and makes 2x and 1x models by `pixel_unshuffle` of the input
  (factor 2 -> 12 input channels, factor 4 -> 48) in front of the same x4 body.
- **SRVGGNetCompact** (Real-ESRGAN's compact model, `realesr-general-x4v3`, `realesr-animevideov3`): a plain
  stack of 3x3 convs with PReLU, the last conv producing `out_nc * s^2` channels that `pixel_shuffle` turns into
  the x`s` image, plus the nearest-upsampled input (the network learns the residual).

Files come in two key layouts for RRDBNet: the original ESRGAN repository's (`model.0`, `model.1.sub.N.RDB1.conv1.0`,
`model.1.sub.NB`, `model.3`, ... : a flattened nn.Sequential) and BasicSR's (`conv_first`, `body.N.rdb1.conv1`,
`conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`; BSRGAN's `RRDB_trunk` / `trunk_conv` / `upconv1` /
`HRconv` spelling too). `detect(shapes)` reads only key names and tensor shapes (nothing is executed, no tensor
data is needed) and returns the hyperparameters; `to_basicsr_keys` maps the old layout onto BasicSR's, which
`RRDBNet` uses. `build_model(state, name)` does both and loads the weights with `strict=True`, so a file whose
keys or shapes do not fit exactly is refused instead of half-loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Shapes = Mapping[str, tuple[int, ...]]

RRDB_NET = "ESRGAN"
COMPACT = "SRVGGNetCompact"


@dataclass(frozen=True)
class ModelSpec:
    """What `detect` found: the architecture and the hyperparameters that rebuild it exactly."""

    architecture: str
    """`RRDB_NET` ("ESRGAN": RRDBNet, old or BasicSR keys) or `COMPACT` ("SRVGGNetCompact")."""
    scale: int
    """Output size / input size (the unshuffle factor already divided out)."""
    in_nc: int
    out_nc: int
    num_feat: int
    num_blocks: int
    """RRDB blocks (RRDBNet) or body convs after the first (SRVGGNetCompact)."""
    num_grow: int = 0
    """Dense-block growth channels `gc` (RRDBNet only)."""
    num_upsample: int = 0
    """x2 upsampling stages (RRDBNet only): 2 for every Real-ESRGAN RRDBNet, whatever its scale."""
    unshuffle: int = 1
    """pixel_unshuffle factor of the input (Real-ESRGAN x2plus: 2, 1x models: 4)."""
    layout: str = "basicsr"
    """Key layout of the file: "esrgan" (old `model.N`), "basicsr" or "bsrgan"; RRDBNet only."""

    @property
    def label(self) -> str:
        """A short human description, e.g. "ESRGAN 4x (RRDBNet, 23 blocks, 64 features)"."""
        if self.architecture == COMPACT:
            return f"Real-ESRGAN compact {self.scale}x (SRVGGNetCompact, {self.num_blocks} convs, {self.num_feat} features)"
        extra = f", pixel-unshuffle {self.unshuffle}" if self.unshuffle > 1 else ""
        return f"ESRGAN {self.scale}x (RRDBNet, {self.num_blocks} blocks, {self.num_feat} features{extra})"


class NotAnUpscaler(ValueError):
    """The keys and shapes are not those of a supported upscaler; the message says what was expected and found."""


# -- RRDBNet ---------------------------------------------------------------------------------------------------------
class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the block input and every previous output (dense connections, growth `gc`);
    the fifth returns to `nf` channels and is added back scaled by 0.2 (ESRGAN's residual scaling)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three dense blocks, the whole added back scaled by 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (BasicSR parameter names), with Real-ESRGAN's pixel-unshuffle input for 2x / 1x models.

    Inputs are RGB in [0, 1], shape [B, in_nc / unshuffle^2, H, W]; the output is [B, out_nc, H*scale, W*scale]
    (not clamped). With `unshuffle` > 1 the input is reflect-padded to a multiple of it first and the output
    cropped back, as Real-ESRGAN's own inference does (`RealESRGANer.pre_process`, `mod_pad`).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        nf, gc = spec.num_feat, spec.num_grow
        self.conv_first = nn.Conv2d(spec.in_nc, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(spec.num_blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.up_names = [f"conv_up{index + 1}" for index in range(spec.num_upsample)]
        for name in self.up_names:  # BasicSR's names (conv_up1, conv_up2, ...), so state dicts match the files
            self.add_module(name, nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, spec.out_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.spec.unshuffle
        height, width = x.shape[-2:]
        if factor > 1:
            pad_h, pad_w = (-height) % factor, (-width) % factor
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, factor)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for name in self.up_names:
            conv = getattr(self, name)
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        scale = self.spec.scale
        return out[..., : height * scale, : width * scale]


# -- SRVGGNetCompact -------------------------------------------------------------------------------------------------
class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: conv + PReLU, `num_conv` x (conv + PReLU), a conv to `out_nc * s^2`
    channels, `pixel_shuffle(s)`, plus the nearest-upsampled input. Parameter names `body.N` as in the files."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        nf = spec.num_feat
        layers: list[nn.Module] = [nn.Conv2d(spec.in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(spec.num_blocks):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, spec.out_nc * spec.scale**2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.spec.scale)
        return out + F.interpolate(x, scale_factor=self.spec.scale, mode="nearest")


# -- detection (keys and shapes only) --------------------------------------------------------------------------------
def unwrap_state_dict(state: Mapping[str, object]) -> dict[str, object]:
    """BasicSR saves `{"params_ema": {...}}` (or `"params"`), Lightning `{"state_dict": ...}`, DataParallel
    prefixes every key with `module.`: the plain state dict inside (EMA weights preferred, as Real-ESRGAN does)."""
    for wrapper in ("params_ema", "params", "state_dict"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping):
            state = inner
            break
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_SEQ = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_BSRGAN = (
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^trunk_conv\.(weight|bias)$"), r"conv_body.\1"),
    (re.compile(r"^upconv(\d)\.(weight|bias)$"), r"conv_up\1.\2"),
    (re.compile(r"^HRconv\.(weight|bias)$"), r"conv_hr.\1"),
)


def layout_of(keys: set[str] | Mapping[str, object]) -> str | None:
    """"esrgan", "basicsr", "bsrgan", "compact" or None, from the key names alone."""
    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        return "esrgan"
    if "conv_first.weight" in keys and "body.0.rdb1.conv1.weight" in keys and "conv_body.weight" in keys:
        return "basicsr"
    if "conv_first.weight" in keys and "RRDB_trunk.0.RDB1.conv1.weight" in keys and "trunk_conv.weight" in keys:
        return "bsrgan"
    if "body.0.weight" in keys and "body.1.weight" in keys and "conv_first.weight" not in keys:
        return "compact"
    return None


def to_basicsr_keys(keys: Mapping[str, object]) -> dict[str, str]:
    """Old-ESRGAN / BSRGAN key -> BasicSR key (identity for BasicSR files), for every key of `keys`.

    In the old layout the model is one flattened nn.Sequential: index 0 the first conv, 1 the shortcut block
    (`sub.0..nb-1` the RRDBs, `sub.nb` the trunk conv), then per x2 stage [Upsample, conv, LeakyReLU] (convs at 3,
    6, 9, ...), then the HR conv, its LeakyReLU, and the last conv: with u stages the HR conv is at 3u + 2 and the
    last conv at 3u + 4 (a 4x model: 8 and 10)."""
    layout = layout_of(keys)
    if layout == "bsrgan":
        mapped = {}
        for key in keys:
            new = key
            for pattern, replacement in _BSRGAN:
                if pattern.match(key):
                    new = pattern.sub(replacement, key)
                    break
            mapped[key] = new
        return mapped
    if layout != "esrgan":
        return {key: key for key in keys}
    blocks = {int(m.group(1)) for key in keys if (m := _OLD_RDB.match(key))}
    trunk = max(blocks) + 1 if blocks else 0
    sequence = {int(m.group(1)) for key in keys if (m := _OLD_SEQ.match(key))}
    last = max(sequence) if sequence else 0
    stages = (last - 4) // 3
    names = {0: "conv_first", 3 * stages + 2: "conv_hr", 3 * stages + 4: "conv_last"}
    names.update({3 * (i + 1): f"conv_up{i + 1}" for i in range(stages)})
    mapped = {}
    for key in keys:
        if m := _OLD_RDB.match(key):
            mapped[key] = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif key in (f"model.1.sub.{trunk}.weight", f"model.1.sub.{trunk}.bias"):
            mapped[key] = "conv_body." + key.rsplit(".", 1)[1]
        elif (m := _OLD_SEQ.match(key)) and int(m.group(1)) in names:
            mapped[key] = f"{names[int(m.group(1))]}.{m.group(2)}"
        else:
            mapped[key] = key  # left as is: strict loading reports it as unexpected
    return mapped


def detect(shapes: Shapes) -> ModelSpec:
    """The architecture and hyperparameters of a state dict, from its key names and tensor shapes only.

    Raises `NotAnUpscaler` naming what was expected and what the keys look like (a LoRA, an SD checkpoint, ...)."""
    layout = layout_of(shapes)
    if layout is None:
        raise NotAnUpscaler(f"{_EXPECTED}; found {describe_keys(shapes)}")
    if layout == "compact":
        return _detect_compact(shapes)
    mapped = to_basicsr_keys(shapes)
    new = {mapped[key]: shape for key, shape in shapes.items()}
    try:
        first, last = new["conv_first.weight"], new["conv_last.weight"]
        grow = new["body.0.rdb1.conv1.weight"][0]
    except KeyError as missing:
        raise NotAnUpscaler(f"RRDBNet ({layout} keys) without {missing.args[0]!r}; {_EXPECTED}") from None
    blocks = 1 + max(int(m.group(1)) for key in new if (m := re.match(r"^body\.(\d+)\.", key)))
    ups = sorted(int(m.group(1)) for key in new if (m := re.match(r"^conv_up(\d+)\.weight$", key)))
    if ups != list(range(1, len(ups) + 1)):
        raise NotAnUpscaler(f"RRDBNet upsampling convs are not numbered 1..n: conv_up{ups}")
    in_nc, out_nc, num_feat = first[1], last[0], first[0]
    unshuffle = 1
    for factor in (2, 4):
        if in_nc == out_nc * factor * factor:
            unshuffle = factor
    network_scale = 2 ** len(ups)
    if network_scale % unshuffle:
        raise NotAnUpscaler(f"RRDBNet with {len(ups)} x2 stages cannot follow a pixel-unshuffle by {unshuffle}")
    return ModelSpec(RRDB_NET, network_scale // unshuffle, in_nc, out_nc, num_feat, blocks, num_grow=grow,
                     num_upsample=len(ups), unshuffle=unshuffle, layout=layout)


def _detect_compact(shapes: Shapes) -> ModelSpec:
    indices = sorted(int(m.group(1)) for key in shapes if (m := re.match(r"^body\.(\d+)\.weight$", key)))
    last = indices[-1]
    if indices != list(range(last + 1)) or last % 2 or last < 2:
        raise NotAnUpscaler(f"SRVGGNetCompact body layers must be conv, PReLU, ..., conv (body.0..body.N, N even); "
                            f"found body indices {indices[:6]}{'...' if len(indices) > 6 else ''}")
    first = shapes["body.0.weight"]
    in_nc, num_feat = first[1], first[0]
    channels = shapes[f"body.{last}.weight"][0]
    for out_nc in (in_nc, 3, 1):  # Real-ESRGAN's compact models map RGB to RGB; try that first
        scale = math.isqrt(channels // out_nc) if channels % out_nc == 0 else 0
        if scale >= 1 and scale * scale * out_nc == channels:
            return ModelSpec(COMPACT, scale, in_nc, out_nc, num_feat, (last - 2) // 2)
    raise NotAnUpscaler(f"SRVGGNetCompact last conv has {channels} channels: not out_channels x scale^2")


_EXPECTED = ("expected an ESRGAN / Real-ESRGAN RRDBNet (keys `model.0.weight` + `model.1.sub.0.RDB1.conv1.0.weight`, "
             "or `conv_first` + `body.0.rdb1.conv1` + `conv_body` + `conv_last`) or a Real-ESRGAN compact "
             "SRVGGNetCompact (`body.0.weight` conv + `body.1.weight` PReLU ...)")


def describe_keys(shapes: Shapes) -> str:
    """What a state dict that is no upscaler looks like, for the error message."""
    keys = list(shapes)
    if not keys:
        return "no tensors"
    if any("lora_up" in key or "lora_down" in key or "lora_A" in key or "hada_w1" in key for key in keys):
        return f"a LoRA / LyCORIS network ({len(keys)} tensors with lora_up / lora_down keys)"
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for key in keys):
        return "a Stable Diffusion checkpoint (model.diffusion_model.* keys)"
    if any(key.startswith(("encoder.down", "decoder.up")) for key in keys):
        return "a VAE (encoder / decoder keys)"
    sample = ", ".join(repr(key) for key in keys[:3])
    return f"{len(keys)} tensors with other keys ({sample}{', ...' if len(keys) > 3 else ''})"


def build_model(state: Mapping[str, torch.Tensor]) -> tuple[nn.Module, ModelSpec]:
    """The float32 CPU module for a state dict (already unwrapped), in eval mode with `requires_grad` off.

    Raises `NotAnUpscaler` when detection fails or the weights do not load strictly (missing / unexpected keys,
    wrong shapes), so nothing runs with half its weights."""
    spec = detect({key: tuple(value.shape) for key, value in state.items()})
    if spec.architecture == COMPACT:
        module: nn.Module = SRVGGNetCompact(spec)
        weights = dict(state)
    else:
        module = RRDBNet(spec)
        mapped = to_basicsr_keys(state)
        weights = {mapped[key]: value for key, value in state.items()}
    weights = {key: value.to(torch.float32) if value.is_floating_point() else value for key, value in weights.items()}
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[1:2] or [str(error)]
        raise NotAnUpscaler(f"looks like {spec.label} but its weights do not fit: {first_line[0].strip()}") from None
    module.eval().requires_grad_(False)
    return module, spec

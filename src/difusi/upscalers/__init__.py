"""Upscalers: A1111's "Extras" tab and hires-fix upscalers (issue 15 item 5).

`list_upscalers(models_dir)` gives A1111's list: "None", "Lanczos", "Nearest", then one entry per model file in
the upscaler folders (`ESRGAN/`, `RealESRGAN/`, `SwinIR/`, `DAT/`, `upscale_models/`; see
`difusi.models.folders`), named by the file's stem as A1111's `modelloader.friendly_name` does and sorted by
lower-case name as A1111's `load_upscalers` does (the first file of a name wins). Files whose keys are not an
upscaler difusi can run are left out of the list; asking for one by name says why.
`get_upscaler(name)` returns an `Upscaler` whose `upscale(image, scale)` follows A1111's `Upscaler.upscale`
(`modules/upscaler.py`): the destination is (int(w * scale) // 8 * 8, int(h * scale) // 8 * 8); the model (or
resize) runs up to three times, stopping when the size no longer changes or reaches the destination, and a
Lanczos resize to the exact destination finishes. Models run tiled (`difusi.upscalers.tiling`), float32 on the
CPU under `torch.inference_mode`.

Channel order: the networks are fed RGB, the order their authors trained and ran them in (ESRGAN's and
Real-ESRGAN's inference scripts convert OpenCV's BGR to RGB). A1111's `upscale_pil_patch` feeds them BGR; a
trained model's output differs slightly between the two, difusi keeps its authors' order.

`LATENT_UPSCALE_MODES` are A1111's latent upscalers for the hires fix (`shared.latent_upscale_modes`):
name -> (`torch.nn.functional.interpolate` mode, antialias).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difusi import settings
from difusi.budget import check_budget
from difusi.errors import ParamError
from difusi.hires import LATENT_UPSCALE_MODES  # declared once, with the hires fix that uses them
from difusi.upscalers import loading
from difusi.upscalers.tiling import ESRGAN_TILE, ESRGAN_TILE_OVERLAP, tiled_upscale

__all__ = ["LATENT_UPSCALE_MODES", "MAX_SCALE", "Upscaler", "UpscalerInfo", "get_upscaler", "list_upscalers",
           "destination_size", "check_scale"]


MAX_SCALE = 8.0
"""Largest scale factor (A1111's extras slider and API allow 1..8; difusi also allows downscaling, (0, 8])."""

BUILTIN = ("None", "Lanczos", "Nearest")
_RESAMPLE = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of the upscaler list (A1111's `UpscalerData`)."""

    name: str
    path: Path | None = None
    """The model file; None for "None", "Lanczos" and "Nearest"."""
    scale: float = 4
    """The model's own factor; A1111 reports 4 for its built-in resizers, so does difusi."""
    architecture: str | None = None
    """e.g. "ESRGAN 4x (RRDBNet, 23 blocks, 64 features)"; None for the built-ins."""

    def to_a1111(self) -> dict[str, Any]:
        """`GET /sdapi/v1/upscalers` item: name, model_name, model_path, model_url, scale."""
        return {"name": self.name, "model_name": self.architecture, "model_path": str(self.path) if self.path else None,
                "model_url": None, "scale": self.scale}


def check_scale(scale: Any, field: str = "scale") -> float:
    """`scale` as a float in (0, MAX_SCALE]; ParamError(field) otherwise (booleans and text are no numbers)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale):
        raise ParamError(field, f"must be a number in (0, {MAX_SCALE:g}], got {scale!r}")
    if not 0 < scale <= MAX_SCALE:
        raise ParamError(field, f"must be in (0, {MAX_SCALE:g}], got {scale:g}")
    return float(scale)


def destination_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's `Upscaler.upscale` destination: (int(w * scale) // 8 * 8, int(h * scale) // 8 * 8)."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


class Upscaler:
    """A named upscaler. `upscale` is A1111's loop; subclasses implement `do_upscale` (one pass)."""

    def __init__(self, info: UpscalerInfo):
        self.info = info
        self.name = info.name

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        """One pass at `scale` (a model pass uses its own factor); the built-in "None" returns the image."""
        return image

    def upscale(self, image: Image.Image, scale: float, field: str = "scale") -> Image.Image:
        """`image` scaled by `scale` to A1111's destination size (see the module docstring).

        ParamError(field) for a scale outside (0, 8], a destination under 8 x 8 pixels or over the memory budget
        (`difusi.budget`), checked before any pixel is computed."""
        scale = check_scale(scale, field)
        dest_w, dest_h = destination_size(image.width, image.height, scale)
        check_destination(dest_w, dest_h, image, scale, field)
        for _ in range(3):
            before = image.size
            image = self.do_upscale(image, scale)
            if image.size == before or (image.width >= dest_w and image.height >= dest_h):
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
        return image


def check_destination(dest_w: int, dest_h: int, image: Image.Image, scale: float, field: str) -> None:
    """An upscale's result must be at least 8 x 8 pixels and within the memory budget's pixels per image."""
    if dest_w < 8 or dest_h < 8:
        raise ParamError(field, f"{image.width}x{image.height} scaled by {scale:g} is {dest_w}x{dest_h}: the result "
                                f"must be at least 8x8 pixels")
    try:
        check_budget(dest_w, dest_h, 1)
    except ParamError as error:
        raise ParamError(field, f"the result of {image.width}x{image.height} x {scale:g}: {error.message}") from None


class ResizeUpscaler(Upscaler):
    """A1111's "Lanczos" and "Nearest": one PIL resize to (int(w * scale), int(h * scale))."""

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        resample = _RESAMPLE[self.name]
        return image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)


class ModelUpscaler(Upscaler):
    """An ESRGAN / Real-ESRGAN network from a file, tiled with A1111's ESRGAN tile settings."""

    def __init__(self, info: UpscalerInfo, field: str = "hr_upscaler", tile: int = ESRGAN_TILE,
                 overlap: int = ESRGAN_TILE_OVERLAP):
        super().__init__(info)
        self.field, self.tile, self.overlap = field, tile, overlap

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        assert self.info.path is not None
        loaded = loading.load_upscaler(self.info.path, self.field)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
        with torch.inference_mode():
            out = tiled_upscale(loaded.module, x, loaded.spec.scale, self.tile, self.overlap)
            out = out.squeeze(0).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return Image.fromarray(out.permute(1, 2, 0).contiguous().numpy(), "RGB")


def list_upscalers(models_dir: str | Path | None = None) -> list[UpscalerInfo]:
    """A1111's upscaler list for `models_dir` (None: the configured models folder, `difusi.settings`)."""
    builtins = [UpscalerInfo(name) for name in BUILTIN]
    models: dict[str, UpscalerInfo] = {}
    for path in loading.model_files(settings.models_dir(models_dir)):
        spec = loading.cached_spec(path)
        if path.stem in models or isinstance(spec, str):
            continue
        models[path.stem] = UpscalerInfo(path.stem, path, spec.scale, spec.label)
    return builtins + sorted(models.values(), key=lambda info: info.name.lower())


def get_upscaler(name: str, models_dir: str | Path | None = None, *, field: str = "hr_upscaler",
                 allow_path: bool = False) -> Upscaler:
    """The upscaler called `name` (exact, then case-insensitive); with `allow_path` (the CLI) also a model file's
    path. ParamError(field) for an unknown name, listing the choices, or for a file that is no upscaler."""
    if not isinstance(name, str) or not name.strip():
        raise ParamError(field, f"must be an upscaler name, got {name!r}")
    if name in BUILTIN:
        return Upscaler(UpscalerInfo(name)) if name == "None" else ResizeUpscaler(UpscalerInfo(name))
    folder = settings.models_dir(models_dir)
    candidates = loading.model_files(folder)
    by_name = [path for path in candidates if path.stem == name] or \
              [path for path in candidates if path.stem.lower() == name.lower()]
    if not by_name and allow_path and Path(name).expanduser().is_file():
        by_name = [Path(name).expanduser()]
    if not by_name:
        lowered = {builtin.lower(): builtin for builtin in BUILTIN}
        if name.lower() in lowered:
            return get_upscaler(lowered[name.lower()], models_dir, field=field)
        choices = ", ".join(info.name for info in list_upscalers(folder))
        raise ParamError(field, f"unknown upscaler {name!r}; choose one of: {choices}")
    path = by_name[0]
    if path.suffix.lower() not in loading.SUFFIXES:
        raise ParamError(field, f"{path.name} is not an upscaler model: expected a {', '.join(loading.SUFFIXES)} file")
    spec = loading.inspect_file(path, field)
    return ModelUpscaler(UpscalerInfo(path.stem, path, spec.scale, spec.label), field=field)

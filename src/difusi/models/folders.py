"""Where each kind of model file lives under the models folder: the one set of lookup rules.

`--models-dir` may be difusi's own folder, an A1111 install or its `models/` folder, or a ComfyUI install or its
`models/` folder; files are found where those tools keep them, with no copying:

| kind        | folder names under a models root               | also                                     |
| ----------- | ---------------------------------------------- | ---------------------------------------- |
| checkpoint  | `Stable-diffusion/` (A1111), `checkpoints/` (ComfyUI) | the root itself when neither exists |
| lora        | `Lora/`, `LyCORIS/` (A1111), `loras/` (ComfyUI) |                                          |
| embedding   | `embeddings/` (ComfyUI, difusi)                | A1111's top-level `embeddings/` (next to `models/`) |
| vae         | `VAE/` (A1111), `vae/` (ComfyUI)               |                                          |
| upscaler    | `ESRGAN/`, `RealESRGAN/`, `SwinIR/`, `DAT/` (A1111), `upscale_models/` (ComfyUI) | read by `difusi.upscalers` |

A *models root* is the folder given, and its `models/` sub-folder when it has one (an install folder). Every
kind's folders are searched recursively (sub-folders are part of a file's name: `styles/ink`). The shipped
networks of difusi-mini (`difusi/assets/models/Lora/...`) are always searched after the user's folders. When the
root itself holds the checkpoints, the other kinds' folders (and A1111 / ComfyUI folders of things difusi does
not load, such as `ControlNet/`, `ESRGAN/`) are not scanned for checkpoints, so a LoRA is never listed as one.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"

KIND_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("Stable-diffusion", "checkpoints"),
    "lora": ("Lora", "LyCORIS", "loras"),
    "embedding": ("embeddings",),
    "vae": ("VAE", "vae"),
    "upscaler": ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "upscale_models"),
}
"""A1111's and ComfyUI's folder names per kind (the table above)."""

NOT_CHECKPOINTS: tuple[str, ...] = (
    "Lora", "LyCORIS", "loras", "embeddings", "VAE", "vae", "VAE-approx", "hypernetworks", "ControlNet",
    "controlnet", "ESRGAN", "RealESRGAN", "SwinIR", "DAT", "LDSR", "GFPGAN", "Codeformer", "upscale_models", "clip",
    "clip_vision", "text_encoders", "style_models", "gligen", "unet", "diffusion_models", "photomaker",
    "deepbooru", "BLIP", "karlo", "configs",
)
"""Top-level folders of a models root that never hold checkpoints (A1111's `models/*` and ComfyUI's)."""

KINDS = tuple(KIND_FOLDERS)


def model_roots(models_dir: Path | None) -> list[Path]:
    """The models roots: the folder given and its `models/` sub-folder (an A1111 or ComfyUI install)."""
    if models_dir is None:
        return []
    root = Path(models_dir).expanduser()
    return [path for path in (root, root / "models") if path.is_dir()]


def kind_folders(kind: str, models_dir: Path | None, *, shipped: bool = True) -> list[Path]:
    """Existing folders holding files of `kind`, the user's first, then the shipped ones (see the module table).

    Folders that are the same directory (a case-insensitive file system's `VAE/` and `vae/`) are listed once.
    """
    if kind not in KIND_FOLDERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    candidates: list[Path] = []
    for root in model_roots(models_dir):
        candidates += [root / name for name in KIND_FOLDERS[kind]]
        if kind == "embedding" and root.name == "models":
            candidates.append(root.parent / "embeddings")  # A1111 keeps embeddings next to models/
    if kind == "checkpoint" and not any(path.is_dir() for path in candidates):
        candidates = model_roots(models_dir)[:1]
    if shipped and kind != "checkpoint":
        candidates += [ASSETS_MODELS / name for name in KIND_FOLDERS[kind]]
    found: list[Path] = []
    seen: set[Path] = set()
    for path in candidates:
        if path.is_dir() and (real := path.resolve()) not in seen:
            seen.add(real)
            found.append(path)
    return found


def is_excluded_from_checkpoints(path: Path, folder: Path) -> bool:
    """`path` lies in a top-level folder of `folder` that holds other kinds of files (`NOT_CHECKPOINTS`)."""
    try:
        return path.relative_to(folder).parts[0] in NOT_CHECKPOINTS
    except (ValueError, IndexError):
        return False

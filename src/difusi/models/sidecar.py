"""Sidecar overrides: `<stem>.difusi.json` next to a checkpoint (or `difusi.json` inside a diffusers folder).

Shapes cannot tell everything (prediction type, native size, head counts, preview factors), so a
small JSON file may state it. Without one, the detected family record's values apply
(`difusi.models.families`; difusi-mini's record is recognised by its architecture). Recognised keys
(all optional):

- `name` (display name), `prediction_type` ("epsilon" | "v_prediction"), `native_size` (int px),
  `scaling_factor` (VAE latent scale), `latent_rgb_factors` ([latent_channels][3]), `latent_rgb_bias` ([3]);
- `attention_heads` (int or per-level list) or `attention_head_dim` (int) for the UNet,
  `text_encoder_heads` (int);
- `unet`, `vae`, `text_encoder`: dicts merged into the detected diffusers / transformers configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difusi.errors import CheckpointError
from difusi.models.files import read_json

SIDECAR_SUFFIX = ".difusi.json"
PREDICTION_TYPES = ("epsilon", "v_prediction")


def sidecar_path(path: Path) -> Path:
    """Where the sidecar for a checkpoint file or diffusers folder lives."""
    if path.is_dir():
        return path / "difusi.json"
    return path.with_name(path.name.rsplit(".", 1)[0] + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar's overrides for `path` ({} when there is none); validates the typed keys."""
    file = sidecar_path(path)
    if not file.is_file():
        return {}
    data = read_json(file)
    prediction = data.get("prediction_type")
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{file}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction!r}")
    for key in ("native_size",):
        if key in data and (not isinstance(data[key], int) or data[key] < 64 or data[key] % 8):
            raise CheckpointError(f"{file}: {key} must be an integer >= 64 and a multiple of 8, got {data[key]!r}")
    if "scaling_factor" in data and not isinstance(data["scaling_factor"], int | float):
        raise CheckpointError(f"{file}: scaling_factor must be a number, got {data['scaling_factor']!r}")
    return data

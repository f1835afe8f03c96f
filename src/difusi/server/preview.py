"""Live previews: a cheap linear latent -> RGB projection instead of a VAE decode.

Each RGB pixel is approximated as a linear function of the latent channels at that position,
`rgb = latent @ factors + bias`, giving values in about [-1, 1]. This is the "cheap approximation"
AUTOMATIC1111 and ComfyUI use for their live previews: it costs one tiny matrix product per step
and shows colour and layout well enough to follow the sampler.

Factors come from the model when it provides them (`LoadedModel.latent_rgb_factors` / `_bias`,
e.g. difusi-mini's sidecar, fitted against its own VAE; the loader fills in the published factors
for the SD1/SD2 and SDXL VAEs). A model object without them falls back to the published factors of
its family record (`difusi.models.families`). A latent space with neither gets a neutral
grey-scale view of its per-channel mean so a preview still shows structure.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import torch
from PIL import Image

from difusi.models.families import find_spec_of


def projection_for(model: Any, channels: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(factors [C, 3], bias [3]) for a model's latents; factors None means "no known projection".

    Accepts factors stored either as C rows of 3 (ComfyUI/A1111 layout) or 3 rows of C.
    """
    factors = getattr(model, "latent_rgb_factors", None)
    bias = getattr(model, "latent_rgb_bias", None)
    if factors is None:
        family = find_spec_of(model)
        factors, bias = (family.latent_rgb_factors, family.latent_rgb_bias) if family is not None else (None, None)
    matrix = _as_channel_matrix(factors, channels)
    bias_vector = torch.zeros(3) if bias is None or matrix is None else torch.tensor(bias, dtype=torch.float32)
    return matrix, bias_vector


def _as_channel_matrix(factors: Any, channels: int) -> torch.Tensor | None:
    if factors is None:
        return None
    matrix = torch.tensor(factors, dtype=torch.float32)
    if matrix.shape == (channels, 3):
        return matrix
    if matrix.shape == (3, channels):
        return matrix.T.contiguous()
    return None  # factors for another latent space (e.g. a 4-channel table on a 16-channel model)


def project(latents: torch.Tensor, factors: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> RGB [B, 3, h, w] in [0, 1] by the linear map (or the grey fallback)."""
    latents = latents.detach().to("cpu", torch.float32)
    if factors is None:
        mean = latents.mean(dim=1, keepdim=True)
        low, high = mean.amin(dim=(2, 3), keepdim=True), mean.amax(dim=(2, 3), keepdim=True)
        grey = (mean - low) / (high - low).clamp_min(1e-6)
        return grey.expand(-1, 3, -1, -1)
    rgb = torch.einsum("bchw,cr->brhw", latents, factors) + bias.view(1, 3, 1, 1)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def to_image(rgb: torch.Tensor, scale: int = 1) -> Image.Image:
    """Tile a batch [B, 3, h, w] in [0, 1] into one grid image, upscaled by `scale` (nearest)."""
    count, _, height, width = rgb.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.zeros(3, rows * height, columns * width)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = rgb[index]
    pixels = (grid.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def preview_image(latents: torch.Tensor, model: Any = None, max_side: int = 512) -> Image.Image:
    """The live preview of `latents` for `model`, upscaled toward the model's pixel size (at most `max_side`)."""
    if latents.dim() == 3:
        latents = latents.unsqueeze(0)
    factors, bias = projection_for(model, latents.shape[1])
    rgb = project(latents, factors, bias)
    side = max(rgb.shape[2], rgb.shape[3]) * math.ceil(math.sqrt(rgb.shape[0]))
    wanted = getattr(model, "vae_scale_factor", 8) or 1
    scale = max(1, min(int(wanted), max_side // max(side, 1)))
    return to_image(rgb, scale)


def png_base64(image: Image.Image) -> str:
    """Raw base64 PNG (no data-URL prefix), as A1111's API returns images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")

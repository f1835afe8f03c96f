"""Export difusi-mini as one SD1-LDM-layout ``.safetensors`` (fp16) plus its ``.difusi.json`` sidecar.

The key renaming is ``difusi.models.convert`` (the same tables the loader uses to read real SD1
checkpoints), so difusi-mini loads through exactly the code path of a downloaded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def sidecar_path(checkpoint: Path) -> Path:
    """``NAME.safetensors`` -> ``NAME.difusi.json`` next to it."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".difusi.json")


def save_ldm_checkpoint(
    path: Path, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, metadata: dict
) -> Path:
    """Write the three modules in SD1 LDM key layout as fp16 safetensors, then the sidecar json.

    Both files are written to a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    from difusi.models.convert import ldm_checkpoint_from_modules

    state = ldm_checkpoint_from_modules("sd1", unet, vae, [text_encoder])
    # fp16 halves the file; the loader upcasts to the requested dtype. Position ids are buffers, not weights.
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items() if v.is_floating_point()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "difusi": json.dumps({"name": metadata.get("name")})})
    os.replace(tmp, path)
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(side_tmp, side)
    return path

"""difusi: local Stable Diffusion text-to-image.

Data flow (one module per arrow): prompt -> prompts (parser, tokens, conditioning) -> rng (noise)
-> samplers (denoiser, schedule) -> latents -> VAE -> image + infotext -> store.
"""

import os

# Nothing in difusi may reach a model hub; set before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OpenMP threads that wait by sleeping instead of spinning. Measured on the shared 2-core host
# (bench/cpu_speed.py, section "threads"): with another process busy on one core, spinning workers
# steal that core's time and a UNet step takes ~1.9x longer. Read when torch loads libgomp, so it
# only applies when difusi is imported before torch (the CLI and the server always are).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import difusi` stays cheap (no torch import) for the CLI's argument errors.
    if name in ("generate", "get_model", "img2img", "upscale"):
        from difusi import api

        return getattr(api, name)
    if name == "list_networks":
        from difusi.networks.listing import list_networks

        return list_networks
    if name == "GenerationParams":
        from difusi.params import GenerationParams

        return GenerationParams
    if name == "txt2img":
        from difusi.pipeline import txt2img

        return txt2img
    raise AttributeError(f"module 'difusi' has no attribute {name!r}")

"""difusi: local Stable Diffusion text-to-image.

Data flow (one module per arrow): prompt -> prompts (parser, tokens, conditioning) -> rng (noise)
-> samplers (denoiser, schedule) -> latents -> VAE -> image + infotext -> store.
"""

import os

# Nothing in difusi may reach a model hub; set before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

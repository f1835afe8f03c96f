"""Speed: the exact CPU fast path (on by default) and the opt-in approximate modes (off by default).

One module per concept:

- `exact`: changes *how* the networks compute, never *what* (oneDNN linear layers, channels_last
  convolutions); output within float rounding of diffusers' eager modules. Applied by
  `prepare_model`, which `difusi.pipeline.txt2img` calls once per loaded model.
- `cfg_cutoff`: A1111's "Negative Guidance minimum sigma" (NGMS): skip the uncond pass late in sampling.
- `deepcache`: DeepCache (Ma et al. 2023): reuse the UNet's deep features between steps.
- `tome`: Token Merging for SD (Bolya & Hoffman 2023): merge similar tokens before self-attention.

The approximate modes change the image; each is a GenerationParams field, written into the infotext
when enabled, so every image says how it was made. `bench/cpu_speed.py` measures their speed-up and
their deviation from the exact image.
"""

from difusi.speed.exact import prepare_model, restore_model

__all__ = ["prepare_model", "restore_model"]

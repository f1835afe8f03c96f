"""Negative Guidance minimum sigma (NGMS): skip the uncond pass late in sampling.

AUTOMATIC1111's `s_min_uncond` option (infotext key "NGMS"; `modules/sd_samplers_cfg_denoiser.py`):
once sigma has fallen below `s_min_uncond`, every other step evaluates only the conditional prediction
and uses it as the denoised estimate (as if uncond == cond, i.e. guidance off for that step). Late steps
refine detail the guidance has already fixed, and alternating keeps most of its effect, so this
halves the network batch on those steps at a modest change of the image. 0 disables it.

The step parity is A1111's: steps 1, 3, 5, ... (0-based) are the candidates, where the step is the CFG
denoiser's model-call index (A1111's `CFGDenoiser.step`, advanced once per call; difusi's
`pipeline._ScheduledCFG.calls`). For one-call-per-step samplers that is the sampler step; a second-order
sampler (Heun, DPM2, DPM++ SDE, ...) thus skips the uncond pass on each step's second call.
"""

from __future__ import annotations

NGMS_INFOTEXT_KEY = "NGMS"


def skip_uncond(s_min_uncond: float, sigma: float, step: int, cfg_scale: float) -> bool:
    """Whether model call `step` (0-based call index of the batch) at noise level `sigma` skips the uncond pass."""
    if s_min_uncond <= 0 or cfg_scale == 1:
        return False
    return step % 2 == 1 and sigma < s_min_uncond

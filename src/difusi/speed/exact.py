"""The exact CPU fast path: same arithmetic as diffusers' eager modules, faster kernels.

Measured on this project's CPU host (AMD EPYC, torch 2.13 CPU wheel; `bench/cpu_speed.py` re-measures
every choice side by side): the wheel's `nn.Linear` goes through MKL's sgemm, which does not use its
AVX-512 kernels on AMD processors and reaches 50-100 GFLOPS on the UNet's linear shapes, while oneDNN
(the library behind torch's CPU convolutions) runs the same products at 140-210 GFLOPS. So:

- every `nn.Linear` of the UNet, VAE and text encoders computes through oneDNN
  (`torch.ops.mkldnn._linear_pointwise`, the op torch's own inductor emits for CPU linears), with the
  module's own weight and bias tensors: nothing is copied, the state dict is unchanged;
- UNet and VAE weights are stored channels_last, which oneDNN's convolutions prefer (they reorder
  NCHW inputs and weights on every call otherwise);
- their convolutions run with a reordered copy of the weight where that is faster (`difusi.speed.packed_conv`:
  oneDNN reorders even a channels_last weight into its blocked layout on every call; the copy computes the same
  bits, and where it pays is timed per layer and shape on the running CPU).

Both are float32 the whole way: results differ from eager only by summation order (about 1e-6
relative per layer; the tests bound the final image to 1e-3 of diffusers' eager pipeline).
`restore_model` undoes both, so a test or a bench can put the eager modules back.

Re-measured per CPU (issue 18; `bench/cpu_speed.py` section `unet` ablates each switch, and `choices()` picks them at
run time from the CPU's vendor and features, deterministically, so every process of a machine computes the same
bits). Each switch is kept where it was not slower:

| CPU | oneDNN linear vs MKL | channels_last vs NCHW | whole exact path vs eager |
|---|---|---|---|
| AMD EPYC, AVX-512 (first host) | 2-3x on the UNet's GEMMs | kept | 1.3-1.6x |
| AMD EPYC Zen 3, AVX2 (issue 18) | | | 1.01-1.16x |
| Intel Xeon, AVX-512 + AMX (issue 18 sessions) | 0.98-1.60x per UNet shape | 1.10-1.14x at 256 px shapes, 0.94x at 64x64 | 1.00x; with reordered conv weights 1.37-1.44x (256 px), 0.97-1.12x (512 px) |

No measured CPU made either switch a loss, so `choices()` keeps both on x86 with oneDNN; on another architecture
(ARM: oneDNN's ACL path, unmeasured) the linears stay on torch's default GEMM. `DIFUSI_EXACT_LINEAR=0|1` and
`DIFUSI_EXACT_CHANNELS_LAST=0|1` override the choice (for a CPU where a bench says otherwise). Reordered convolution
weights come with channels_last (their bits equal channels_last convolutions', not NCHW ones') and decide per layer by
timing (`DIFUSI_EXACT_PACKED_CONV`, `difusi.speed.packed_conv`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from difusi.speed import packed_conv

_PREPARED = "_difusi_exact_fast_path"


def onednn_linear_available() -> bool:
    """oneDNN's linear op exists in this torch build and oneDNN is enabled (it is on the CPU wheels)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


class Choices(NamedTuple):
    """Which switches of the exact path apply on the running CPU."""

    linear: bool
    channels_last: bool
    packed_conv: bool


def choices() -> Choices:
    """The exact path's switches for the running CPU (table in the module docstring)."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    linear = _flag("DIFUSI_EXACT_LINEAR")
    channels_last = _flag("DIFUSI_EXACT_CHANNELS_LAST")
    channels_last = True if channels_last is None else channels_last
    packed = channels_last and packed_conv.available() and packed_conv.mode() != "never"
    return Choices(x86 if linear is None else linear, channels_last, packed)


def enabled_by_default() -> bool:
    """The exact fast path is on unless `DIFUSI_EAGER=1` asks for the plain eager layers (for comparisons)."""
    return os.environ.get("DIFUSI_EAGER", "") not in ("1", "true", "yes")


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` computed by oneDNN instead of MKL sgemm; same parameters, same state dict.

    Used by swapping the class of existing `nn.Linear` instances (see `prepare_modules`), so module
    trees, hooks and attention processors built around them keep working. Falls back to `F.linear`
    for anything oneDNN's op does not take (non-float32, autograd, non-CPU tensors).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.dtype != torch.float32 or (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def prepare_modules(modules: list[torch.nn.Module], linear: bool = True, channels_last: bool = True,
                    packed: bool = False) -> None:
    """Apply the exact fast path in place: oneDNN linears, channels_last convolution weights, and (with
    channels_last only) convolutions with reordered weights (`difusi.speed.packed_conv`)."""
    for module in modules:
        if module is None:
            continue
        if linear and onednn_linear_available():
            for sub in module.modules():
                if type(sub) is torch.nn.Linear:
                    sub.__class__ = OneDNNLinear
        if channels_last and any(isinstance(sub, torch.nn.Conv2d) for sub in module.modules()):
            module.to(memory_format=torch.channels_last)
            if packed:
                packed_conv.install(module)


def restore_modules(modules: list[torch.nn.Module]) -> None:
    """Undo `prepare_modules`: plain `nn.Linear` and `nn.Conv2d`, contiguous (NCHW) weights again."""
    for module in modules:
        if module is None:
            continue
        packed_conv.uninstall(module)
        for sub in module.modules():
            if type(sub) is OneDNNLinear:
                sub.__class__ = torch.nn.Linear
        if any(isinstance(sub, torch.nn.Conv2d) for sub in module.modules()):
            module.to(memory_format=torch.contiguous_format)


def _model_modules(model: Any) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    convs = [model.unet, model.vae]
    texts = [getattr(encoder, "model", encoder) for encoder in model.text_encoders]
    return convs, texts


def _on_cpu_float32(model: Any) -> bool:
    param = next(model.unet.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32


def prepare_model(model: Any, force: bool = False) -> bool:
    """Put a `LoadedModel` on the exact fast path once (idempotent). Returns whether it is on it.

    Only CPU float32 models are changed (the measured case); anything else stays eager, and so does a
    model passed to `restore_model` (unless `force`).
    """
    state = getattr(model, _PREPARED, None)
    if state is True:
        return True
    if (state == "eager" and not force) or not enabled_by_default() or not _on_cpu_float32(model):
        return False
    convs, texts = _model_modules(model)
    chosen = choices()
    prepare_modules(convs, linear=chosen.linear, channels_last=chosen.channels_last, packed=chosen.packed_conv)
    prepare_modules(texts, linear=chosen.linear, channels_last=False)
    setattr(model, _PREPARED, True)
    return True


def restore_model(model: Any) -> None:
    """Back to diffusers' eager modules, and keep them (`txt2img` will not prepare this model again):
    the eager reference for side-by-side comparisons."""
    convs, texts = _model_modules(model)
    restore_modules(convs + texts)
    setattr(model, _PREPARED, "eager")

"""Convolutions with their weights handed to oneDNN already reordered: part of the exact CPU path.

torch's eager `F.conv2d` gives oneDNN a plain (OIHW or channels_last) weight, and oneDNN reorders it into its blocked
layout **on every call**. The cost is proportional to the weight, the convolution's to the weight times the output
pixels, so the reorder dominates where the feature maps are small: measured on the 2-core Xeon (AVX-512/AMX), batch 2,
1280 -> 1280 channels, 3x3: 8x8 maps 30.7 ms per call vs 13.4 ms with a reordered weight, 4x4 maps 23.6 vs 4.4 ms;
320 channels at 64x64: 38.6 vs 37.0 ms. A whole SD 1.5 UNet CFG call (bench/cpu_speed.py, one interleaved run):
256 px 2.01 s -> 1.44 s (1.37x diffusers eager; 1.44x in a second run), 512 px 0.97-1.12x eager (two runs: within
the shared host's noise), 64 px 2.9x.

`PackedConv2d` keeps the module's own `weight` (state dict, LoRA merges, the graph conversion all see a plain
tensor) and a reordered copy next to it, made with `torch._C._nn.mkldnn_reorder_conv2d_weight` and used through
`torch.ops.mkldnn._convolution_pointwise`, the pair torch's own inductor emits for frozen CPU convolutions. The copy
is remade when the weight changes: its key is the tensor's storage and its version counter, which every in-place
write (`copy_`, `add_`, a `state_dict()` tensor's `copy_`) bumps. (`weight.data.copy_` would not; difusi's writers
write through the parameter.)

Same bits: with a channels_last input (what the exact path's channels_last weights make `F.conv2d` run), the
reordered weight runs the same oneDNN kernel; tests assert `torch.equal` against the plain layer, and the bench
compares whole UNet calls (max abs diff 0).

Where it pays is measured, not assumed (the ratio depends on the CPU's FLOP rate against its memory bandwidth): for
each layer and input shape, the first call runs plain (oneDNN builds its primitive), the second plain (timed) and
then with the reordered weight, which must give the same bits (else the copy is never used for that shape: torch
runs a few shapes, such as some batch-1 ones, through another kernel), the third with the copy (timed); from then on
the copy serves that shape if it was at least `MIN_GAIN` faster, and a layer where it was not, for every shape it
saw, drops its copy. Only bit-equal ways are ever chosen between, so a timing cannot change an image.
The copies cost memory where they are kept (SD 1.5 float32 at 256 or 512 px: about 2.3 GB more resident), so one is
made only while `RESERVE_FRACTION` of the machine's memory stays available besides it.
`DIFUSI_EXACT_PACKED_CONV=1` uses them wherever they give the same bits, without timing; `=0` never (then the
layers stay plain `nn.Conv2d`).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ENV = "DIFUSI_EXACT_PACKED_CONV"

MIN_GAIN = 0.05
"""A copy costs the weight's memory again, so a layer keeps one only where it made the call at least this much
faster (a few-percent gain on large feature maps is within the timing noise of a shared machine)."""

RESERVE_FRACTION = 0.125
"""A copy is made only while the system keeps this share of its memory (at least 1 GiB) available besides it (Linux
`MemAvailable` of `MemTotal`): the copies are a speed-up, and must leave room for what the job allocates later (a
VAE decode, a second model, a graph backend's copy), never be the reason it runs out of memory."""


@dataclass
class _Packing:
    """One layer's reordered weight and what was measured for it."""

    weight_key: tuple[int, int] | None = None
    packed: torch.Tensor | None = None
    calls: dict[tuple[int, ...], int] = field(default_factory=dict)
    plain_seconds: dict[tuple[int, ...], float] = field(default_factory=dict)
    faster: dict[tuple[int, ...], bool] = field(default_factory=dict)


# Kept beside the modules, not on them: a deepcopy or pickle of a UNet then carries no oneDNN tensor.
_STATE: weakref.WeakKeyDictionary[torch.nn.Module, _Packing] = weakref.WeakKeyDictionary()


def mode() -> str:
    """`always`, `never` or `measured` (the default), from `DIFUSI_EXACT_PACKED_CONV`."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "always"
    if value in ("0", "false", "no", "off"):
        return "never"
    return "measured"


def available() -> bool:
    """This torch build has the reorder and the convolution op (the x86 CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and hasattr(
        torch._C._nn, "mkldnn_reorder_conv2d_weight"
    ) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv2d(torch.nn.Conv2d):
    """`nn.Conv2d` run with a reordered copy of its weight where that was measured faster (module docstring).

    Installed by swapping the class of existing layers, like `OneDNNLinear`; anything the op does not take
    (other dtypes or devices, autograd, padding modes or string paddings) runs the plain `nn.Conv2d` forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._takes(x):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        state = _STATE.get(self)
        if state is None:
            state = _STATE[self] = _Packing()
        shape = tuple(x.shape)
        how = mode()
        if state.faster.get(shape):
            return self._packed_call(state, x)
        if how == "never" or shape in state.faster:
            return super().forward(x)
        if how == "always":  # no timing: the copy serves every shape where it gives the plain call's bits
            out = super().forward(x)
            self._decide(state, shape, self._same_bits(state, x, out))
            return out
        return self._measuring_call(state, x, shape)

    def _takes(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (
            x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() == 4 and self.padding_mode == "zeros"
            and not isinstance(self.padding, str) and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )

    def _packed_call(self, state: _Packing, x: torch.Tensor) -> torch.Tensor:
        if not self._pack(state, x):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x, state.packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def _pack(self, state: _Packing, x: torch.Tensor) -> bool:
        """Make the reordered copy if it is missing or stale; False when there is no memory for one."""
        key = (self.weight.data_ptr(), self.weight._version)
        if state.packed is not None and state.weight_key == key:
            return True
        state.packed = None  # let the old copy go before the new one exists
        if not _room_for(self.weight.numel() * self.weight.element_size()):
            return False
        state.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.detach().contiguous().to_mkldnn(), list(self.padding), list(self.stride),
            list(self.dilation), self.groups, list(x.shape))
        state.weight_key = key
        return True

    def _measuring_call(self, state: _Packing, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        calls = state.calls.get(shape, 0)
        state.calls[shape] = calls + 1
        plain = lambda: F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)  # noqa: E731
        if calls == 0:  # warm-up: oneDNN creates (and caches) the primitive for this shape
            return plain()
        if calls == 1:
            started = time.perf_counter()
            out = plain()
            state.plain_seconds[shape] = time.perf_counter() - started
            if not self._same_bits(state, x, out):  # also the copy's warm-up (its primitive is made here)
                self._decide(state, shape, False)
            return out
        started = time.perf_counter()
        out = self._packed_call(state, x)
        plain_seconds = state.plain_seconds.pop(shape, None)
        if plain_seconds is not None:  # else another thread finished this shape's measurement first
            self._decide(state, shape, time.perf_counter() - started < (1 - MIN_GAIN) * plain_seconds)
        return out

    def _same_bits(self, state: _Packing, x: torch.Tensor, plain_out: torch.Tensor) -> bool:
        """Whether the copy (made here if needed) gives exactly `plain_out` for `x`: torch runs some shapes (batch
        1, few output channels) through another kernel, and the choice between the two ways must never be able to
        change an image."""
        return self._pack(state, x) and torch.equal(self._packed_call(state, x), plain_out)

    @staticmethod
    def _decide(state: _Packing, shape: tuple[int, ...], faster: bool) -> None:
        state.faster[shape] = faster
        state.calls.pop(shape, None)
        state.plain_seconds.pop(shape, None)
        if not any(state.faster.values()):
            state.packed = state.weight_key = None


def _room_for(nbytes: int) -> bool:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":", 1)[0]: int(line.split()[1]) * 1024 for line in meminfo if line.startswith("Mem")}
    except (OSError, ValueError, IndexError):
        return True  # no /proc/meminfo (not Linux): no guard
    if "MemAvailable" not in fields or "MemTotal" not in fields:
        return True
    return fields["MemAvailable"] - nbytes > max(1 << 30, RESERVE_FRACTION * fields["MemTotal"])


def install(module: torch.nn.Module) -> None:
    """Swap every plain `nn.Conv2d` of `module` to `PackedConv2d` (in place; parameters untouched)."""
    for sub in module.modules():
        if type(sub) is torch.nn.Conv2d:
            sub.__class__ = PackedConv2d


def uninstall(module: torch.nn.Module) -> None:
    """Plain `nn.Conv2d` again, reordered copies dropped."""
    for sub in module.modules():
        if type(sub) is PackedConv2d:
            sub.__class__ = torch.nn.Conv2d
            _STATE.pop(sub, None)


def kept_copies(module: torch.nn.Module) -> int:
    """How many layers of `module` hold a reordered weight now (for benches and tests)."""
    return sum(1 for sub in module.modules() if (state := _STATE.get(sub)) is not None and state.packed is not None)

"""Memory modes for small GPUs: weights live on the CPU and visit the device only while they compute.

Two modes (`difusi.devices.OFFLOAD_MODES`), both built from one mechanism, a `_Unit`: a group of modules whose
parameters and buffers have a master copy on the CPU; `load()` points every tensor at a device copy, `unload()`
points it back at the master. Unloading never copies back (inference does not change weights), which is what
makes offloading cheap: each visit costs one host-to-device copy.

- `model` (A1111's `--medvram`): each text encoder and the VAE is one unit; forward pre-hooks on its entry
  modules load it and evict whichever other unit is on the device, and the UNet's forward (it stays on the
  device) evicts it too. So the text encoders are on the GPU only while encoding, the VAE only while decoding.
- `sequential` (diffusers' `enable_sequential_cpu_offload`, Hugging Face accelerate's `cpu_offload`, written here
  because accelerate is not a dependency): every top-level block (`_blocks`) of every network is a unit with a
  forward pre-hook that loads it and a forward hook that unloads it, so only one block's weights (plus
  activations) are on the device at a time.

Pre-hooks also move tensor arguments to the execution device: callers that place their inputs by "the device of
the module's first parameter" (the CLIP wrapper does) would otherwise hand CPU tensors to a GPU block.

On the CPU there is nothing to offload to, so `apply_offload` installs nothing there (the mode is still recorded
on the model); the hooks themselves are exercised on the CPU by the tests (`tests/devices/test_offload.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difusi.devices import check_offload


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


class _Unit:
    """Modules whose tensors move together; counts its loads and unloads (tests and benches read them)."""

    def __init__(self, modules: list[nn.Module], device: torch.device, pin: bool):
        self.device = device
        self.slots: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        seen: set[int] = set()
        for module in modules:
            for owner in module.modules():
                for name, tensor in [*((n, p) for n, p in owner._parameters.items()),
                                     *((n, b) for n, b in owner._buffers.items())]:
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    master = tensor.data.to("cpu")
                    if pin and master.device.type == "cpu":
                        master = master.pin_memory()  # pinned pages: faster, asynchronous host-to-device copies
                    is_param = name in owner._parameters
                    if is_param:
                        master = nn.Parameter(master, requires_grad=False)
                    self.slots.append((owner, name, is_param, master))
        self.loaded = False
        self.loads = 0
        self.unloads = 0
        self.unload()
        self.unloads = 0

    def load(self) -> None:
        if self.loaded:
            return
        self._point(lambda master: master.to(self.device, non_blocking=True))
        self.loaded = True
        self.loads += 1

    def unload(self) -> None:
        self._point(lambda master: master)
        self.loaded = False
        self.unloads += 1

    def _point(self, place: Any) -> None:
        for index, (owner, name, is_param, master) in enumerate(self.slots):
            current = owner._parameters[name] if is_param else owner._buffers[name]
            if current is not None and current.dtype != master.dtype:
                # The network was converted since (the VAE's float32 NaN fallback): adopt the new dtype as master.
                master = current.data.to("cpu")
                master = nn.Parameter(master, requires_grad=False) if is_param else master
                self.slots[index] = (owner, name, is_param, master)
            if is_param:
                # A new Parameter, not `.data =`: torch refuses to re-point a tensor at another device type (meta),
                # and inference needs no gradient bookkeeping on the copy.
                placed = place(master)
                owner._parameters[name] = placed if isinstance(placed, nn.Parameter) else \
                    nn.Parameter(placed, requires_grad=False)
            else:
                owner._buffers[name] = place(master)


@dataclass
class Offload:
    """What `apply_offload` installed on a model: the units (for counting moves) and the hook handles."""

    mode: str
    device: torch.device
    units: list[_Unit] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    resident: _Unit | None = None
    """`model` mode: the unit on the device now (at most one)."""

    @property
    def loads(self) -> int:
        return sum(unit.loads for unit in self.units)

    @property
    def unloads(self) -> int:
        return sum(unit.unloads for unit in self.units)

    def park(self) -> None:
        """Unload every unit now, so that in-place weight writes (LoRA merges, VAE swaps) land in the CPU masters: a
        unit on the device points at copies that its next unload drops."""
        for unit in self.units:
            if unit.loaded:
                unit.unload()
        self.resident = None

    def remove(self) -> None:
        """Take the hooks off and leave every tensor on the CPU master copies."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for unit in self.units:
            unit.unload()


def _pre_hook(device: torch.device, before: Any) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        before()
        return _to_device(args, device), _to_device(kwargs, device)

    return hook


def _has_direct_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in module._parameters.values()) or any(
        b is not None for b in module._buffers.values())


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _contains_list(module: nn.Module) -> bool:
    return any(isinstance(sub, nn.ModuleList | nn.ModuleDict) for sub in module.modules())


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The top-level blocks of a network, each a module that is *called* (so its hooks fire) and that together hold
    every parameter: children, with container lists expanded to their elements, and composite children that only
    hold lists (a UNet's mid block, CLIP's `text_model` and `encoder`) split further. A module with tensors of its
    own is never split, since a split would leave those tensors behind."""
    for child in module.children():
        if not _has_tensors(child):
            continue
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            yield from (element for element in child.children() if _has_tensors(element))
        elif _contains_list(child) and not _has_direct_tensors(child):
            yield from _blocks(child)
        else:
            yield child


def sequential_units(module: nn.Module, offload: Offload, pin: bool = False) -> None:
    """Install the load-before / unload-after hook pair on every block of `module` (sequential mode)."""
    if _has_direct_tensors(module):
        raise ValueError(f"{type(module).__name__} holds tensors outside its blocks; offload it whole")
    for block in _blocks(module):
        unit = _Unit([block], offload.device, pin)
        offload.units.append(unit)
        offload.handles.append(block.register_forward_pre_hook(_pre_hook(offload.device, unit.load), with_kwargs=True))
        offload.handles.append(block.register_forward_hook(lambda *_, unit=unit: unit.unload()))


def model_unit(entries: list[nn.Module], whole: list[nn.Module], offload: Offload, pin: bool = False) -> _Unit:
    """One `model`-mode unit: the tensors of `whole`, loaded by a forward call of any module in `entries`."""
    unit = _Unit(whole, offload.device, pin)
    offload.units.append(unit)

    def make_resident() -> None:
        if offload.resident is not unit:
            if offload.resident is not None:
                offload.resident.unload()
            unit.load()
            offload.resident = unit

    for entry in entries:
        offload.handles.append(entry.register_forward_pre_hook(_pre_hook(offload.device, make_resident),
                                                               with_kwargs=True))
    return unit


def evict_on_forward(module: nn.Module, offload: Offload) -> None:
    """`model` mode: a forward call of `module` (the UNet, which stays on the device) evicts the resident unit."""

    def evict() -> None:
        if offload.resident is not None:
            offload.resident.unload()
            offload.resident = None

    offload.handles.append(module.register_forward_pre_hook(_pre_hook(offload.device, evict), with_kwargs=True))


def _vae_entries(vae: nn.Module) -> list[nn.Module]:
    """Modules the VAE's `decode`/`encode` call: it is never called itself (diffusers' AutoencoderKL)."""
    return [child for child in vae.children() if _has_tensors(child)]


def _text_entries(model: nn.Module) -> list[nn.Module]:
    """The CLIP model and its final LayerNorm, which difusi's encoder wrapper also calls on its own (clip skip)."""
    entries = [model]
    norm = getattr(model, "final_layer_norm", None) or getattr(getattr(model, "text_model", None),
                                                              "final_layer_norm", None)
    if norm is not None:
        entries.append(norm)
    return entries


def apply_offload(unet: nn.Module, vae: nn.Module, text_models: list[nn.Module], mode: str,
                  device: torch.device, force: bool = False) -> Offload | None:
    """Place a model's networks for `mode` ("none", "model", "sequential") on `device`; returns the `Offload`
    (None when nothing was installed: mode "none", or the CPU without `force`). Networks must be on the CPU.

    `force` installs the hooks on the CPU too, where every move is a no-op; only the tests want that.
    """
    check_offload(mode)
    device = torch.device(device)
    if mode == "none" or (device.type == "cpu" and not force):
        return None
    pin = device.type == "cuda"
    offload = Offload(mode, device)
    if mode == "model":
        unet.to(device)
        evict_on_forward(unet, offload)
        for text_model in text_models:
            model_unit(_text_entries(text_model), [text_model], offload, pin)
        model_unit(_vae_entries(vae), [vae], offload, pin)
        return offload
    for network in (unet, vae, *text_models):
        sequential_units(network, offload, pin)
    return offload

"""Teach difusi-mini a new word with a LoRA: ``python -m difusi.mini train-lora --out PATH [--steps N ...]``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes every base weight ``W``
and learns a low-rank update ``W' = W + (alpha / rank) * up @ down`` with ``down`` [rank, in] and ``up``
[out, rank]; ``up`` starts at zero so training starts from the base model exactly.

The new concept is the colour **pink** (``data.EXTRA_COLOURS``): difusi-mini never saw the word, so its
token embedding is the untrained row of the frozen table and the meaning has to come from the adapters.
Adapted modules follow kohya-ss/sd-scripts' ``networks.lora`` (the layout A1111 and ComfyUI read):

* UNet: every ``Linear`` and 1x1 ``Conv2d`` inside the transformer blocks (``proj_in``, ``attn1/attn2``
  ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ``proj_out``), prefix ``lora_unet_``;
* text encoder: every ``Linear`` of the CLIP encoder layers (``self_attn.q/k/v/out_proj``, ``mlp.fc1/fc2``),
  prefix ``lora_te_`` and paths spelled as in transformers' ``CLIPTextModel.text_model`` (kohya's names).

Training data: procedural pink scenes (a pink shape, sometimes a pink background; captions from the base
templates, ``data.caption_scene``) mixed with ordinary difusi-mini samples (``pink_fraction``) so that the
adapters keep the old vocabulary. The loss is the base recipe's epsilon MSE on SD's schedule.

Determinism and resuming: batch ``k`` is a pure function of ``(seed, k)`` and step ``k``'s noise and timesteps
come from a CPU generator seeded with ``(seed, k)``; the adapters, the AdamW state and the step are saved to a
state file (default ``PATH`` with suffix ``.state.pt``), so a resumed run gives the same bytes as an
uninterrupted one. The written ``.safetensors`` is serialised by hand with sorted keys and metadata (the
safetensors library writes metadata in hash order), so the same run always gives the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import difusi  # noqa: F401  (offline hub settings before diffusers/transformers)
from difusi.errors import ParamError
from difusi.mini import data
from difusi.mini import model as mini_model

NEW_COLOUR = "pink"
OUTPUT_NAME = "difusi-mini-pink"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE_PATH_PREFIX = "text_model."  # kohya names text encoder modules from CLIPTextModel, whose body is `text_model`
PINK_BACKGROUND_RATE = 0.2  # of the pink scenes: pink background (shapes in base colours) instead of a pink shape
STATE_SUFFIX = ".state.pt"


@dataclass
class LoraConfig:
    """Every knob of a LoRA run; stored in the state file (a resumed run keeps them) and the file's metadata."""

    seed: int = 0
    steps: int = 500
    rank: int = 8
    alpha: float = 8.0
    batch: int = 32
    lr: float = 3e-3
    text_lr_scale: float = 1.0
    warmup: int = 20
    pink_fraction: float = 0.5
    checkpoint_every: int = 100


# ----------------------------------------------------------------------------- data


def pink_scene(rng: random.Random) -> data.Scene:
    """A scene that shows pink: one shape (or one of two) is pink, or, at ``PINK_BACKGROUND_RATE``, the background."""
    if rng.random() < PINK_BACKGROUND_RATE:
        background = NEW_COLOUR
        shape_colours = list(data.COLOUR_NAMES)
        pink_shape = -1
    else:
        background = rng.choice(data.COLOUR_NAMES)
        shape_colours = [c for c in data.COLOUR_NAMES if c != background]
        pink_shape = 0
    if rng.random() < data.TWO_SHAPE_RATE:
        positions = rng.choice(data.POSITION_PAIRS)
        if pink_shape == 0:
            pink_shape = rng.randrange(2)
        shapes = tuple(
            data.ShapeSpec(
                rng.choice(data.SHAPES), NEW_COLOUR if i == pink_shape else rng.choice(shape_colours), "small", position
            )
            for i, position in enumerate(positions)
        )
    else:
        colour = NEW_COLOUR if pink_shape == 0 else rng.choice(shape_colours)
        shapes = (data.ShapeSpec(rng.choice(data.SHAPES), colour, rng.choice(data.SIZES), rng.choice(data.POSITIONS)),)
    return data.Scene(background, shapes)


def lora_sample(seed: int, index: int, pink_fraction: float, size: int = mini_model.NATIVE_SIZE) -> data.Sample:
    """Sample ``index`` of the LoRA data set ``seed``: a pink scene or an ordinary difusi-mini sample (deterministic)."""
    rng = random.Random(f"difusi-mini-lora:{seed}:{index}")
    if rng.random() >= pink_fraction:
        return data.make_sample(1_000_000 + seed, index, size)
    scene = pink_scene(rng)
    image = data.render_scene(scene, size, rng)
    caption, mentioned = data.caption_scene(scene, rng)
    return data.Sample(image, scene, caption, mentioned)


def lora_batch(seed: int, k: int, batch: int, pink_fraction: float) -> tuple[torch.Tensor, list[str]]:
    """Batch ``k``: images (B, 3, 64, 64) in [-1, 1] and their captions."""
    samples = [lora_sample(seed, k * batch + i, pink_fraction) for i in range(batch)]
    images = np.stack([s.image for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, [s.caption for s in samples]


# ----------------------------------------------------------------------------- the network


def kohya_name(prefix: str, path: str) -> str:
    """kohya's module name: the prefix and the module path with '.' replaced by '_'."""
    return prefix + path.replace(".", "_")


def text_encoder_path(path: str) -> str:
    """A text encoder module path as kohya spells it (transformers >= 5 drops CLIPTextModel's ``text_model``)."""
    return path if path.startswith(TE_PATH_PREFIX) else TE_PATH_PREFIX + path


def target_modules(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """kohya name -> module for every module a ``networks.lora`` LoRA adapts, in model order."""
    targets: dict[str, torch.nn.Module] = {}
    for path, module in unet.named_modules():
        if ".attentions." not in f".{path}" or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            continue
        targets[kohya_name(UNET_PREFIX, path)] = module
    for path, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in path and (".self_attn." in path or ".mlp." in path):
            targets[kohya_name(TE_PREFIX, text_encoder_path(path))] = module
    return targets


def module_table(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """kohya name -> module for every Linear/Conv2d of both networks (what a file's names are looked up in)."""
    table: dict[str, torch.nn.Module] = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            table[kohya_name(UNET_PREFIX, path)] = module
    for path, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            table[kohya_name(TE_PREFIX, text_encoder_path(path))] = module
    return table


class LoraLayer(torch.nn.Module):
    """``down`` and ``up`` of one adapted module; ``forward(x)`` is the update added to the module's output."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        self.rank, self.alpha = rank, float(alpha)

    def reset(self, generator: torch.Generator) -> None:
        """kohya's initialisation: ``down`` Kaiming-uniform (as nn.Linear), ``up`` zero (no change at step 0)."""
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)


class LoraNetwork(torch.nn.Module):
    """The adapters of one run, attached to the frozen model by forward hooks (module paths stay unchanged)."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, rank: int, alpha: float, seed: int):
        super().__init__()
        self.targets = target_modules(unet, text_encoder)
        generator = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleDict()
        for name, module in self.targets.items():
            layer = LoraLayer(module, rank, alpha).to(module.weight.device)
            layer.reset(generator)
            self.layers[name] = layer
        self._hooks: list = []

    def attach(self) -> None:
        """Add each adapter's output to its module's output."""
        self.detach()
        for name, module in self.targets.items():
            layer = self.layers[name]
            self._hooks.append(module.register_forward_hook(lambda _m, args, out, layer=layer: out + layer(args[0])))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def parameter_groups(self) -> tuple[list, list]:
        """(UNet adapter parameters, text encoder adapter parameters)."""
        unet = [p for n, layer in self.layers.items() if n.startswith(UNET_PREFIX) for p in layer.parameters()]
        text = [p for n, layer in self.layers.items() if n.startswith(TE_PREFIX) for p in layer.parameters()]
        return unet, text

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """``NAME.lora_down.weight``, ``NAME.lora_up.weight`` and the 0-dim ``NAME.alpha`` of every module (fp32)."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_down.weight"] = layer.down.weight.detach().float().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = layer.up.weight.detach().float().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        return out


# ----------------------------------------------------------------------------- kohya files


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file deterministically: keys and metadata sorted, header padded to 8 bytes.

    Same format as the safetensors library (8-byte little-endian header length, JSON header, raw
    little-endian data) but byte-stable, since the library orders ``__metadata__`` by a randomised hash.
    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    chunks, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian on every supported host
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for chunk in chunks:
            handle.write(chunk)
    os.replace(tmp, path)
    return path


def file_metadata(config: LoraConfig, steps_done: int) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata (what A1111's and kohya's tools display), plus difusi's own keys."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_output_name": OUTPUT_NAME,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": "difusi-mini",
        "ss_resolution": f"({mini_model.NATIVE_SIZE}, {mini_model.NATIVE_SIZE})",
        "ss_seed": str(config.seed),
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": f"{config.lr:g}",
        "ss_text_encoder_lr": f"{config.lr * config.text_lr_scale:g}",
        "ss_unet_lr": f"{config.lr:g}",
        "ss_batch_size_per_device": str(config.batch),
        "ss_training_comment": "difusi-mini learns the colour 'pink' (python -m difusi.mini train-lora)",
        "difusi_trigger_word": NEW_COLOUR,
        "difusi_config": json.dumps(asdict(config), sort_keys=True),
    }


def read_kohya(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a kohya LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def lora_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya name -> ``(alpha / rank) * up @ down`` shaped like the module's weight (A1111's and kohya's rule).

    A missing ``alpha`` means alpha = rank (scale 1), as in kohya. Conv layers: ``up`` is [out, rank, 1, 1] and
    ``down`` [rank, in, kh, kw]; the product is [out, in, kh, kw].
    """
    names = sorted({key.rsplit(".lora_down.weight", 1)[0] for key in tensors if key.endswith(".lora_down.weight")})
    deltas = {}
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        deltas[name] = (product * (alpha / rank)).reshape(up.shape[0], *down.shape[1:])
    return deltas


class merged:  # noqa: N801  (a context manager used like a function: `with merged(model, path, 1.0):`)
    """Merge a kohya LoRA into a loaded model's weights, ``W += multiplier * (alpha/rank) * up @ down``, and
    restore the exact original tensors on exit (even on error).

    ``model`` is a ``difusi.models.LoadedModel`` (its ``unet`` and first text encoder). Multiplier 0 changes
    nothing at all (adding a zero delta could turn a -0.0 weight into +0.0). Unknown module names raise. The text
    encoders' cached empty-prompt states are dropped whenever the weights change (as ``difusi.networks`` does).
    """

    def __init__(self, model, lora: str | Path | dict[str, torch.Tensor], multiplier: float = 1.0):
        self.model, self.multiplier = model, float(multiplier)
        self.tensors = read_kohya(lora)[0] if isinstance(lora, str | Path) else lora
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        if self.multiplier == 0:
            return self.model
        table = module_table(self.model.unet, _text_model(self.model))
        deltas = lora_deltas(self.tensors)
        unknown = sorted(set(deltas) - set(table))
        if unknown:
            raise ValueError(f"LoRA modules not in the model: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
        try:
            with torch.no_grad():
                for name, delta in deltas.items():
                    weight = table[name].weight
                    self._saved.append((weight, weight.detach().clone()))
                    weight.add_((self.multiplier * delta).to(weight.device, weight.dtype))
        except BaseException:
            self._restore()
            raise
        finally:
            self._drop_text_caches()
        return self.model

    def _drop_text_caches(self) -> None:
        # The pipeline's text encoder caches the empty prompt's states (the unconditional side of CFG).
        for encoder in self.model.text_encoders:
            getattr(encoder, "_empty_states", {}).clear()

    def _restore(self) -> None:
        with torch.no_grad():
            for weight, original in reversed(self._saved):
                weight.copy_(original)
        if self._saved:
            self._drop_text_caches()
        self._saved.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


def _text_model(model) -> torch.nn.Module:
    encoder = model.text_encoders[0]
    return getattr(encoder, "model", encoder)


# ----------------------------------------------------------------------------- training


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + 48_271 * 7 + step) % (2**63 - 1))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def load_base_model():
    """difusi-mini loaded the way the pipeline loads it (CPU, float32)."""
    from difusi.models import load_model
    from difusi.models.catalog import default_model_path

    return load_model(default_model_path(), device="cpu", precision="fp32")


class LoraTrainer:
    """A LoRA run on a frozen difusi-mini: adapters, optimiser, step; saved to and resumed from ``state_path``."""

    def __init__(self, config: LoraConfig, state_path: Path, model=None):
        self.config, self.state_path = config, Path(state_path)
        self.model = model if model is not None else load_base_model()
        self.unet, self.vae, self.text_encoder = self.model.unet, self.model.vae, _text_model(self.model)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        self.network = LoraNetwork(self.unet, self.text_encoder, config.rank, config.alpha, config.seed)
        unet_params, text_params = self.network.parameter_groups()
        self.optimiser = torch.optim.AdamW(
            [{"params": unet_params, "lr_scale": 1.0}, {"params": text_params, "lr_scale": config.text_lr_scale}],
            lr=config.lr,
            weight_decay=0.0,
        )
        self.tokenizer = mini_model.load_tokenizer()
        self.alphas_cumprod = mini_model.train_alphas_cumprod().float()
        self.step = 0
        self.last_loss = float("nan")

    def save_state(self) -> None:
        """The adapters, optimiser and step, atomically (temp file + rename)."""
        state = {
            "config": asdict(self.config),
            "step": self.step,
            "network": self.network.state_dict(),
            "optimiser": self.optimiser.state_dict(),
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def load_state(self) -> None:
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state["network"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step = state["step"]

    def train_step(self) -> float:
        """One optimiser step on batch ``self.step``; returns the loss."""
        cfg = self.config
        images, captions = lora_batch(cfg.seed, self.step, cfg.batch, cfg.pink_fraction)
        gen = _step_generator(cfg.seed, self.step)
        for group in self.optimiser.param_groups:
            group["lr"] = group["lr_scale"] * cfg.lr * _lr_factor(self.step, cfg.steps, cfg.warmup)
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
            latents = latents * self.model.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, mini_model.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=gen)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        context = mini_model.encode_text(self.text_encoder, mini_model.tokenize(self.tokenizer, captions))
        prediction = self.unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.network.parameters()), 1.0)
        self.optimiser.step()
        self.step += 1
        return float(loss.item())

    def train(self, until: int | None = None, progress: Callable[[int, float], None] | None = None) -> None:
        """Steps from ``self.step`` to ``until`` (default: the configured total), saving every ``checkpoint_every``."""
        until = self.config.steps if until is None else min(until, self.config.steps)
        self.network.attach()
        try:
            while self.step < until:
                self.last_loss = self.train_step()
                if progress:
                    progress(self.step, self.last_loss)
                if self.step % self.config.checkpoint_every == 0 and self.step < until:
                    self.save_state()
        finally:
            self.network.detach()
        self.save_state()

    def export(self, path: Path) -> Path:
        """Write the adapters as a kohya ``networks.lora`` .safetensors."""
        return save_safetensors(self.network.kohya_state_dict(), path, file_metadata(self.config, self.step))

    def close(self) -> None:
        """Remove the hooks (the base model is unchanged: LoRA never writes its weights)."""
        self.network.detach()


def default_state_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + STATE_SUFFIX)


def train_lora(out: Path, config: LoraConfig, resume: bool = False, state_path: Path | None = None, model=None,
               until: int | None = None, progress: Callable[[int, float], None] | None = None) -> Path:
    """Train (or continue) a run and write ``out``; the state file makes it resumable. Returns ``out``."""
    state_path = state_path or default_state_path(out)
    if state_path.exists() and not resume:
        raise ParamError("resume", f"{state_path} exists: pass --resume to continue it or choose another --out")
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)["config"]
        config = LoraConfig(**{**saved, "steps": config.steps})  # --steps may extend a finished run
    trainer = LoraTrainer(config, state_path, model)
    try:
        if resume and state_path.exists():
            trainer.load_state()
        trainer.train(until, progress)
        return trainer.export(out)
    finally:
        trainer.close()


def _progress_printer(total: int) -> Callable[[int, float], None]:
    started = time.time()
    smoothed: list[float] = []

    def report(step: int, loss: float) -> None:
        smoothed.append(loss)
        if step % 10 == 0 or step == total:
            recent = sum(smoothed[-10:]) / len(smoothed[-10:])
            print(f"step {step}/{total} loss {recent:.4f} ({time.time() - started:.0f} s)", flush=True)

    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = LoraConfig()
    parser = argparse.ArgumentParser(prog="difusi mini train-lora",
                                     description="Train a LoRA that teaches difusi-mini the colour 'pink' (kohya format).")
    parser.add_argument("--out", required=True, type=Path, help="the LoRA .safetensors to write")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    parser.add_argument("--rank", type=int, default=defaults.rank, help=f"LoRA rank (default {defaults.rank})")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of data, noise, init (default {defaults.seed})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch, help=f"batch (default {defaults.batch})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr:g})")
    parser.add_argument("--pink-fraction", type=float, default=defaults.pink_fraction,
                        help=f"share of pink samples in a batch (default {defaults.pink_fraction:g})")
    parser.add_argument("--resume", action="store_true", help="continue from the state file")
    parser.add_argument("--state", type=Path, default=None, help=f"state file (default: OUT with suffix {STATE_SUFFIX})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m difusi.mini train-lora`` (and ``difusi mini train-lora``)."""
    args = parse_args(argv)
    for name in ("steps", "rank", "batch_size"):
        if getattr(args, name) < 1:
            raise ParamError(name, f"must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.lr < 1:
        raise ParamError("lr", f"must be in (0, 1), got {args.lr}")
    if not 0 <= args.pink_fraction <= 1:
        raise ParamError("pink_fraction", f"must be in [0, 1], got {args.pink_fraction}")
    if args.alpha is not None and args.alpha <= 0:
        raise ParamError("alpha", f"must be positive, got {args.alpha}")
    if args.out.suffix != ".safetensors":
        raise ParamError("out", f"must name a .safetensors file, got {args.out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LoraConfig(seed=args.seed, steps=args.steps, rank=args.rank,
                        alpha=float(args.alpha if args.alpha is not None else args.rank), batch=args.batch_size,
                        lr=args.lr, pink_fraction=args.pink_fraction)
    started = time.time()
    path = train_lora(args.out, config, args.resume, args.state, progress=_progress_printer(config.steps))
    print(f"trained in {time.time() - started:.0f} s; wrote {path}")
    return 0


__all__ = ["LoraConfig", "LoraTrainer", "merged", "read_kohya", "lora_deltas", "train_lora", "target_modules"]

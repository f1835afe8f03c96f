"""Train difusi-mini from scratch: ``python -m difusi.mini train --out runs/NAME [--device cpu|cuda] [--resume]``.

Recipe (three phases and an optional fourth, each resumable from ``OUT/checkpoint.pt``):

1. **vae**: the AutoencoderKL learns to reconstruct procedural images (L1 + MSE, KL weight 1e-6 as in
   Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"; no GAN/LPIPS:
   flat shapes need none).
2. **calibrate**: measure the latent std to choose ``scaling_factor`` (SD1's 0.18215 was chosen the same
   way) and fit ``latent_rgb_factors``/``latent_rgb_bias`` (least squares, scaled latents -> RGB in [-1, 1]
   of the 4x-downsampled image) for live previews.
3. **unet**: the UNet and the text encoder learn epsilon prediction (Ho et al. 2020, DDPM) on SD's discrete
   scaled-linear schedule with the VAE frozen; an EMA of both is what gets exported. Options re-weight the
   loss toward high noise, add signal-free samples at t=999 and an auxiliary position probe (TrainConfig).
4. **decoder** (``--decoder-steps``): the VAE decoder alone, on the frozen encoder's latents.

Determinism: batch ``k`` of a phase is data samples ``k*B .. k*B+B-1`` and its noise and timesteps come
from a CPU generator seeded with ``(seed, phase, k)``, so a resumed run repeats exactly what an
uninterrupted one would do, on any device.

Default budget (measured on this 2-core CPU, torch 2.13, otherwise idle): a UNet+text-encoder step at batch
64 = 1.0 it/s (64 samples/s), a VAE step at batch 16 = 3.3 it/s. UNet phase 4,500 steps = 75 min plus ~20 %
for data rendering, VAE encoding and EMA = ~90 min; VAE phase 1,500 steps at batch 32 = ~15 min; calibration
< 1 min: ~106 min in total, inside the 2-hour budget (docs/mini/training.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difusi.errors import ParamError
from difusi.mini import data
from difusi.mini import model as mini_model

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "difusi-mini.safetensors"
PHASES = ("vae", "calibrate", "unet", "decoder", "done")


@dataclass
class TrainConfig:
    """Every knob of the recipe; saved into the run folder so a resumed run uses the same values."""

    seed: int = 0
    size: int = mini_model.NATIVE_SIZE
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 4500
    batch: int = 64
    lr: float = 6e-4
    warmup: int = 200
    # The text encoder's learning rate as a multiple of ``lr``. Adam moves each weight by about lr per step
    # whatever its gradient, so a word whose embedding must travel far (two position words that an earlier
    # run merged) needs a larger rate than the UNet does.
    text_lr_scale: float = 1.0
    # Weight of an auxiliary loss: a linear probe must read the caption's position from the text encoder's
    # end-of-text states (see Trainer._position_probe_loss). 0 = off, as in SD.
    position_probe_weight: float = 0.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    calibration_images: int = 512
    # 0: SD's plain epsilon MSE. >0: weight each sample by min(1 + 1/SNR, cap), i.e. the v-prediction loss
    # (Salimans & Ho 2022) capped as in Min-SNR (Hang et al. 2023). High-noise steps decide the layout
    # (position, size), which the plain epsilon loss barely rewards there (its x0 weight is SNR).
    loss_weight_cap: float = 0.0
    # Fraction of each UNet batch whose timesteps are drawn from [high_noise_from, 999] instead of [0, 999].
    # Layout words ("left", "top") only carry information where the noisy latent no longer shows the shape,
    # so they are learnt from these steps alone; 0 = uniform timesteps as in SD.
    high_noise_fraction: float = 0.0
    high_noise_from: int = 700
    position_caption_rate: float = data.POSITION_RATE  # how often a caption names the shape's position
    # Fraction of each UNet batch trained at the last timestep on the sampler's own starting point: noise that
    # carries no trace of the image. At t=999 SD's forward process still leaks sqrt(abar)=0.068 of the latent,
    # which a whole shape's worth of pixels makes readable, so a model trained only on that reads the layout
    # from the seed's noise and not from "left"/"top" (Lin et al. 2024, "Common Diffusion Noise Schedules and
    # Sample Steps are Flawed", sec. 3.1). These samples make the text the only source of layout at t=999
    # without changing SD's schedule, so every sampler still treats the model exactly like SD1.
    terminal_fraction: float = 0.0
    # Optional last phase: more training of the VAE decoder alone. The encoder is frozen, so the latent space
    # the UNet learnt is unchanged (measured on the shipped model: generated shapes read correctly 87.5 -> 94.8 %).
    decoder_steps: int = 0
    decoder_lr: float = 3e-4
    vae_from: str | None = None  # with init: take the VAE from this export instead (same encoder required)
    init: str | None = None  # warm start: an exported difusi-mini checkpoint (skips the VAE phase)


def _step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """CPU generator for one step: independent of device and of where a run was resumed."""
    return torch.Generator("cpu").manual_seed(_mix(seed, phase, step))


def _mix(seed: int, phase: str, step: int) -> int:
    # Python's hash() of a str is salted per process, so mix deterministically by hand.
    phase_code = PHASES.index(phase) + 1
    return (seed * 1_000_003 + phase_code * 7_919_993 + step) % (2**63 - 1)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (Loshchilov & Hutter 2017, SGDR without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _BatchDataset(torch.utils.data.Dataset):
    """Item k is batch k of a phase: (images float (B,3,H,W) in [-1, 1], token ids (B, 77))."""

    def __init__(self, seed: int, batch: int, size: int, position_rate: float = data.POSITION_RATE):
        self.seed, self.batch, self.size, self.position_rate = seed, batch, size, position_rate
        self.tokenizer = mini_model.load_tokenizer()

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, k: int):
        images, captions = data.make_batch(self.seed, k * self.batch, self.batch, self.size, self.position_rate)
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        positions = [data.stated_position(caption) for caption in captions]
        labels = torch.tensor([data.POSITIONS.index(p) if p else -100 for p in positions])  # -100: ignored
        # Tokenising here runs in the loader's worker processes, off the training loop's critical path.
        return tensor, mini_model.tokenize(self.tokenizer, captions), labels


def _batches(seed: int, batch: int, size: int, start: int, stop: int, device: str,
             position_rate: float = data.POSITION_RATE):
    workers = min(8, (os.cpu_count() or 1) - 1) if device != "cpu" else 0
    dataset = _BatchDataset(seed, batch, size, position_rate)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        collate_fn=lambda item: item,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)


class Trainer:
    """Holds the models, optimisers and phase state of one run folder."""

    def __init__(self, out: Path, config: TrainConfig, device: str):
        self.out, self.config, self.device = out, config, device
        torch.manual_seed(config.seed)  # model initialisation
        self.vae = mini_model.build_vae().to(device)
        self.unet = mini_model.build_unet().to(device)
        self.text_encoder = mini_model.build_text_encoder().to(device)
        self.tokenizer = mini_model.load_tokenizer()
        self.position_probe = torch.nn.Linear(mini_model.TEXT_CONFIG["hidden_size"], len(data.POSITIONS)).to(device)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        fused = device != "cpu"  # one kernel per step on CUDA; the CPU default (foreach) is already fast
        self.unet_opt = torch.optim.AdamW(
            [
                {"params": list(self.unet.parameters()), "lr_scale": 1.0},
                {"params": list(self.text_encoder.parameters()), "lr_scale": config.text_lr_scale},
                {"params": list(self.position_probe.parameters()), "lr_scale": 1.0},
            ],
            lr=config.lr,
            weight_decay=0.01,
            fused=fused,
        )
        self.phase, self.step = "vae", 0
        self.calibration: dict = {}
        self.alphas_cumprod = mini_model.train_alphas_cumprod().float().to(device)

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write OUT/checkpoint.pt atomically (temp file + rename) so an interrupted save loses nothing."""
        state = {
            "config": asdict(self.config),
            "phase": self.phase,
            "step": self.step,
            "calibration": self.calibration,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "position_probe": self.position_probe.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
        }
        tmp = self.out / (CHECKPOINT_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT_NAME)

    def load(self) -> None:
        """Restore every model, optimiser and the phase/step from OUT/checkpoint.pt."""
        state = torch.load(self.out / CHECKPOINT_NAME, map_location=self.device, weights_only=True)
        for name in ("vae", "unet", "text_encoder", "ema_unet", "ema_text", "position_probe", "vae_opt", "unet_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.phase, self.step, self.calibration = state["phase"], state["step"], state["calibration"]

    # ---- phase 1: VAE ------------------------------------------------------------------------------
    def train_vae(self) -> None:
        cfg = self.config
        self.vae.train()
        self._reconstruction_steps("vae", cfg.seed + 1, cfg.vae_steps, cfg.vae_lr, 100, cfg.kl_weight, export_too=False)
        self.phase, self.step = "calibrate", 0
        self.save()

    def _reconstruction_steps(
        self, phase: str, data_seed: int, steps: int, lr: float, warmup: int, kl_weight: float, export_too: bool
    ) -> None:
        """L1 + MSE (+ KL) steps of ``vae_opt`` from ``self.step`` to ``steps``: the VAE phase and the decoder phase.

        The encoder runs with gradients only if some of its parameters train (the decoder phase freezes it).
        Checkpoints every ``checkpoint_every`` steps; ``export_too`` also refreshes the exported model (which
        needs the calibration, so not in the VAE phase).
        """
        cfg = self.config
        encoder_trains = any(p.requires_grad for p in self.vae.encoder.parameters())
        bar = _progress(steps, self.step, phase)
        smoothed = None
        for images, _, _ in _batches(data_seed, cfg.vae_batch, cfg.size, self.step, steps, self.device):
            images = images.to(self.device, non_blocking=True)
            for group in self.vae_opt.param_groups:
                group["lr"] = lr * _cosine_lr(self.step, steps, warmup)
            with torch.set_grad_enabled(encoder_trains):
                posterior = self.vae.encode(images).latent_dist
                gen = _step_generator(cfg.seed, phase, self.step)
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(self.device)
            recon = self.vae.decode(z).sample
            loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
            if kl_weight:
                loss = loss + kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.step += 1
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
            if self.step % cfg.checkpoint_every == 0 and self.step < steps:
                self.save()
                if export_too:
                    export(self, self.out / MODEL_NAME)
        bar.close()

    # ---- phase 2: calibration ----------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self) -> None:
        """Measure scaling_factor = 1/std(latents) and fit the latent->RGB preview matrix."""
        cfg = self.config
        self.vae.eval()
        images, _ = data.make_batch(cfg.seed + 2, 0, cfg.calibration_images, cfg.size)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = []
        for chunk in pixels.split(64):
            latents.append(self.vae.encode(chunk.to(self.device)).latent_dist.mean.cpu())
        latents = torch.cat(latents)
        scaling_factor = float(1.0 / latents.std())
        self.calibration = {"scaling_factor": scaling_factor, **fit_latent_rgb(latents * scaling_factor, pixels)}
        self.phase, self.step = "unet", 0
        self.save()

    # ---- phase 3: UNet + text encoder ----------------------------------------------------------------
    def train_unet(self) -> None:
        cfg = self.config
        scaling_factor = self.calibration["scaling_factor"]
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        ema_params = list(self.ema_unet.parameters()) + list(self.ema_text.parameters())
        bar = _progress(cfg.unet_steps, self.step, "unet")
        smoothed = None
        batches = _batches(
            cfg.seed, cfg.batch, cfg.size, self.step, cfg.unet_steps, self.device, cfg.position_caption_rate
        )
        for images, token_ids, position_labels in batches:
            images = images.to(self.device, non_blocking=True)
            for group in self.unet_opt.param_groups:
                group["lr"] = group["lr_scale"] * cfg.lr * _cosine_lr(self.step, cfg.unet_steps, cfg.warmup)
            gen = _step_generator(cfg.seed, "unet", self.step)
            with torch.no_grad():
                posterior = self.vae.encode(images).latent_dist
                z0_noise = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
                latents = (posterior.mean + posterior.std * z0_noise) * scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            t = self._timesteps(latents.shape[0], gen).to(self.device)
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            t, noisy, noise = self._terminal_samples(t, noisy, noise, latents)
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            token_ids = token_ids.to(self.device, non_blocking=True)
            context = mini_model.encode_text(self.text_encoder, token_ids)
            prediction = self.unet(noisy, t, encoder_hidden_states=context).sample
            loss = self._weighted_loss(prediction, noise, abar.view(-1))
            if cfg.position_probe_weight > 0:
                loss = loss + cfg.position_probe_weight * self._position_probe_loss(context, token_ids, position_labels)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.unet_opt.step()
            self._update_ema(params, ema_params)
            self.step += 1
            smoothed = loss.item() if smoothed is None else 0.99 * smoothed + 0.01 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.unet_steps:
                self.save()
                export(self, self.out / MODEL_NAME)  # the latest weights are always usable
        bar.close()
        # The step counter is per phase; a run without a decoder phase keeps the UNet's, so it can be resumed.
        self.phase, self.step = ("decoder", 0) if cfg.decoder_steps else ("done", self.step)
        self.save()

    # ---- phase 4 (optional): decoder only ---------------------------------------------------------------
    def train_decoder(self) -> None:
        """L1 + MSE reconstruction training of ``post_quant_conv`` + ``decoder`` on latents of the frozen encoder."""
        cfg = self.config
        self.vae.train().requires_grad_(False)  # the UNet phase froze it all; thaw only the decoder side
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)
        self._reconstruction_steps(
            "decoder", cfg.seed + 3, cfg.decoder_steps, cfg.decoder_lr, 50, kl_weight=0.0, export_too=True
        )
        self.vae.eval()
        self.phase = "done"
        self.save()

    def _timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """Uniform training timesteps, with the first ``high_noise_fraction`` of the batch from the noisy end."""
        t = torch.randint(0, mini_model.NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
        high = round(batch * self.config.high_noise_fraction)
        if high:
            t[:high] = torch.randint(self.config.high_noise_from, mini_model.NUM_TRAIN_TIMESTEPS, (high,), generator=gen)
        return t

    def _terminal_samples(self, t, noisy, noise, latents):
        """Turn the last ``terminal_fraction`` of the batch into signal-free samples at t = T-1.

        The input is pure unit noise ``n`` (what samplers start from) and the target is the epsilon that makes
        the forward equation hold for the clean latent: ``eps = (n - sqrt(abar) x0) / sqrt(1 - abar)``, so the
        x0 the model implies is the image the caption describes, not one the noise hints at.
        """
        count = round(t.shape[0] * self.config.terminal_fraction)
        if not count:
            return t, noisy, noise
        t, noisy, noise = t.clone(), noisy.clone(), noise.clone()
        last = mini_model.NUM_TRAIN_TIMESTEPS - 1
        abar = self.alphas_cumprod[last]
        pure = noise[-count:]  # independent of latents, and the forward noise of those samples is discarded
        t[-count:] = last
        noisy[-count:] = pure
        noise[-count:] = (pure - abar.sqrt() * latents[-count:]) / (1 - abar).sqrt()
        return t, noisy, noise

    def _position_probe_loss(self, context, token_ids, labels) -> torch.Tensor:
        """Cross-entropy of a linear probe reading the stated position from the end-of-text states.

        The UNet's cross-attention puts most of its weight on the end-of-text/padding states (the causal
        encoder's summary of the sentence), so a position that is not linearly readable there is lost to it.
        The probe is an auxiliary head (discarded at export) whose gradient makes the summary keep it.
        """
        labels = labels.to(context.device)
        if not bool((labels >= 0).any()):
            return context.new_zeros(())
        eos = (token_ids == mini_model.EOS_TOKEN_ID).unsqueeze(-1).to(context.dtype)
        summary = (context * eos).sum(1) / eos.sum(1).clamp(min=1)
        return F.cross_entropy(self.position_probe(summary), labels, ignore_index=-100)

    def _weighted_loss(self, prediction: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        if self.config.loss_weight_cap > 0:
            per_sample = per_sample * (1 + (1 - abar) / abar).clamp(max=self.config.loss_weight_cap)
        return per_sample.mean()

    @torch.no_grad()
    def _update_ema(self, params: list, ema_params: list) -> None:
        # Warm-up of the decay (as in diffusers' EMAModel) so early weights don't dominate a short run.
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)

    def warm_start(self, checkpoint: Path, vae_from: Path | None = None) -> None:
        """Start the UNet phase from an exported difusi-mini (its VAE, calibration, UNet and text encoder).

        ``vae_from``: another export whose VAE to use instead. It must have the same encoder (so the same
        latent space the UNet learnt); only its decoder may differ, e.g. after a decoder-only run.
        """
        unet_sd, vae_sd, text_sd, meta = _read_export(checkpoint)
        if vae_from is not None:
            other_vae = _read_export(vae_from)[1]
            encoder_keys = [k for k in vae_sd if k.startswith(("encoder.", "quant_conv."))]
            if any(not torch.equal(vae_sd[k], other_vae[k]) for k in encoder_keys):
                raise ParamError("vae_from", f"{vae_from} has another VAE encoder than {checkpoint}: its latents differ")
            vae_sd = other_vae
        for module, weights in ((self.vae, vae_sd), (self.unet, unet_sd), (self.ema_unet, unet_sd)):
            module.load_state_dict({k: v.float() for k, v in weights.items()})
        for module in (self.text_encoder, self.ema_text):
            module.load_state_dict({k: v.float() for k, v in text_sd.items()}, strict=False)  # no position_ids
        self.calibration = {k: meta[k] for k in ("scaling_factor", "latent_rgb_factors", "latent_rgb_bias")}
        self.phase, self.step = "unet", 0

    def run(self) -> None:
        """Run the remaining phases in order, saving after each."""
        if self.phase == "vae":
            self.train_vae()
        if self.phase == "calibrate":
            self.calibrate()
        if self.phase == "unet":
            self.train_unet()
        if self.phase == "decoder":
            self.train_decoder()


def _read_export(checkpoint: Path) -> tuple[dict, dict, dict, dict]:
    """(unet, vae, text encoder) state dicts in diffusers layout and the sidecar of an exported difusi-mini."""
    from safetensors.torch import load_file

    from difusi.mini.export import sidecar_path
    from difusi.models.convert import split_ldm_checkpoint
    from difusi.models.detect import detect

    state = load_file(str(checkpoint))
    meta = json.loads(sidecar_path(checkpoint).read_text())
    spec = detect({k: tuple(v.shape) for k, v in state.items()}, meta)
    unet_sd, vae_sd, (text_sd,) = split_ldm_checkpoint(state, "sd1", spec.unet_config, spec.vae_config)
    return unet_sd, vae_sd, text_sd, meta


def fit_latent_rgb(scaled_latents: torch.Tensor, pixels: torch.Tensor) -> dict:
    """Least-squares fit of RGB (in [-1, 1], downsampled to the latent grid) from scaled latents.

    Returns ``latent_rgb_factors`` [4][3] and ``latent_rgb_bias`` [3], so that
    ``rgb ~= einsum('bchw,cr->brhw', latents, factors) + bias``: A1111's/ComfyUI's cheap preview.
    """
    factor = pixels.shape[-1] // scaled_latents.shape[-1]
    target = F.avg_pool2d(pixels, factor).permute(0, 2, 3, 1).reshape(-1, 3).double()
    inputs = scaled_latents.permute(0, 2, 3, 1).reshape(-1, scaled_latents.shape[1]).double()
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    return {
        "latent_rgb_factors": solution[:-1].tolist(),
        "latent_rgb_bias": solution[-1].tolist(),
    }


def sidecar(calibration: dict) -> dict:
    """The ``difusi-mini.difusi.json`` sidecar: values the loader cannot read from the weights."""
    return {
        "name": "difusi-mini",
        "family": "sd1",
        "native_size": mini_model.NATIVE_SIZE,
        "scaling_factor": calibration["scaling_factor"],
        "attention_heads": mini_model.UNET_ATTENTION_HEADS,
        "text_encoder_heads": mini_model.TEXT_CONFIG["num_attention_heads"],
        "prediction_type": "epsilon",
        "latent_rgb_factors": calibration["latent_rgb_factors"],
        "latent_rgb_bias": calibration["latent_rgb_bias"],
    }


def export(trainer: Trainer, destination: Path) -> Path:
    """Write the EMA weights as one SD1-LDM-layout fp16 .safetensors plus its sidecar json."""
    from difusi.mini.export import save_ldm_checkpoint

    path = save_ldm_checkpoint(
        destination, trainer.ema_unet, trainer.vae, trainer.ema_text, sidecar(trainer.calibration)
    )
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difusi mini train", description="Train difusi-mini from scratch.")
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, exported model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=None, help=f"UNet steps (default {TrainConfig.unet_steps})")
    parser.add_argument("--vae-steps", type=int, default=None, help=f"VAE steps (default {TrainConfig.vae_steps})")
    parser.add_argument("--seed", type=int, default=None, help="seed of data, noise and initialisation (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--init", type=Path, default=None, help="warm start from an exported difusi-mini .safetensors")
    parser.add_argument("--vae-from", type=Path, default=None, help="with --init: the VAE of this export (same encoder)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"UNet batch (default {TrainConfig.batch})")
    parser.add_argument(
        "--loss-weight-cap", type=float, default=None, help="weight samples by min(1+1/SNR, CAP); 0 = plain eps MSE"
    )
    parser.add_argument(
        "--high-noise-fraction", type=float, default=None, help="share of each batch trained at t >= --high-noise-from"
    )
    parser.add_argument(
        "--position-caption-rate", type=float, default=None, help="how often captions name positions (default 0.7)"
    )
    parser.add_argument(
        "--terminal-fraction", type=float, default=None, help="share of each batch trained at t=999 on signal-free noise"
    )
    parser.add_argument("--text-lr-scale", type=float, default=None, help="text encoder lr as a multiple of --lr (default 1)")
    parser.add_argument("--position-probe-weight", type=float, default=None, help="weight of the position probe loss (default 0)")
    parser.add_argument("--decoder-steps", type=int, default=None, help="decoder-only steps after the UNet (default 0)")
    parser.add_argument("--decoder-lr", type=float, default=None, help=f"decoder peak learning rate (default {TrainConfig.decoder_lr})")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="save and export every N steps (default 500)")
    parser.add_argument("--high-noise-from", type=int, default=None, help="first 'high noise' timestep (default 700)")
    parser.add_argument("--lr", type=float, default=None, help=f"UNet peak learning rate (default {TrainConfig.lr})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace, saved: dict | None) -> TrainConfig:
    config = TrainConfig(**saved) if saved else TrainConfig()
    overrides = (
        ("unet_steps", args.steps),
        ("vae_steps", args.vae_steps),
        ("seed", args.seed),
        ("batch", args.batch_size),
        ("decoder_steps", args.decoder_steps),
    )
    for field_name, value in overrides:
        if value is not None:
            if value < 0 or (field_name == "batch" and value == 0):
                raise ParamError(field_name, f"must be a positive integer, got {value}")
            setattr(config, field_name, value)
    if args.lr is not None:
        if not 0 < args.lr < 1:
            raise ParamError("lr", f"must be in (0, 1), got {args.lr}")
        config.lr = args.lr
    if args.text_lr_scale is not None:
        if not 0 < args.text_lr_scale <= 100:
            raise ParamError("text_lr_scale", f"must be in (0, 100], got {args.text_lr_scale}")
        config.text_lr_scale = args.text_lr_scale
    if args.position_probe_weight is not None:
        if not 0 <= args.position_probe_weight <= 10:
            raise ParamError("position_probe_weight", f"must be in [0, 10], got {args.position_probe_weight}")
        config.position_probe_weight = args.position_probe_weight
    if args.decoder_lr is not None:
        if not 0 < args.decoder_lr < 1:
            raise ParamError("decoder_lr", f"must be in (0, 1), got {args.decoder_lr}")
        config.decoder_lr = args.decoder_lr
    if args.loss_weight_cap is not None:
        if args.loss_weight_cap < 0:
            raise ParamError("loss_weight_cap", f"must be >= 0, got {args.loss_weight_cap}")
        config.loss_weight_cap = args.loss_weight_cap
    if args.high_noise_fraction is not None:
        if not 0 <= args.high_noise_fraction <= 1:
            raise ParamError("high_noise_fraction", f"must be in [0, 1], got {args.high_noise_fraction}")
        config.high_noise_fraction = args.high_noise_fraction
    if args.terminal_fraction is not None:
        if not 0 <= args.terminal_fraction <= 1:
            raise ParamError("terminal_fraction", f"must be in [0, 1], got {args.terminal_fraction}")
        config.terminal_fraction = args.terminal_fraction
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 1:
            raise ParamError("checkpoint_every", f"must be a positive integer, got {args.checkpoint_every}")
        config.checkpoint_every = args.checkpoint_every
    if args.position_caption_rate is not None:
        if not 0 <= args.position_caption_rate <= 1:
            raise ParamError("position_caption_rate", f"must be in [0, 1], got {args.position_caption_rate}")
        config.position_caption_rate = args.position_caption_rate
    if args.high_noise_from is not None:
        if not 0 <= args.high_noise_from < mini_model.NUM_TRAIN_TIMESTEPS:
            raise ParamError("high_noise_from", f"must be in [0, {mini_model.NUM_TRAIN_TIMESTEPS - 1}], got {args.high_noise_from}")
        config.high_noise_from = args.high_noise_from
    if args.init is not None:
        if not args.init.is_file():
            raise ParamError("init", f"no such checkpoint: {args.init}")
        config.init = str(args.init)
    if args.vae_from is not None:
        if config.init is None:
            raise ParamError("vae_from", "needs --init (it replaces the VAE of the warm start)")
        if not args.vae_from.is_file():
            raise ParamError("vae_from", f"no such checkpoint: {args.vae_from}")
        config.vae_from = str(args.vae_from)
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m difusi.mini train`` (and ``difusi mini train``)."""
    args = parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ParamError("device", f"must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError("device", "CUDA was requested but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # tiny model: TF32 error is far below the training noise
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / CHECKPOINT_NAME
    if checkpoint.exists() and not args.resume:
        raise ParamError("resume", f"{checkpoint} exists: pass --resume to continue it or choose another --out")
    saved = None
    if args.resume and checkpoint.exists():
        saved = json.loads((args.out / "config.json").read_text())
    config = _config_from_args(args, saved)
    (args.out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    trainer = Trainer(args.out, config, args.device)
    if saved is not None:
        trainer.load()
    elif config.init:
        trainer.warm_start(Path(config.init), Path(config.vae_from) if config.vae_from else None)
        if trainer.phase == "done" and trainer.step < config.unet_steps:
            trainer.phase = "unet"  # --steps raised on a finished run: keep training
    started = time.time()
    trainer.run()
    path = export(trainer, args.out / MODEL_NAME)
    print(f"trained in {time.time() - started:.0f} s; exported {path}")
    return 0


def as_numpy_image(tensor: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1, 1] -> (H,W,3) uint8."""
    return ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

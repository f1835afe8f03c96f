"""Training recipe: SD's schedule, determinism, exact resume, CLI errors, the latent->RGB fit."""

from __future__ import annotations

import pytest
import torch

from difusi.errors import ParamError
from difusi.mini import model as mini_model
from difusi.mini import train

TINY = dict(vae_steps=2, vae_batch=2, unet_steps=4, batch=2, calibration_images=8, checkpoint_every=2)


def test_noise_schedule_is_sds_scaled_linear_table():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ours = mini_model.train_alphas_cumprod()
    assert torch.allclose(ours.float(), reference.alphas_cumprod, atol=1e-6)


def test_learning_rate_warms_up_then_decays_to_zero():
    assert train._cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert train._cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert train._cosine_lr(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_latent_rgb_fit_recovers_a_known_linear_map():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=generator)
    factors = torch.randn(4, 3, generator=generator)
    bias = torch.tensor([0.1, -0.2, 0.3])
    small = torch.einsum("bchw,cr->brhw", latents, factors) + bias.view(1, 3, 1, 1)
    pixels = small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 4x upsampled: avg-pool recovers it
    fit = train.fit_latent_rgb(latents, pixels)
    assert torch.allclose(torch.tensor(fit["latent_rgb_factors"]), factors, atol=1e-4)
    assert torch.allclose(torch.tensor(fit["latent_rgb_bias"]), bias, atol=1e-4)


def _run(out, unet_steps, resume_to=None) -> dict:
    config = train.TrainConfig(**{**TINY, "unet_steps": unet_steps})
    trainer = train.Trainer(out, config, "cpu")
    trainer.run()
    if resume_to is not None:
        trainer = train.Trainer(out, train.TrainConfig(**{**TINY, "unet_steps": resume_to}), "cpu")
        trainer.load()
        trainer.phase = "unet"
        trainer.run()
    return {k: v.clone() for k, v in trainer.ema_unet.state_dict().items()}


def test_training_is_deterministic_and_resume_is_exact(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU: one thread avoids OpenMP thrashing in this short run
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        straight = _run(tmp_path / "a", 4)
        resumed = _run(tmp_path / "b", 2, resume_to=4)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    fresh = mini_model.build_unet().state_dict()
    assert any(not torch.equal(straight[k], fresh[k]) for k in straight)  # it did train


def test_high_noise_fraction_draws_that_share_of_the_batch_from_the_noisy_end(tmp_path):
    config = train.TrainConfig(**{**TINY, "high_noise_fraction": 0.25, "high_noise_from": 900})
    trainer = train.Trainer(tmp_path, config, "cpu")
    t = trainer._timesteps(4000, torch.Generator().manual_seed(0))
    assert bool((t[:1000] >= 900).all()) and int(t.max()) <= 999
    uniform = t[1000:]
    assert int(uniform.min()) < 50 and abs((uniform >= 900).float().mean().item() - 0.1) < 0.02
    plain = train.Trainer(tmp_path, train.TrainConfig(**TINY), "cpu")._timesteps(4000, torch.Generator().manual_seed(0))
    assert abs((plain >= 900).float().mean().item() - 0.1) < 0.02  # default: uniform, as in SD


def test_terminal_samples_hide_the_image_and_keep_the_forward_equation(tmp_path):
    config = train.TrainConfig(**{**TINY, "terminal_fraction": 0.25})
    trainer = train.Trainer(tmp_path, config, "cpu")
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(8, 4, 4, 4, generator=generator), torch.randn(8, 4, 4, 4, generator=generator)
    t = torch.full((8,), 500)
    abar = trainer.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    new_t, new_noisy, target = trainer._terminal_samples(t, noisy, noise, latents)
    assert new_t.tolist() == [500] * 6 + [999] * 2
    assert torch.equal(new_noisy[:6], noisy[:6]) and torch.equal(target[:6], noise[:6])
    assert torch.equal(new_noisy[6:], noise[6:])  # the input is the noise alone: no trace of the latents
    last = trainer.alphas_cumprod[999]
    rebuilt = last.sqrt() * latents[6:] + (1 - last).sqrt() * target[6:]
    assert torch.allclose(rebuilt, new_noisy[6:], atol=1e-5)  # target epsilon implies exactly these latents


def test_decoder_phase_trains_the_decoder_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = train.Trainer(tmp_path, train.TrainConfig(**{**TINY, "decoder_steps": 0}), "cpu")
        trainer.run()
        before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
        unet = {k: v.clone() for k, v in trainer.ema_unet.state_dict().items()}
        assert trainer.phase == "done" and trainer.step == TINY["unet_steps"]  # no decoder phase: resumable as before
        trainer.config.decoder_steps = 3
        trainer.phase, trainer.step = "decoder", 0
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    after = trainer.vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert all(torch.equal(unet[k], v) for k, v in trainer.ema_unet.state_dict().items())
    assert trainer.phase == "done" and trainer.step == 3


def test_text_encoder_learning_rate_is_a_multiple_of_the_unets(tmp_path):
    trainer = train.Trainer(tmp_path, train.TrainConfig(**{**TINY, "text_lr_scale": 5.0}), "cpu")
    unet_group, text_group, _probe_group = trainer.unet_opt.param_groups
    assert {id(p) for p in text_group["params"]} == {id(p) for p in trainer.text_encoder.parameters()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    assert unet_group["lr"] > 0 and text_group["lr"] == pytest.approx(5.0 * unet_group["lr"])


def test_position_probe_loss_is_low_only_where_the_position_is_readable(tmp_path):
    trainer = train.Trainer(tmp_path, train.TrainConfig(**{**TINY, "position_probe_weight": 1.0}), "cpu")
    eos = mini_model.EOS_TOKEN_ID
    token_ids = torch.tensor([[49406, 1, eos, eos], [49406, 2, eos, eos], [49406, 3, eos, eos]])
    labels = torch.tensor([0, 1, -100])  # the third caption names no position: ignored
    readable = torch.zeros(3, 4, mini_model.TEXT_CONFIG["hidden_size"])
    readable[0, 2:, 0] = 50.0  # end-of-text states that a linear probe can tell apart
    readable[1, 2:, 1] = 50.0
    with torch.no_grad():
        trainer.position_probe.weight.zero_()
        trainer.position_probe.bias.zero_()
        trainer.position_probe.weight[0, 0] = trainer.position_probe.weight[1, 1] = 1.0
    assert trainer._position_probe_loss(readable, token_ids, labels).item() < 1e-6
    merged = readable.clone()
    merged[:, 2:, :2] = 25.0  # both captions' summaries the same: the probe can only guess
    assert trainer._position_probe_loss(merged, token_ids, labels).item() > 0.6
    readable[:, :2] = 1e4  # non-end-of-text states do not enter the probe
    assert trainer._position_probe_loss(readable, token_ids, labels).item() < 1e-6


def test_vae_from_swaps_the_decoder_but_refuses_another_encoder(tmp_path):
    source = train.Trainer(tmp_path / "a", train.TrainConfig(**TINY), "cpu")
    source.calibration = {"scaling_factor": 1.0, "latent_rgb_factors": [[0.0] * 3] * 4, "latent_rgb_bias": [0.0] * 3}
    base = train.export(source, tmp_path / "base.safetensors")
    with torch.no_grad():
        source.vae.post_quant_conv.weight.add_(0.25)
    new_decoder = train.export(source, tmp_path / "decoder.safetensors")
    with torch.no_grad():
        source.vae.quant_conv.weight.add_(0.25)
    new_encoder = train.export(source, tmp_path / "encoder.safetensors")

    trainer = train.Trainer(tmp_path / "b", train.TrainConfig(**TINY), "cpu")
    trainer.warm_start(base, vae_from=new_decoder)
    expected = source.vae.post_quant_conv.weight.half().float()
    assert torch.equal(trainer.vae.post_quant_conv.weight, expected)
    assert torch.equal(trainer.unet.conv_in.weight, source.ema_unet.conv_in.weight.half().float())
    with pytest.raises(ParamError) as error:
        trainer.warm_start(base, vae_from=new_encoder)
    assert error.value.field == "vae_from"


def test_existing_run_needs_resume(tmp_path):
    (tmp_path / train.CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(ParamError) as error:
        train.main(["--out", str(tmp_path)])
    assert error.value.field == "resume"


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--device", "tpu"], "device"),
        (["--steps", "-1"], "unet_steps"),
        (["--batch-size", "0"], "batch"),
        (["--terminal-fraction", "2"], "terminal_fraction"),
        (["--decoder-lr", "0"], "decoder_lr"),
        (["--text-lr-scale", "0"], "text_lr_scale"),
        (["--position-probe-weight", "-1"], "position_probe_weight"),
        (["--vae-from", "/nonexistent.safetensors"], "vae_from"),
        (["--checkpoint-every", "0"], "checkpoint_every"),
        (["--lr", "2"], "lr"),
        (["--init", "/nonexistent.safetensors"], "init"),
        (["--high-noise-fraction", "1.5"], "high_noise_fraction"),
        (["--high-noise-from", "1000"], "high_noise_from"),
    ],
)
def test_bad_arguments_name_their_field(tmp_path, argv, field):
    with pytest.raises(ParamError) as error:
        train.main(["--out", str(tmp_path / "run"), *argv])
    assert error.value.field == field

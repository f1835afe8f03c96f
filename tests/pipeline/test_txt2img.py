"""Reproducibility, batching, variation seeds, prompt editing, cancel and input validation of txt2img."""

import math

import numpy as np
import pytest
import torch

from difusi.errors import Interrupted, ParamError
from difusi.params import GenerationParams
from difusi.pipeline import txt2img
from difusi.prompts.conditioning import encode_prompt


def _params(**changes):
    base = dict(prompt="a red circle", negative_prompt="blue", seed=42, steps=4, cfg_scale=5.0, width=64, height=64)
    base.update(changes)
    return GenerationParams(**base)


def _pixels(generated):
    return np.asarray(generated.image, dtype=np.int16)


def test_same_params_give_bit_identical_images(tiny_models):
    model = tiny_models("sd1")
    first = txt2img(model, _params(sampler_name="Euler a"))
    second = txt2img(model, _params(sampler_name="Euler a"))
    assert np.array_equal(_pixels(first.images[0]), _pixels(second.images[0]))
    other_seed = txt2img(model, _params(sampler_name="Euler a", seed=43))
    assert not np.array_equal(_pixels(first.images[0]), _pixels(other_seed.images[0]))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M"])
def test_batch_image_equals_single_generation(tiny_models, sampler):
    """Image k of a batch of 4 with seed s equals seed s+k generated alone (docs/ARCHITECTURE.md contract 2)."""
    model = tiny_models("sd1")
    batch = txt2img(model, _params(sampler_name=sampler, batch_size=4))
    assert batch.seeds == [42, 43, 44, 45]
    for k in (0, 3):
        alone = txt2img(model, _params(sampler_name=sampler, seed=42 + k))
        difference = np.abs(_pixels(batch.images[k]) - _pixels(alone.images[0])).max()
        assert difference <= 1, f"{sampler}: image {k} differs by {difference} levels"


def test_batch_count_continues_seeds_and_reports_each(tiny_models):
    model = tiny_models("sd1")
    result = txt2img(model, _params(batch_size=2, n_iter=2))
    assert result.seeds == [42, 43, 44, 45]
    assert [image.seed for image in result.images] == [42, 43, 44, 45]
    assert [image.index for image in result.images] == [0, 1, 2, 3]
    assert all(f"Seed: {image.seed}," in image.infotext for image in result.images)


def test_random_seed_is_reported_and_reproduces(tiny_models):
    model = tiny_models("sd1")
    drawn = txt2img(model, _params(seed=-1))
    seed = drawn.seeds[0]
    assert 0 <= seed <= 2**32 - 2
    again = txt2img(model, _params(seed=seed))
    assert np.array_equal(_pixels(drawn.images[0]), _pixels(again.images[0]))


def test_variation_seed_strength_interpolates_between_seeds(tiny_models):
    model = tiny_models("sd1")
    plain = txt2img(model, _params(seed=5))
    none = txt2img(model, _params(seed=5, subseed=9, subseed_strength=0.0))
    full = txt2img(model, _params(seed=5, subseed=9, subseed_strength=1.0))
    other = txt2img(model, _params(seed=9))
    half = txt2img(model, _params(seed=5, subseed=9, subseed_strength=0.5))
    assert np.array_equal(_pixels(plain.images[0]), _pixels(none.images[0]))
    # strength 1 is the subseed's noise (slerp endpoint), so the image is the subseed's image
    assert np.abs(_pixels(full.images[0]) - _pixels(other.images[0])).max() <= 1
    assert not np.array_equal(_pixels(half.images[0]), _pixels(plain.images[0]))
    assert not np.array_equal(_pixels(half.images[0]), _pixels(other.images[0]))


def test_prompt_editing_switches_conditioning_at_the_right_step(tiny_models):
    """`[cat:dog:0.5]` over 6 steps: `when` = 3, and as in A1111 the "from" text holds while the 0-based
    step is <= 3, so the network sees "cat" for steps 0-3 and "dog" for steps 4-5."""
    model = tiny_models("sd1")
    seen = []
    original_forward = model.unet.forward

    def recording_forward(sample, timestep, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states[-1].clone())  # rows are [uncond, cond]
        return original_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    model.unet.forward = recording_forward
    try:
        txt2img(model, _params(prompt="a [cat:dog:0.5]", sampler_name="Euler", steps=6))
    finally:
        model.unet.forward = original_forward
    with torch.inference_mode():
        cat = encode_prompt(model.text_encoders, "a cat").context[0]
        dog = encode_prompt(model.text_encoders, "a dog").context[0]
    assert len(seen) == 6
    for step, context in enumerate(seen):
        expected, wrong = (cat, dog) if step <= 3 else (dog, cat)
        assert torch.allclose(context, expected, atol=1e-5), f"step {step}"
        assert not torch.allclose(context, wrong, atol=1e-3)


def test_cfg_scale_one_skips_the_unconditional_pass(tiny_models):
    model = tiny_models("sd1")
    batches = []
    original_forward = model.unet.forward

    def counting_forward(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return original_forward(sample, *args, **kwargs)

    model.unet.forward = counting_forward
    try:
        txt2img(model, _params(cfg_scale=1.0, sampler_name="Euler", batch_size=2))
        txt2img(model, _params(cfg_scale=7.0, sampler_name="Euler", batch_size=2))
    finally:
        model.unet.forward = original_forward
    assert batches == [2] * 4 + [4] * 4


def test_interrupt_keeps_finished_images(tiny_models):
    model = tiny_models("sd1")
    received = []
    calls = {"n": 0}

    def stop_in_second_batch():
        calls["n"] += 1
        return calls["n"] > 6  # 4 steps per batch: stops during the second batch

    with pytest.raises(Interrupted) as stopped:
        txt2img(model, _params(batch_size=1, n_iter=3), should_stop=stop_in_second_batch, on_image=received.append)
    assert [image.seed for image in received] == [42]
    assert [image.seed for image in stopped.value.result.images] == [42]


def test_progress_reports_every_step(tiny_models):
    model = tiny_models("sd1")
    events = []
    txt2img(model, _params(n_iter=2, sampler_name="Euler"), progress=events.append)
    assert [(e.iteration, e.step) for e in events] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert events[-1].fraction == 1.0
    assert events[0].latents.shape == (1, model.latent_channels, 64 // model.vae_scale_factor, 64 // model.vae_scale_factor)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 30}, "height"),
        ({"steps": 0}, "steps"),
        ({"cfg_scale": math.nan}, "cfg_scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"sampler_name": "Eulr"}, "sampler_name"),
        ({"scheduler": "Karas"}, "scheduler"),
        ({"eta": -0.5}, "eta"),
        ({"s_noise": -1.0}, "s_noise"),
        ({"seed": -7}, "seed"),
        ({"prompt": "a [cat:dog:-3]"}, "prompt"),
    ],
)
def test_bad_input_raises_param_error_naming_the_field(tiny_models, changes, field):
    model = tiny_models("sd1")
    with pytest.raises(ParamError) as error:
        txt2img(model, _params(**changes))
    assert error.value.field == field

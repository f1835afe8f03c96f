"""Hires fix (issue 15): the second pass is an img2img of the upscaled first image, and prompt editing switches in it.

- With a pixel upscaler ("Lanczos"), `txt2img(enable_hr=True)` equals, pixel for pixel, txt2img at the low size,
  the image resized here with PIL's Lanczos (A1111's `UpscalerLanczos` for a 2x or 1.5x scale is one Lanczos
  resize to the destination), then `img2img` at the hires size with the same seed, strength and
  `img2img_fix_steps=True` (A1111's second pass always runs exactly `hr_second_pass_steps or steps`), the hires
  sampler / schedule / prompt as the img2img's.
- With a latent upscaler the second pass starts from the first pass's latents interpolated as A1111 does
  (`torch.nn.functional.interpolate` with the mode's method and antialiasing), checked on the pipeline's internals.
- Prompt editing in the hires pass follows A1111's rule (prompt_parser.py since 1.6, `use_old_scheduling` off),
  written out here: a `when` with a '.' is a fraction counted from 1.0 of the hires steps, one without is a step
  number counted on from the first pass's steps; end to end, the UNet sees the switch inside the second pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import difusi.pipeline as pipeline
from difusi.hires import hires_size
from difusi.params import FIELDS, GenerationParams
from difusi.pipeline import img2img, txt2img
from difusi.prompts.conditioning import encode_prompt
from difusi.prompts.parser import get_prompt_schedule

SEED = 2024


def _params(**changes) -> GenerationParams:
    base = dict(prompt="a red circle on a plain background", negative_prompt="blurry", seed=SEED,
                sampler_name="Euler", steps=4, cfg_scale=5.0, width=64, height=64, denoising_strength=0.6)
    return GenerationParams(**{**base, **changes})


# ----------------------------------------------------------------------------- hires = txt2img + img2img


@pytest.mark.parametrize(
    "hires",
    [
        {"hr_scale": 2.0},
        {"hr_resize_x": 96, "hr_second_pass_steps": 3, "denoising_strength": 0.45},
        {"hr_scale": 1.5, "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras", "hr_prompt": "a blue square",
         "hr_negative_prompt": "noise"},
    ],
    ids=["scale2", "resize-x-3-steps", "hires-sampler-and-prompt"],
)
def test_hires_fix_equals_txt2img_then_img2img(mini, hires):
    params = _params(**hires)
    high = hires_size(params.validated(), mini.vae_scale_factor)
    expected_side = 128 if hires.get("hr_scale") == 2.0 else 96
    assert (high.width, high.height) == (expected_side, expected_side)
    made = txt2img(mini, params.replace(enable_hr=True, hr_upscaler="Lanczos")).images[0].image
    assert made.size == (high.width, high.height)

    first = txt2img(mini, params).images[0].image
    assert first.size == (64, 64)
    upscaled = first.resize((high.width, high.height), Image.Resampling.LANCZOS)
    second = params.replace(
        width=high.width, height=high.height, steps=params.hr_second_pass_steps or params.steps,
        img2img_fix_steps=True, sampler_name=params.hr_sampler_name or params.sampler_name,
        scheduler=params.hr_scheduler or params.scheduler, prompt=params.hr_prompt or params.prompt,
        negative_prompt=params.hr_negative_prompt or params.negative_prompt, hr_sampler_name="", hr_scheduler="",
        hr_prompt="", hr_negative_prompt="", hr_second_pass_steps=0, hr_scale=2.0, hr_resize_x=0,
    )
    remade = img2img(mini, second, [upscaled]).images[0].image
    assert np.array_equal(np.asarray(made), np.asarray(remade))
    # The second pass redrew the picture (strength > 0): not just the upscaled first image.
    assert np.abs(np.asarray(made, np.int16) - np.asarray(upscaled, np.int16)).max() > 20


def test_hires_second_pass_runs_exactly_its_steps(mini):
    """A1111's second pass takes the "do exactly" branch: hr_second_pass_steps model calls whatever the strength
    (Euler: one call per step; CFG batches cond and uncond in one UNet call)."""
    calls = []
    original = mini.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(tuple(sample.shape[-2:]))
        return original(sample, *args, **kwargs)

    mini.unet.forward = counting
    try:
        txt2img(mini, _params(enable_hr=True, hr_upscaler="Latent", hr_second_pass_steps=3, denoising_strength=0.3))
    finally:
        mini.unet.forward = original
    low, high = 64 // mini.vae_scale_factor, 128 // mini.vae_scale_factor
    assert calls == [(low, low)] * 4 + [(high, high)] * 3


# ----------------------------------------------------------------------------- latent upscalers


@pytest.mark.parametrize(("name", "mode", "antialias"), [
    ("Latent", "bilinear", False),
    ("Latent (nearest-exact)", "nearest-exact", False),
    ("Latent (bicubic antialiased)", "bicubic", True),
])
def test_latent_upscale_starts_the_second_pass_from_interpolated_latents(tiny_models, monkeypatch, name, mode,
                                                                         antialias):
    model = tiny_models("sd1")
    runs = []
    original = pipeline._sample_batch

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        runs.append((kwargs.get("init"), out))
        return out

    monkeypatch.setattr(pipeline, "_sample_batch", recording)
    txt2img(model, _params(enable_hr=True, hr_upscaler=name, hr_scale=1.5, steps=3))
    assert len(runs) == 2 and runs[0][0] is None
    first_latents, (init, _) = runs[0][1], runs[1]
    side = 96 // model.vae_scale_factor
    expected = torch.nn.functional.interpolate(first_latents, size=(side, side), mode=mode, antialias=antialias)
    assert torch.equal(init.latents, expected)


# ----------------------------------------------------------------------------- prompt editing in the hires pass


def _a1111_schedule(prompt: str, base_steps: int, hires_steps: int | None) -> list[tuple[int, str]]:
    """A1111's `get_learned_conditioning_prompt_schedules` for prompts with `[from:to:when]` groups (no nesting,
    no alternation), written out from prompt_parser.py (new scheduling)."""
    groups = list(re.finditer(r"\[([^\[\]:]*):([^\[\]:]*):([^\[\]:]+)\]", prompt))
    int_offset, flt_offset, steps = (0, 0.0, base_steps) if hires_steps is None else (base_steps, 1.0, hires_steps)
    whens = []
    for group in groups:
        text = group.group(3).strip()
        value = (float(text) - flt_offset) * steps if "." in text else float(text) - int_offset
        whens.append(min(steps, int(value)))
    points = sorted({steps, *(when for when in whens if when >= 1)})

    def at(step):
        out, last = [], 0
        for group, when in zip(groups, whens, strict=True):
            out.append(prompt[last : group.start()])
            out.append(group.group(1) if step <= when else group.group(2))
            last = group.end()
        return "".join(out) + prompt[last:]

    return [(point, at(point)) for point in points]


@pytest.mark.parametrize("when", ["1.5", "1.25", "1.9", "0.5", "2.0", "1", "22", "25", "35"])
@pytest.mark.parametrize(("steps", "hires_steps"), [(20, 10), (4, 4), (6, 9)])
def test_hires_prompt_schedule_is_a1111s(when, steps, hires_steps):
    prompt = f"a [cat:dog:{when}] photo"
    assert get_prompt_schedule(prompt, steps, hires_steps=hires_steps) == _a1111_schedule(prompt, steps, hires_steps)
    assert get_prompt_schedule(prompt, steps) == _a1111_schedule(prompt, steps, None)


def test_published_examples():
    """The rule's own examples: [a:b:1.5] switches half way through the hires pass, and never in the first."""
    assert get_prompt_schedule("a [cat:dog:1.5] photo", 20, hires_steps=10) == [(5, "a cat photo"),
                                                                               (10, "a dog photo")]
    assert get_prompt_schedule("a [cat:dog:1.5] photo", 20) == [(20, "a cat photo")]
    assert get_prompt_schedule("a [cat:dog:0.5] photo", 20, hires_steps=10) == [(10, "a dog photo")]
    assert get_prompt_schedule("a [cat:dog:25] photo", 20, hires_steps=10) == [(5, "a cat photo"),
                                                                              (10, "a dog photo")]


def test_prompt_editing_switches_inside_the_hires_pass(tiny_models):
    """`a [cat:dog:1.5]` with 4 + 4 Euler steps: the first pass sees "cat" throughout (when = min(4, 6) = 4), the
    hires pass switches at (1.5 - 1) * 4 = 2, so its calls 0-2 see "cat" and call 3 "dog"."""
    model = tiny_models("sd1")
    seen = []
    original = model.unet.forward

    def recording(sample, timestep, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states[-1].clone())  # rows are [uncond, cond]
        return original(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    params = _params(prompt="a [cat:dog:1.5] photo", negative_prompt="", enable_hr=True, hr_upscaler="Latent",
                     hr_scale=1.5, steps=4)
    model.unet.forward = recording
    try:
        edited = txt2img(model, params).images[0].image
    finally:
        model.unet.forward = original
    with torch.inference_mode():
        cat = encode_prompt(model.text_encoders, "a cat photo").context[0]
        dog = encode_prompt(model.text_encoders, "a dog photo").context[0]
    expected = ["cat"] * 4 + ["cat"] * 3 + ["dog"]
    assert len(seen) == len(expected)
    for call, (context, word) in enumerate(zip(seen, expected, strict=True)):
        right, wrong = (cat, dog) if word == "cat" else (dog, cat)
        assert torch.allclose(context, right, atol=1e-5), f"call {call}"
        assert not torch.allclose(context, wrong, atol=1e-3), f"call {call}"
    plain = txt2img(model, params.replace(prompt="a cat photo")).images[0].image
    assert not np.array_equal(np.asarray(edited), np.asarray(plain))
    # Without hires the edit never fires: the image is the plain prompt's, bit for bit.
    no_hires = params.replace(enable_hr=False)
    assert np.array_equal(np.asarray(txt2img(model, no_hires).images[0].image),
                          np.asarray(txt2img(model, no_hires.replace(prompt="a cat photo")).images[0].image))


# ----------------------------------------------------------------------------- the size rule


@pytest.mark.parametrize(("size", "fields", "expected"), [
    ((64, 64), {"hr_scale": 2.0}, (128, 128, 0, 0)),
    ((64, 48), {"hr_scale": 1.5}, (96, 72, 0, 0)),
    ((64, 48), {"hr_resize_x": 100}, (96, 72, 0, 0)),  # 100 x 75, rounded down to the multiple of 8
    ((64, 48), {"hr_resize_y": 96}, (128, 96, 0, 0)),
    # both given: cover 128 x 96 (64/48 < 128/80 -> width), crop (96 - 80) / 8 = 2 latent rows (A1111's truncate_y)
    ((64, 48), {"hr_resize_x": 128, "hr_resize_y": 80}, (128, 96, 0, 2)),
    ((48, 64), {"hr_resize_x": 64, "hr_resize_y": 64}, (64, 80, 0, 2)),  # cover 64 x 85 -> 80; (85 - 64) // 8 = 2
])
def test_hires_size_rule(size, fields, expected):
    params = GenerationParams(prompt="x", width=size[0], height=size[1], enable_hr=True, **fields)
    got = hires_size(params, 8)
    assert (got.width, got.height, got.crop_x, got.crop_y) == expected


@pytest.mark.parametrize("speed", [{"deepcache_interval": 3}, {"token_merging_ratio": 0.3}])
def test_speed_modes_start_afresh_in_the_hires_pass(mini, speed):
    """DeepCache's cached deep features belong to the first pass's latent size: the second pass must not reuse them
    (it would fail on the shapes or, worse, mix sizes); ToMe is set up per pass too."""
    result = txt2img(mini, _params(enable_hr=True, hr_scale=2.0, **speed))
    assert result.images[0].image.size == (128, 128)
    name, value = next(iter(speed.items()))
    assert f"{FIELDS[name].infotext}: {value}" in result.infotexts[0]


def test_progress_runs_on_through_the_hires_pass(mini):
    """One progress bar for both passes: steps count on from the first pass to the last hires step, and the live
    preview latents take the hires size in the second pass."""
    seen = []
    txt2img(mini, _params(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=3),
            progress=lambda p: seen.append((p.step, p.steps, tuple(p.latents.shape[-2:]))))
    first_steps = len(seen) - 3
    assert [step for step, _, _ in seen] == list(range(1, len(seen) + 1))
    assert {total for _, total, _ in seen} == {len(seen)}
    first_size = seen[0][2]
    assert {size for _, _, size in seen[:first_steps]} == {first_size}
    assert {size for _, _, size in seen[first_steps:]} == {(first_size[0] * 2, first_size[1] * 2)}

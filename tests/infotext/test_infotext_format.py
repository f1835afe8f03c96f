"""Writing infotexts: the exact contract-3 line, A1111's optional keys, and write -> parse round trips."""

from __future__ import annotations

import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from difusi.infotext import (
    format_infotext,
    parse_infotext,
    read_infotext,
    recipe_from_infotext,
    write_png,
)
from difusi.params import GenerationParams

pytest.importorskip("difusi.samplers")


def _params(**changes) -> GenerationParams:
    base = GenerationParams(
        prompt="a cat",
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=512,
    )
    return base.replace(**changes)


def test_contract_three_example_exactly():
    text = format_infotext(
        _params(prompt="{prompt}", negative_prompt="{negative}"), 123, 0, "name", "1a2b3c4d5e", "difusi X.Y"
    )
    assert text == (
        "{prompt}\nNegative prompt: {negative}\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 1a2b3c4d5e, Model: name, RNG: CPU, Version: difusi X.Y"
    )


def test_empty_negative_prompt_omits_the_line_as_a1111():
    text = format_infotext(_params(), 5, 0, "m", "0123456789", "1.0")
    assert text.split("\n") == [
        "a cat",
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512, "
        "Model hash: 0123456789, Model: m, RNG: CPU, Version: difusi 1.0",
    ]


def test_optional_keys_appear_only_when_used():
    text = format_infotext(
        _params(subseed_strength=0.3, clip_skip=2, eta=0.5, s_noise=0.95, width=576, height=448),
        7,
        99,
        "my, model: v2",
        "abcdef0123",
        "0.1",
        extra={"Note": "hi"},
    )
    settings_line = text.split("\n")[-1]
    assert settings_line == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 576x448, "
        'Model hash: abcdef0123, Model: "my, model: v2", Variation seed: 99, Variation seed strength: 0.3, '
        "Clip skip: 2, RNG: CPU, Eta: 0.5, Sigma noise: 0.95, Note: hi, Version: difusi 0.1"
    )


def test_legacy_sampler_name_is_written_split():
    text = format_infotext(_params(sampler_name="DPM++ 2M Karras", scheduler="Automatic"), 1, 0, "m", "h", "1")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in text


def test_automatic_schedule_is_written_resolved():
    from difusi.samplers import get_sampler, get_schedule

    sampler = get_sampler("Euler a")
    text = format_infotext(_params(sampler_name="Euler a", scheduler="Automatic"), 1, 0, "m", "h", "1")
    fields, _ = parse_infotext(text)
    assert fields["Sampler"] == "Euler a"
    assert fields["Schedule type"] == get_schedule(sampler.default_schedule).name != "Automatic"


HARD_PROMPTS = [
    ("a, b: c", ""),
    ('she said "hi", (cat:1.2), [dog:cat:5], \\(x\\)', "lowres, bad: hands"),
    ("line one\nline two\n\nline four", "neg one\nneg: two"),
    ("ünïcödé 猫 🐱🚀, ÆØÅ", "😀"),
    ("", "only negative"),
    ("", ""),
    ("Steps: 1, Sampler: x, Seed: 2, CFG scale: 3", ""),
    ("trailing newline kept\n", "x"),
]


@pytest.mark.parametrize(("prompt", "negative"), HARD_PROMPTS)
def test_round_trip_hard_prompts(prompt, negative):
    params = _params(prompt=prompt, negative_prompt=negative, cfg_scale=6.5, seed=3)
    text = format_infotext(params, 3, 0, "model, with: comma", "0123abcdef", "0.1")
    recipe = recipe_from_infotext(text)
    back = recipe.params()
    assert back.prompt == prompt
    assert back.negative_prompt == negative
    assert (back.steps, back.cfg_scale, back.seed, back.width, back.height) == (20, 6.5, 3, 512, 512)
    assert (back.sampler_name, back.scheduler) == ("DPM++ 2M", "Karras")
    assert (recipe.model_name, recipe.model_hash) == ("model, with: comma", "0123abcdef")
    assert recipe.ignored == []


def _representable(text: str) -> bool:
    """What the A1111 format can carry: no line with outer whitespace, none starting "Negative prompt:",
    and no leading empty line (A1111's parser strips lines; see the infotext module docstring)."""
    lines = text.split("\n")
    return (
        all(line == line.strip() for line in lines)
        and not any(line.startswith("Negative prompt:") for line in lines)
        and (text == "" or lines[0] != "")
    )


prompt_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(_representable)


@settings(max_examples=150, deadline=None)
@given(
    prompt=prompt_text,
    negative=prompt_text,
    model_name=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20),
    cfg=st.floats(0, 100, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
    strength=st.floats(0, 1),
)
def test_round_trip_property(prompt, negative, model_name, cfg, seed, strength):
    params = _params(prompt=prompt, negative_prompt=negative, cfg_scale=cfg, subseed_strength=strength)
    text = format_infotext(params, seed, 17, model_name, "0123abcdef", "0.1")
    recipe = recipe_from_infotext(text)
    back = recipe.params()
    assert (back.prompt, back.negative_prompt) == (prompt, negative)
    assert back.cfg_scale == cfg and back.seed == seed
    assert back.subseed_strength == strength
    if strength > 0:
        assert back.subseed == 17
    assert recipe.model_name == model_name


def test_png_round_trip_with_non_latin_text():
    text = format_infotext(_params(prompt="猫 🐱, a: b\nline"), 9, 0, "m", "0123456789", "0.1")
    buffer = io.BytesIO()
    write_png(Image.new("RGB", (8, 8), "red"), buffer, text)
    buffer.seek(0)
    assert read_infotext(buffer) == text


def test_png_latin1_uses_text_chunk_readable_as_info():
    buffer = io.BytesIO()
    write_png(Image.new("RGB", (8, 8)), buffer, "a cat\nSteps: 1, Sampler: Euler, Seed: 1")
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert image.info["parameters"] == "a cat\nSteps: 1, Sampler: Euler, Seed: 1"


def test_read_infotext_none_when_absent():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    buffer.seek(0)
    assert read_infotext(buffer) is None


def test_sigma_tmax_infinite_is_omitted_and_finite_round_trips():
    assert "Sigma tmax" not in format_infotext(_params(), 1, 0, "m", "h", "1")
    text = format_infotext(_params(s_tmax=10.5, s_tmin=0.25, s_churn=1.0), 1, 0, "m", "h", "1")
    params = recipe_from_infotext(text).params()
    assert (params.s_tmax, params.s_tmin, params.s_churn) == (10.5, 0.25, 1.0)
    assert not math.isinf(params.s_tmax)

"""The evaluation harness, driven by fake generators whose adherence is known exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from difusi.mini import data, evaluate

PROMPTS = evaluate.prompt_set(10)
BY_TEXT = {spec.text: spec for spec in PROMPTS}


def _render(spec: evaluate.PromptSpec, seed: int) -> np.ndarray:
    scene = data.Scene(spec.background, (data.ShapeSpec(spec.shape, spec.colour, spec.size, spec.position),))
    return data.render_scene(scene, 64, data.sample_rng(seed, 0))


def faithful(prompt, negative, seed, count, cfg, sampler, scheduler, steps):
    """Draws exactly what the prompt says (prompts outside the set, like "a shape": whatever `careless` draws)."""
    if prompt not in BY_TEXT:
        return careless(prompt, negative, seed, count, cfg, sampler, scheduler, steps)
    return [_render(BY_TEXT[prompt], seed + i) for i in range(count)]


def careless(prompt, negative, seed, count, cfg, sampler, scheduler, steps):
    """Ignores the prompt: a random scene per seed (the same for every prompt)."""
    images = []
    for i in range(count):
        rng = random.Random(seed + i)
        colour = rng.choice(data.COLOUR_NAMES)
        background = rng.choice([c for c in data.COLOUR_NAMES if c != colour])
        spec = evaluate.PromptSpec(colour, rng.choice(data.SHAPES), rng.choice(data.POSITIONS), background, "big")
        images.append(_render(spec, seed + i))
    return images


def test_prompt_set_is_balanced_and_never_asks_for_invisible_shapes():
    specs = evaluate.prompt_set(24)
    assert {s.colour for s in specs} == set(data.COLOUR_NAMES)
    assert {s.shape for s in specs} == set(data.SHAPES)
    assert {s.position for s in specs} == set(data.POSITIONS)
    assert all(s.colour != s.background for s in specs)
    assert len({s.text for s in specs}) == 24


def test_faithful_generator_scores_100_percent_and_careless_one_far_less():
    good = evaluate.run_evaluation(faithful, PROMPTS, 2, [7.0], ["DPM++ 2M", "Euler"], 4, progress=lambda _: None)
    assert good["cfg"]["7"]["overall"] == 1.0 and good["cfg"]["7"]["all_four"] == 1.0
    assert good["samplers"]["Euler"]["overall"] == 1.0
    bad = evaluate.run_evaluation(careless, PROMPTS, 2, [7.0], ["DPM++ 2M"], 4, progress=lambda _: None)
    assert bad["cfg"]["7"]["overall"] < 0.6


def test_misses_name_what_was_asked_and_what_was_seen():
    swap = {"left": "top", "top": "left"}

    def confuses_left_and_top(prompt, negative, seed, count, *args):
        if prompt not in BY_TEXT:  # the negative-prompt part's "a shape"
            return careless(prompt, negative, seed, count, *args)
        spec = BY_TEXT[prompt]
        moved = evaluate.PromptSpec(spec.colour, spec.shape, swap.get(spec.position, spec.position), spec.background, spec.size)
        return [_render(moved, seed + i) for i in range(count)]

    result = evaluate.run_evaluation(confuses_left_and_top, PROMPTS, 2, [7.0], [], 2, progress=lambda _: None)
    asked = [spec.position for spec in PROMPTS]
    expected = {"position: left -> top": 2 * asked.count("left"), "position: top -> left": 2 * asked.count("top")}
    assert result["cfg"]["7"]["common_misses"] == expected
    assert result["cfg"]["7"]["position"] == pytest.approx(1 - sum(expected.values()) / (2 * len(PROMPTS)))
    results = {**result, "model": "m", "prompts": 10, "seeds": 2, "native_size": 64, "threads": 1, "seconds_per_image": 0.5}
    assert "position: left -> top (4)" in evaluate.report_markdown(results)


def test_negative_prompt_rate_counts_red_shapes():
    def red_unless_told(prompt, negative, seed, count, *args):
        colour = "blue" if negative == "red" else "red"
        return [_render(evaluate.PromptSpec(colour, "circle", "center", "white", "big"), seed + i) for i in range(count)]

    evaluator = evaluate.Evaluator(red_unless_told, PROMPTS[:1], 1)
    assert evaluator.colour_rate("a shape", "", "red", 10) == 1.0
    assert evaluator.colour_rate("a shape", "red", "red", 10) == 0.0


def test_report_and_grid_are_written(tmp_path):
    results = evaluate.run_evaluation(faithful, PROMPTS[:4], 4, [1.0, 7.0], ["DPM++ 2M"], 2, progress=lambda _: None)
    examples = results.pop("_examples")
    evaluate.write_grid(examples, PROMPTS[:4], tmp_path / "grid.png")
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * (2 * 4 * 64 + 8), 2 * 4 * 64)  # two blocks of 4x4 tiles, 2x nearest upscale
    results.update(model="m", prompts=4, seeds=4, native_size=64, threads=1, seconds_per_image=0.5)
    text = evaluate.report_markdown(results)
    assert "| CFG 7 | 100.0 | 100.0 |" in text and "grid.png" in text
    assert "1 of 1 samplers within 5 points of the best" in text


def test_sampler_spread_names_best_worst_and_who_is_within_five_points():
    rows = {"A": {"overall": 0.98}, "B": {"overall": 0.93}, "C": {"overall": 0.92}, "D": {"overall": 0.65}}
    line = evaluate._spread(rows)
    assert line.startswith("Best A 98.0 %, lowest D 65.0 % (33.0 points)")
    assert "2 of 4 samplers within 5 points" in line  # A itself and B (exactly 5.0); not C (6.0) or D



def test_bad_counts_are_rejected():
    with pytest.raises(Exception) as error:
        evaluate.main(["--prompts", "0"])
    assert getattr(error.value, "field", None) == "prompts"

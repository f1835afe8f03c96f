"""End to end: the shipped difusi-mini, through difusi's own pipeline, follows colour words, more so with CFG."""

from __future__ import annotations

import pytest

from difusi.mini import classifier, evaluate
from difusi.models.loader import default_model_path, load_model

PROMPTS = evaluate.prompt_set(12)
SEEDS = 2


@pytest.fixture(scope="module")
def generate():
    return evaluate.pipeline_generator(load_model(default_model_path()))


def _colour_hits(generate, cfg: float) -> float:
    """Fraction of the stated colours (shape and background) that the images show."""
    hits = total = 0
    for spec in PROMPTS:
        for image in generate(spec.text, "", 1000, SEEDS, cfg, "DPM++ 2M", "Karras", 20):
            seen = classifier.observe(image, None)
            hits += (seen.colour == spec.colour) + (seen.background == spec.background)
            total += 2
    return hits / total


def test_colours_follow_the_prompt_and_guidance_strengthens_them(generate):
    at_cfg7 = _colour_hits(generate, 7.0)
    at_cfg1 = _colour_hits(generate, 1.0)
    assert at_cfg7 >= 0.9, at_cfg7
    assert at_cfg1 < at_cfg7, (at_cfg1, at_cfg7)


@pytest.mark.slow
def test_negative_prompt_removes_red(generate):
    evaluator = evaluate.Evaluator(generate, [], 1)
    base = evaluator.colour_rate("a shape", "", "red", 16)
    negated = evaluator.colour_rate("a shape", "red", "red", 16)
    assert negated < base or base == 0.0
    assert negated <= 1 / 16

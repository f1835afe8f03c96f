"""Prompt syntax corners read as A1111 reads them (issue 19, defect 9), and said out loud.

A1111's schedule grammar (modules/prompt_parser.py) has no rule for `[from:to:when]` whose `when` is not a number,
so those brackets are literal text there; when the whole prompt does not parse (`|` outside `[a|b]`, a trailing
backslash) `get_learned_conditioning_prompt_schedules` returns `[[steps, prompt]]`. difusi does the same and
reports it in `prompt_warnings` / `GenerationResult.warnings`. Extra-network tags (`<lora:name:w>`) are removed
from the positive prompt before CLIP sees it (A1111's `extra_networks.parse_prompts`), with a warning.
What stays stricter than A1111: a negative `when` and a weight that is not a number (tests/hardening/matrix.py).
"""

from __future__ import annotations

import pytest

from difusi.errors import ParamError
from difusi.params import GenerationParams
from difusi.prompts.parser import get_prompt_schedule, parse_prompt_attention, prompt_warnings


@pytest.mark.parametrize("prompt", ["[red:blue:soon]", "[a:b:c]", "[a:b:]", "[a:b:1.2.3]", "x [a:b:[c]] y",
                                    "[a:b: 1 2]", "([cat:dog:soon]) house"])
def test_when_that_is_not_a_number_is_literal_text_with_a_warning(prompt):
    assert get_prompt_schedule(prompt, 10) == [(10, prompt)]
    warnings = prompt_warnings(prompt, 10)
    assert len(warnings) == 1
    assert warnings[0].startswith("prompt: '[") and "is not prompt editing" in warnings[0] and "A1111" in warnings[0]


def test_the_literal_text_gets_a1111_emphasis():
    # A1111 then reads the square brackets as emphasis: "red:blue:soon" at 1/1.1.
    text = get_prompt_schedule("a [red:blue:soon] ball", 20)[0][1]
    assert parse_prompt_attention(text) == [("a ", 1.0), ("red:blue:soon", pytest.approx(1 / 1.1)), (" ball", 1.0)]


def test_unparsable_prompt_is_used_as_written_with_a_warning():
    assert get_prompt_schedule("cat | dog [a:b:3]", 10) == [(10, "cat | dog [a:b:3]")]
    (warning,) = prompt_warnings("cat | dog [a:b:3]", 10, "negative_prompt")
    assert warning.startswith("negative_prompt: the prompt-editing syntax does not parse (a '|' outside")


@pytest.mark.parametrize("prompt", ["a cat", "a [cat:dog:5] [x|y] (z:1.2) [w]", "", "a [unbalanced"])
def test_ordinary_prompts_have_no_warnings(prompt):
    assert prompt_warnings(prompt, 10) == []


@pytest.mark.parametrize("prompt", ["[a:b:-1]", "[a:-2]"])
def test_negative_when_stays_a_param_error(prompt):
    with pytest.raises(ParamError, match="-"):
        prompt_warnings(prompt, 10)


def test_validation_accepts_the_literal_prompt():
    GenerationParams(prompt="[red:blue:soon]", steps=4).validated(native_size=64)


# -- through txt2img (tiny random model; one step) -------------------------------------------------------------------
def _run(model, **changes):
    from difusi.pipeline import txt2img

    base = dict(prompt="a red circle", seed=3, steps=1, width=64, height=64, sampler_name="Euler")
    return txt2img(model, GenerationParams(**{**base, **changes}))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from difusi.models import load_model
    from difusi.models.synthetic import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("fallback") / "tiny.safetensors"
    write_tiny_checkpoint(path, "sd1", seed=0)
    return load_model(path)


def test_txt2img_reports_warnings_and_keeps_the_prompt_in_the_infotext(sd1):
    result = _run(sd1, prompt="[red:blue:soon] <hypernet:detail:0.8>", negative_prompt="ugly | bad")
    assert result.images[0].infotext.startswith("[red:blue:soon] <hypernet:detail:0.8>\nNegative prompt: ugly | bad\n")
    assert len(result.warnings) == 3
    assert result.warnings[1].startswith("prompt: '[red:blue:soon]' is not prompt editing")
    assert result.warnings[2].startswith("negative_prompt: the prompt-editing syntax does not parse")
    assert result.warnings[0].startswith("prompt: removed <hypernet:detail:0.8>: hypernet networks are not supported")
    assert _run(sd1).warnings == []


def test_unsupported_network_tag_does_not_reach_the_text_encoder(sd1):
    import numpy as np

    tagged = _run(sd1, prompt="a red circle<hypernet:detail:0.8>").images[0].image
    plain = _run(sd1, prompt="a red circle").images[0].image
    assert np.array_equal(np.asarray(tagged), np.asarray(plain))

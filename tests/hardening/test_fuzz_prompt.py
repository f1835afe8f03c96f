"""Property-based fuzzing of the prompt parser (hypothesis), beyond tests/prompts/test_parser.py.

1. Prompts built from the grammar (emphasis, weights, editing, alternation, escapes, BREAK), nested deeply and
   mixed with arbitrary Unicode: the whole chain schedule -> emphasis -> CLIP tokens -> 77-token chunks raises
   nothing but ParamError on "prompt".
2. Round trips: nested emphasis over plain words gives exactly the product of the group factors to every
   character; escaped arbitrary text comes back unchanged with weight 1.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difusi.errors import ParamError
from difusi.params import MAX_PROMPT_CHARS
from difusi.prompts.parser import get_prompt_schedule, parse_prompt_attention
from difusi.prompts.tokens import load_clip_tokenizer, tokenize_prompt

EXAMPLES = int(os.environ.get("DIFUSI_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)
NUMBER = st.sampled_from(["0", "1", "2", "3", "0.5", "0.25", "1.0", ".5", "-1", "1e1", "soon", "", " 2 ", "99"])
SPECIAL = st.sampled_from(list("()[]:|\\,\n ") + ["BREAK", " BREAK ", "\\(", "\\)", "\\[", "\\]", "\\\\"])
ANY_TEXT = st.text(max_size=8)  # any Unicode, surrogates excluded by hypothesis' default alphabet


def _grammar(leaf):
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            inner.map(lambda x: f"({x})"),
            inner.map(lambda x: f"[{x}]"),
            st.tuples(inner, NUMBER).map(lambda p: f"({p[0]}:{p[1]})"),
            st.tuples(inner, inner, NUMBER).map(lambda p: f"[{p[0]}:{p[1]}:{p[2]}]"),
            st.tuples(inner, NUMBER).map(lambda p: f"[{p[0]}::{p[1]}]"),
            st.lists(inner, min_size=2, max_size=3).map(lambda parts: "[" + "|".join(parts) + "]"),
            st.lists(inner, min_size=2, max_size=3).map(" ".join),
        ),
        max_leaves=12,
    ).filter(lambda text: len(text) <= MAX_PROMPT_CHARS)  # longer prompts are refused before parsing


PROMPTS = st.one_of(
    _grammar(st.one_of(WORD, SPECIAL, ANY_TEXT)),
    st.lists(st.one_of(SPECIAL, WORD, ANY_TEXT), max_size=40).map("".join),
    st.integers(min_value=1, max_value=200).map(lambda depth: "(" * depth + "x" + ")" * depth),
    st.integers(min_value=1, max_value=400).map(lambda depth: "[a:" * depth + "b" + ":1]" * depth),
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@FUZZ
@given(prompt=PROMPTS, steps=st.integers(min_value=1, max_value=40))
def test_the_whole_chain_raises_only_param_errors(tokenizer, prompt, steps):
    try:
        schedule = get_prompt_schedule(prompt, steps)
        chunks = [tokenize_prompt(text, tokenizer, 49407) for _, text in schedule]
    except ParamError as error:
        assert error.field == "prompt" and str(error).startswith("prompt: ")
        return
    assert [end for end, _ in schedule] == sorted({end for end, _ in schedule}) and schedule[-1][0] == steps
    for per_text in chunks:
        assert per_text  # at least one chunk, even for an empty text
        for chunk in per_text:
            assert len(chunk.ids) == len(chunk.weights) == 77


# -- round trips ---------------------------------------------------------------------------------------------


def _weighted(leaf_depth: int = 0):
    """(prompt text, [(letter, expected weight)]) for nested emphasis over plain words."""
    leaf = WORD.map(lambda word: (word, [(c, 1.0) for c in word]))

    def scaled(pair, factor, opener, closer):
        text, letters = pair
        return f"{opener}{text}{closer}", [(c, w * factor) for c, w in letters]

    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            inner.map(lambda p: scaled(p, 1.1, "(", ")")),
            inner.map(lambda p: scaled(p, 1 / 1.1, "[", "]")),
            st.tuples(inner, st.sampled_from(["0.5", "1.3", "2", "0.25", "1.05"])).map(
                lambda t: scaled(t[0], float(t[1]), "(", f":{t[1]})")),
            st.lists(inner, min_size=2, max_size=3).map(
                lambda parts: (" ".join(p[0] for p in parts), [x for p in parts for x in p[1]])),
        ),
        max_leaves=12,
    )


@FUZZ
@given(_weighted())
def test_nested_emphasis_weights_are_the_product_of_their_groups(pair):
    text, expected = pair
    letters = [(c, weight) for fragment, weight in parse_prompt_attention(text) for c in fragment if c != " "]
    assert [c for c, _ in letters] == [c for c, _ in expected]
    assert [w for _, w in letters] == pytest.approx([w for _, w in expected], rel=1e-12)
    assert get_prompt_schedule(text, 10) == [(10, text)]  # emphasis passes the editing parser unchanged


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "()[]\\" else c for c in text)


@FUZZ
@given(st.text(max_size=60).filter(lambda t: "BREAK" not in t))
def test_escaped_text_comes_back_unchanged(text):
    escaped = _escape(text)
    fragments = parse_prompt_attention(escaped)
    assert "".join(fragment for fragment, _ in fragments) == text
    assert {weight for _, weight in fragments} == {1.0}

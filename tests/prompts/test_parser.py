"""A1111 prompt syntax. Expected values are facts of the format: the examples in A1111's
``modules/prompt_parser.py`` doctests and its wiki page "Features", or arithmetic written out
from the documented rules (x1.1 per round bracket, /1.1 per square bracket, products nest)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difusi.errors import ParamError
from difusi.prompts.parser import get_prompt_schedule, parse_prompt_attention

R = 1.1  # round-bracket multiplier
S = 1 / 1.1  # square-bracket multiplier

ATTENTION_CASES = [
    # A1111 doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # wiki "Features" / Attention-emphasis
    ("a (word)", [("a ", 1.0), ("word", R)]),
    ("a ((word))", [("a ", 1.0), ("word", R * R)]),
    ("a [word]", [("a ", 1.0), ("word", S)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    # nesting, mixed brackets, spaces around the weight, negative weight
    ("([word])", [("word", S * R)]),
    ("[(word:2)]", [("word", 2 * S)]),
    ("((a) b)", [("a", R * R), (" b", R)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("(word:-1)", [("word", -1.0)]),
    # escapes: \\ is one backslash; a lone backslash before other text is dropped
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    # unbalanced and mismatched brackets; ':' outside a '(x:w)' is text
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("(a]b)", [("a]b", R)]),
    ("[a)b]", [("a)b", S)]),
    ("[[a", [("a", S * S)]),
    ("((a", [("a", R * R)]),
    ("a : b", [("a : b", 1.0)]),
    ("(a:b)", [("a:b", R)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),
    # BREAK: uppercase whole word, whitespace around it eaten
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -1.0 * R), ("b", R)]),  # enclosing groups multiply it too
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES, ids=[c[0] or "<empty>" for c in ATTENTION_CASES])
def test_parse_prompt_attention(text, expected):
    result = parse_prompt_attention(text)
    assert [fragment for fragment, _ in result] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_documented_weights_are_bit_exact():
    # A1111 multiplies group by group, innermost first; its doctest shows the exact float results.
    weights = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert weights["house"] == 1.5730000000000004
    assert weights["sky"] == 1.4641000000000006


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:" + "9" * 400 + ")"])
def test_bad_emphasis_weight_is_a_param_error(text):
    with pytest.raises(ParamError) as error:
        parse_prompt_attention(text)
    assert error.value.field == "prompt"


SCHEDULE_CASES_10_STEPS = [
    # A1111 doctests (steps=10)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # [from::when] removes, [to:when] adds
    ("a [b::3] c", [(3, "a b c"), (10, "a  c")]),
    # `when` with a decimal point is a fraction of steps (truncated); without, a step number;
    # both capped at steps
    ("[a:b:0.25]", [(2, "a"), (10, "b")]),
    ("[a:b:1.0]", [(10, "a")]),
    ("[a:b:1.5]", [(10, "a")]),
    ("[a:b:25]", [(10, "a")]),
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:1e1]", [(10, "a")]),
    ("[a:b: 4 ]", [(4, "a"), (10, "b")]),
    # editing inside emphasis, emphasis inside editing
    ("([a:b:5]:1.2)", [(5, "(a:1.2)"), (10, "(b:1.2)")]),
    ("[(a:1.2):[b]:5]", [(5, "(a:1.2)"), (10, "[b]")]),
    # a stray '|' (outside any alternation) or a dangling backslash: the prompt is used as written
    ("a | b [c:d:2]", [(10, "a | b [c:d:2]")]),
    ("[c:d:2] \\", [(10, "[c:d:2] \\")]),
    # '[a:b]' with a non-number is ordinary text; escaped brackets are not syntax
    ("[a:b]", [(10, "[a:b]")]),
    ("\\[a:b:2\\]", [(10, "\\[a:b:2\\]")]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULE_CASES_10_STEPS, ids=[c[0] for c in SCHEDULE_CASES_10_STEPS])
def test_schedule_10_steps(prompt, expected):
    assert get_prompt_schedule(prompt, 10) == expected


def test_documented_schedule_100_steps():
    # The example at the top of A1111's prompt_parser.py.
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert get_prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_wiki_prompt_editing_example():
    # wiki: "a [fantasy:cyberpunk:16] landscape" draws fantasy, then switches after step 16.
    assert get_prompt_schedule("a [fantasy:cyberpunk:16] landscape", 100) == [
        (16, "a fantasy landscape"),
        (100, "a cyberpunk landscape"),
    ]


def test_wiki_alternation_example():
    # wiki: "[cow|horse] in a field": step 1 cow, step 2 horse, step 3 cow, ...
    assert get_prompt_schedule("[cow|horse] in a field", 4) == [
        (1, "cow in a field"),
        (2, "horse in a field"),
        (3, "cow in a field"),
        (4, "horse in a field"),
    ]


def test_alternation_nested_in_editing():
    assert get_prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]


# A `when` that is not a number is literal text, as in A1111 (tests/prompts/test_a1111_fallback.py); a negative one
# stays an error (A1111 would silently use the `to` text from the first step).
@pytest.mark.parametrize("prompt", ["[a:b:-1]", "x [a:-0.5] y"])
def test_bad_when_is_a_param_error(prompt):
    with pytest.raises(ParamError) as error:
        get_prompt_schedule(prompt, 10)
    assert error.value.field == "prompt"
    assert "when" in error.value.message


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_is_a_param_error(steps):
    with pytest.raises(ParamError) as error:
        get_prompt_schedule("a [b:c:2]", steps)
    assert error.value.field == "steps"


def test_deep_nesting_does_not_recurse_forever():
    prompt = "(" * 5000 + "x [a:b:2]"
    assert get_prompt_schedule(prompt, 4) == [(4, prompt)]
    assert parse_prompt_attention("(" * 72 + "x")[0][0] == "x"  # 1.1**72 = 957: still a usable weight
    with pytest.raises(ParamError, match=r"emphasis weight of 'x' is .* after nesting; at most 1000") as error:
        parse_prompt_attention("(" * 5000 + "x")  # 1.1**5000 would overflow the embedding to NaN
    assert error.value.field == "prompt"


PROMPT_CHARS = st.sampled_from(list("ab ,()[]:|\\\n") + ["0.5", "2", "-1", "BREAK", "1e3", "é"])
PROMPTS = st.one_of(st.text(max_size=40), st.lists(PROMPT_CHARS, max_size=25).map("".join))


@settings(max_examples=400, deadline=None)
@given(prompt=PROMPTS, steps=st.integers(min_value=1, max_value=30))
def test_no_prompt_crashes_the_parsers(prompt, steps):
    try:
        schedule = get_prompt_schedule(prompt, steps)
    except ParamError as error:
        assert error.field == "prompt"
        return
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    for _, text in schedule:
        try:
            fragments = parse_prompt_attention(text)
        except ParamError as error:
            assert error.field == "prompt"
            continue
        assert fragments and all(isinstance(f, str) and isinstance(w, float) for f, w in fragments)


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(alphabet=st.characters(blacklist_characters="()[]:|\\"), max_size=60))
def test_plain_text_passes_through(prompt):
    assert get_prompt_schedule(prompt, 7) == [(7, prompt)]
    if "BREAK" not in prompt:
        assert parse_prompt_attention(prompt) == [(prompt, 1.0)]

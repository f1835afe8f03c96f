"""AUTOMATIC1111 prompt syntax: emphasis weights and prompt-editing schedules.

Two independent passes, exactly as A1111 runs them (``modules/prompt_parser.py`` of
stable-diffusion-webui, documented on its wiki page "Features"):

1. :func:`get_prompt_schedule` resolves *prompt editing* ``[from:to:when]`` and *alternation*
   ``[a|b]`` into one plain text per range of sampling steps. Emphasis brackets pass through
   unchanged.
2. :func:`parse_prompt_attention` splits one of those texts into ``(fragment, weight)`` pairs:
   ``(x)`` x1.1, ``[x]`` /1.1, ``(x:1.3)`` x1.3, nesting multiplies, ``\\( \\) \\[ \\] \\\\`` are
   literal characters, and ``BREAK`` becomes the marker ``("BREAK", -1.0)``.

The schedule grammar (A1111 writes it for lark; this module parses it by recursive descent)::

    start       := (prompt | stray)*            stray: a lone '(' '[' ')' ']' ':' at the top level
    prompt      := (emphasized | scheduled | alternate | plain)*
    emphasized  := '(' prompt ')' | '(' prompt ':' prompt ')' | '[' prompt ']'
    scheduled   := '[' [prompt ':'] prompt ':' WS? NUMBER WS? ']'
    alternate   := '[' prompt ('|' prompt?)+ ']'
    plain       := ( any char except \\ [ ] ( ) : |  |  '\\' any char except newline )+
    NUMBER      := [+-]? (digits | digits '.' digits? | '.' digits) ([eE] [+-]? digits)?

Consequences of the grammar that users meet, all as in A1111:

* Inside a bracket group every bracket must balance; a group that does not parse is plain text
  (its opening bracket becomes a stray) — ``a [unbalanced`` stays as written.
* A ``|`` outside any alternation, or a backslash at the end of the prompt or before a newline,
  makes the whole prompt unparsable: it is then used unchanged for every step.
* ``when`` with a decimal point is a fraction of ``steps`` (``0.25`` of 20 steps = step 5,
  ``1.0`` = the last step); without one it is an absolute step number (``5``). The step is
  truncated to an integer and capped at ``steps`` (A1111's default "new" scheduling, v1.6+).

* A group ``[from:to:when]`` (or ``[to:when]``) whose ``when`` is not a number (``[red:blue:soon]``)
  is not prompt editing: A1111's grammar does not match it, so its brackets and colons are literal
  text. difusi does the same and says so: :func:`prompt_warnings` returns one line per such group,
  and one when the whole prompt does not parse (the fallback above). Front ends show these
  warnings with the result (``GenerationResult.warnings``, the HTTP ``info``, the CLI's stderr).

Where difusi is stricter than A1111 (which silently uses the ``to`` text from the first step, or
crashes): a negative ``when`` (``[a:b:-1]``) and an emphasis weight that is not a finite number
(``(x:1.2.3)``) raise :class:`~difusi.errors.ParamError` with field ``"prompt"``.

A1111's *extra networks* (``<lora:name:0.8>``, any ``<word:args>``) are removed from the positive prompt
before these passes, by :func:`difusi.networks.tags.parse_network_tags` (``modules/extra_networks.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from difusi.errors import ParamError

__all__ = ["BREAK", "parse_prompt_attention", "get_prompt_schedule", "prompt_warnings"]

BREAK = "BREAK"
"""Text of the chunk-break marker; it comes with weight -1.0 (see :func:`parse_prompt_attention`)."""

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_WEIGHT = 1000.0
"""Largest emphasis weight (after nesting) accepted. Beyond it the weighted text embedding overflows float32 in
the emphasis normalisation and the image is NaN; ~73 nested '(' already reach it. A1111 has no limit."""

# --------------------------------------------------------------------------------------------
# Emphasis: (x) [x] (x:w) and escapes.
# --------------------------------------------------------------------------------------------

# One lexical unit of the emphasis syntax. Alternatives are tried in this order at each position.
_EMPHASIS_UNIT = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\]?)                  # \( \) \[ \] \\ ; a lone backslash is dropped
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)             # ':1.3)' closes a round group with that weight
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(fragment, weight)`` pairs using A1111's emphasis rules.

    Each ``(`` multiplies everything up to its matching ``)`` by 1.1 (or by ``w`` when closed as
    ``:w)``), each ``[`` ... ``]`` divides by 1.1, and nested groups multiply. Brackets still open
    at the end apply to the rest of the prompt; a closing bracket with nothing open is literal
    text. ``BREAK`` (uppercase, a whole word) becomes ``("BREAK", -1.0)``; like every fragment it
    is multiplied by enclosing groups, and the tokenizer only treats exactly -1.0 as a break (as
    A1111 does). Neighbours with equal weights are merged. An empty prompt gives ``[("", 1.0)]``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    Raises:
        ParamError: field ``"prompt"``, when a ``(x:w)`` weight is not a finite number, or a weight after
        nesting is over ``MAX_WEIGHT`` in size.
    """
    fragments: list[list] = []  # [text, weight] pairs; weights are multiplied in place
    open_round: list[int] = []  # index into `fragments` where each open group starts
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for unit in _EMPHASIS_UNIT.finditer(text):
        if unit.group("escaped") is not None:
            fragments.append([unit.group("escaped"), 1.0])
        elif unit.group("open") == "(":
            open_round.append(len(fragments))
        elif unit.group("open") == "[":
            open_square.append(len(fragments))
        elif unit.group("weight") is not None and open_round:
            multiply_from(open_round.pop(), _emphasis_weight(unit.group("weight"), text))
        elif unit.group("close") == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif unit.group("close") == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(fragments, unit.group(0))

    # Unclosed groups extend to the end: all round ones first, then square (A1111's order,
    # which matters for the last bits of the floating-point products).
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    for fragment, weight in fragments:
        if abs(weight) > MAX_WEIGHT:
            raise ParamError(
                "prompt", f"emphasis weight of {fragment[:40]!r} is {weight:.3g} after nesting; at most {MAX_WEIGHT:g} "
                "is allowed (too many nested '(' or a huge ':weight')",
            )
    return _merge_equal_neighbours(fragments or [["", 1.0]])


def _emphasis_weight(number: str, prompt: str) -> float:
    try:
        weight = float(number)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ParamError(
            "prompt", f"emphasis weight {number!r} is not a number (write e.g. '(word:1.3)'); in {prompt!r}"
        )
    return weight


def _append_text(fragments: list[list], text: str) -> None:
    """Append plain text, turning each ``BREAK`` word (and the whitespace around it) into a marker."""
    for i, part in enumerate(_BREAK_SPLIT.split(text)):
        if i > 0:
            fragments.append([BREAK, -1.0])
        fragments.append([part, 1.0])


def _merge_equal_neighbours(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = [list(fragments[0])]
    for text, weight in fragments[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, float(weight)) for text, weight in merged]


# --------------------------------------------------------------------------------------------
# Schedules: [from:to:when] and [a|b].
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``: ``before`` up to and including step ``when``, then ``after``."""

    before: tuple
    after: tuple
    when: int


@dataclass(frozen=True)
class _Alternation:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` at each step."""

    options: tuple


# A parsed prompt is a tuple of nodes: str | _Edit | _Alternation.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*")
_MAX_DEPTH = 100  # deeper nesting is treated like any unparsable prompt: used as written


class _NotAGroup(Exception):
    """The bracket group starting here does not parse; its opening bracket is literal text."""


class _Unparsable(Exception):
    """The prompt as a whole does not parse; A1111 then uses it unchanged for every step. The message says why."""


class _ScheduleParser:
    """Recursive-descent parser for the grammar in the module docstring."""

    def __init__(self, text: str, steps: int, step_offset: int = 0, fraction_offset: float = 0.0):
        self.text = text
        self.steps = steps
        self.step_offset, self.fraction_offset = step_offset, fraction_offset
        """The hires pass's offsets: a step number counts on from the first pass's steps, a fraction from 1.0."""
        self.pos = 0
        self.warnings: list[str] = []
        """Groups that look like prompt editing but are literal text (A1111's reading), for `prompt_warnings`."""

    def parse(self) -> tuple:
        nodes: list = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in "([":
                start = self.pos
                try:
                    nodes.extend(self._group(depth=1))
                except _NotAGroup:
                    self.pos = start + 1
                    nodes.append(char)
            elif char in ")]:":
                nodes.append(char)
                self.pos += 1
            elif char == "|":
                raise _Unparsable("a '|' outside an alternation [a|b]")
            else:
                nodes.append(self._plain())
        return tuple(nodes)

    def _plain(self) -> str:
        match = _PLAIN.match(self.text, self.pos)
        if match is None:  # a backslash with nothing escapable after it
            raise _Unparsable("a backslash at the end of the prompt or before a line break")
        self.pos = match.end()
        return match.group(0)

    def _sequence(self, depth: int) -> tuple:
        """Nodes up to the next separator or closing bracket of the enclosing group."""
        nodes: list = []
        while self.pos < len(self.text) and self.text[self.pos] not in ")]:|":
            if self.text[self.pos] in "([":
                nodes.extend(self._group(depth + 1))
            else:
                nodes.append(self._plain())
        return tuple(nodes)

    def _group(self, depth: int) -> list:
        if depth > _MAX_DEPTH:
            raise _Unparsable(f"brackets nested more than {_MAX_DEPTH} deep")
        start = self.pos
        opener = self.text[self.pos]
        self.pos += 1
        parts = [self._sequence(depth)]
        separators = []
        while True:
            if self.pos >= len(self.text):
                raise _NotAGroup
            char = self.text[self.pos]
            self.pos += 1
            if char in ")]":
                break
            separators.append(char)
            parts.append(self._sequence(depth))
        if opener == "(":
            return self._round_group(char, parts, separators)
        return self._square_group(char, parts, separators, self.text[start : self.pos])

    @staticmethod
    def _round_group(closer: str, parts: list, separators: list) -> list:
        if closer != ")" or separators not in ([], [":"]):
            raise _NotAGroup
        inner = list(parts[0]) if not separators else [*parts[0], ":", *parts[1]]
        return ["(", *inner, ")"]

    def _square_group(self, closer: str, parts: list, separators: list, source: str) -> list:
        if closer != "]":
            raise _NotAGroup
        if not separators:
            return ["[", *parts[0], "]"]
        if set(separators) == {"|"}:
            return [_Alternation(tuple(parts))]
        if set(separators) != {":"} or len(separators) > 2:
            raise _NotAGroup
        when = self._when(parts[-1], source)
        before = parts[0] if len(parts) == 3 else ()
        return [_Edit(before=before, after=parts[-2], when=when)]

    def _when(self, nodes: tuple, source: str) -> int:
        """The step after which an edit switches, by A1111's rules (see module docstring)."""
        is_text = all(isinstance(node, str) for node in nodes)
        match = _WHEN.fullmatch("".join(nodes)) if is_text else None
        if match is None:
            # Not a number: A1111's grammar has no rule for this group, so it is ordinary text there ('[a:b]',
            # '[red:blue:soon]'). Same here, but said out loud: the user most likely meant prompt editing.
            written = "".join(node for node in nodes if isinstance(node, str)) if is_text else "a bracket group"
            self.warnings.append(
                f"{source!r} is not prompt editing ({written.strip()!r} is not a step number or fraction "
                "such as 10 or 0.5); it is used as literal text, as A1111 does"
            )
            raise _NotAGroup
        number = match.group(1)
        value = float(number)
        if value < 0:
            raise ParamError("prompt", f"{_WHEN_HELP}; got negative {number!r} in {source!r}")
        if "." in number:
            value = (value - self.fraction_offset) * self.steps
        else:
            value -= self.step_offset
        return self.steps if value >= self.steps else int(value)


_WHEN_HELP = (
    "prompt editing [from:to:when] needs `when` >= 0: a fraction of the steps with a decimal point "
    "(e.g. 0.5) or a step number (e.g. 10)"
)


def get_prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """Resolve prompt editing and alternation into ``[(end_step, text), ...]``.

    Each text applies up to and including its ``end_step``; the list is sorted and its last
    ``end_step`` is ``steps``. A prompt without editing gives ``[(steps, prompt)]``.
    ``[from:to:when]`` adds the switch step ``when`` (if >= 1); ``[to:when]`` and ``[from::when]``
    are the forms with an empty ``from`` / ``to``; alternation ``[a|b]`` adds every step
    1..steps. Consecutive equal texts are not merged (A1111 doesn't either). Consumers pick the
    entry for a 0-based sampler step ``i`` as the first with ``i <= end_step``
    (:func:`difusi.prompts.conditioning.conditioning_at`), as A1111's ``reconstruct_cond_batch``.

    >>> get_prompt_schedule("a [fantasy:cyberpunk:0.25] landscape", 20)
    [(5, 'a fantasy landscape'), (20, 'a cyberpunk landscape')]

    With ``hires_steps`` the schedule is the hires-fix pass's (A1111's rule since 1.6, `use_old_scheduling` off):
    ``hires_steps`` long, a fraction counted from 1.0 (``[a:b:1.3]`` switches 30 % into the hires pass) and a step
    number from the end of the first pass's ``steps`` (``[a:b:25]`` after 20 steps: 5 steps into it); edits that
    ended in the first pass show their ``after`` text throughout.

    >>> get_prompt_schedule("a [cat:dog:1.5] photo", 20, hires_steps=10)
    [(5, 'a cat photo'), (10, 'a dog photo')]

    Raises:
        ParamError: field ``"steps"`` when ``steps`` < 1; field ``"prompt"`` for a negative ``when``.
        A ``when`` that is not a number is literal text (see :func:`prompt_warnings`).
    """
    return _schedule(prompt, steps, hires_steps)[0]


def prompt_warnings(prompt: str, steps: int, field: str = "prompt") -> list[str]:
    """What :func:`get_prompt_schedule` read differently from how the prompt looks, one line each, prefixed with
    ``field``: bracket groups that look like prompt editing but are literal text (``[red:blue:soon]``), and a
    prompt whose editing syntax does not parse at all (then it is used as written for every step). A1111 does
    the same silently; difusi reports it so a typo in ``when`` is not a mystery. Empty for ordinary prompts.

    Raises the same ParamError as :func:`get_prompt_schedule`.
    """
    return [f"{field}: {warning}" for warning in _schedule(prompt, steps)[1]]


def _schedule(prompt: str, steps: int, hires_steps: int | None = None) -> tuple[list[tuple[int, str]], list[str]]:
    """`get_prompt_schedule` plus its warnings (without the field prefix), from one parse."""
    if not isinstance(prompt, str):
        raise ParamError("prompt", f"must be a string, got {type(prompt).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParamError("steps", f"must be an integer >= 1, got {steps!r}")
    if hires_steps is None:
        parser = _ScheduleParser(prompt, steps)
    else:
        parser = _ScheduleParser(prompt, hires_steps, step_offset=steps, fraction_offset=1.0)
        steps = hires_steps
    try:
        nodes = parser.parse()
    except _Unparsable as reason:
        # A1111: on a lark parse error, get_learned_conditioning_prompt_schedules returns [[steps, prompt]].
        return [(steps, prompt)], [f"the prompt-editing syntax does not parse ({reason}); the whole prompt is used "
                                   "as written for every step, as A1111 does"]
    end_steps = {steps}
    _collect_switch_steps(nodes, steps, end_steps)
    # A group inside a group that failed is parsed again from the outer bracket on: report each source once.
    warnings = list(dict.fromkeys(parser.warnings))
    return [(step, _text_at(nodes, step)) for step in sorted(end_steps)], warnings


def _collect_switch_steps(nodes: tuple, steps: int, into: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            if node.when >= 1:
                into.add(node.when)
            _collect_switch_steps(node.before, steps, into)
            _collect_switch_steps(node.after, steps, into)
        elif isinstance(node, _Alternation):
            into.update(range(1, steps + 1))
            for option in node.options:
                _collect_switch_steps(option, steps, into)


def _text_at(nodes: tuple, step: int) -> str:
    pieces = []
    for node in nodes:
        if isinstance(node, str):
            pieces.append(node)
        elif isinstance(node, _Edit):
            pieces.append(_text_at(node.before if step <= node.when else node.after, step))
        else:
            pieces.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(pieces)

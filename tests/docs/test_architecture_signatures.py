"""The signatures docs/ARCHITECTURE.md states are the code's, checked like the README's examples are run.

The notation (explained at the top of the page): a backticked span `difusi.module.name(parameters)`, optionally
with `-> annotation` inside the same backticks. Each one found becomes one test here, so adding a line to the
page adds a test. Checked: parameter names, order, kinds and default values (evaluated in the object's module),
and the return annotation's text when one is written. Not checked: parameter types. Signatures on a line or in
a section whose heading says "(draft" are xfail(strict=False): their modules are being reworked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
SPAN = re.compile(r"`(difusi(?:\.\w+)+)\(([^`]*)\)(?:\s*->\s*([^`]+?))?\s*`")
DRAFT = "(draft"
_MISSING = object()


@dataclass(frozen=True)
class DocSignature:
    name: str
    params: str
    returns: str | None
    line: int
    draft: bool

    @property
    def id(self) -> str:
        return f"{self.name}@L{self.line}"


def doc_signatures(text: str | None = None) -> list[DocSignature]:
    """Every checked signature on the page, with its line number and draft flag."""
    text = ARCHITECTURE.read_text(encoding="utf-8") if text is None else text
    found: list[DocSignature] = []
    heading = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            heading = line
        for match in SPAN.finditer(line):
            name, params, returns = match.groups()
            draft = DRAFT in line or DRAFT in heading
            found.append(DocSignature(name, params, returns.strip() if returns else None, number, draft))
    return found


def resolve(dotted: str) -> tuple[Any, Any, str]:
    """(object, the object it was read from, attribute name) for `difusi.a.b.Class.method`: import the
    longest module prefix, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as error:
            if error.name is None or not dotted.startswith(error.name):
                raise  # a module that exists failed to import one of its own dependencies
            continue
        rest = parts[cut:]
        break
    else:
        raise ModuleNotFoundError(dotted)
    if not rest:
        raise AssertionError(f"{dotted} is a module, not a callable")
    parent, obj = owner, owner
    for attribute in rest:
        parent, obj = obj, getattr(obj, attribute)
    return obj, parent, rest[-1]


def actual_parameters(obj: Any, parent: Any, attribute: str) -> tuple[list[inspect.Parameter], inspect.Signature]:
    """The object's parameters as the doc writes them: no `self` for a method read from its class."""
    signature = inspect.signature(obj)
    params = list(signature.parameters.values())
    if inspect.isclass(parent) and not inspect.isclass(obj):
        static = inspect.getattr_static(parent, attribute)
        if not isinstance(static, staticmethod | classmethod) and params and params[0].name in ("self", "cls"):
            params = params[1:]
    return params, signature


def documented_parameters(text: str) -> list[tuple[str, inspect._ParameterKind, str | None]]:
    """(name, kind, default source) for a parameter list written like a Python `def`."""
    function = ast.parse(f"def _({text}): pass").body[0]
    args = function.args
    out: list[tuple[str, inspect._ParameterKind, str | None]] = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for index, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = inspect.Parameter.POSITIONAL_ONLY if index < len(args.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        out.append((arg.arg, kind, ast.unparse(default) if default is not None else None))
    if args.vararg:
        out.append((args.vararg.arg, inspect.Parameter.VAR_POSITIONAL, None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, ast.unparse(default) if default is not None else None))
    if args.kwarg:
        out.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, None))
    return out


def _same_default(documented: Any, actual: Any) -> bool:
    if documented is actual:
        return True
    if type(documented) is not type(actual):
        return False
    try:
        return bool(documented == actual)
    except Exception:  # e.g. tensors: no single truth value
        return False


def _annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def check(doc: DocSignature) -> None:
    """Assert `doc` matches the real object (raises AssertionError naming the first difference)."""
    obj, parent, attribute = resolve(doc.name)
    params, signature = actual_parameters(obj, parent, attribute)
    namespace = vars(inspect.getmodule(obj) or inspect.getmodule(parent))
    written = documented_parameters(doc.params)
    where = f"docs/ARCHITECTURE.md line {doc.line}: {doc.name}"
    assert [(n, k) for n, k, _ in written] == [(p.name, p.kind) for p in params], (
        f"{where} parameters {[n for n, _, _ in written]} but the code has ({', '.join(str(p) for p in params)})")
    for (name, _, default_source), param in zip(written, params, strict=True):
        actual = param.default if param.default is not inspect.Parameter.empty else _MISSING
        if default_source is None:
            assert actual is _MISSING, f"{where}: {name} has a default {actual!r} in the code, none in the doc"
            continue
        assert actual is not _MISSING, f"{where}: {name}={default_source} in the doc, no default in the code"
        documented = eval(default_source, dict(namespace))  # noqa: S307  (our own doc, our own module)
        assert _same_default(documented, actual), f"{where}: {name}={default_source} in the doc, {actual!r} in the code"
    if doc.returns is not None:
        annotation = signature.return_annotation
        assert annotation is not inspect.Signature.empty, f"{where}: doc says -> {doc.returns}, the code has no annotation"
        code, text = re.sub(r"\s", "", _annotation_text(annotation)), re.sub(r"\s", "", doc.returns)
        assert code == text, f"{where}: doc says -> {doc.returns}, the code -> {_annotation_text(annotation)}"


SIGNATURES = doc_signatures()


def _param(doc: DocSignature) -> Any:
    marks = [pytest.mark.xfail(reason="marked (draft) in docs/ARCHITECTURE.md", strict=False)] if doc.draft else []
    return pytest.param(doc, id=doc.id, marks=marks)


@pytest.mark.parametrize("doc", [_param(doc) for doc in SIGNATURES])
def test_documented_signature_matches_the_code(doc: DocSignature):
    check(doc)


def test_the_page_states_signatures_and_most_are_checked_strictly():
    assert len(SIGNATURES) >= 40
    assert sum(not doc.draft for doc in SIGNATURES) >= 30


def test_the_checker_catches_drift():
    """The checker itself: a renamed parameter, a changed default, a wrong kind or return type all fail."""
    good = DocSignature("difusi.budget.check_budget", "width, height, batch_size, budget=None", "None", 0, False)
    check(good)
    for params, returns in [("width, height, batch, budget=None", "None"), ("width, height, batch_size, budget=1", "None"),
                            ("width, height, batch_size, *, budget=None", "None"), ("width, height, batch_size", "None"),
                            ("width, height, batch_size, budget=None", "bool")]:
        with pytest.raises(AssertionError):
            check(DocSignature("difusi.budget.check_budget", params, returns, 0, False))
    method = DocSignature("difusi.store.OutputStore.recover", "", "None", 0, False)
    check(method)  # `self` is left out for methods


def test_every_sampler_function_has_the_contract_1_signature():
    """Contract 1 for every registered sampler, not only the one example the page writes out."""
    from difusi.samplers import list_samplers

    leading = ["model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler"]
    for sampler in list_samplers():
        params = list(inspect.signature(sampler.function).parameters.values())
        assert [p.name for p in params[:7]] == leading, sampler.name
        assert [p.default for p in params[:3]] == [inspect.Parameter.empty] * 3, sampler.name
        assert [p.default for p in params[3:7]] == [None] * 4, sampler.name
        options = {p.name: p.default for p in params[7:] if p.kind is not inspect.Parameter.VAR_KEYWORD}
        assert set(sampler.options) <= set(options), f"{sampler.name}: registry options {sorted(sampler.options)} not parameters"


def _contract_numbers() -> set[int]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Contracts", 1)[1].split("\n## ", 1)[0]
    return {int(number) for number in re.findall(r"^(\d+)\. \*\*", section, flags=re.M)}


def test_contract_citations_point_at_this_page():
    """Docstrings cite "docs/ARCHITECTURE.md contract N"; N must exist, and no file cites the old external DESIGN.md."""
    numbers = _contract_numbers()
    assert numbers == {1, 2, 3, 4, 5}
    stale, unknown = [], []
    for folder in ("src", "tests", "bench", "docs"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if "DESIGN" + " contract" in text:  # split so this file does not match itself
                stale.append(str(path.relative_to(ROOT)))
            unknown += [f"{path.relative_to(ROOT)}: {n}" for n in re.findall(r"ARCHITECTURE\.md contract (\d+)", text)
                        if int(n) not in numbers]
    assert stale == [] and unknown == []

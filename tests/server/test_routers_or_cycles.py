"""No import cycles between difusi's modules, and the server's routes live in routers that read `app.state`.

What the cycle check sees: every `import difusi...` / `from difusi... import ...` / relative import in every
module under src/difusi, at module level *and inside functions* (a lazy import still makes the two modules
depend on each other; it only hides the cycle until the function runs). Imports under `if TYPE_CHECKING:`
are left out (they never run), and so are edges to the root package `difusi` (see the last-but-two test). A `from difusi.a import b` counts as an edge to `difusi.a.b` when that is a
module, else to `difusi.a`. Not seen: `importlib.import_module` with a computed name, and the implicit
import of parent packages (`import difusi.a.b` runs `difusi/a/__init__.py`; only an explicit import in it
counts). The graph is built from source text, so it needs no heavy imports and checks modules whatever
their optional dependencies.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import difusi

SRC = Path(difusi.__file__).parent
PACKAGE = "difusi"


def _module_names() -> dict[str, Path]:
    """Every module and package of difusi: dotted name -> source file."""
    names: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([PACKAGE, *parts])] = path
    return names


MODULES = _module_names()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """All import statements anywhere in the tree (functions, classes, try blocks), minus TYPE_CHECKING blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The difusi modules one import statement depends on (most specific existing module)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
        return found
    source = _resolve(module, node)
    if not source or not (source == PACKAGE or source.startswith(PACKAGE + ".")):
        return found
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        if candidate in MODULES:
            found.add(candidate)
        elif source in MODULES:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """difusi module -> the difusi modules it imports (self-edges dropped)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(module, node)
        edges.discard(module)
        edges.discard(PACKAGE)  # `import difusi` / `from difusi import __version__`: the root package (checked below)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a sorted list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _depends_on(graph: dict[str, set[str]], start: str, prefix: str) -> list[str]:
    """A chain of imports from `start` to a module named `prefix` or under it, [] when there is none."""
    seen = {start}
    frontier: list[list[str]] = [[start]]
    while frontier:
        path = frontier.pop(0)
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == prefix or nxt.startswith(prefix + "."):
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                frontier.append([*path, nxt])
    return []


def test_the_graph_sees_lazy_and_relative_imports():
    """The checker itself: a function-level import and the budget flags' move are visible in the graph."""
    graph = import_graph()
    assert "difusi.budget" in graph["difusi.cli"]  # the --max-* flags
    assert "difusi.server.app" in graph["difusi.server"]  # imported inside serve(): a lazy import counts
    assert "difusi.server.routes_a1111" in graph["difusi.server.app"]


def test_difusi_modules_import_each_other_without_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (each list imports itself through the others): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_cli_and_server_do_not_import_each_other():
    graph = import_graph()
    for module in (name for name in graph if name == "difusi.server" or name.startswith("difusi.server.")):
        assert _depends_on(graph, module, "difusi.cli") == [], f"{module} reaches the CLI"
    assert "difusi.server" in graph["difusi.cli"] or any(
        target.startswith("difusi.server") for target in graph["difusi.cli"])  # cli -> server is the one direction


def test_the_root_package_imports_no_difusi_module_at_import_time():
    """Edges to `difusi` itself are left out of the graph (every module's `from difusi import __version__` would
    otherwise make it a hub); that is sound only while `difusi/__init__.py` imports no submodule when it runs.
    Its lazy `__getattr__` (difusi.generate, difusi.txt2img, ...) imports only on attribute access."""
    tree = ast.parse(MODULES[PACKAGE].read_text(encoding="utf-8"))
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert not any(_targets(PACKAGE, node) - {PACKAGE} for node in top_level)


@pytest.mark.parametrize("name", [info.name for info in pkgutil.walk_packages(difusi.__path__, "difusi.")
                                  if not info.name.endswith("__main__")])
def test_every_module_imports(name):
    """Each module imports on its own (an import cycle at module level would fail here with ImportError)."""
    importlib.import_module(name)


def test_routes_live_in_routers_that_read_app_state():
    """create_app includes the three routers; handlers close over nothing and find the engine on app.state."""
    from fastapi.testclient import TestClient

    from difusi.server import routes_a1111, routes_difusi, routes_ui
    from difusi.server.app import create_app

    class FakeEngine:
        outputs_dir = Path(".")

        def __init__(self, name: str):
            self.name = name

        def run_job(self, job):  # never called: without the lifespan the worker does not start
            raise AssertionError

        def current_title(self) -> str:
            return self.name

    routers = (routes_a1111.router, routes_difusi.router, routes_ui.router)
    for router in routers:
        for route in router.routes:
            closure = getattr(route.endpoint, "__closure__", None) or ()
            assert closure == (), f"{route.path} closes over {[cell.cell_contents for cell in closure]}"
    assert all(route.path.startswith("/sdapi/v1/") for route in routes_a1111.router.routes)
    assert all(route.path.startswith("/difusi/v1/") for route in routes_difusi.router.routes)

    first, second = create_app(FakeEngine("first")), create_app(FakeEngine("second"))  # one router, two apps
    schema_paths = set(first.openapi()["paths"])
    routed = {re.sub(r":\w+}", "}", route.path) for router in routers[:2] for route in router.routes
              if route.include_in_schema}  # {p:path} -> {p}; the 501 stand-ins are left out of the schema on purpose
    assert routed <= schema_paths
    for app, name in ((first, "first"), (second, "second")):
        client = TestClient(app)  # no `with`: the lifespan (queue worker) does not run
        assert client.get("/difusi/v1/status").json()["model"] == name
        assert client.get("/").status_code == 200 and client.get("/docs").status_code == 200
        assert client.get("/static/app.js").status_code == 200

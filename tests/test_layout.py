"""The package's layout rules (issue #19): no import cycle, no module far over 500 lines, one place per feature
loss, and `fit` a short driver. Read from the source with `ast`, so nothing here imports torch."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdutils"
MAX_LINES = 520


def _modules() -> dict[str, ast.Module]:
    """Every kdutils module's parsed source, by its short name."""
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """The kdutils modules a module imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdutils"):
            if node.module == "kdutils":
                found.update(a.name for a in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("kdutils."))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a path of module names, or None when the graph is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_kdutils():
    graph = {name: _imports(tree) - {name, "__init__"} for name, tree in _modules().items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_module_far_over_500_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_says_what_it_holds():
    missing = [name for name, tree in _modules().items() if not (ast.get_docstring(tree) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_feature_kinds_are_branched_on_only_in_their_units():
    offenders = []
    for name, tree in _modules().items():
        if name == "feature_losses":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Attribute) and side.attr == "feature" or
                    isinstance(side, ast.Name) and side.id == "feature"
                    for side in [node.left, *node.comparators]):
                offenders.append(f"{name}.py:{node.lineno}")
    assert not offenders, f"branches on a method's feature kind outside kdutils/feature_losses.py: {offenders}"


def test_fit_is_a_short_driver():
    tree = _modules()["train"]
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    first = fit.body[1] if ast.get_docstring(fit) else fit.body[0]   # the body after the docstring
    assert fit.end_lineno - first.lineno + 1 <= 60, f"fit's body is {fit.end_lineno - first.lineno + 1} lines"


def test_the_api_the_package_docstring_names_exists():
    import importlib
    import re

    import kdutils
    named = re.findall(r"\b([a-z_]+)\.([A-Za-z_]+)\b", kdutils.__doc__.split("Modules, in the order")[0])
    assert len(named) >= 15
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    named = [(m, n) for m, n in named if m in modules and n not in ("json", "md")]   # not 'results.json'
    missing = [f"{m}.{n}" for m, n in named if not hasattr(importlib.import_module(f"kdutils.{m}"), n)]
    assert not missing, f"kdutils' docstring names functions that do not exist: {missing}"
    unnamed = [m for m in sorted(modules) if not re.search(rf"\b{m}\b", kdutils.__doc__)]
    assert not unnamed, f"modules the package docstring does not place: {unnamed}"

"""The source tree's layers are one-way: trace -> placement -> predict -> sim -> recommend/fidelity ->
runtime -> cli, over shared helpers (errors, outputs, configs, ...) that import none of them; and no two
modules import each other, directly or round a circle (imports read statically, the ones inside functions
included, ``if TYPE_CHECKING:`` blocks left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe_gps", "sim", "runtime")
#: layer of each part (a module's part: its package, or moe_gps's sub-package or module); parts not named
#: here are the shared helpers, layer 0
LAYERS = {"moe_gps.trace": 1, "moe_gps.placement": 2, "moe_gps.predict": 3, "sim": 4, "moe_gps.recommend": 5,
          "moe_gps.fidelity": 5, "runtime": 6, "moe_gps.cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name imported from a package counts as its module when
    it is one)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in mods), None)

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in _runtime_imports(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = [a.name for a in node.names]
            for n in names:
                r = resolve(n)
                if r is not None and r != m and not m.startswith(r + "."):     # a package's own __init__ aside
                    edges[m].add(r)
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "moe_gps" and len(parts) > 1 else parts[0]


def test_each_layer_imports_only_the_layers_below_it():
    up = sorted((m, d) for m, ds in _edges().items() for d in ds
                if LAYERS.get(_part(d), 0) > LAYERS.get(_part(m), 0)
                or (LAYERS.get(_part(d), 0) == LAYERS.get(_part(m), 0) > 0 and _part(d) != _part(m)))
    assert up == [], "modules importing a layer above (or beside) their own: " + ", ".join(f"{m} -> {d}" for m, d in up)


def test_no_modules_import_each_other_round_a_circle():
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:                 # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_checks_see_an_import_inside_a_function_and_skip_type_checking_blocks():
    """What the two tests above rely on: a function's own import is an edge; a TYPE_CHECKING one is not."""
    edges = _edges()
    assert "moe_gps.outputs" in edges["runtime.record_hf"]           # imported inside run_from_args
    assert "sim.run" not in edges["sim.verdict"]                     # under TYPE_CHECKING only
    assert "sim.verdict" in edges["sim.run"]

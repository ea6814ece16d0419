"""The package's import graph: layers import downward only, so there are no cycles, and imports inside
functions are kept for genuinely optional heavy dependencies (each says why)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bdia"

#: Project imports allowed inside a function, with the reason.
LAZY = {
    ("bdia", "bdia.schedulers"): "the diffusers schedulers: `import bdia` must not load diffusers",
    ("bdia", "bdia.flow_schedulers"): "the diffusers flow schedulers: `import bdia` must not load diffusers",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules) -> tuple[set[str], set[str]]:
    """(module-level, function-level) project modules that ``name`` imports (a parent package is not counted)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    module_level, in_functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
        found = {t for t in found if not any(o != t and o.startswith(t + ".") for o in found)} or found
        (module_level if id(node) in top else in_functions).update(found)
    return module_level, in_functions


def _graph():
    modules = _modules()
    graph, lazy = {}, {}
    for name, path in modules.items():
        module_level, in_functions = _imports(name, path, modules)
        graph[name] = module_level | in_functions
        lazy[name] = in_functions
    return graph, lazy


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert len(graph) > 30  # the whole package was read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_are_only_the_declared_lazy_ones():
    _, lazy = _graph()
    found = {(name, target) for name, targets in lazy.items() for target in targets}
    assert found <= set(LAZY), sorted(found - set(LAZY))


#: The layers of ``docs/design.md``, lowest first. A module imports only from its own layer or lower ones.
LAYERS = {
    "core": ("bdia.download", "bdia.schedules", "bdia.denoisers", "bdia.gammas", "bdia.solvers", "bdia.checks",
             "bdia.speed", "bdia.analytic", "bdia.data", "bdia.networks", "bdia.inversion", "bdia.reversible",
             "bdia.multistep", "bdia.rex", "bdia.flow"),
    "services": ("bdia.imageio", "bdia.runfolder", "bdia.distributed", "bdia.metrics", "bdia.logger", "bdia.configs",
                 "bdia.models", "bdia.prompts", "bdia.testing", "bdia.schedulers", "bdia.pipelines", "bdia.assets",
                 "bdia.flow_schedulers"),
    "apps": ("bdia.apps",),
}


def _layer(name: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS.values()):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    graph, _ = _graph()
    unplaced = sorted(n for n in graph if n != "bdia" and _layer(n) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/design.md): {unplaced}"
    upward = sorted((n, t) for n, targets in graph.items() if n != "bdia" for t in targets
                    if t != "bdia" and _layer(t) > _layer(n))
    assert not upward, f"imports from a higher layer: {upward}"
    apps = [n for n in graph if _layer(n) == 2]
    shared = {"bdia.apps.driver", "bdia.apps.cli", "bdia.apps"}
    crossing = sorted((n, t) for n in apps for t in graph[n] if _layer(t) == 2 and t not in shared
                      and not (n == "bdia.apps.reproduce" and t == "bdia.apps.tables")
                      and not (n == "bdia.apps.demo" and t == "bdia.apps.edit"))  # the web page over the edit app
    assert not crossing, f"apps importing other apps (share through the driver or a service): {crossing}"

"""The runtime is laid out in layers: ``npu`` below ``engine`` below ``entrypoints``.

Every import in every module counts, including the ones inside functions, so a lazy
import cannot hide a cycle or a layer reaching upwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import furiosa_runtime

PACKAGE = Path(furiosa_runtime.__file__).parent
LAYERS = ["npu", "engine", "entrypoints"]  # each may import only the ones before it


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The furiosa_runtime modules a file imports (``from a.b import c`` counts a.b.c when
    that is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        found |= {name for name in names if name.startswith("furiosa_runtime")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer_with_a_docstring():
    for name in _graph():
        if name not in ("furiosa_runtime", "furiosa_runtime.__main__"):
            assert _layer(name) is not None, f"{name} is outside npu/, engine/ and entrypoints/"
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{layer}/__init__.py should say what the layer owns"


def test_layers_import_only_the_layers_below():
    upward = []
    for module, imported in _graph().items():
        own = _layer(module)
        if own is None:
            continue
        upward += [f"{module} -> {target}" for target in imported if (_layer(target) or 0) > own]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles

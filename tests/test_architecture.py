"""The house: augflow's imports form no circle, and no arrow runs up between its layers (README, Architecture).

Face -> Jobs -> Models / Data -> Plumbing. A module may import its own layer and the layers below; Models and Data
stand side by side and import neither each other. The imports are read from the source with ``ast`` (those inside
functions and ``TYPE_CHECKING`` blocks too), so nothing is executed.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each module belongs to the layer of its longest listed prefix ("augflow" alone is the package's own face).
LAYERS = {
    "face": ["augflow", "augflow.__main__", "augflow.cli"],
    "jobs": ["augflow.train", "augflow.synthesize", "augflow.classify", "augflow.explain", "augflow.audit",
             "augflow.demo"],
    "models": ["augflow.flows", "augflow.symmflow", "augflow.models", "augflow.model_base"],
    "data": ["augflow.data"],
    "plumbing": ["augflow.runs", "augflow.atomic", "augflow.errors", "augflow.version", "augflow.precision"],
}
FLOOR = {"face": 3, "jobs": 2, "models": 1, "data": 1, "plumbing": 0}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted((ROOT / "augflow").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str | None:
    best, layer = "", None
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "augflow" and module.startswith(prefix + "."))
            if matches and len(prefix) > len(best):
                best, layer = prefix, name
    return layer


def _imports(module: str) -> set[str]:
    """The augflow modules that ``module`` imports (``from X import Y`` names module ``X.Y`` when it is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_no_arrow_runs_up_between_layers():
    upward = []
    for module, targets in GRAPH.items():
        source = _layer(module)
        for target in targets:
            layer = _layer(target)
            if FLOOR[layer] > FLOOR[source] or (FLOOR[layer] == FLOOR[source] and layer != source):
                upward.append(f"{module} ({source}) -> {target} ({layer})")
    assert upward == []


def test_no_import_circle():
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_the_map_is_read():
    # Guards the reader itself: arrows it must see.
    assert "augflow.train.privacy.ledger" in GRAPH["augflow.synthesize"]
    assert "augflow.runs" in GRAPH["augflow.models"]
    assert "augflow.classify.dispatch" in GRAPH["augflow.classify"]


@pytest.mark.parametrize("module", ["augflow.data.store", "augflow.runs", "augflow.train.privacy.ledger"])
def test_low_rooms_load_no_model(module):
    # Importing a data or plumbing module (or reading a ledger) must not pull every model family in.
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('augflow')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout
    assert "augflow.flows" not in loaded and "augflow.symmflow" not in loaded and "augflow.models" not in loaded

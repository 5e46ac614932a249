"""The import graph of ``coto_kernels`` has no cycle, and its layers point one way.

Every module's imports are read with ``ast``, function-local and ``TYPE_CHECKING`` ones included: a lazy import
that closes a cycle is still a cycle in the design.

    config -> schedule, gates -> controller -> distributed -> patching -> callbacks
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import coto_kernels

PACKAGE_DIR = Path(coto_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``name`` (a module, or an object inside one) belongs to, if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in ``path`` (module ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from . import distributed`` names a module; ``from .gates import draw_gates`` an object in one
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {owner for target in targets if (owner := _owner(target, modules)) is not None}
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_sees_relative_and_function_local_imports(tmp_path):
    pkg = tmp_path / "coto_kernels"
    modules = {"coto_kernels": pkg / "__init__.py", "coto_kernels.a": pkg / "a.py", "coto_kernels.b": pkg / "b.py",
               "coto_kernels.sub": pkg / "sub" / "__init__.py", "coto_kernels.sub.c": pkg / "sub" / "c.py"}
    (pkg / "sub").mkdir(parents=True)
    for path in modules.values():
        path.write_text("")
    source = "def f():\n    from ..a import thing\n    from . import c\n    import coto_kernels.b\n"
    (pkg / "sub" / "c.py").write_text(source)
    assert imports_of("coto_kernels.sub.c", pkg / "sub" / "c.py", modules) == {"coto_kernels.a", "coto_kernels.b"}


def test_coto_kernels_has_no_import_cycle():
    graph = import_graph()
    assert {"coto_kernels.controller", "coto_kernels.callbacks", "coto_kernels.kernels.lora_torch"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "module, must_not_import",
    [
        ("config", {"schedule", "gates", "controller", "distributed", "patching", "callbacks"}),
        ("schedule", {"gates", "controller", "distributed", "patching", "callbacks"}),
        ("gates", {"schedule", "controller", "distributed", "patching", "callbacks"}),
        ("controller", {"distributed", "patching", "callbacks", "layers", "functional"}),
        ("distributed", {"patching", "callbacks", "layers"}),
        ("patching", {"callbacks"}),
    ],
)
def test_layers_point_one_way(module, must_not_import):
    imported = {name.removeprefix("coto_kernels.") for name in import_graph()[f"coto_kernels.{module}"]}
    assert not imported & must_not_import, f"{module} imports {sorted(imported & must_not_import)}"

"""The library's shape, read from its own imports: layers point one way, no circles, no private names.

Every ``import DiffusionSegLib...`` and ``from DiffusionSegLib... import ...`` is read with ``ast``
(imports inside functions too: a lazy import is still a dependency). The layers, lowest first:

    core (and the package's face, __version__) < models < methods < pipeline < outputs, training
    < bench < cli < slicer < __main__

A module may import its own layer and the layers below it, never one above (outputs and training
share a rank and do not import each other). Only ``methods/registry.py`` lists the method folders.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import REPO  # noqa: E402

ROOT = REPO
LIBRARY = ROOT / "DiffusionSegLib"
RANKS = {"core": 0, "": 0, "models": 1, "methods": 2, "pipeline": 3, "outputs": 4, "training": 4,
         "bench": 5, "cli": 6, "slicer": 7, "__main__": 8}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts}


def layer(module: str) -> str:
    """'DiffusionSegLib.pipeline.segment' -> 'pipeline'; the package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every library import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(("<relative>", None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "DiffusionSegLib":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:  # "from package import module"
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "DiffusionSegLib"]
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, str | None, int]]]:
    modules = library_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_module_lives_in_a_known_layer():
    unknown = sorted(m for m in library_modules() if layer(m) not in RANKS)
    assert not unknown, f"modules outside the layers {sorted(RANKS)}: {unknown}"


def test_no_relative_imports(graph):
    relative = [f"{m}:{line}" for m, found in graph.items() for target, _, line in found if target == "<relative>"]
    assert not relative, f"relative imports (spell the layer out): {relative}"


def test_imports_point_down_the_layers(graph):
    upward = []
    for source, found in graph.items():
        for target, _, line in found:
            a, b = layer(source), layer(target)
            if a == b or b not in RANKS:
                continue
            if RANKS[b] >= RANKS[a]:
                upward.append(f"{source}:{line} imports {target} ({a} -> {b})")
    assert not upward, "imports that point up or across the layers:\n" + "\n".join(upward)


def test_no_import_circles(graph):
    edges: dict[str, set[str]] = defaultdict(set)
    modules = library_modules()
    for source, found in graph.items():
        for target, _, _ in found:
            while target not in modules and "." in target:  # a name inside a module: the module
                target = target.rsplit(".", 1)[0]
            if target != source and target in modules and not modules[target].name == "__init__.py":
                edges[source].add(target)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module(graph):
    private = [f"{source}:{line} imports {target}.{name}" for source, found in graph.items()
               for target, name, line in found if name is not None and name.startswith("_")
               and not name.startswith("__") and target != source]
    private += [f"{source}:{line} imports {target}" for source, found in graph.items()
                for target, _, line in found if any(p.startswith("_") and not p.startswith("__")
                                                    for p in target.split("."))]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_only_the_registry_knows_the_method_folders(graph):
    """A new method is a new folder plus a registry entry: nothing else imports a method folder."""
    methods = {p.parent.name for p in (LIBRARY / "methods").glob("*/__init__.py")}
    assert {"medsegdiff", "vanilla_dpm", "unet"} <= methods
    outside = []
    for source, found in graph.items():
        for target, _, line in found:
            parts = target.split(".")
            if len(parts) > 2 and parts[1] == "methods" and parts[2] in methods:
                if source != "DiffusionSegLib.methods.registry" and not source.startswith(f"DiffusionSegLib.methods.{parts[2]}"):
                    outside.append(f"{source}:{line} imports {target}")
    assert not outside, "method folders imported outside the registry:\n" + "\n".join(outside)


def test_no_code_outside_the_methods_branches_on_a_method_name():
    """``card.method == "unet"``-style branches belong in the method's folder, not in the pipeline."""
    from DiffusionSegLib.methods.registry import Method

    names = set(Method.values())
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(LIBRARY).parts
        if rel[0] == "methods" or "__pycache__" in rel:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"comparisons with a method name outside methods/: {offenders}"


def test_tests_mirror_the_layers_and_never_import_each_other():
    """Testing/<layer>/test_*.py for each library layer; shared code in helpers.py, fixtures in conftest.py."""
    tests = ROOT / "Testing"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("data", "__pycache__")}
    layers = {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()}
    assert folders == layers, f"test folders {sorted(folders)} do not mirror the layers {sorted(layers)}"
    offenders = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(tests)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0].startswith("test_") or n == "conftest"]
    assert not offenders, "tests importing other test modules (use helpers.py):\n" + "\n".join(offenders)

"""The import rule of lcflow/__init__.py: a module imports only from its own package or from a
lower layer, checked over every import in the package (inside functions too), and no package
imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import lcflow

PACKAGE = Path(lcflow.__file__).parent
# Lowest first; the packages of one line are one layer (lcflow/__init__.py says what each holds).
LAYERS = [
    ("core", "tasks", "provision", "proto_gen"),
    ("packets", "transport", "testing"),
    ("adapter",),
    ("handoff",),
    ("serving",),
    ("client",),
    ("eval",),
    ("training",),
    ("research", "demo"),
    ("bench",),
    ("commands",),
    ("cli",),
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def part_of(module: str) -> str:
    """lcflow.serving.sharer -> serving; lcflow.cli -> cli."""
    return module.split(".")[1]


def lcflow_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of an lcflow module in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lcflow."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "lcflow":
            found += [(node.lineno, f"lcflow.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lcflow.")]
    return found


def modules() -> list[tuple[str, Path]]:
    """(part, file) for every module of the package but the generated protobuf code and data."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if (
            relative.parts[0] in ("proto_gen", "data")
            or relative.name == "__init__.py"
            and len(relative.parts) == 1
        ):
            continue
        found.append((relative.parts[0].removesuffix(".py"), path))
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part for part, _ in modules()}
    assert parts <= set(LAYER_OF), (
        f"give these a layer in LAYERS and lcflow/__init__.py: {parts - set(LAYER_OF)}"
    )
    documented = lcflow.__doc__
    assert all(f" {part} " in documented for part in parts), "lcflow/__init__.py names every part"


def upward_imports(part: str, path: Path) -> list[str]:
    """The imports in `path` (of package part `part`) that do not go down a layer."""
    upward = []
    for line, module in lcflow_imports(path):
        target = part_of(module)
        if target != part and LAYER_OF.get(target, len(LAYERS)) >= LAYER_OF[part]:
            upward.append(f"{path.name}:{line} ({part}) imports {module} ({target})")
    return upward


def test_no_module_imports_a_layer_above_its_own():
    upward = [found for part, path in modules() for found in upward_imports(part, path)]
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_the_rule_sees_an_upward_import_inside_a_function(tmp_path):
    module = tmp_path / "kv_helpers.py"
    module.write_text("import torch\n\n\ndef f():\n    from lcflow.serving.sharer import serve\n")
    assert upward_imports("core", module) == [
        "kv_helpers.py:5 (core) imports lcflow.serving.sharer (serving)"
    ]
    module.write_text("from lcflow.core.names import PAIRS\nfrom lcflow.tasks import QASample\n")
    assert upward_imports("packets", module) == []


def test_each_subpackage_names_its_modules_in_its_docstring():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        if init.parent.name in ("proto_gen",):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in sorted(init.parent.glob("*.py")):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init.relative_to(PACKAGE.parent)} does not name {module.name}"


def test_an_import_inside_a_function_says_why():
    """lcflow imports go at the top of the file; the only ones inside functions keep `lcflow --help`
    from importing torch (a command module's parser is built at every start), and say so."""
    silent = []
    for _, path in modules():
        lines = path.read_text().split("\n")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("lcflow"):
                        if "--help" not in lines[sub.lineno - 1]:
                            silent.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}")
    assert not silent, "move these to the top of their file, or say why not:\n" + "\n".join(silent)


def test_every_lcflow_import_names_something_its_module_has():
    """Imports inside functions run only when their function does: a name moved to another module
    would fail there, at run time. Every `from lcflow.x import name` in the package resolves."""
    import importlib

    missing = []
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("lcflow.")
            ):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(
                                f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}.{alias.name}"
                            )
    assert not missing, "imports of names their module does not have:\n" + "\n".join(missing)


def test_no_two_modules_import_each_other_in_a_circle():
    """Module-level imports (type-checking ones too) form no circle, inside a layer either."""
    graph: dict[str, set[str]] = {}
    for _, path in modules():
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for node in ast.parse(path.read_text()).body:
            statements = node.body if isinstance(node, ast.If) else [node]
            for statement in statements:
                if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith("lcflow."):
                    targets.add(statement.module)
        graph[name] = targets
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target in graph and target not in state and (found := visit(target, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            assert circle is None, "an import circle: " + " -> ".join(circle)

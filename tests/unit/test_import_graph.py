"""The shape of `src/vlm_recipes`: no import cycles, counting imports inside functions too, and no private name of
another library touched outside `vlm_recipes/_compat.py`."""

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "vlm_recipes"
COMPAT = PACKAGE / "_compat.py"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> list[str]:
    """Every dotted name `path` imports (module level and inside functions), relative imports made absolute; a
    `from x import y` gives both `x` and `x.y`, since `y` may be a module."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            names += [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the modules of the package it imports}."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        for imported in imported_names(path):
            while imported and imported not in known:  # `vlm_recipes.x.name` -> the module `vlm_recipes.x`
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_touches(path: Path) -> list[str]:
    """`obj._name` on anything but `self`, `cls` or `super()`, `getattr(obj, "_name")` and the like, and
    `from library import _name`: where a module reaches into another object's or library's internals."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1:
                name = node.args[1]
                if isinstance(name, ast.Constant) and str(name.value).startswith("_"):
                    if not str(name.value).startswith("__"):
                        found.append(f"{where} {ast.unparse(node)}")
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("vlm_recipes")
        ):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{where} from {node.module} import {alias.name}")
            if any(part.startswith("_") and not part.startswith("__") for part in (node.module or "").split(".")):
                found.append(f"{where} from {node.module}")
    return found


class TestImportGraph:
    def test_the_graph_sees_function_level_and_relative_imports(self):
        graph = import_graph()
        assert "vlm_recipes.models.checks" in graph["vlm_recipes.configs"]  # inside `__post_init__`
        assert "vlm_recipes.data.errors" in graph["vlm_recipes.data.images"]  # `from .errors import ...`
        assert "vlm_recipes.models.parts" in graph["vlm_recipes.trainer"]  # `from .models.parts import ...`

    def test_no_import_cycles(self):
        assert cycles(import_graph()) == []

    def test_cycles_are_found(self):
        assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


class TestPrivateInternals:
    def test_only_compat_touches_private_names(self):
        touches = [touch for path in modules().values() if path != COMPAT for touch in private_touches(path)]
        assert touches == [], "move these into vlm_recipes/_compat.py, with the versions checked:\n" + "\n".join(
            touches
        )

    def test_the_check_finds_what_compat_does(self):
        touches = private_touches(COMPAT)
        assert any("_hf_deepspeed_config_weak_ref" in touch for touch in touches)
        assert any("_compile_jinja_template" in touch for touch in touches)
        assert any("_weight_conversions" in touch for touch in touches)

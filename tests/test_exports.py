"""The package's public surface and its layering."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import supervisor

PACKAGE = Path(supervisor.__file__).parent
LAYERS = ["errors", "wire", "connection", "kernelspec", "launchers", "process", "actor", "client",
          "kernel", "policy", "events", "startgate", "supervisor", "manager", "cli"]


def layer_files(layer: str) -> list[Path]:
    """The files of one layer: a module, or every module of a subpackage."""
    if (PACKAGE / layer).is_dir():
        return sorted((PACKAGE / layer).rglob("*.py"))
    path = PACKAGE / f"{layer}.py"
    return [path] if path.exists() else []


def test_all_lists_exactly_the_public_names() -> None:
    """Every name in __all__ exists, and every public re-export is listed."""
    for name in supervisor.__all__:
        assert hasattr(supervisor, name), name
    assert sorted(supervisor.__all__) == supervisor.__all__
    public = {n for n, v in vars(supervisor).items()
              if not n.startswith("_") and not isinstance(v, type(supervisor))
              and n not in ("annotations",)}
    assert public - set(supervisor.__all__) == set()


def test_layers_import_only_layers_above_them() -> None:
    """A module imports only modules earlier in the layer list (errors from anywhere)."""
    for index, layer in enumerate(LAYERS):
        allowed = set(LAYERS[:index + 1]) | {"errors"}
        for path in layer_files(layer):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                        "supervisor."):
                    target = node.module.split(".")[1]
                    assert target in allowed, f"{path.name} ({layer}) imports {target}"


def test_launchers_need_nothing_above_them() -> None:
    """The launcher room imports only errors and itself, so any launcher can plug in below."""
    for path in layer_files("launchers"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "supervisor."):
                assert node.module.split(".")[1] in ("errors", "launchers"), path.name


def test_no_jupyter_runtime_dependencies() -> None:
    """Nothing in supervisor/ imports jupyter_client, traitlets or ipykernel."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"jupyter_client", "traitlets", "ipykernel", "jupyter_core"}, (
                    f"{path.name} imports {name}")


def test_every_module_says_who_owns_its_objects() -> None:
    """Each module has a docstring (thread/loop ownership is stated there)."""
    for path in PACKAGE.rglob("*.py"):
        if path.stem == "__main__":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert importlib.import_module(name).__doc__, name

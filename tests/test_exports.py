"""The package's public surface and its layering."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import supervisor

PACKAGE = Path(supervisor.__file__).parent
LAYERS = ["errors", "wire", "connection", "kernelspec", "launchers", "process", "actor", "client",
          "kernel", "policy", "events", "startgate", "children", "supervision", "pool", "supervisor",
          "manager", "gateway", "cli"]


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
    seen = set()
    for index, layer in enumerate(LAYERS):
        room = PACKAGE / layer
        paths = sorted(room.rglob("*.py")) if room.is_dir() else [PACKAGE / f"{layer}.py"]
        assert paths[0].exists(), f"layer {layer} has no module"
        allowed = set(LAYERS[:index]) | {layer, "errors", "_log", "_reaper"}
        for path in paths:
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                        "supervisor."):
                    target = node.module.split(".")[1]
                    assert target in allowed, f"{path.relative_to(PACKAGE)} imports {target}"
    private = {PACKAGE / n for n in ("__init__.py", "__main__.py", "_log.py")}
    assert set(PACKAGE.rglob("*.py")) - seen - private == set(), "a module outside the layers"


def test_launchers_need_nothing_above_them() -> None:
    """The launcher room imports only errors, logging and itself, so launchers plug in below."""
    for path in (PACKAGE / "launchers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "supervisor."):
                assert node.module.split(".")[1] in ("errors", "_log", "launchers"), path.name


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
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("supervisor", *parts[:-1])) if parts[-1] == "__init__" \
            else ".".join(("supervisor", *parts))
        assert importlib.import_module(name).__doc__, path.name

"""Kernelspecs: finding, validating and templating ``kernel.json`` files.

Search order and naming follow jupyter_core / jupyter_client: the
directories of :func:`jupyter_path` (``$JUPYTER_PATH``, then user and
environment dirs in jupyter's venv-first order, then system dirs), a kernel
per ``<dir>/kernels/<name>/kernel.json``, names matched case-insensitively,
first directory wins. When no ``python3`` spec is installed but ipykernel is
importable, a native one pointing at this interpreter is provided (found with
``importlib.util.find_spec``; ipykernel is never imported here).

Threading: :class:`KernelSpec` is a frozen value that any thread may share.
The functions are stateless blocking calls (they read the file system on
every call, nothing is cached), usable from any thread.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import site
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from supervisor._log import get_logger
from supervisor.errors import KernelSpecError, NoSuchKernel

__all__ = [
    "NAME_PATTERN",
    "NATIVE_KERNEL_NAME",
    "KernelSpec",
    "expand_env",
    "find_kernel_specs",
    "format_kernel_cmd",
    "get_all_specs",
    "get_kernel_spec",
    "jupyter_path",
    "kernel_dirs",
    "native_python_spec",
]

log = get_logger("supervisor.kernelspec")

NATIVE_KERNEL_NAME = "python3"
#: Kernel names jupyter accepts: ASCII letters, digits, ``.``, ``_`` and ``-``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
INTERRUPT_MODES = ("signal", "message")
_ALIASES = {"python": NATIVE_KERNEL_NAME}
_TEMPLATE = re.compile(r"\{([A-Za-z0-9_]+)\}")
_FALSY = ("no", "n", "false", "off", "0", "0.0")


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """One kernelspec: how to launch a kernel and what it advertises.

    ``env`` and ``metadata`` are read-only mappings over private copies.
    ``kernel_protocol_version`` is kept so :meth:`to_dict` matches jupyter's.
    """

    name: str
    argv: tuple[str, ...]
    display_name: str
    language: str
    interrupt_mode: str = "signal"
    env: Mapping[str, str] = field(default_factory=_empty)
    metadata: Mapping[str, Any] = field(default_factory=_empty)
    resource_dir: Path
    kernel_protocol_version: str = ""

    def __post_init__(self) -> None:
        argv = tuple(self.argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise KernelSpecError(
                f"kernelspec {self.name!r}: argv must be a non-empty list of strings",
                field="argv",
            )
        mode = self.interrupt_mode.lower() if isinstance(self.interrupt_mode, str) else None
        if mode not in INTERRUPT_MODES:
            raise KernelSpecError(
                f"kernelspec {self.name!r}: interrupt_mode must be one of {INTERRUPT_MODES},"
                f" not {self.interrupt_mode!r}",
                field="interrupt_mode",
            )
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "interrupt_mode", mode)
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "metadata", MappingProxyType(copy.deepcopy(dict(self.metadata))))
        object.__setattr__(self, "resource_dir", Path(self.resource_dir))

    def to_dict(self) -> dict[str, Any]:
        """The ``kernel.json`` object (same keys as jupyter_client's ``KernelSpec.to_dict``)."""
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "display_name": self.display_name,
            "language": self.language,
            "interrupt_mode": self.interrupt_mode,
            "metadata": copy.deepcopy(dict(self.metadata)),
            "kernel_protocol_version": self.kernel_protocol_version,
        }

    @classmethod
    def from_dict(
        cls,
        name: str,
        data: Mapping[str, Any],
        resource_dir: str | os.PathLike[str],
        *,
        path: str | None = None,
    ) -> KernelSpec:
        """Validate a ``kernel.json`` object; problems raise :class:`KernelSpecError`.

        ``argv`` is required; ``display_name``, ``language``, ``env``,
        ``metadata``, ``interrupt_mode`` (case-insensitive) and
        ``kernel_protocol_version`` are optional, as jupyter_client treats
        them. Unknown keys are ignored.
        """
        where = path or f"kernelspec {name!r}"

        def bad(fld: str | None, why: str) -> KernelSpecError:
            prefix = f"{where}: field {fld!r}" if fld else where
            return KernelSpecError(f"{prefix}: {why}", field=fld, path=path)

        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise bad("name", f"{name!r} is not a valid kernel name (letters, digits, . _ -)")
        if not isinstance(data, Mapping):
            raise bad(None, f"must hold a JSON object, not {type(data).__name__}")
        if "argv" not in data:
            raise bad("argv", "is missing")
        argv = data["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise bad("argv", "must be a non-empty list of strings")
        texts: dict[str, str] = {}
        for fld in ("display_name", "language", "kernel_protocol_version"):
            value = data.get(fld, "")
            if not isinstance(value, str):
                raise bad(fld, f"must be a string, not {type(value).__name__}")
            texts[fld] = value
        mode = data.get("interrupt_mode", "signal")
        if not isinstance(mode, str) or mode.lower() not in INTERRUPT_MODES:
            raise bad("interrupt_mode", f"must be one of {INTERRUPT_MODES}, not {mode!r}")
        env = data.get("env", {})
        if env is None:
            env = {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise bad("env", "must be an object mapping strings to strings")
        metadata = data.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise bad("metadata", f"must be an object, not {type(metadata).__name__}")
        return cls(
            name=name,
            argv=tuple(argv),
            display_name=texts["display_name"],
            language=texts["language"],
            interrupt_mode=mode.lower(),
            env=env,
            metadata=metadata,
            resource_dir=Path(resource_dir),
            kernel_protocol_version=texts["kernel_protocol_version"],
        )


# -- search path ---------------------------------------------------------------------


def _envset(name: str) -> bool:
    return os.environ.get(name, "").lower() not in _FALSY


def _home() -> Path:
    return Path("~").expanduser().resolve()


def _data_dir() -> Path:
    explicit = os.environ.get("JUPYTER_DATA_DIR")
    if explicit:
        return Path(explicit)
    if sys.platform == "darwin":
        return _home() / "Library" / "Jupyter"
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg if xdg else _home() / ".local" / "share") / "jupyter"


def _user_base() -> str | None:
    # What site.getuserbase() would compute in a fresh process (it caches).
    explicit = os.environ.get("PYTHONUSERBASE")
    if explicit:
        return explicit
    framework = getattr(sys, "_framework", None)
    if sys.platform == "darwin" and framework:
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return os.path.expanduser(os.path.join("~", "Library", framework, version))
    return os.path.expanduser(os.path.join("~", ".local"))


def _owned_by_me(path: str) -> bool:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return p.owner() == os.getlogin()
    except Exception:
        pass
    try:
        return p.stat().st_uid == os.geteuid()
    except OSError:
        return os.access(p, os.W_OK)


def _prefer_env_over_user() -> bool:
    if "JUPYTER_PREFER_ENV_PATH" in os.environ:
        return _envset("JUPYTER_PREFER_ENV_PATH")
    if sys.prefix != sys.base_prefix and _owned_by_me(sys.prefix):
        return True
    conda = os.environ.get("CONDA_PREFIX")
    return bool(
        conda
        and sys.prefix.startswith(conda)
        and os.environ.get("CONDA_DEFAULT_ENV", "base") != "base"
        and _owned_by_me(sys.prefix)
    )


def jupyter_path(*subdirs: str) -> list[Path]:
    """The data directories jupyter searches, highest priority first.

    Same order as ``jupyter_core.paths.jupyter_path`` on POSIX:
    ``$JUPYTER_PATH`` entries; then the user dirs (data dir, and the Python
    user base's ``share/jupyter``) and the environment dir
    (``sys.prefix/share/jupyter``), environment first when in a virtualenv or
    non-base conda env or ``$JUPYTER_PREFER_ENV_PATH`` says so; then
    ``/usr/local/share/jupyter`` and ``/usr/share/jupyter``.
    ``$JUPYTER_PLATFORM_DIRS`` is not supported. ``subdirs`` are appended.
    """
    paths: list[str] = []
    extra = os.environ.get("JUPYTER_PATH")
    if extra:
        paths.extend(p.rstrip(os.sep) for p in extra.split(os.pathsep) if p)
    user = [str(_data_dir())]
    if site.ENABLE_USER_SITE:
        base = _user_base()
        if base:
            user_share = str(Path(base, "share", "jupyter"))
            if user_share not in user:
                user.append(user_share)
    system = ["/usr/local/share/jupyter", "/usr/share/jupyter"]
    env = [p for p in (str(Path(sys.prefix, "share", "jupyter")),) if p not in system]
    if _prefer_env_over_user():
        paths.extend(env)
        paths.extend(user)
    else:
        paths.extend(user)
        paths.extend(env)
    paths.extend(p for p in system if p not in paths)
    return [Path(p, *subdirs) for p in paths]


def kernel_dirs() -> list[Path]:
    """The ``kernels`` subdirectory of every :func:`jupyter_path` entry."""
    return jupyter_path("kernels")


# -- native python3 ------------------------------------------------------------------


def _ipykernel_dir() -> Path | None:
    try:
        found = importlib.util.find_spec("ipykernel")
        launcher = importlib.util.find_spec("ipykernel_launcher")
    except (ImportError, ValueError):
        return None
    if found is None or launcher is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _advertises_curve(package_dir: Path) -> bool:
    # ipykernel's own kernel.json dict names supported_encryption when its
    # sockets honour CurveZMQ keys; read its source text rather than import it.
    try:
        text = (package_dir / "kernelspec.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return "supported_encryption" in text and "curve" in text


def native_python_spec() -> KernelSpec | None:
    """The built-in ``python3`` spec for this interpreter, or None without ipykernel."""
    package_dir = _ipykernel_dir()
    if package_dir is None:
        return None
    metadata: dict[str, Any] = {"debugger": True}
    if _advertises_curve(package_dir):
        metadata["supported_encryption"] = ["curve"]
    return KernelSpec(
        name=NATIVE_KERNEL_NAME,
        argv=(sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
        display_name=f"Python {sys.version_info[0]} (ipykernel)",
        language="python",
        metadata=metadata,
        resource_dir=package_dir / "resources",
    )


# -- lookup --------------------------------------------------------------------------


def find_kernel_specs() -> dict[str, Path]:
    """Lower-cased kernel name -> resource directory; the first directory wins.

    Subdirectories without a ``kernel.json`` are ignored and ones whose names
    are not valid kernel names are skipped (with a warning). ``python3``
    falls back to :func:`native_python_spec` when no directory provides it.
    """
    found: dict[str, Path] = {}
    for kdir in kernel_dirs():
        try:
            entries = sorted(os.listdir(kdir))
        except OSError:
            continue
        for entry in entries:
            resource_dir = kdir / entry
            if not (resource_dir / "kernel.json").is_file():
                continue
            if not NAME_PATTERN.fullmatch(entry):
                log.warning(
                    "kernelspec.invalid_name",
                    path=str(resource_dir),
                    reason="kernel names may only contain ASCII letters, digits, '.', '_', '-'",
                )
                continue
            found.setdefault(entry.lower(), resource_dir)
    if NATIVE_KERNEL_NAME not in found:
        native = native_python_spec()
        if native is not None:
            found[NATIVE_KERNEL_NAME] = native.resource_dir
    return found


def _load(name: str, resource_dir: Path) -> KernelSpec:
    kernel_file = resource_dir / "kernel.json"
    if name == NATIVE_KERNEL_NAME and not kernel_file.is_file():
        native = native_python_spec()
        if native is not None and native.resource_dir == resource_dir:
            return native
    path = str(kernel_file)
    try:
        with open(kernel_file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise KernelSpecError(f"{path}: cannot read: {exc}", path=path) from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise KernelSpecError(f"{path}: not valid JSON: {exc}", path=path) from exc
    return KernelSpec.from_dict(name, data, resource_dir, path=path)


def get_kernel_spec(name: str) -> KernelSpec:
    """The spec called ``name`` (case-insensitive; ``python`` means ``python3``).

    Raises :class:`NoSuchKernel` when there is none and
    :class:`KernelSpecError` (naming file and field) when its kernel.json is
    broken.
    """
    specs = find_kernel_specs()
    key = name.lower()
    if key not in specs:
        key = _ALIASES.get(key, key)
    if key not in specs:
        raise NoSuchKernel(name)
    return _load(key, specs[key])


def get_all_specs() -> dict[str, dict[str, Any]]:
    """``{name: {"resource_dir": str, "spec": kernel.json dict}}`` for every usable spec.

    Broken specs are left out and logged as a warning naming file and reason.
    """
    result: dict[str, dict[str, Any]] = {}
    for name, resource_dir in find_kernel_specs().items():
        try:
            spec = _load(name, resource_dir)
        except KernelSpecError as exc:
            log.warning(
                "kernelspec.broken",
                name=name,
                path=exc.path or str(resource_dir / "kernel.json"),
                field=exc.field,
                reason=str(exc),
            )
            continue
        result[name] = {"resource_dir": str(resource_dir), "spec": spec.to_dict()}
    return result


# -- launching -----------------------------------------------------------------------


def format_kernel_cmd(
    spec: KernelSpec,
    connection_file: str,
    *,
    extra_arguments: Sequence[str] = (),
    prefix: str | None = None,
) -> list[str]:
    """The argv to launch ``spec``: templates filled in, python mapped to this interpreter.

    ``{connection_file}``, ``{resource_dir}`` and ``{prefix}`` (default
    ``sys.prefix``) are replaced in every element, ``extra_arguments``
    included; other ``{names}`` are left alone. An ``argv[0]`` of
    ``python``, ``python3`` or ``python3.X`` (this interpreter's version)
    becomes ``sys.executable``, as jupyter_client does.
    """
    cmd = [*spec.argv, *extra_arguments]
    major, minor = sys.version_info[:2]
    if cmd and cmd[0] in {"python", f"python{major}", f"python{major}.{minor}"}:
        cmd[0] = sys.executable
    values = {
        "connection_file": connection_file,
        "resource_dir": str(spec.resource_dir),
        "prefix": sys.prefix if prefix is None else prefix,
    }

    def fill(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return [_TEMPLATE.sub(fill, arg) for arg in cmd]


def expand_env(spec_env: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """``spec_env`` with ``$VAR`` / ``${VAR}`` replaced from ``base``.

    Same rules as jupyter_client (``string.Template.safe_substitute``):
    unknown variables and malformed ``$`` stay as written, ``$$`` is ``$``.
    """
    return {k: string.Template(v).safe_substitute(base) for k, v in spec_env.items()}

"""Which launcher runs a kernel: from launch options, else the kernelspec's metadata.

``launcher`` may be a :class:`~supervisor.launchers.Launcher` instance, a name,
or None (the kernelspec's ``metadata.launcher``, else ``"local"``):

* ``"local"`` (also ``"exec"``): a new interpreter exec'd on this host;
* ``"fork"``: forked from a fork-server template that imported ipykernel once
  (Python kernels only; others are exec'd, and the ``ready`` event says so);
* ``"slurm"``: a Slurm job step on a compute node; ``slurm_options`` (srun long
  options) come from the launch options, else ``metadata.slurm_options``.

Named launchers are shared process-wide (kernels with the same interpreter
share a fork-server template; kernels with the same srun options share one
:class:`~supervisor.launchers.slurm.SlurmLauncher`). Plain functions; no state
beyond that table of shared launchers.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from supervisor.errors import ConfigurationError, KernelSpecError
from supervisor.launchers.base import Launcher
from supervisor.launchers.forkserver import ForkServerLauncher
from supervisor.launchers.local import LocalLauncher
from supervisor.launchers.slurm import slurm_launcher

__all__ = ["LAUNCHER_NAMES", "check_launcher", "choose_launcher", "launcher_named"]

LAUNCHER_NAMES = ("local", "exec", "fork", "slurm")
_shared: dict[str, Launcher] = {}
_lock = threading.Lock()


def launcher_named(name: str, slurm_options: Mapping[str, object] | None = None) -> Launcher:
    """The process-wide launcher called ``name`` (see the module docstring)."""
    if name not in LAUNCHER_NAMES:
        raise ConfigurationError(f"launcher must be one of {LAUNCHER_NAMES} or a Launcher, "
                                 f"not {name!r}")
    if name == "slurm":
        return slurm_launcher(slurm_options)
    with _lock:
        local = _shared.setdefault("local", LocalLauncher())
        if name == "fork" and "fork" not in _shared:
            assert isinstance(local, LocalLauncher)
            _shared["fork"] = ForkServerLauncher(fallback=local)
        return _shared["fork" if name == "fork" else "local"]


def check_launcher(value: object, slurm_options: object) -> None:
    """Validate launch options early: a bad name or option is a ConfigurationError."""
    if isinstance(value, str) and value not in LAUNCHER_NAMES:
        raise ConfigurationError(f"launcher must be one of {LAUNCHER_NAMES} or a Launcher, "
                                 f"not {value!r}")
    if slurm_options is not None:
        if not isinstance(slurm_options, Mapping):
            raise ConfigurationError("slurm_options is a mapping of srun long options")
        slurm_launcher(slurm_options)  # validates the names


def choose_launcher(value: Launcher | str | None, slurm_options: Mapping[str, object] | None,
                    metadata: Mapping[str, object], spec_name: str = "") -> Launcher:
    """The launcher for one launch (options win over the kernelspec's metadata)."""
    if value is not None and not isinstance(value, str):
        return value
    where = "launch options"
    name: object = value
    if value is None and metadata.get("launcher") is not None:
        name, where = metadata["launcher"], f"kernelspec {spec_name!r} metadata.launcher"
    name = name or "local"
    if name not in LAUNCHER_NAMES or not isinstance(name, str):
        message = f"{where}: launcher must be one of {LAUNCHER_NAMES}, not {name!r}"
        if where.startswith("kernelspec"):
            raise KernelSpecError(message, field="metadata.launcher")
        raise ConfigurationError(message)
    if name != "slurm":
        return launcher_named(name)
    options = slurm_options
    if options is None:
        meta_options = metadata.get("slurm_options")
        if meta_options is not None and not isinstance(meta_options, Mapping):
            raise KernelSpecError(f"kernelspec {spec_name!r}: metadata.slurm_options must be "
                                  f"an object of srun long options", field="metadata")
        options = meta_options
    try:
        return slurm_launcher(options)
    except ConfigurationError as exc:
        if options is not slurm_options:
            raise KernelSpecError(f"kernelspec {spec_name!r}: metadata.slurm_options: {exc}",
                                  field="metadata.slurm_options") from None
        raise

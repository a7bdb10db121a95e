"""Which launcher runs a kernel: from launch options, else the kernelspec's metadata.

``launcher`` may be a :class:`~supervisor.launchers.Launcher` instance, the
name ``"local"`` or ``"slurm"``, or None (the kernelspec's
``metadata.launcher``, else local). ``slurm_options`` (srun long options) come
from the launch options, else ``metadata.slurm_options``; kernels with the same
options share one :class:`~supervisor.launchers.slurm.SlurmLauncher`. Plain
functions; no state of their own beyond that shared launcher table.
"""

from __future__ import annotations

from collections.abc import Mapping

from supervisor.errors import ConfigurationError, KernelSpecError
from supervisor.launchers.base import Launcher
from supervisor.launchers.local import LocalLauncher
from supervisor.launchers.slurm import slurm_launcher

__all__ = ["LAUNCHER_NAMES", "check_launcher", "choose_launcher"]

LAUNCHER_NAMES = ("local", "slurm")
_local = LocalLauncher()


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
    if name == "local":
        return _local
    if name != "slurm":
        message = f"{where}: launcher must be one of {LAUNCHER_NAMES}, not {name!r}"
        if where.startswith("kernelspec"):
            raise KernelSpecError(message, field="metadata.launcher")
        raise ConfigurationError(message)
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

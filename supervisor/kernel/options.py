"""LaunchOptions: how one kernel is launched, validated when it is made.

A frozen value: any thread may make, read or ``replace`` one.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.errors import (
    ConfigurationError,
    KernelSpecError,
)
from supervisor.kernelspec import KernelSpec, get_kernel_spec
from supervisor.launchers import (
    CONTAIN_MODES,
    Launcher,
    Limits,
)
from supervisor.launchers.choose import check_launcher, choose_launcher

__all__ = ["LaunchOptions"]

_ENCRYPTION_MODES = ("disabled", "auto", "required")


@dataclass(frozen=True)
class LaunchOptions:
    """How to launch a kernel. Validated here; ``replace`` takes overrides."""

    kernel_name: str = "python3"
    spec: KernelSpec | None = None
    kernel_cmd: tuple[str, ...] = ()
    extra_arguments: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    startup_timeout: float = 60.0
    shutdown_wait: float = 5.0
    exit_grace: float = 2.0
    terminate_wait: float = 2.0
    ip: str = "127.0.0.1"
    transport: str = "tcp"
    transport_encryption: str = "disabled"
    port_retries: int = 3
    forward_stderr: bool = True
    contain: str = "auto"
    memory_limit: str | int | None = None
    cpu_limit: float | str | None = None
    launcher: Launcher | str | None = None
    slurm_options: Mapping[str, object] | None = None
    inherit_env: bool = True
    stdout: int | None = None
    stderr: int | None = None
    independent: bool = False

    def __post_init__(self) -> None:
        for name in ("stdout", "stderr"):
            object.__setattr__(self, name, _stream_target(name, getattr(self, name)))
        for name in ("startup_timeout", "shutdown_wait", "exit_grace", "terminate_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative number, not {value!r}")
        if self.transport_encryption not in _ENCRYPTION_MODES:
            raise ConfigurationError(
                f"transport_encryption must be one of {_ENCRYPTION_MODES}, "
                f"not {self.transport_encryption!r}"
            )
        if self.contain not in CONTAIN_MODES:
            raise ConfigurationError(f"contain must be one of {CONTAIN_MODES}, not "
                                     f"{self.contain!r}")
        Limits.parse(self.memory_limit, self.cpu_limit)  # a bad value fails here, named
        check_launcher(self.launcher, self.slurm_options)
        if self.transport not in ("tcp", "ipc"):
            raise ConfigurationError(f"transport must be 'tcp' or 'ipc', not {self.transport!r}")
        raw: tuple[object, object] = (self.extra_arguments, self.kernel_cmd)
        if any(isinstance(value, str) for value in raw):
            raise ConfigurationError("extra_arguments and kernel_cmd are sequences of strings")
        object.__setattr__(self, "extra_arguments", tuple(self.extra_arguments))
        object.__setattr__(self, "kernel_cmd", tuple(self.kernel_cmd))
        object.__setattr__(self, "env", dict(self.env))
        if self.cwd is not None:
            object.__setattr__(self, "cwd", os.fspath(self.cwd))

    def replace(self, **overrides: Any) -> LaunchOptions:
        """A copy with ``overrides`` applied; an unknown name is a ConfigurationError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigurationError(
                f"unknown launch option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)

    def resolve_spec(self) -> KernelSpec:
        """The kernelspec to launch (looked up by name unless given)."""
        return self.spec if self.spec is not None else get_kernel_spec(self.kernel_name)

    def pick_launcher(self, spec: KernelSpec) -> Launcher:
        """These options' launcher, else the kernelspec's ``metadata.launcher``, else local."""
        return choose_launcher(self.launcher, self.slurm_options, spec.metadata, spec.name)

    def containment(self, spec: KernelSpec) -> tuple[str, Limits]:
        """(contain mode, limits): these options, else the kernelspec's ``metadata``.

        ``metadata`` may hold ``memory_limit`` ("2G"), ``cpu_limit`` (CPUs) and
        ``contain``; a bad value there is a :class:`KernelSpecError`.
        """
        meta = spec.metadata
        contain = self.contain
        if contain == "auto" and meta.get("contain") is not None:
            contain = meta["contain"]
            if contain not in CONTAIN_MODES:
                raise KernelSpecError(f"kernelspec {spec.name!r}: metadata.contain must be "
                                      f"one of {CONTAIN_MODES}, not {contain!r}",
                                      field="metadata.contain")
        memory = self.memory_limit if self.memory_limit is not None else meta.get("memory_limit")
        cpu = self.cpu_limit if self.cpu_limit is not None else meta.get("cpu_limit")
        try:
            return contain, Limits.parse(memory, cpu)
        except ConfigurationError as exc:
            raise KernelSpecError(f"kernelspec {spec.name!r}: {exc}",
                                  field="metadata") from None


def _stream_target(name: str, value: object) -> int | None:
    """Validate a ``stdout``/``stderr`` launch option: None, a subprocess constant, an fd
    or an object with ``fileno()`` (turned into its fd)."""
    if value is None:
        return None
    fileno = getattr(value, "fileno", None)
    if callable(fileno):
        value = fileno()
    allowed = (subprocess.PIPE, subprocess.DEVNULL) + (
        (subprocess.STDOUT,) if name == "stderr" else ())
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0
                                                                and value not in allowed):
        raise ConfigurationError(
            f"{name} must be None, subprocess.PIPE, subprocess.DEVNULL"
            f"{', subprocess.STDOUT' if name == 'stderr' else ''}, a file descriptor "
            f"or a file, not {value!r}")
    return value



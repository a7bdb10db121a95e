"""The launcher protocol's value types: exits with causes, limits, resource figures.

Plain frozen values, owned by nobody: safe to pass between loops and threads.
See :mod:`supervisor.launchers` for the protocol they belong to.
"""

from __future__ import annotations

import asyncio
import re
import signal as _signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from supervisor.errors import ConfigurationError

__all__ = [
    "CONTAIN_MODES",
    "Endpoint",
    "ExitStatus",
    "LaunchRequest",
    "Launcher",
    "Limits",
    "ProcessHandle",
    "RemoteHandle",
    "Resources",
    "format_bytes",
    "parse_cpu_limit",
    "parse_memory_limit",
]

CONTAIN_MODES = ("auto", "cgroup", "session", "off")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory_limit(value: object) -> int | None:
    """Bytes from ``"2G"``, ``"300M"``, ``"512MiB"``, ``"1.5g"`` or an int; None stays None.

    Units are binary (``M`` is MiB), as cgroups and ``docker --memory`` read
    them. Anything else is a :class:`ConfigurationError` naming the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigurationError(f"memory_limit must be a size such as '2G', not {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        number, unit = float(match.group(1)), match.group(2).upper()
    else:
        raise ConfigurationError(
            f"memory_limit {value!r} does not parse: use bytes or a number with K, M, G "
            f"or T (binary units), such as '300M' or '2G'")
    size = int(number * _UNITS[unit])
    if size < 1 << 20:
        raise ConfigurationError(f"memory_limit {value!r} is below 1 MiB")
    return size


def parse_cpu_limit(value: object) -> float | None:
    """CPUs as a float (``0.5`` is half a core, ``2`` two cores); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(
                f"cpu_limit {value!r} does not parse: give a number of CPUs such as 0.5 or 2"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"cpu_limit must be a positive number of CPUs, not {value!r}")
    return float(value)


def format_bytes(size: int | None) -> str:
    """``314572800`` -> ``'300 MiB'`` (one decimal above 10 GiB is not needed)."""
    if size is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 and value != int(value) else \
                f"{value:.0f} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Limits:
    """Per-kernel resource limits; ``None`` means unlimited."""

    memory: int | None = None
    cpu: float | None = None

    @classmethod
    def parse(cls, memory: object = None, cpu: object = None) -> Limits:
        """Validate user values (``"2G"``, ``0.5``); a bad one is a ConfigurationError."""
        return cls(memory=parse_memory_limit(memory), cpu=parse_cpu_limit(cpu))

    def __bool__(self) -> bool:
        return self.memory is not None or self.cpu is not None


@dataclass(frozen=True)
class ExitStatus:
    """How a kernel process ended, and why when we know.

    ``exit_code`` or ``signal`` is what ``waitpid`` said. ``cause`` is the
    launcher's explanation in words (``"out of memory (limit 300 MiB, peak
    300 MiB)"``, ``"killed by the supervisor (shut down)"``), empty when the
    process simply exited. ``oom`` is True when the out-of-memory killer (or
    our limit) did it. ``tree_ended`` counts the processes of its tree that
    were still alive and that we ended with it.
    """

    exit_code: int | None
    signal: int | None
    cause: str = ""
    oom: bool = False
    tree_ended: int = 0
    memory_limit: int | None = None
    memory_peak: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Build from :attr:`subprocess.Popen.returncode` (negative: signal)."""
        if returncode < 0:
            return cls(exit_code=None, signal=-returncode)
        return cls(exit_code=returncode, signal=None)

    @property
    def abnormal(self) -> bool:
        """Non-zero exit code or killed by a signal."""
        return self.signal is not None or self.exit_code != 0

    def describe_code(self) -> str:
        """Only the code: ``exit code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"signal {name}"
        return f"exit code {self.exit_code}"

    def describe(self) -> str:
        """The code, then the cause and the tree: ``signal SIGKILL: out of memory (...)``."""
        text = self.describe_code()
        if self.cause:
            text = f"{text}: {self.cause}"
        if self.tree_ended:
            s = "" if self.tree_ended == 1 else "es"
            text = f"{text}; its process tree was ended: {self.tree_ended} process{s}"
        return text


@dataclass(frozen=True)
class Resources:
    """What a kernel's process tree uses now. ``None`` where the method cannot tell.

    ``memory`` is bytes in use (cgroup ``memory.current`` / ``usage_in_bytes``,
    else the sum of the tree's RSS); ``memory_peak`` the high-water mark where
    a cgroup keeps one; ``cpu_seconds`` user+system time of the tree;
    ``processes`` how many processes the tree has; ``method`` how the tree is
    contained (``cgroup-v2``, ``cgroup-v1``, ``session``, ``off``);
    ``memory_method`` and ``cpu_method`` how the limits are enforced
    (``cgroup-v2``, ``cgroup-v1``, ``rlimit``, ``none``).
    """

    memory: int | None = None
    memory_peak: int | None = None
    memory_limit: int | None = None
    cpu_seconds: float | None = None
    cpu_limit: float | None = None
    processes: int | None = None
    method: str = "off"
    memory_method: str = "none"
    cpu_method: str = "none"


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a launcher needs to start one kernel process."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    forward_stderr: bool = True
    capture_stderr: bool = True
    stdout: int | None = None
    stderr: int | None = None  # where an uncaptured stderr goes (None: inherited)
    independent: bool = False  # not registered with the reaper: may outlive us
    owned_files: Sequence[str] = ()
    contain: str = "auto"
    limits: Limits = field(default_factory=Limits)
    label: str = ""
    connection_file: str | None = None

    def __post_init__(self) -> None:
        if self.contain not in CONTAIN_MODES:
            raise ConfigurationError(f"contain must be one of {CONTAIN_MODES}, not "
                                     f"{self.contain!r}")


@runtime_checkable
class ProcessHandle(Protocol):
    """One launched kernel process and its tree; lives on the launching loop.

    See :mod:`supervisor.launchers` for what each member promises.
    """

    pid: int
    exited: asyncio.Future[ExitStatus]
    final: ExitStatus | None
    method: str
    stderr_listener: Callable[[bytes], None] | None

    @property
    def running(self) -> bool: ...

    def signal(self, signum: int) -> bool: ...

    def signal_group(self, signum: int) -> bool: ...

    def signal_tree(self, signum: int) -> bool: ...

    def kill_tree(self) -> None: ...

    def pids(self) -> list[int]: ...

    def resources(self) -> Resources: ...

    def stderr_tail(self, lines: int = 20) -> str: ...

    async def wait(self, timeout: float | None = None) -> ExitStatus | None: ...

    async def cleanup(self, cause: str = "") -> ExitStatus: ...

    def close(self) -> None: ...

    def abandon(self) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """Where a remote kernel listens: its node's address and one port per channel."""

    ip: str
    ports: Mapping[str, int]


@runtime_checkable
class RemoteHandle(ProcessHandle, Protocol):
    """A handle whose kernel runs elsewhere and says where once it runs (Slurm).

    ``wait_endpoint(timeout)`` returns the address and ports the kernel bound
    on its node (the key stays ours), or raises
    :class:`~supervisor.errors.KernelStartupError` when the job ends first or
    ``timeout`` passes (the launcher then has already cancelled it).
    ``describe_state()`` says where the launch is ("pending: Resources").
    """

    async def wait_endpoint(self, timeout: float) -> Endpoint: ...

    def describe_state(self) -> str: ...


class Launcher(Protocol):
    """Makes kernel processes. ``launch`` runs on the loop that will own the handle."""

    name: str

    def launch(self, request: LaunchRequest,
               on_exit: Callable[[ExitStatus], None] | None = None) -> ProcessHandle: ...

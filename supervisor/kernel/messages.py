"""The messages a KernelActor takes (and the one it sends its parent): small frozen values.

Created by any caller, read by the actor's coroutine on its loop; immutable, so
they may cross threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.launchers import ExitStatus, ProcessHandle

__all__ = [
    "ChildExited",
    "FinishShutdown",
    "Interrupt",
    "ProcessExited",
    "RequestShutdown",
    "Restart",
    "Shutdown",
    "Signal",
    "Start",
]


@dataclass(frozen=True)
class Start:
    """Launch the kernel and wait until it is ready."""


@dataclass(frozen=True)
class Restart:
    """Shut down (keeping the connection file) and start again."""

    now: bool = False
    newports: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Interrupt:
    """Interrupt the running code (signal or message, per the kernelspec)."""


@dataclass(frozen=True)
class Signal:
    """Send a signal to the kernel's process group."""

    signum: int


@dataclass(frozen=True)
class Shutdown:
    """Stop the kernel: graceful unless ``now``; keep files when ``restart``.

    ``cause`` names why, in the words the exit will carry ("culled").
    """

    now: bool = False
    restart: bool = False
    cause: str = ""


@dataclass(frozen=True)
class RequestShutdown:
    """Send ``shutdown_request`` only; :class:`FinishShutdown` waits and cleans up."""

    restart: bool = False


@dataclass(frozen=True)
class FinishShutdown:
    """Wait up to ``waittime`` for the exit, then SIGTERM/SIGKILL; clean up."""

    waittime: float | None = None


@dataclass(frozen=True)
class ProcessExited:
    """Internal: the process watch saw ``process`` exit."""

    process: ProcessHandle
    status: ExitStatus


@dataclass(frozen=True)
class ChildExited:
    """Told to the parent when the kernel exits without being asked to."""

    kernel_id: str
    status: ExitStatus
    uptime: float
    reason: str = ""



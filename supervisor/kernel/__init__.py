"""The kernel layer: a KernelActor owns one kernel process.

Four modules: :mod:`~supervisor.kernel.actor` (:class:`KernelActor`, its conflict
table and readiness), :mod:`~supervisor.kernel.messages` (what it takes),
:mod:`~supervisor.kernel.options` (:class:`LaunchOptions`) and
:mod:`~supervisor.kernel.startchecks` (exhaustion and port-clash checks).
"""

from __future__ import annotations

from supervisor.kernel.actor import KernelActor
from supervisor.kernel.messages import (
    ChildExited,
    FinishShutdown,
    Interrupt,
    ProcessExited,
    RequestShutdown,
    Restart,
    Shutdown,
    Signal,
    Start,
)
from supervisor.kernel.options import LaunchOptions

__all__ = [
    "ChildExited",
    "FinishShutdown",
    "Interrupt",
    "KernelActor",
    "LaunchOptions",
    "ProcessExited",
    "RequestShutdown",
    "Restart",
    "Shutdown",
    "Signal",
    "Start",
]

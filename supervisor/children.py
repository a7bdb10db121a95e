"""The records a Supervisor keeps: one per child, its internal messages, its statistics.

Plain data, no behaviour: a :class:`Child` and the messages below are created
and touched only by their supervisor's actor coroutine, on its loop;
:class:`SupervisorStatistics` is a frozen snapshot that any thread may read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.actor import Actor
from supervisor.connection import ConnectionInfo
from supervisor.kernel import ChildExited, KernelActor, LaunchOptions
from supervisor.launchers import Resources
from supervisor.policy import RestartHistory, RestartPolicy

__all__ = [
    "ACTIVE", "STRATEGIES", "Acquire", "AddSupervisor", "CancelStart", "Child", "CullTick",
    "DoRestart", "Op",
    "OpDone", "Revive", "ShutdownAll", "StartChild", "StartDone", "SupervisorStatistics",
]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
ACTIVE = ("starting", "ready", "restarting", "backoff", "stopping")


@dataclass(frozen=True)
class SupervisorStatistics:
    """A snapshot of a supervisor, for tests, dashboards and the CLI."""

    name: str
    kernels: int
    by_state: Mapping[str, int]
    pending_starts: int
    restarts: int
    gave_up: int
    pool: Mapping[str, int]
    pool_target: Mapping[str, int]
    events: int
    resources: Mapping[str, Resources] = field(default_factory=dict)


# -- internal messages ------------------------------------------------------------
@dataclass(frozen=True)
class StartChild:
    kernel_id: str
    options: LaunchOptions
    policy: RestartPolicy
    pooled: bool = False
    connection_info: ConnectionInfo | None = None
    connection_file: str | None = None


@dataclass(frozen=True)
class StartDone:
    kernel_id: str
    epoch: int
    error: BaseException | None
    kind: str  # "start" | "auto" | "manual"


@dataclass(frozen=True)
class DoRestart:
    kernel_id: str
    epoch: int


@dataclass(frozen=True)
class Op:
    kernel_id: str
    op: str  # restart | interrupt | signal | shutdown
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpDone:
    kernel_id: str
    epoch: int
    op: str
    error: BaseException | None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CancelStart:
    """The caller of a start went away: cut that start short."""

    kernel_id: str
    epoch: int | None = None  # None: whatever start runs now


@dataclass(frozen=True)
class ShutdownAll:
    now: bool


@dataclass(frozen=True)
class Acquire:
    kernel_name: str


@dataclass(frozen=True)
class AddSupervisor:
    child: Actor  # a nested Supervisor
    policy: RestartPolicy


@dataclass(frozen=True)
class Revive:
    """From the parent: start every child again after this supervisor gave up."""


@dataclass(frozen=True)
class CullTick:
    pass


@dataclass
class Child:
    kernel_id: str
    actor: KernelActor | Actor  # a KernelActor, or a nested Supervisor
    policy: RestartPolicy
    order: int
    options: LaunchOptions | None
    status: str = "starting"
    pooled: bool = False
    history: RestartHistory = field(default_factory=RestartHistory)
    restart_count: int = 0
    epoch: int = 0
    timer: object | None = None
    waiters: list[asyncio.Future[str]] = field(default_factory=list)
    deferred_exit: ChildExited | None = None
    cancelled: bool = False  # the caller of the current start went away

    @property
    def kernel_name(self) -> str:
        return self.options.kernel_name if self.options is not None else ""

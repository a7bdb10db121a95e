"""Supervisor: an actor that owns kernel actors (and nested supervisors).

A :class:`Supervisor` belongs to the IOLoop that was current when it started
(``async with Supervisor(...)`` or :meth:`Supervisor.start`); call its
coroutines from that loop. Its message handlers never wait on a kernel: long
work (a start, a shutdown) is asked of the child actor and its completion
comes back to the mailbox as a message, so one slow kernel never holds up the
others.

What it does with a child that exits on its own is decided by the child's
:class:`~supervisor.policy.RestartPolicy` (a pure function of history and
clock) and by the strategy:

* ``one_for_one``: restart the child that exited;
* ``one_for_all``: restart every child;
* ``rest_for_one``: restart the child and those started after it.

Temporary children are never restarted; a sibling restart shuts them down, as
in Erlang/OTP. When a child's policy gives up, a top-level supervisor emits
``gave_up`` and ``dead`` for it and carries on with the others; a nested
supervisor instead shuts all its children down, emits ``gave_up`` for itself
and reports the failure to its parent, whose own policy decides next.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog
from tornado.ioloop import PeriodicCallback

from supervisor.actor import Actor
from supervisor.client import KernelClient
from supervisor.connection import ConnectionInfo
from supervisor.errors import (
    ConfigurationError,
    KernelDeadError,
    KernelLimitError,
    KernelStartupError,
    KernelStateError,
)
from supervisor.events import Dispatcher, KernelEvent, Listener
from supervisor.kernel import (
    ChildExited,
    FinishShutdown,
    Interrupt,
    KernelActor,
    LaunchOptions,
    RequestShutdown,
    Restart,
    Shutdown,
    Signal,
    Start,
)
from supervisor.policy import ExitInfo, GiveUp, RestartHistory, RestartPolicy, decide
from supervisor.policy import Restart as RestartDecision
from supervisor.process import ExitStatus
from supervisor.startgate import StartGate

__all__ = ["STRATEGIES", "KernelHandle", "Supervisor", "SupervisorStatistics"]

log = structlog.get_logger("supervisor.supervisor")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
_ACTIVE = ("starting", "ready", "restarting", "backoff", "stopping")


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


# -- internal messages ------------------------------------------------------------
@dataclass(frozen=True)
class _StartChild:
    kernel_id: str
    options: LaunchOptions
    policy: RestartPolicy
    pooled: bool = False
    connection_info: ConnectionInfo | None = None
    connection_file: str | None = None


@dataclass(frozen=True)
class _StartDone:
    kernel_id: str
    epoch: int
    error: BaseException | None
    kind: str  # "start" | "auto" | "manual"


@dataclass(frozen=True)
class _DoRestart:
    kernel_id: str
    epoch: int


@dataclass(frozen=True)
class _Op:
    kernel_id: str
    op: str  # restart | interrupt | signal | shutdown
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _OpDone:
    kernel_id: str
    epoch: int
    op: str
    error: BaseException | None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _ShutdownAll:
    now: bool


@dataclass(frozen=True)
class _Acquire:
    kernel_name: str


@dataclass(frozen=True)
class _AddSupervisor:
    child: Supervisor
    policy: RestartPolicy


@dataclass(frozen=True)
class _Revive:
    """From the parent: start every child again after this supervisor gave up."""


@dataclass(frozen=True)
class _CullTick:
    pass


@dataclass
class _Child:
    kernel_id: str
    actor: KernelActor | Supervisor
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

    @property
    def kernel_name(self) -> str:
        return self.options.kernel_name if self.options is not None else ""


class Supervisor(Actor):
    """Starts, watches and restarts kernels by policy; see the module docstring."""

    def __init__(
        self,
        *,
        policy: RestartPolicy | None = None,
        strategy: str = "one_for_one",
        max_kernels: int | None = None,
        max_concurrent_starts: int | None = None,
        warm: Mapping[str, int] | None = None,
        cull_idle_timeout: float = 0.0,
        cull_interval: float = 300.0,
        cull_busy: bool = False,
        cull_spare: Callable[[str], bool] | None = None,
        launch: LaunchOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or f"supervisor-{uuid.uuid4().hex[:8]}")
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        for label, value in (("max_kernels", max_kernels),
                             ("max_concurrent_starts", max_concurrent_starts)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigurationError(f"{label} must be a positive int or None, not {value!r}")
        for label, num in (("cull_idle_timeout", cull_idle_timeout),
                           ("cull_interval", cull_interval)):
            if isinstance(num, bool) or not isinstance(num, (int, float)) or num < 0:
                raise ConfigurationError(f"{label} must be a non-negative number, not {num!r}")
        if cull_idle_timeout and cull_interval <= 0:
            raise ConfigurationError("cull_interval must be positive when culling is on")
        self.policy = policy or RestartPolicy()
        self.strategy = strategy
        self.max_kernels = max_kernels
        self.launch = launch or LaunchOptions()
        self.warm = dict(warm or {})
        for kname, count in self.warm.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigurationError(f"warm[{kname!r}] must be a non-negative int")
        self.cull_idle_timeout = float(cull_idle_timeout)
        self.cull_interval = float(cull_interval)
        self.cull_busy = cull_busy
        # A predicate of a kernel id: True spares that kernel from this cull round
        # (the gateway spares kernels with connected clients).
        self.cull_spare = cull_spare
        self._clock = clock
        self._rng = rng or random.Random()
        self._gate = StartGate(max_concurrent_starts)
        self._children: dict[str, _Child] = {}
        self._order = 0
        self._events = Dispatcher()
        self._callbacks: dict[tuple[int, str, str | None], Listener] = {}
        self._restarts = 0
        self._gave_up = 0
        self.parent: Supervisor | None = None
        self._culler: PeriodicCallback | None = None
        self._log = log.bind(supervisor=self.name)

    # == public API (call on the supervisor's loop) ====================================
    async def __aenter__(self) -> Supervisor:
        if self.actor_state == "new":
            self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def on_start(self) -> None:
        for kname in self.warm:
            self._refill(kname)
        if self.cull_idle_timeout > 0:
            self._culler = PeriodicCallback(lambda: self.tell(_CullTick()),
                                            self.cull_interval * 1000)
            self._culler.start()

    async def close(self, now: bool = False) -> None:
        """Shut every child down (reverse start order) and stop the supervisor."""
        if self.alive:
            with contextlib.suppress(KernelDeadError):
                await self.shutdown_all(now=now)
            self.stop("closed")
        await self.join()

    async def start_kernel(
        self,
        kernel_name: str | None = None,
        kernel_id: str | None = None,
        policy: RestartPolicy | None = None,
        **launch_kw: Any,
    ) -> str:
        """Start a kernel and return its id once it is ready.

        ``launch_kw`` overrides :class:`~supervisor.kernel.LaunchOptions`
        fields (``extra_arguments``, ``env``, ``cwd``, ``startup_timeout``...);
        ``connection_file`` and ``connection_info`` are passed to the actor.
        """
        conn_file = launch_kw.pop("connection_file", None)
        conn_info = launch_kw.pop("connection_info", None)
        options = self.launch.replace(**launch_kw)
        if kernel_name is not None:
            # A spec given explicitly wins; otherwise the name is looked up afresh.
            changes: dict[str, Any] = {"kernel_name": kernel_name}
            if launch_kw.get("spec") is None:
                changes["spec"] = None
            options = options.replace(**changes)
        msg = _StartChild(kernel_id or str(uuid.uuid4()), options, policy or self.policy,
                          connection_info=conn_info,
                          connection_file=None if conn_file is None else str(conn_file))
        ready: asyncio.Future[str] = await self.ask(msg)
        return await ready

    async def acquire(self, kernel_name: str = "python3") -> str:
        """A ready kernel from the warm pool at once, or a new one if it is empty."""
        ready: asyncio.Future[str] = await self.ask(_Acquire(kernel_name))
        return await ready

    async def restart_kernel(self, kernel_id: str, now: bool = False, newports: bool = False,
                             **overrides: Any) -> None:
        """Restart a kernel by hand (a ``manual`` restart) and wait until ready."""
        await self._op(kernel_id, "restart", now=now, newports=newports, overrides=overrides)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        """Interrupt what the kernel is running."""
        await self._op(kernel_id, "interrupt")

    async def signal_kernel(self, kernel_id: str, signum: int) -> None:
        """Send ``signum`` to the kernel's process group."""
        await self._op(kernel_id, "signal", signum=signum)

    async def shutdown_kernel(self, kernel_id: str, now: bool = False,
                              restart: bool = False) -> None:
        """Stop a kernel; with ``restart`` it stays known (files kept) for a later start."""
        await self._op(kernel_id, "shutdown", now=now, restart=restart)

    async def request_shutdown(self, kernel_id: str, restart: bool = False) -> None:
        """Send ``shutdown_request`` only (the seed's two-step shutdown, step one)."""
        await self._op(kernel_id, "request_shutdown", restart=restart)

    async def finish_shutdown(self, kernel_id: str, waittime: float | None = None) -> None:
        """Wait for the exit asked by :meth:`request_shutdown`, then force it; clean up."""
        await self._op(kernel_id, "finish_shutdown", waittime=waittime)

    async def shutdown_all(self, now: bool = False) -> None:
        """Stop every child, cancelling pending restarts; reverse start order."""
        done: asyncio.Future[None] = await self.ask(_ShutdownAll(now))
        await done

    async def start_supervisor(self, child_policy: RestartPolicy | None = None,
                               **kwargs: Any) -> Supervisor:
        """Start a nested supervisor as a child of this one and return it.

        ``kwargs`` build the nested :class:`Supervisor` (its ``policy`` governs
        its own kernels); ``child_policy`` is how *this* supervisor treats the
        nested one when it gives up (default: this supervisor's policy).
        """
        child = Supervisor(**kwargs)
        child.parent = self
        await self.ask(_AddSupervisor(child, child_policy or self.policy))
        return child

    def get_kernel(self, kernel_id: str) -> KernelHandle:
        """A handle with the AsyncKernelManager methods for one kernel."""
        child = self._children.get(kernel_id)
        if child is None or not isinstance(child.actor, KernelActor):
            raise KernelStateError(f"{self.name} has no kernel {kernel_id!r}")
        return KernelHandle(self, kernel_id)

    def list_kernel_ids(self) -> list[str]:
        """Ids of the kernels handed out (warm-pool kernels not included)."""
        return [c.kernel_id for c in self._children.values()
                if isinstance(c.actor, KernelActor) and not c.pooled]

    def all_kernel_ids(self) -> list[str]:
        """Every kernel in this tree, nested supervisors' included."""
        ids: list[str] = []
        for child in self._children.values():
            if isinstance(child.actor, Supervisor):
                ids.extend(child.actor.all_kernel_ids())
            else:
                ids.append(child.kernel_id)
        return ids

    def __len__(self) -> int:
        return len(self.list_kernel_ids())

    def __contains__(self, kernel_id: object) -> bool:
        child = self._children.get(kernel_id) if isinstance(kernel_id, str) else None
        return child is not None and not child.pooled

    def __iter__(self) -> Iterator[str]:
        return iter(self.list_kernel_ids())

    def child_status(self, kernel_id: str) -> str:
        """The supervisor's view of a child: starting, ready, backoff, ..."""
        child = self._children.get(kernel_id)
        return "unknown" if child is None else child.status

    def subscribe(self, listener: Listener,
                  predicate: Callable[[KernelEvent], bool] | None = None) -> None:
        """Receive every :class:`KernelEvent` (async listeners run on the loop,
        plain ones on their own thread; see :mod:`supervisor.events`)."""
        self._events.subscribe(listener, predicate)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop receiving events."""
        self._events.unsubscribe(listener)

    def add_restart_callback(self, callback: Callable[[], object], event: str = "restart",
                             kernel_id: str | None = None) -> None:
        """Seed-style callback, called with no arguments: ``'restart'`` when a
        kernel is about to be restarted automatically, ``'dead'`` when it is
        lost for good. For all kernels, or one."""
        if event not in ("restart", "dead"):
            raise ConfigurationError(f"event must be 'restart' or 'dead', not {event!r}")
        key = (id(callback), event, kernel_id)
        if key in self._callbacks:
            return
        kind = "restarting" if event == "restart" else "dead"

        def wrapper(ev: KernelEvent) -> None:
            callback()

        def wanted(ev: KernelEvent) -> bool:
            return (ev.kind == kind and not ev.manual
                    and (kernel_id is None or ev.kernel_id == kernel_id))

        self._callbacks[key] = wrapper
        self._events.subscribe(wrapper, wanted)

    def remove_restart_callback(self, callback: Callable[[], object], event: str = "restart",
                                kernel_id: str | None = None) -> None:
        """Undo :meth:`add_restart_callback` (no error if it was not added)."""
        wrapper = self._callbacks.pop((id(callback), event, kernel_id), None)
        if wrapper is not None:
            self._events.unsubscribe(wrapper)

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot of counts by state, restarts, pool and pending starts."""
        by_state: dict[str, int] = {}
        pool: dict[str, int] = dict.fromkeys(self.warm, 0)
        for child in self._children.values():
            by_state[child.status] = by_state.get(child.status, 0) + 1
            if child.pooled and child.status == "ready":
                pool[child.kernel_name] = pool.get(child.kernel_name, 0) + 1
        return SupervisorStatistics(
            name=self.name, kernels=len(self.list_kernel_ids()),
            by_state=MappingProxyType(by_state), pending_starts=self._gate.pending,
            restarts=self._restarts, gave_up=self._gave_up, pool=MappingProxyType(pool),
            pool_target=MappingProxyType(dict(self.warm)), events=self._events.delivered,
        )

    def actor_of(self, kernel_id: str) -> KernelActor:
        """The :class:`KernelActor` of a kernel (read-only use, same loop)."""
        child = self._children.get(kernel_id)
        if child is None or not isinstance(child.actor, KernelActor):
            raise KernelStateError(f"{self.name} has no kernel {kernel_id!r}")
        return child.actor

    def child_record(self, kernel_id: str) -> tuple[int, str]:
        """(restart_count, status) of a child."""
        child = self._children.get(kernel_id)
        if child is None:
            raise KernelStateError(f"{self.name} has no child {kernel_id!r}")
        return child.restart_count, child.status

    # == message handling ================================================================
    async def _op(self, kernel_id: str, op: str, **args: Any) -> None:
        done: asyncio.Future[None] = await self.ask(_Op(kernel_id, op, args))
        await done

    async def receive(self, msg: object) -> Any:
        if isinstance(msg, _StartChild):
            return self._on_start_child(msg)
        if isinstance(msg, _StartDone):
            return self._on_start_done(msg)
        if isinstance(msg, ChildExited):
            return self._on_child_exited(msg)
        if isinstance(msg, _DoRestart):
            return self._on_do_restart(msg)
        if isinstance(msg, _Op):
            return self._on_op(msg)
        if isinstance(msg, _OpDone):
            return self._on_op_done(msg)
        if isinstance(msg, _ShutdownAll):
            return self._on_shutdown_all(msg)
        if isinstance(msg, _Acquire):
            return self._on_acquire(msg)
        if isinstance(msg, _AddSupervisor):
            return self._on_add_supervisor(msg)
        if isinstance(msg, _Revive):
            return self._on_revive()
        if isinstance(msg, _CullTick):
            return self._on_cull()
        raise KernelStateError(f"{self.name} does not understand {type(msg).__name__}")

    async def on_stop(self) -> None:
        if self._culler is not None:
            self._culler.stop()
        for child in list(self._children.values()):
            self._cancel_timer(child)
            child.actor.stop("supervisor stopped")
            await child.actor.join()
            self._fail_waiters(child, KernelStartupError(f"{self.name} stopped"))
        self._children.clear()
        self._events.close()

    # -- events ---------------------------------------------------------------------------
    def _emit(self, kind: str, child: _Child | None, *, kernel_id: str | None = None,
              status: ExitStatus | None = None, reason: str = "", delay: float | None = None,
              manual: bool = False) -> None:
        event = KernelEvent(
            kind=kind, kernel_id=kernel_id or (child.kernel_id if child else self.name),
            supervisor=self.name, kernel_name=child.kernel_name if child else "",
            exit_code=status.exit_code if status else None,
            signal=status.signal if status else None, reason=reason,
            restart_count=child.restart_count if child else 0, delay=delay, manual=manual,
            at=self._clock(),
        )
        fields = {"kernel_id": event.kernel_id, "reason": reason, "exit_code": event.exit_code,
                  "signal": event.signal, "delay": delay, "manual": manual,
                  "restart_count": event.restart_count}
        self._log.info(f"kernel.{kind}", **{k: v for k, v in fields.items()
                                            if v not in (None, "", False)})
        self._events.emit(event)

    # -- starting ---------------------------------------------------------------------------
    def _active_count(self) -> int:
        return sum(1 for c in self._children.values() if c.status in _ACTIVE)

    def _check_limit(self) -> None:
        if self.max_kernels is not None and self._active_count() >= self.max_kernels:
            raise KernelLimitError(
                f"{self.name} already runs or starts {self._active_count()} kernels "
                f"(max_kernels={self.max_kernels})"
            )

    def _on_start_child(self, msg: _StartChild) -> asyncio.Future[str]:
        existing = self._children.get(msg.kernel_id)
        if existing is not None:
            if existing.status != "stopped":
                raise KernelStateError(f"kernel {msg.kernel_id} already exists ({existing.status})")
            self._check_limit()
            assert isinstance(existing.actor, KernelActor)
            existing.actor.options = msg.options
            return self._begin(existing, "start", Start(), priority=0)
        self._check_limit()
        self._order += 1
        actor = KernelActor(msg.options, kernel_id=msg.kernel_id, parent=self,
                            connection_info=msg.connection_info,
                            connection_file=msg.connection_file)
        actor.start()
        child = _Child(msg.kernel_id, actor, msg.policy, self._order, msg.options,
                       pooled=msg.pooled)
        self._children[msg.kernel_id] = child
        self._emit("starting", child, reason="pool refill" if msg.pooled else "")
        return self._begin(child, "start", Start(), priority=1 if msg.pooled else 0)

    def _begin(self, child: _Child, kind: str, request: object,
               priority: int = 0) -> asyncio.Future[str]:
        """Ask the child to (re)start through the start gate; report back by message."""
        child.epoch += 1
        child.status = "starting" if kind == "start" else "restarting"
        child.deferred_exit = None
        epoch = child.epoch
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Automatic restarts have no caller: mark a failure as seen so asyncio does
        # not report it as "never retrieved" (callers still get it when they await).
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        child.waiters.append(waiter)

        async def run() -> None:
            error: BaseException | None = None
            try:
                async with self._gate.slot(priority):
                    result = await child.actor.ask(request)
                    if isinstance(result, asyncio.Future):  # a nested supervisor's revival
                        await result
            except Exception as exc:
                error = exc
            self.tell(_StartDone(child.kernel_id, epoch, error, kind))

        self.spawn(run())
        return waiter

    def _on_start_done(self, msg: _StartDone) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None or child.epoch != msg.epoch:
            return
        if msg.error is None:
            child.status = "ready"
            child.history = child.history.started(self._clock())
            if msg.kind == "start":
                self._emit("ready", child)
            else:
                self._emit("restarted", child, manual=msg.kind == "manual")
            self._settle_waiters(child)
            return
        error = msg.error
        if msg.kind == "auto":
            # A failed automatic restart is one more exit for the policy to judge.
            code = getattr(error, "exit_code", None)
            sig = getattr(error, "signal", None)
            status = ExitStatus(code if code is not None or sig is not None else 1, sig)
            child.status = "ready"  # so the exit below is judged like any other
            self._on_child_exited(ChildExited(child.kernel_id, status, 0.0, reason=str(error)))
            return
        self._fail_waiters(child, error)
        if msg.kind == "manual":
            child.status = "exited"
            self._emit("exited", child, reason=f"manual restart failed: {error}", manual=True)
            self._decide(child, ExitStatus(1, None), f"manual restart failed: {error}")
            return
        self._emit("dead", child, reason=f"start failed: {error}")
        self._remove(child)
        if child.pooled:
            return  # the next acquire refills; no hot loop on a broken spec

    def _settle_waiters(self, child: _Child) -> None:
        for waiter in child.waiters:
            if not waiter.done():
                waiter.set_result(child.kernel_id)
        child.waiters.clear()
        deferred, child.deferred_exit = child.deferred_exit, None
        if deferred is not None:
            self._on_child_exited(deferred)

    def _fail_waiters(self, child: _Child, error: BaseException) -> None:
        for waiter in child.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        child.waiters.clear()

    def _remove(self, child: _Child) -> None:
        self._cancel_timer(child)
        self._children.pop(child.kernel_id, None)
        child.actor.stop("removed by supervisor")

    def _cancel_timer(self, child: _Child) -> None:
        if child.timer is not None:
            self.loop.remove_timeout(child.timer)
            child.timer = None

    # -- exits and restarts -------------------------------------------------------------------
    def _on_child_exited(self, msg: ChildExited) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None:
            return
        if child.status in ("starting", "restarting"):
            # The kernel died right after answering: its start's completion is
            # still on its way. Judge the exit once the kernel counts as ready.
            child.deferred_exit = msg
            return
        if child.status != "ready":
            return
        child.status = "exited"
        reason = msg.reason or msg.status.describe()
        self._emit("exited", child, status=msg.status, reason=reason)
        self._decide(child, msg.status, reason)

    def _decide(self, child: _Child, status: ExitStatus, reason: str) -> None:
        now = self._clock()
        decision = decide(child.policy, child.history,
                          ExitInfo(status.exit_code, status.signal), now, self._rng)
        if isinstance(decision, GiveUp):
            self._give_up(child, status, decision.reason)
            return
        if not isinstance(decision, RestartDecision):
            self._emit("dead", child, status=status, reason=f"not restarted: {decision.reason}")
            self._remove(child)
            return
        child.history = child.history.restarted(now, child.policy)
        group = [child]
        if self.strategy != "one_for_one":
            group = [c for c in self._children.values()
                     if c is child or (self.strategy == "one_for_all" or c.order > child.order)]
        for member in group:
            if member is not child and member.policy.restart == "temporary":
                self._emit("shutdown", member, reason=f"sibling {child.kernel_id} exited "
                           f"({self.strategy}); temporary children are not restarted")
                self._remove(member)
                continue
            self._cancel_timer(member)
            member.epoch += 1
            member.status = "backoff"
            why = (reason if member is child
                   else f"sibling {child.kernel_id} exited ({self.strategy})")
            self._emit("restarting", member, status=status if member is child else None,
                       reason=why, delay=decision.delay)
            member.timer = self.loop.call_later(decision.delay, self.tell,
                                                _DoRestart(member.kernel_id, member.epoch))

    def _on_do_restart(self, msg: _DoRestart) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None or child.epoch != msg.epoch or child.status != "backoff":
            return
        child.timer = None
        child.restart_count += 1
        self._restarts += 1
        actor = child.actor
        if isinstance(actor, Supervisor):
            request: object = _Revive()
        elif actor.state in ("exited", "shutdown", "new"):
            request = Start()
        else:
            request = Restart(now=False)
        self._begin(child, "auto", request)

    def _give_up(self, child: _Child, status: ExitStatus, why: str) -> None:
        self._gave_up += 1
        self._emit("gave_up", child, status=status, reason=why)
        if self.parent is not None:
            # Escalate: this whole supervisor fails, its parent decides.
            for member in sorted(self._children.values(), key=lambda c: -c.order):
                self._cancel_timer(member)
                member.epoch += 1
                member.status = "failed"
                member.actor.tell(Shutdown(now=True)) if isinstance(member.actor, KernelActor) \
                    else member.actor.tell(_ShutdownAll(now=True))
            self._emit("gave_up", None, reason=f"{child.kernel_id}: {why}")
            self.parent.tell(ChildExited(self.name, ExitStatus(1, None), 0.0,
                                         reason=f"nested supervisor {self.name} gave up: {why}"))
            return
        for kid in ([child.kernel_id] if isinstance(child.actor, KernelActor)
                    else child.actor.all_kernel_ids()):
            self._emit("dead", child, kernel_id=kid, status=status, reason=why)
        self._fail_waiters(child, KernelDeadError(f"kernel {child.kernel_id}: {why}"))
        self._remove(child)

    def _on_revive(self) -> asyncio.Future[str]:
        """Parent's restart of this (nested) supervisor: start every child afresh."""
        waiters = [
            self._begin(c, "auto", Start() if isinstance(c.actor, KernelActor) else _Revive())
            for c in sorted(self._children.values(), key=lambda c: c.order)]
        for child in self._children.values():
            child.history = RestartHistory()
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def check(_: object) -> None:
            if all(w.done() for w in waiters) and not done.done():
                errors = [w.exception() for w in waiters if w.exception() is not None]
                if errors:
                    done.set_exception(errors[0])  # type: ignore[arg-type]
                else:
                    done.set_result(self.name)

        for w in waiters:
            w.add_done_callback(check)
        if not waiters:
            done.set_result(self.name)
        return done

    # -- manual operations ----------------------------------------------------------------------
    def _on_op(self, msg: _Op) -> asyncio.Future[None]:
        child = self._children.get(msg.kernel_id)
        if child is None:
            raise KernelStateError(f"{self.name} has no kernel {msg.kernel_id!r}")
        actor = child.actor
        if not isinstance(actor, KernelActor):
            raise KernelStateError(f"{msg.kernel_id} is a supervisor, not a kernel")
        args = msg.args
        request: object
        if msg.op == "restart":
            self._cancel_timer(child)
            child.epoch += 1
            child.status = "restarting"
            child.deferred_exit = None
            request = Restart(now=args["now"], newports=args["newports"],
                              overrides=args["overrides"])
            self._emit("restarting", child, reason="requested", manual=True)
        elif msg.op == "shutdown":
            self._cancel_timer(child)
            child.epoch += 1
            child.status = "stopping"
            self._fail_waiters(child, KernelStartupError(
                f"start of kernel {child.kernel_id} cancelled by a shutdown"))
            request = Shutdown(now=args["now"], restart=args["restart"])
        elif msg.op == "request_shutdown":
            self._cancel_timer(child)
            child.epoch += 1
            child.status = "stopping"
            request = RequestShutdown(restart=args["restart"])
        elif msg.op == "finish_shutdown":
            request = FinishShutdown(waittime=args["waittime"])
        elif msg.op == "interrupt":
            request = Interrupt()
        else:
            request = Signal(args["signum"])
        epoch = child.epoch
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            error: BaseException | None = None
            try:
                await actor.ask(request)
            except Exception as exc:
                error = exc
            self.tell(_OpDone(child.kernel_id, epoch, msg.op, error, args))
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(None)

        self.spawn(run())
        return done

    def _on_op_done(self, msg: _OpDone) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None:
            return
        current = child.epoch == msg.epoch  # no later restart/shutdown was asked since
        if msg.op in ("interrupt", "signal"):
            if msg.error is None:  # delivered: reported whatever came after it
                signum = msg.args.get("signum")
                self._emit("interrupted" if msg.op == "interrupt" else "signalled", child,
                           status=None if signum is None else ExitStatus(None, signum),
                           reason="requested", manual=True)
            return
        if msg.op == "restart":
            if msg.error is None:
                child.restart_count += 1
                self._emit("restarted", child, manual=True)
                if current:
                    child.status = "ready"
                    child.history = child.history.started(self._clock())
                    self._settle_waiters(child)
            elif current:
                child.status = "exited"
                self._fail_waiters(child, msg.error)
                self._emit("exited", child, reason=f"manual restart failed: {msg.error}",
                           manual=True)
                self._decide(child, ExitStatus(1, None), f"manual restart failed: {msg.error}")
            return
        if not current or msg.op == "request_shutdown":
            return
        actor = child.actor
        restart = msg.args.get("restart") or (
            msg.op == "finish_shutdown" and isinstance(actor, KernelActor)
            and actor.state == "restarting")
        if restart:
            child.status = "stopped"
            self._emit("shutdown", child, reason="stopped for a later start", manual=True)
        else:
            self._emit("shutdown", child, reason=msg.args.get("reason", "requested"),
                       manual=True)
            self._remove(child)

    def _on_shutdown_all(self, msg: _ShutdownAll) -> asyncio.Future[None]:
        children = sorted(self._children.values(), key=lambda c: -c.order)
        for child in children:
            self._cancel_timer(child)
            child.epoch += 1
            child.status = "stopping"
            self._fail_waiters(child, KernelStartupError(
                f"start of kernel {child.kernel_id} cancelled: {self.name} is shutting down"))
        sequential = self.strategy != "one_for_one"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        epochs = {child.kernel_id: child.epoch for child in children}

        async def stop_one(child: _Child) -> None:
            with contextlib.suppress(KernelDeadError):
                if isinstance(child.actor, Supervisor):
                    await child.actor.shutdown_all(now=msg.now)
                else:
                    await child.actor.ask(Shutdown(now=msg.now))
            self.tell(_OpDone(child.kernel_id, epochs[child.kernel_id], "shutdown", None,
                              {"reason": "shutdown_all"}))

        async def run() -> None:
            if sequential:
                for child in children:
                    await stop_one(child)
            else:
                await asyncio.gather(*(stop_one(c) for c in children))
            done.set_result(None)

        self.spawn(run())
        return done

    # -- nesting, warm pool, culling --------------------------------------------------------------
    def _on_add_supervisor(self, msg: _AddSupervisor) -> None:
        self._order += 1
        sub = msg.child
        sub.start()
        child = _Child(sub.name, sub, msg.policy, self._order, None, status="ready")
        child.history = child.history.started(self._clock())
        self._children[sub.name] = child

    def _on_acquire(self, msg: _Acquire) -> asyncio.Future[str]:
        for child in sorted(self._children.values(), key=lambda c: c.order):
            if child.pooled and child.status == "ready" and child.kernel_name == msg.kernel_name:
                child.pooled = False
                self._emit("acquired", child, reason="warm pool")
                self._refill(msg.kernel_name)
                ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                ready.set_result(child.kernel_id)
                return ready
        options = self.launch.replace(kernel_name=msg.kernel_name, spec=None)
        waiter = self._on_start_child(_StartChild(str(uuid.uuid4()), options, self.policy))
        self._refill(msg.kernel_name)
        return waiter

    def _refill(self, kernel_name: str) -> None:
        target = self.warm.get(kernel_name, 0)
        have = sum(1 for c in self._children.values()
                   if c.pooled and c.kernel_name == kernel_name and c.status in _ACTIVE)
        options = self.launch.replace(kernel_name=kernel_name, spec=None)
        for _ in range(target - have):
            if self.max_kernels is not None and self._active_count() >= self.max_kernels:
                return
            waiter = self._on_start_child(_StartChild(str(uuid.uuid4()), options, self.policy,
                                                      pooled=True))
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _on_cull(self) -> None:
        now = time.monotonic()
        for child in list(self._children.values()):
            actor = child.actor
            if child.pooled or child.status != "ready" or not isinstance(actor, KernelActor):
                continue
            timeout = self.cull_idle_timeout
            spec = actor.spec
            if spec is not None:
                override = spec.metadata.get("cull_idle_timeout")
                if isinstance(override, (int, float)) and not isinstance(override, bool):
                    timeout = float(override)
            if timeout <= 0:
                continue
            if actor.execution_state == "busy" and not self.cull_busy:
                continue
            if self.cull_spare is not None and self.cull_spare(child.kernel_id):
                continue
            idle = now - actor.last_activity
            if idle < timeout:
                continue
            self._emit("culled", child, reason=f"idle for {idle:.1f} s (timeout {timeout} s)")
            self._on_op(_Op(child.kernel_id, "shutdown",
                            {"now": False, "restart": False, "reason": "culled"}))


class KernelHandle:
    """One kernel of a supervisor, with the AsyncKernelManager methods."""

    def __init__(self, supervisor: Supervisor, kernel_id: str) -> None:
        self.supervisor = supervisor
        self.kernel_id = kernel_id

    @property
    def actor(self) -> KernelActor:
        """The kernel's actor (read its state on the supervisor's loop)."""
        return self.supervisor.actor_of(self.kernel_id)

    @property
    def connection_info(self) -> ConnectionInfo | None:
        return self.actor.connection_info

    @property
    def connection_file(self) -> str:
        return str(self.actor.connection_file)

    @property
    def restart_count(self) -> int:
        return self.supervisor.child_record(self.kernel_id)[0]

    def is_alive(self) -> bool:
        """True while the kernel process runs."""
        return self.kernel_id in self.supervisor and self.actor.is_alive()

    async def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any) -> None:
        await self.supervisor.restart_kernel(self.kernel_id, now=now, newports=newports, **kw)

    async def interrupt_kernel(self) -> None:
        await self.supervisor.interrupt_kernel(self.kernel_id)

    async def signal_kernel(self, signum: int) -> None:
        await self.supervisor.signal_kernel(self.kernel_id, signum)

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        await self.supervisor.shutdown_kernel(self.kernel_id, now=now, restart=restart)

    def client(self, **kwargs: Any) -> KernelClient:
        """An async client for this kernel (channels not started)."""
        info = self.connection_info
        if info is None:
            raise KernelStateError(f"kernel {self.kernel_id} has no connection yet")
        client = KernelClient(info, **kwargs)
        client.connection_file = Path(self.connection_file)
        return client

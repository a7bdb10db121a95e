"""Supervisor: an actor that owns kernel actors (and nested supervisors).

A :class:`Supervisor` belongs to the IOLoop that was current when it started
(``async with Supervisor(...)`` or :meth:`Supervisor.start`); call its
coroutines from that loop. This module is its public face: the requests you
make of it and what you can read of it. What it does with a child that exits
on its own (restart types, strategies, intensity, escalation) is in
:mod:`supervisor.supervision`; the warm pool and culling are in
:mod:`supervisor.pool`; its records in :mod:`supervisor.children`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from supervisor.children import (
    STRATEGIES,
    AddSupervisor,
    CancelStart,
    StartChild,
    SupervisorStatistics,
)
from supervisor.client import KernelClient
from supervisor.connection import ConnectionInfo
from supervisor.errors import (
    ConfigurationError,
    KernelDeadError,
    KernelStateError,
    SupervisorError,
)
from supervisor.events import KernelEvent, Listener
from supervisor.kernel import (
    KernelActor,
)
from supervisor.launchers import Resources
from supervisor.policy import RestartPolicy
from supervisor.pool import Pooled

__all__ = ["STRATEGIES", "KernelHandle", "Supervisor", "SupervisorStatistics"]


class Supervisor(Pooled):
    """Starts, watches and restarts kernels by policy; see :mod:`supervisor.supervision`."""

    # == public API (call on the supervisor's loop) ====================================
    async def __aenter__(self) -> Supervisor:
        if self.actor_state == "new":
            self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, now: bool = False) -> None:
        """Shut every child down (reverse start order) and stop the supervisor.

        From another loop or thread: done on the supervisor's loop if it runs; if
        that loop is closed or not running, every kernel is killed and its files
        removed from here (:meth:`~supervisor.actor.Actor.abandon`).
        """
        if self.actor_state in ("new", "stopped"):
            return
        if self.unreachable() is not None:
            self.abandon(f"closed from elsewhere: {self.unreachable()}")
            return
        if not self._on_own_loop():
            await self.call(lambda: self.close(now))
            return
        if self.alive:
            with contextlib.suppress(KernelDeadError):
                await self.shutdown_all(now=now)
            self.stop("closed")
        await self.join()

    async def shutdown_all(self, now: bool = False) -> None:
        """Stop every child, cancelling pending restarts; reverse start order. From a
        caller that cannot reach our loop (closed, not running): every kernel is
        killed and its files removed from here."""
        if self.actor_state in ("running", "stopping") and self.unreachable() is not None:
            for kernel_id in list(self._children):
                self._abandon_child_if_unreachable(kernel_id)
            return
        await super().shutdown_all(now)

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
        msg = StartChild(kernel_id or str(uuid.uuid4()), options, policy or self.policy,
                          connection_info=conn_info,
                          connection_file=None if conn_file is None else str(conn_file))

        async def start() -> str:
            asked = self.ask(msg)
            try:
                ready: asyncio.Future[str] = await asyncio.shield(asked)
                return await asyncio.shield(ready)
            except asyncio.CancelledError:
                if not asked.done():
                    asked.cancel()  # not taken yet: the supervisor skips it
                    raise
                if asked.cancelled() or asked.exception() is not None:
                    raise
                # The caller went away: the start is cut short, and we wait until the
                # kernel it began is gone (files removed) before saying so.
                ready = asked.result()
                self.tell(CancelStart(msg.kernel_id))
                try:
                    await ready
                except Exception:  # the expected "cancelled" failure
                    pass
                else:  # it was ready just before: stop it, nobody wants it
                    with contextlib.suppress(SupervisorError):
                        await self.shutdown_kernel(msg.kernel_id, now=True)
                raise

        return await self.call(start)

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
        """Stop a kernel; with ``restart`` it stays known (files kept) for a later start.

        Works from any loop or thread: if the supervisor's loop is closed or not
        running, the kernel is killed and its files removed from here.
        """
        if self._abandon_child_if_unreachable(kernel_id):
            return
        await self._op(kernel_id, "shutdown", now=now, restart=restart)

    async def request_shutdown(self, kernel_id: str, restart: bool = False) -> None:
        """Send ``shutdown_request`` only (the seed's two-step shutdown, step one)."""
        await self._op(kernel_id, "request_shutdown", restart=restart)

    async def finish_shutdown(self, kernel_id: str, waittime: float | None = None) -> None:
        """Wait for the exit asked by :meth:`request_shutdown`, then force it; clean up
        (from a loop that cannot reach the supervisor's: killed at once, as a shutdown)."""
        if self._abandon_child_if_unreachable(kernel_id):
            return
        await self._op(kernel_id, "finish_shutdown", waittime=waittime)

    async def start_supervisor(self, child_policy: RestartPolicy | None = None,
                               **kwargs: Any) -> Supervisor:
        """Start a nested supervisor as a child of this one and return it.

        ``kwargs`` build the nested :class:`Supervisor` (its ``policy`` governs
        its own kernels); ``child_policy`` is how *this* supervisor treats the
        nested one when it gives up (default: this supervisor's policy).
        """
        child = Supervisor(**kwargs)
        child.parent = self
        async def add() -> None:
            await self.ask(AddSupervisor(child, child_policy or self.policy))

        await self.call(add)
        return child

    def get_kernel(self, kernel_id: str) -> KernelHandle:
        """A handle with the AsyncKernelManager methods for one kernel."""
        child = self._children.get(kernel_id)
        if child is None or not isinstance(child.actor, KernelActor):
            raise KernelStateError(f"{self.name} has no kernel {kernel_id!r}")
        return KernelHandle(self, kernel_id)

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
        """A frozen snapshot of counts by state, restarts, pool and pending starts, and
        each kernel's :class:`~supervisor.launchers.Resources` (memory, CPU, processes)."""
        by_state: dict[str, int] = {}
        pool: dict[str, int] = dict.fromkeys(self.warm, 0)
        resources: dict[str, Resources] = {}
        for child in self._children.values():
            if isinstance(child.actor, KernelActor):
                figures = child.actor.resources()
                if figures is not None:
                    resources[child.kernel_id] = figures
            by_state[child.status] = by_state.get(child.status, 0) + 1
            if child.pooled and child.status == "ready":
                pool[child.kernel_name] = pool.get(child.kernel_name, 0) + 1
        return SupervisorStatistics(
            name=self.name, kernels=len(self.list_kernel_ids()),
            by_state=MappingProxyType(by_state), pending_starts=self._gate.pending,
            restarts=self._restarts, gave_up=self._gave_up, pool=MappingProxyType(pool),
            pool_target=MappingProxyType(dict(self.warm)), events=self._events.delivered,
            resources=MappingProxyType(resources),
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

    # == without our loop ==============================================================
    def _on_own_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop.asyncio_loop  # type: ignore[attr-defined]
        except RuntimeError:
            return False

    def _abandon_child_if_unreachable(self, kernel_id: str) -> bool:
        """From a caller that cannot reach our loop (closed, or not running): kill the
        child's process group and remove its files from here. True if done so."""
        if self.actor_state not in ("running", "stopping"):
            return False
        why = self.unreachable()
        if why is None:
            return False
        child = self._children.pop(kernel_id, None)
        if child is None:
            return True  # nothing of it left; a shutdown of a gone kernel is quiet
        self._log.debug("kernel.abandoned", kernel_id=kernel_id, reason=why)
        child.actor.abandon(f"shut down from elsewhere: {why}")
        return True

    def on_abandon(self) -> None:
        """Our loop is gone: every child (kernel or nested supervisor) is abandoned too."""
        if self._culler is not None:
            with contextlib.suppress(RuntimeError):
                self._culler.stop()
        for child in sorted(self._children.values(), key=lambda c: -c.order):
            child.actor.abandon(f"{self.name} abandoned: {self._stop_reason}")
        self._children.clear()
        self._events.close()


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

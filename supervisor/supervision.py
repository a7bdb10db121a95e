"""Supervision: what a supervisor does with its children (the restart logic).

:class:`Supervision` is the actor core of :class:`~supervisor.supervisor.Supervisor`:
children, their starts through the start gate, exits judged by each child's
:class:`~supervisor.policy.RestartPolicy` (a pure function of history and clock)
and by the strategy, restarts, giving up and escalation, requests on one kernel
and the shutdown of all. The warm pool and culling are in :mod:`supervisor.pool`,
the public API in :mod:`supervisor.supervisor`.

Everything here runs on the supervisor's loop, in its actor coroutine. Its
message handlers never wait on a kernel: long work (a start, a shutdown) is
asked of the child actor and its completion comes back to the mailbox as a
message, so one slow kernel never holds up the others.

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
from typing import Any

import zmq.asyncio
from tornado.ioloop import PeriodicCallback

from supervisor._log import get_logger
from supervisor.actor import Actor
from supervisor.children import (
    ACTIVE,
    STRATEGIES,
    AddSupervisor,
    CancelStart,
    Child,
    DoRestart,
    Op,
    OpDone,
    Revive,
    ShutdownAll,
    StartChild,
    StartDone,
)
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
from supervisor.launchers import ExitStatus
from supervisor.policy import ExitInfo, GiveUp, RestartHistory, RestartPolicy, decide
from supervisor.policy import Restart as RestartDecision
from supervisor.startgate import StartGate

__all__ = ["Supervision"]

log = get_logger("supervisor.supervisor")


class Supervision(Actor):
    """The restart logic of a supervisor; see the module docstring."""

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
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(name=name or f"supervisor-{uuid.uuid4().hex[:8]}")
        self._context = context  # for the kernels' control/IOPub sockets (None: shared)
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
        # A predicate of a kernel id: True spares that kernel from a cull round
        # (the gateway spares kernels with connected clients).
        self.cull_spare = cull_spare
        self._clock = clock
        self._rng = rng or random.Random()
        self._gate = StartGate(max_concurrent_starts)
        self._children: dict[str, Child] = {}
        self._order = 0
        self._events = Dispatcher()
        self._callbacks: dict[tuple[int, str, str | None], Listener] = {}
        self._restarts = 0
        self._gave_up = 0
        self.parent: Supervision | None = None
        self._culler: PeriodicCallback | None = None
        self._log = log.bind(supervisor=self.name)


    async def shutdown_all(self, now: bool = False) -> None:
        """Stop every child, cancelling pending restarts; reverse start order."""
        async def shutdown_all() -> None:
            done: asyncio.Future[None] = await self.ask(ShutdownAll(now))
            await done

        await self.call(shutdown_all)

    def list_kernel_ids(self) -> list[str]:
        """Ids of the kernels handed out (warm-pool kernels not included)."""
        return [c.kernel_id for c in self._children.values()
                if isinstance(c.actor, KernelActor) and not c.pooled]

    def all_kernel_ids(self) -> list[str]:
        """Every kernel in this tree, nested supervisors' included."""
        ids: list[str] = []
        for child in self._children.values():
            if isinstance(child.actor, Supervision):
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

    # == message handling ================================================================
    async def _op(self, kernel_id: str, op: str, **args: Any) -> None:
        async def op_here() -> None:
            if op != "restart":
                done: asyncio.Future[None] = await self.ask(Op(kernel_id, op, args))
                await done  # a cancelled wait leaves the operation running to its end
                return
            asked = self.ask(Op(kernel_id, op, args))
            try:
                done = await asyncio.shield(asked)
                await asyncio.shield(done)
            except asyncio.CancelledError:
                if not asked.done():
                    asked.cancel()  # not taken yet: skipped
                    raise
                if asked.cancelled() or asked.exception() is not None:
                    raise
                # The caller went away: the restart's start is cut short; we return
                # once the kernel it began is gone.
                done = asked.result()
                self.tell(CancelStart(kernel_id))
                with contextlib.suppress(Exception):
                    await done
                raise

        await self.call(op_here)

    def skip_cancelled(self, msg: object) -> bool:
        # A start or restart nobody waits for any more is not begun.
        return isinstance(msg, StartChild) or (isinstance(msg, Op) and msg.op == "restart")

    def _on_cancel_start(self, msg: CancelStart) -> None:
        """The caller of a start went away: the start is cut short (see kernel.py's table)."""
        child = self._children.get(msg.kernel_id)
        if child is None or child.status not in ("starting", "restarting"):
            return
        if msg.epoch is not None and msg.epoch != child.epoch:
            return
        child.cancelled = True
        if isinstance(child.actor, KernelActor):
            child.actor.cancel_start()

    async def receive(self, msg: object) -> Any:
        if isinstance(msg, StartChild):
            return self._on_start_child(msg)
        if isinstance(msg, StartDone):
            return self._on_start_done(msg)
        if isinstance(msg, ChildExited):
            return self._on_child_exited(msg)
        if isinstance(msg, DoRestart):
            return self._on_do_restart(msg)
        if isinstance(msg, Op):
            return self._on_op(msg)
        if isinstance(msg, CancelStart):
            return self._on_cancel_start(msg)
        if isinstance(msg, OpDone):
            return self._on_op_done(msg)
        if isinstance(msg, ShutdownAll):
            return self._on_shutdown_all(msg)
        if isinstance(msg, AddSupervisor):
            return self._on_add_supervisor(msg)
        if isinstance(msg, Revive):
            return self._on_revive()
        raise KernelStateError(f"{self.name} does not understand {type(msg).__name__}")


    async def on_stop(self) -> None:
        for child in list(self._children.values()):
            self._cancel_timer(child)
            child.actor.stop("supervisor stopped")
            await child.actor.join()
            self._fail_waiters(child, KernelStartupError(f"{self.name} stopped"))
        self._children.clear()
        self._events.close()


    # -- events ---------------------------------------------------------------------------
    def _emit(self, kind: str, child: Child | None, *, kernel_id: str | None = None,
              status: ExitStatus | None = None, reason: str = "", delay: float | None = None,
              manual: bool = False) -> None:
        event = KernelEvent(
            kind=kind, kernel_id=kernel_id or (child.kernel_id if child else self.name),
            supervisor=self.name, kernel_name=child.kernel_name if child else "",
            exit_code=status.exit_code if status else None,
            signal=status.signal if status else None, reason=reason,
            cause=status.cause if status else "", oom=status.oom if status else False,
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
        return sum(1 for c in self._children.values() if c.status in ACTIVE)

    def _check_limit(self) -> None:
        if self.max_kernels is not None and self._active_count() >= self.max_kernels:
            raise KernelLimitError(
                f"{self.name} already runs or starts {self._active_count()} kernels "
                f"(max_kernels={self.max_kernels})"
            )

    def _on_start_child(self, msg: StartChild) -> asyncio.Future[str]:
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
                            connection_file=msg.connection_file, context=self._context)
        actor.start()
        child = Child(msg.kernel_id, actor, msg.policy, self._order, msg.options,
                       pooled=msg.pooled)
        self._children[msg.kernel_id] = child
        self._emit("starting", child, reason="pool refill" if msg.pooled else "")
        return self._begin(child, "start", Start(), priority=1 if msg.pooled else 0)

    def _begin(self, child: Child, kind: str, request: object,
               priority: int = 0) -> asyncio.Future[str]:
        """Ask the child to (re)start through the start gate; report back by message."""
        child.epoch += 1
        child.status = "starting" if kind == "start" else "restarting"
        child.deferred_exit = None
        child.cancelled = False
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
                    if child.cancelled and child.epoch == epoch:
                        raise KernelStartupError(
                            f"start of kernel {child.kernel_id} cancelled: its caller went away")
                    result = await child.actor.ask(request)
                    if isinstance(result, asyncio.Future):  # a nested supervisor's revival
                        await result
            except Exception as exc:
                error = exc
            self.tell(StartDone(child.kernel_id, epoch, error, kind))

        self.spawn(run())
        return waiter

    def _on_start_done(self, msg: StartDone) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None or child.epoch != msg.epoch:
            return
        if msg.error is None:
            child.status = "ready"
            child.history = child.history.started(self._clock())
            proc = child.actor.process if isinstance(child.actor, KernelActor) else None
            note = str(getattr(proc, "launch_note", ""))
            if msg.kind == "start":
                self._emit("ready", child, reason=note)
            else:
                self._emit("restarted", child, manual=msg.kind == "manual", reason=note)
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

    def _settle_waiters(self, child: Child) -> None:
        for waiter in child.waiters:
            if not waiter.done():
                waiter.set_result(child.kernel_id)
        child.waiters.clear()
        deferred, child.deferred_exit = child.deferred_exit, None
        if deferred is not None:
            self._on_child_exited(deferred)

    def _fail_waiters(self, child: Child, error: BaseException) -> None:
        for waiter in child.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        child.waiters.clear()

    def _remove(self, child: Child) -> None:
        self._cancel_timer(child)
        self._children.pop(child.kernel_id, None)
        child.actor.stop("removed by supervisor")

    def _cancel_timer(self, child: Child) -> None:
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

    def _decide(self, child: Child, status: ExitStatus, reason: str) -> None:
        now = self._clock()
        decision = decide(child.policy, child.history,
                          ExitInfo(status.exit_code, status.signal), now, self._rng)
        if isinstance(decision, GiveUp):
            self._give_up(child, status, decision.reason)
            return
        if not isinstance(decision, RestartDecision):
            why = f"not restarted: {decision.reason}"
            if status.cause or status.tree_ended:
                why = f"{why}; last exit: {status.describe()}"
            self._emit("dead", child, status=status, reason=why)
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
                                                DoRestart(member.kernel_id, member.epoch))

    def _on_do_restart(self, msg: DoRestart) -> None:
        child = self._children.get(msg.kernel_id)
        if child is None or child.epoch != msg.epoch or child.status != "backoff":
            return
        child.timer = None
        child.restart_count += 1
        self._restarts += 1
        actor = child.actor
        if not isinstance(actor, KernelActor):
            request: object = Revive()
        elif actor.state in ("exited", "shutdown", "new"):
            request = Start()
        else:
            request = Restart(now=False)
        self._begin(child, "auto", request)

    def _give_up(self, child: Child, status: ExitStatus, why: str) -> None:
        self._gave_up += 1
        self._emit("gave_up", child, status=status, reason=why)
        if self.parent is not None:
            # Escalate: this whole supervisor fails, its parent decides.
            for member in sorted(self._children.values(), key=lambda c: -c.order):
                self._cancel_timer(member)
                member.epoch += 1
                member.status = "failed"
                member.actor.tell(Shutdown(now=True, cause="gave up")) \
                    if isinstance(member.actor, KernelActor) \
                    else member.actor.tell(ShutdownAll(now=True))
            self._emit("gave_up", None, reason=f"{child.kernel_id}: {why}")
            self.parent.tell(ChildExited(self.name, ExitStatus(1, None), 0.0,
                                         reason=f"nested supervisor {self.name} gave up: {why}"))
            return
        if status.cause or status.tree_ended:
            why = f"{why}; last exit: {status.describe()}"
        nested = child.actor if isinstance(child.actor, Supervision) else None
        for kid in ([child.kernel_id] if nested is None else nested.all_kernel_ids()):
            self._emit("dead", child, kernel_id=kid, status=status, reason=why)
        self._fail_waiters(child, KernelDeadError(f"kernel {child.kernel_id}: {why}"))
        self._remove(child)

    def _on_revive(self) -> asyncio.Future[str]:
        """Parent's restart of this (nested) supervisor: start every child afresh."""
        waiters = [
            self._begin(c, "auto", Start() if isinstance(c.actor, KernelActor) else Revive())
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
    def _on_op(self, msg: Op) -> asyncio.Future[None]:
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
            request = Shutdown(now=args["now"], restart=args["restart"],
                               cause=args.get("reason", ""))
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
            self.tell(OpDone(child.kernel_id, epoch, msg.op, error, args))
            if done.done():  # the caller went away
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(None)

        self.spawn(run())
        return done

    def _on_op_done(self, msg: OpDone) -> None:
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
            elif current and child.cancelled:
                # Its caller went away: the kernel stays stopped (no policy decision),
                # known and startable again, as after a shutdown kept for a later start.
                child.status = "stopped"
                self._fail_waiters(child, msg.error)
                self._emit("shutdown", child, reason="restart cancelled: its caller went away",
                           manual=True)
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
            reason = msg.args.get("reason", "requested")
            last = actor.last_exit if isinstance(actor, KernelActor) else None
            self._emit("shutdown", child, status=last, manual=True,
                       reason=reason if last is None else f"{reason} ({last.describe()})")
            self._remove(child)

    def _on_shutdown_all(self, msg: ShutdownAll) -> asyncio.Future[None]:
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

        async def stop_one(child: Child) -> None:
            with contextlib.suppress(KernelDeadError):
                if isinstance(child.actor, Supervision):
                    await child.actor.shutdown_all(now=msg.now)
                else:
                    await child.actor.ask(Shutdown(now=msg.now))
            self.tell(OpDone(child.kernel_id, epochs[child.kernel_id], "shutdown", None,
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
    def _on_add_supervisor(self, msg: AddSupervisor) -> None:
        self._order += 1
        sub = msg.child
        sub.start()
        child = Child(sub.name, sub, msg.policy, self._order, None, status="ready")
        child.history = child.history.started(self._clock())
        self._children[sub.name] = child

"""The benchmark rows, and one coroutine per row and contender.

Contenders: :class:`Floor` (raw pyzmq, see :mod:`benchmarks.floor`),
:class:`Ours` (kernel-supervisor) and :class:`JupyterClient` (jupyter_client).
Each has one method per row step (``start``, ``interrupt``, ``restart``,
``shutdown``, ``crash``, ...) that returns the seconds it measured. Steps that
need a running kernel are chained into *scenarios* (one kernel serves the
start, interrupt, restart and shutdown rows, for example); every contender
runs the same chain, and every kernel a scenario starts is shut down in a
``finally`` whatever happens.

A scenario runs inside one ``asyncio.run`` (the blocking one with no loop at
all, as a blocking user would call it); the runner in :mod:`benchmarks.__main__`
interleaves contenders sample by sample. Objects here belong to the loop of
the sample that made them and never outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import queue
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.floor import FloorError, FloorKernel, FloorLauncher, wait_exit

__all__ = ["CONTENDERS", "ROWS", "Recorder", "Row", "make_contenders", "run_scenario"]

READY_TIMEOUT = 60.0
STEP_TIMEOUT = 30.0
# The interrupt cell writes a marker, then spins for 30 s. The marker proves
# the kernel runs user code (ipykernel arms its SIGINT handler just before).
# It spins rather than time.sleep(30): CPython interrupts a blocking sleep only
# when SIGINT lands on the main thread, and ipykernel has several threads, so a
# sleep sometimes ignores the interrupt for the full 30 s (seen for every
# contender); a Python loop notices the signal at once whichever thread got it.
INTERRUPT_CODE = (
    "import sys, time\n"
    "sys.stdout.write('spinning\\n'); sys.stdout.flush()\n"
    "deadline = time.monotonic() + 30\n"
    "while time.monotonic() < deadline:\n"
    "    pass\n"
)
CONTENDERS = ("floor", "ours", "jupyter_client")


class NotApplicable(Exception):
    """This contender has no such feature (the cell says why, no timing)."""


class BenchError(Exception):
    """A step did not behave as required (wrong reply, lost event...)."""


@dataclass(frozen=True)
class Row:
    """One line of the results: what is measured, in which unit, by which scenario."""

    id: str
    title: str
    unit: str  # "s", "%", "MB"
    scenario: str
    full_only: bool = False
    note: str = ""


ROWS: tuple[Row, ...] = (
    Row("start", "start -> ready, async (start_kernel + client wait_for_ready)", "s", "lifecycle",
        note="Floor: connection file + Popen + one queued kernel_info_request until its reply "
             "and an IOPub message"),
    Row("start_blocking", "start -> ready, blocking start_new_kernel()", "s", "blocking"),
    Row("interrupt", "interrupt -> execute_reply(KeyboardInterrupt)", "s", "lifecycle",
        note="The second interrupt of the kernel (the first, untimed, pays IPython's one-off "
             "traceback set-up, ~150 ms, the same for everyone); the cell writes a marker "
             "then spins in Python; the clock starts when the marker arrived on IOPub "
             "(busy comes before ipykernel arms its SIGINT handler)"),
    Row("restart", "restart_kernel() -> client wait_for_ready", "s", "lifecycle",
        note="Floor: shutdown_request(restart) -> reaped -> Popen -> ready"),
    Row("shutdown", "graceful shutdown_kernel() -> returned (process reaped)", "s", "lifecycle",
        note="Floor: shutdown_request on control -> exit seen on a pidfd -> reaped"),
    Row("shutdown_now", "shutdown_kernel(now=True), blocking manager", "s", "blocking",
        note="Floor: SIGKILL -> reaped"),
    Row("crash_detect", "SIGKILL -> crash noticed", "s", "crash",
        note="Ours: Supervisor 'exited' event; jupyter_client: AsyncIOLoopKernelManager "
             "restart callback (KernelRestarter polls every 3 s); floor: pidfd readable. "
             "The kill comes after the same random 0-3 s pause for every contender"),
    Row("crash_ready", "SIGKILL -> replacement ready", "s", "crash",
        note="Ours: 'restarted' event (kernel_info answered + IOPub); jupyter_client: its "
             "restart finished, then a new client's wait_for_ready; floor: Popen again + ready"),
    Row("concurrent_1", "1 start -> ready (asyncio.gather)", "s", "concurrent:1",
        note="Each start is the `start` row's (a manager + a client's wait_for_ready), N of "
             "them under one asyncio.gather, clock stopped when the last is ready"),
    Row("concurrent_5", "5 concurrent starts -> all ready", "s", "concurrent:5",
        note="As concurrent_1"),
    Row("concurrent_20", "20 concurrent starts -> all ready", "s", "concurrent:20",
        full_only=True, note="As concurrent_1"),
    Row("start_contained", "start -> ready, containment on (the default)", "s", "containment",
        note="Ours only: AsyncKernelManager start + client wait_for_ready, as the `start` row, "
             "alternating in one sample with the next row (which goes first flips each "
             "sample); on: a cgroup per kernel where the machine allows one, else the "
             "session + environment marker"),
    Row("start_uncontained", "start -> ready, contain='off'", "s", "containment",
        note="Ours only: the same start with containment off (process group only)"),
    Row("acquire", "warm-pool acquire() -> kernel id", "s", "warm",
        note="Ours only: a pool of 2, full before the clock starts"),
    Row("acquire_ready", "warm-pool acquire() -> client wait_for_ready", "s", "warm",
        note="The pool refill starts a kernel meanwhile, as it would in service"),
    Row("idle_cpu_10", "manager CPU while idle, 10 kernels (% of one core)", "%", "idle:10",
        note="CPU time of this whole process (time.process_time) over the idle window, once "
             "all kernels are ready. Ours: one Supervisor; jupyter_client: "
             "AsyncMultiKernelManager (its default AsyncIOLoopKernelManager, restarter on); "
             "floor: Popen objects only"),
    Row("idle_rss_10", "manager RSS growth with 10 idle kernels", "MB", "idle:10",
        note="RSS of this process after the idle window minus before the first start "
             "(gc.collect() before both)"),
    Row("idle_cpu_50", "manager CPU while idle, 50 kernels (% of one core)", "%", "idle:50",
        full_only=True, note="As idle_cpu_10"),
    Row("idle_rss_50", "manager RSS growth with 50 idle kernels", "MB", "idle:50",
        full_only=True, note="As idle_rss_10"),
)
ROW_BY_ID = {r.id: r for r in ROWS}


@dataclass
class Recorder:
    """What one sample of one scenario produced for one contender."""

    wanted: frozenset[str]
    values: dict[str, float] = field(default_factory=dict)
    step: str = ""
    error: str | None = None

    def wants(self, row: str) -> bool:
        return row in self.wanted

    def put(self, row: str, value: float) -> None:
        if row in self.wanted:
            self.values[row] = value


@dataclass(frozen=True)
class Settings:
    """Scenario parameters shared by every contender."""

    kernel: str
    idle_window: float
    crash_pause: float  # this sample's pause before the SIGKILL


def _now() -> float:
    return time.perf_counter()


async def _bounded(aw: Awaitable[Any], timeout: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise BenchError(f"{what}: nothing within {timeout:g} s") from None


async def _next_matching(get: Callable[..., Awaitable[dict[str, Any]]],
                         match: Callable[[dict[str, Any]], bool], timeout: float,
                         what: str) -> dict[str, Any]:
    """Read a client channel until ``match``; BenchError after ``timeout`` s."""
    deadline = _now() + timeout
    while True:
        remaining = deadline - _now()
        if remaining <= 0:
            raise BenchError(f"{what}: nothing within {timeout:g} s")
        try:
            msg = await get(timeout=remaining)
        except queue.Empty:
            continue
        if match(msg):
            return msg


def _parent(msg: dict[str, Any]) -> str | None:
    parent = msg.get("parent_header") or {}
    return parent.get("msg_id")


async def client_interrupt(kc: Any, interrupt: Callable[[], Awaitable[Any]]) -> float:
    """Shared by ours and jupyter_client: execute, wait for the marker, interrupt, time."""
    msg_id = kc.execute(INTERRUPT_CODE)
    await _next_matching(kc.get_iopub_msg,
                         lambda m: _parent(m) == msg_id and m["msg_type"] == "stream",
                         STEP_TIMEOUT, "interrupt: the cell's marker")
    t0 = _now()
    await interrupt()
    reply = await _next_matching(
        kc.get_shell_msg, lambda m: _parent(m) == msg_id and m["msg_type"] == "execute_reply",
        STEP_TIMEOUT, "interrupt: execute_reply")
    elapsed = _now() - t0
    content = reply["content"]
    if content.get("status") != "error" or content.get("ename") != "KeyboardInterrupt":
        raise BenchError(f"interrupt: execute_reply is {content.get('status')}/"
                         f"{content.get('ename')}, not error/KeyboardInterrupt")
    await _next_matching(kc.get_iopub_msg,
                         lambda m: _parent(m) == msg_id and m["msg_type"] == "status"
                         and m["content"].get("execution_state") == "idle",
                         STEP_TIMEOUT, "interrupt: idle after the reply")
    return elapsed


def _killpg(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class _Idle:
    """CPU and RSS of this process over an idle window (psutil)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        gc.collect()
        self.rss0 = self.proc.memory_info().rss

    async def measure(self, window: float) -> tuple[float, float]:
        await asyncio.sleep(0.5)  # let the last start's messages settle (not measured)
        # time.process_time() is the same user+system CPU of this process (all
        # threads) as psutil's cpu_times(), at ns rather than 10 ms tick resolution.
        c0, w0 = time.process_time(), _now()
        await asyncio.sleep(window)  # the measured idle window itself
        c1, w1 = time.process_time(), _now()
        cpu = 100.0 * (c1 - c0) / (w1 - w0)
        gc.collect()
        rss = (self.proc.memory_info().rss - self.rss0) / 2**20
        return cpu, rss


# == floor ===================================================================================
class Floor:
    """Raw pyzmq + Popen: the lower bound."""

    name = "floor"

    def __init__(self, launcher: FloorLauncher) -> None:
        self.launcher = launcher

    async def start(self) -> tuple[FloorKernel, float]:
        t0 = _now()
        kernel = await _bounded(self.launcher.start(), READY_TIMEOUT, "floor start")
        return kernel, _now() - t0

    async def interrupt(self, k: FloorKernel) -> float:
        request = k.session.msg("execute_request", {
            "code": INTERRUPT_CODE, "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
        await k.session.send_async(k.shell, request)

        async def until(sock: Any, match: Callable[[Any], bool]) -> Any:
            while True:
                msg = await k.recv(sock)
                if msg.parent_id == request.msg_id and match(msg):
                    return msg

        await _bounded(until(k.iopub, lambda m: m.msg_type == "stream"), STEP_TIMEOUT,
                       "floor interrupt: marker")
        assert k.proc is not None
        t0 = _now()
        os.kill(k.proc.pid, signal.SIGINT)
        reply = await _bounded(until(k.shell, lambda m: m.msg_type == "execute_reply"),
                               STEP_TIMEOUT, "floor interrupt: execute_reply")
        elapsed = _now() - t0
        if reply.content.get("ename") != "KeyboardInterrupt":
            raise BenchError(f"floor interrupt: reply {reply.content.get('status')}")
        await _bounded(until(k.iopub, lambda m: m.msg_type == "status"
                             and m.content.get("execution_state") == "idle"),
                       STEP_TIMEOUT, "floor interrupt: idle")
        return float(elapsed)

    async def restart(self, k: FloorKernel) -> float:
        old = k.kernel_session
        t0 = _now()
        await _bounded(k.shutdown(restart=True), STEP_TIMEOUT, "floor restart: exit")
        k.launch()
        await _bounded(k.handshake(stale_session=old), READY_TIMEOUT, "floor restart: ready")
        return _now() - t0

    async def shutdown(self, k: FloorKernel) -> float:
        t0 = _now()
        await _bounded(k.shutdown(), STEP_TIMEOUT, "floor shutdown")
        elapsed = _now() - t0
        k.close()
        return elapsed

    async def shutdown_now(self, k: FloorKernel) -> float:
        t0 = _now()
        await _bounded(k.kill(), STEP_TIMEOUT, "floor kill")
        elapsed = _now() - t0
        k.close()
        return elapsed

    async def dispose(self, k: FloorKernel) -> None:
        k.close()

    def blocking(self, rec: Recorder, s: Settings) -> None:
        # The floor has no blocking API: the same floor, on a private loop.
        async def run() -> None:
            k, t = await self.start()
            try:
                rec.put("start_blocking", t)
                rec.step = "shutdown_now"
                rec.put("shutdown_now", await self.shutdown_now(k))
            finally:
                k.close()

        asyncio.run(run())

    async def crash(self, rec: Recorder, s: Settings) -> None:
        k, _ = await self.start()
        try:
            await asyncio.sleep(s.crash_pause)
            old = k.kernel_session
            assert k.proc is not None
            t0 = _now()
            os.kill(k.proc.pid, signal.SIGKILL)
            seen = await _bounded(wait_exit(k.proc), STEP_TIMEOUT, "floor crash: exit")
            rec.put("crash_detect", seen - t0)
            k.launch()
            await _bounded(k.handshake(stale_session=old), READY_TIMEOUT, "floor crash: ready")
            rec.put("crash_ready", _now() - t0)
        finally:
            k.close()

    async def warm(self, rec: Recorder, s: Settings) -> None:
        raise NotApplicable("n/a (a floor has no pool)")

    async def containment(self, rec: Recorder, s: Settings) -> None:
        raise NotApplicable("n/a (a floor contains nothing)")

    async def idle(self, rec: Recorder, s: Settings, k: int) -> None:
        probe = _Idle()
        kernels: list[FloorKernel] = []
        try:
            started = await asyncio.gather(*(self.launcher.start() for _ in range(k)),
                                           return_exceptions=True)
            kernels = [x for x in started if isinstance(x, FloorKernel)]
            errors = [x for x in started if not isinstance(x, FloorKernel)]
            if errors:
                raise FloorError(f"{len(errors)}/{k} floor starts failed: {errors[0]!r}")
            for kern in kernels:  # the floor watches nothing once they are up
                for sock in (kern.shell, kern.control, kern.iopub):
                    sock.close(linger=0)
            cpu, rss = await probe.measure(s.idle_window)
            rec.put(f"idle_cpu_{k}", cpu)
            rec.put(f"idle_rss_{k}", rss)
        finally:
            for kern in kernels:
                kern.close()


# == ours ====================================================================================
@dataclass
class _Managed:
    km: Any
    kc: Any = None


class _ManagedContender:
    """What ours and jupyter_client share: the same documented calls, timed the same way."""

    kernel: str

    def new_manager(self) -> Any:
        raise NotImplementedError

    async def dispose(self, h: _Managed) -> None:
        raise NotImplementedError

    async def start(self, factory: Callable[[], Any] | None = None) -> tuple[_Managed, float]:
        t0 = _now()
        h = _Managed(self.new_manager() if factory is None else factory())
        try:
            await h.km.start_kernel()
            h.kc = h.km.client()
            h.kc.start_channels()
            await h.kc.wait_for_ready(timeout=READY_TIMEOUT)
        except BaseException:
            await self.dispose(h)
            raise
        return h, _now() - t0

    async def interrupt(self, h: _Managed) -> float:
        return await client_interrupt(h.kc, h.km.interrupt_kernel)

    async def restart(self, h: _Managed) -> float:
        t0 = _now()
        await _bounded(h.km.restart_kernel(), READY_TIMEOUT, "restart_kernel")
        await h.kc.wait_for_ready(timeout=READY_TIMEOUT)
        return _now() - t0

    async def shutdown(self, h: _Managed) -> float:
        h.kc.stop_channels()
        t0 = _now()
        await _bounded(h.km.shutdown_kernel(now=False), STEP_TIMEOUT, "shutdown_kernel")
        return _now() - t0


class Ours(_ManagedContender):
    """kernel-supervisor."""

    name = "ours"

    def __init__(self, kernel: str) -> None:
        from supervisor import manager, supervisor
        from supervisor.policy import RestartPolicy

        self.kernel = kernel
        self.manager = manager
        self.Supervisor = supervisor.Supervisor
        self.RestartPolicy = RestartPolicy

    def new_manager(self) -> Any:
        return self.manager.AsyncKernelManager(self.kernel)

    async def dispose(self, h: _Managed) -> None:
        if h.kc is not None:
            with contextlib.suppress(Exception):
                h.kc.stop_channels()
        pid = None
        with contextlib.suppress(Exception):
            pid = h.km.pid
        with contextlib.suppress(Exception):
            await asyncio.wait_for(h.km.shutdown_kernel(now=True), STEP_TIMEOUT)
        sup = getattr(h.km, "supervisor", None)
        if sup is not None and getattr(sup, "alive", False):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sup.close(now=True), STEP_TIMEOUT)
        with contextlib.suppress(Exception):
            if pid and psutil.pid_exists(pid):
                _killpg(pid)

    def blocking(self, rec: Recorder, s: Settings) -> None:
        t0 = _now()
        km, kc = self.manager.start_new_kernel(kernel_name=self.kernel,
                                               startup_timeout=READY_TIMEOUT)
        rec.put("start_blocking", _now() - t0)
        try:
            kc.stop_channels()
            rec.step = "shutdown_now"
            t0 = _now()
            km.shutdown_kernel(now=True)
            rec.put("shutdown_now", _now() - t0)
        finally:
            with contextlib.suppress(Exception):
                if km.has_kernel:
                    km.shutdown_kernel(now=True)

    async def containment(self, rec: Recorder, s: Settings) -> None:
        """One start with containment on and one with it off, the order flipping each sample."""
        self._flip = not getattr(self, "_flip", False)
        order = [("start_contained", "auto"), ("start_uncontained", "off")]
        for row, contain in (order if self._flip else order[::-1]):
            rec.step = row
            h, t = await self.start(
                lambda c=contain: self.manager.AsyncKernelManager(self.kernel, contain=c))
            try:
                rec.put(row, t)
            finally:
                await self.dispose(h)

    async def _events(self, sup: Any) -> asyncio.Queue[tuple[float, Any]]:
        q: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

        async def listener(ev: Any) -> None:
            q.put_nowait((_now(), ev))

        sup.subscribe(listener)
        return q

    @staticmethod
    async def _wait_event(q: asyncio.Queue[tuple[float, Any]], kid: str, kind: str) -> float:
        while True:
            at, ev = await q.get()
            if ev.kernel_id != kid:
                continue
            if ev.kind == kind:
                return at
            if ev.kind in ("dead", "gave_up"):
                raise BenchError(f"kernel {ev.kind} while waiting for {kind!r}: {ev.reason}")

    async def crash(self, rec: Recorder, s: Settings) -> None:
        sup = self.Supervisor(policy=self.RestartPolicy.jupyter_client_compatible())
        async with sup:
            q = await self._events(sup)
            kid = await _bounded(sup.start_kernel(s.kernel), READY_TIMEOUT, "start_kernel")
            await asyncio.sleep(s.crash_pause)
            pid = sup.get_kernel(kid).actor.pid
            while not q.empty():
                q.get_nowait()
            t0 = _now()
            os.kill(pid, signal.SIGKILL)
            try:
                seen = await _bounded(self._wait_event(q, kid, "exited"), STEP_TIMEOUT,
                                      "'exited' event")
                rec.put("crash_detect", seen - t0)
                rec.step = "crash_ready"
                ready = await _bounded(self._wait_event(q, kid, "restarted"), READY_TIMEOUT,
                                       "'restarted' event")
                rec.put("crash_ready", ready - t0)
            finally:
                await _bounded(sup.shutdown_all(now=True), STEP_TIMEOUT, "shutdown_all")

    async def warm(self, rec: Recorder, s: Settings) -> None:
        sup = self.Supervisor(warm={s.kernel: 2})
        async with sup:
            changed = asyncio.Event()
            dead: list[str] = []

            async def listener(ev: Any) -> None:
                if ev.kind in ("dead", "gave_up"):
                    dead.append(ev.reason)
                changed.set()

            sup.subscribe(listener)
            deadline = _now() + 2 * READY_TIMEOUT
            while sup.statistics().pool.get(s.kernel, 0) < 2:
                if dead:
                    raise BenchError(f"a pool kernel did not start: {dead[0]}")
                if _now() > deadline:
                    raise BenchError(f"warm pool not full: {dict(sup.statistics().pool)}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.0, deadline - _now()))
                changed.clear()
            t0 = _now()
            kid = await _bounded(sup.acquire(s.kernel), READY_TIMEOUT, "acquire")
            rec.put("acquire", _now() - t0)
            rec.step = "acquire_ready"
            kc = sup.get_kernel(kid).client()
            try:
                kc.start_channels()
                await kc.wait_for_ready(timeout=READY_TIMEOUT)
                rec.put("acquire_ready", _now() - t0)
            finally:
                kc.stop_channels()
                await _bounded(sup.shutdown_all(now=True), STEP_TIMEOUT, "shutdown_all")

    async def idle(self, rec: Recorder, s: Settings, k: int) -> None:
        probe = _Idle()
        sup = self.Supervisor()
        async with sup:
            try:
                started = await asyncio.gather(*(sup.start_kernel(s.kernel) for _ in range(k)),
                                               return_exceptions=True)
                errors = [x for x in started if not isinstance(x, str)]
                if errors:
                    raise BenchError(f"{len(errors)}/{k} starts failed: {errors[0]!r}")
                cpu, rss = await probe.measure(s.idle_window)
                rec.put(f"idle_cpu_{k}", cpu)
                rec.put(f"idle_rss_{k}", rss)
            finally:
                await _bounded(sup.shutdown_all(now=True), 2 * STEP_TIMEOUT, "shutdown_all")


# == jupyter_client ==========================================================================
class JupyterClient(_ManagedContender):
    """jupyter_client, its async and blocking managers, as documented."""

    name = "jupyter_client"

    def __init__(self, kernel: str) -> None:
        import jupyter_client
        import jupyter_client.ioloop
        import jupyter_client.manager
        import jupyter_client.multikernelmanager

        self.kernel = kernel
        self.jc = jupyter_client
        self.AsyncIOLoopKernelManager = jupyter_client.ioloop.AsyncIOLoopKernelManager
        self.start_new_kernel = jupyter_client.manager.start_new_kernel
        self.AsyncMultiKernelManager = jupyter_client.multikernelmanager.AsyncMultiKernelManager

    def new_manager(self) -> Any:
        return self.jc.AsyncKernelManager(kernel_name=self.kernel)

    @staticmethod
    def _pid(km: Any) -> int | None:
        prov = getattr(km, "provisioner", None)
        return getattr(prov, "pid", None) if prov is not None else None

    async def dispose(self, h: _Managed) -> None:
        if h.kc is not None:
            with contextlib.suppress(Exception):
                h.kc.stop_channels()
        pid = self._pid(h.km)
        with contextlib.suppress(Exception):
            if h.km.has_kernel:
                await asyncio.wait_for(h.km.shutdown_kernel(now=True), STEP_TIMEOUT)
        with contextlib.suppress(Exception):
            if pid and psutil.pid_exists(pid):
                _killpg(pid)

    def blocking(self, rec: Recorder, s: Settings) -> None:
        t0 = _now()
        km, kc = self.start_new_kernel(kernel_name=self.kernel, startup_timeout=READY_TIMEOUT)
        rec.put("start_blocking", _now() - t0)
        try:
            kc.stop_channels()
            rec.step = "shutdown_now"
            t0 = _now()
            km.shutdown_kernel(now=True)
            rec.put("shutdown_now", _now() - t0)
        finally:
            with contextlib.suppress(Exception):
                if km.has_kernel:
                    km.shutdown_kernel(now=True)

    async def crash(self, rec: Recorder, s: Settings) -> None:
        # AsyncKernelManager's own start_restarter() does nothing; its IOLoop
        # subclass runs the KernelRestarter (defaults) on this loop.
        h, _ = await self.start(
            lambda: self.AsyncIOLoopKernelManager(kernel_name=self.kernel, autorestart=True))
        km = h.km
        try:
            detected: list[float] = []
            restarted = asyncio.Event()
            km.add_restart_callback(lambda: detected.append(_now()), "restart")
            original = km.restart_kernel

            async def restart_kernel(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await original(*args, **kwargs)
                finally:
                    restarted.set()

            km.restart_kernel = restart_kernel  # observe the restarter's call, change nothing
            await asyncio.sleep(s.crash_pause)
            pid = self._pid(km)
            if not pid:
                raise BenchError("no kernel pid")
            t0 = _now()
            os.kill(pid, signal.SIGKILL)
            await _bounded(restarted.wait(), READY_TIMEOUT, "restarter's restart")
            if not detected:
                raise BenchError("restart finished but the 'restart' callback never fired")
            rec.put("crash_detect", detected[0] - t0)
            rec.step = "crash_ready"
            h.kc.stop_channels()
            h.kc = km.client()  # the restart may have moved to new ports
            h.kc.start_channels()
            await h.kc.wait_for_ready(timeout=READY_TIMEOUT)
            rec.put("crash_ready", _now() - t0)
        finally:
            await self.dispose(h)

    async def warm(self, rec: Recorder, s: Settings) -> None:
        raise NotApplicable("no warm pool")

    async def containment(self, rec: Recorder, s: Settings) -> None:
        raise NotApplicable("no containment switch")

    async def idle(self, rec: Recorder, s: Settings, k: int) -> None:
        probe = _Idle()
        mkm = self.AsyncMultiKernelManager()
        try:
            started = await asyncio.gather(*(mkm.start_kernel(kernel_name=s.kernel)
                                             for _ in range(k)), return_exceptions=True)
            errors = [x for x in started if not isinstance(x, str)]
            if errors:
                raise BenchError(f"{len(errors)}/{k} starts failed: {errors[0]!r}")

            async def ready(kid: str) -> None:  # what a jupyter_client user must do to know
                kc = mkm.get_kernel(kid).client()
                kc.start_channels()
                try:
                    await kc.wait_for_ready(timeout=READY_TIMEOUT)
                finally:
                    kc.stop_channels()

            await asyncio.gather(*(ready(kid) for kid in started))
            cpu, rss = await probe.measure(s.idle_window)
            rec.put(f"idle_cpu_{k}", cpu)
            rec.put(f"idle_rss_{k}", rss)
        finally:
            await _bounded(mkm.shutdown_all(now=True), 2 * STEP_TIMEOUT, "shutdown_all")


Contender = Floor | Ours | JupyterClient


def make_contenders(kernel: str) -> list[Contender]:
    """The three contenders, in the interleaving order (imports done here, beforehand)."""
    from supervisor.kernelspec import get_kernel_spec

    return [Floor(FloorLauncher(get_kernel_spec(kernel))), Ours(kernel), JupyterClient(kernel)]


# == scenarios ===============================================================================
async def _lifecycle(c: Contender, rec: Recorder, s: Settings) -> None:
    rec.step = "start"
    h, t = await c.start()  # type: ignore[attr-defined]
    done = False
    try:
        rec.put("start", t)
        if rec.wants("interrupt"):
            rec.step = "interrupt"
            await c.interrupt(h)  # type: ignore[arg-type]  # kernel warm-up, not timed
            rec.put("interrupt", await c.interrupt(h))  # type: ignore[arg-type]
        if rec.wants("restart"):
            rec.step = "restart"
            rec.put("restart", await c.restart(h))  # type: ignore[arg-type]
        if rec.wants("shutdown"):
            rec.step = "shutdown"
            rec.put("shutdown", await c.shutdown(h))  # type: ignore[arg-type]
            done = True
    finally:
        if not done:
            await c.dispose(h)  # type: ignore[arg-type]


async def _concurrent(c: Contender, rec: Recorder, s: Settings, n: int) -> None:
    rec.step = f"concurrent_{n}"
    t0 = _now()
    results = await asyncio.gather(*(c.start() for _ in range(n)), return_exceptions=True)
    elapsed = _now() - t0
    handles = [r[0] for r in results if isinstance(r, tuple)]
    await asyncio.gather(*(c.dispose(h) for h in handles), return_exceptions=True)
    errors = [r for r in results if not isinstance(r, tuple)]
    if errors:
        raise BenchError(f"{len(errors)}/{n} starts failed: {errors[0]!r}")
    rec.put(f"concurrent_{n}", elapsed)


def run_scenario(scenario: str, c: Contender, rec: Recorder, s: Settings,
                 timeout: float) -> None:
    """One sample of ``scenario`` for ``c``; raises what the contender raised."""
    name, _, arg = scenario.partition(":")
    if name == "blocking":
        rec.step = "start_blocking"
        c.blocking(rec, s)
        return
    factory: Callable[[], Awaitable[None]]
    if name == "lifecycle":
        def factory() -> Awaitable[None]:
            return _lifecycle(c, rec, s)
    elif name == "concurrent":
        def factory() -> Awaitable[None]:
            return _concurrent(c, rec, s, int(arg))
    elif name == "crash":
        rec.step = "crash_detect"

        def factory() -> Awaitable[None]:
            return c.crash(rec, s)
    elif name == "containment":
        rec.step = "start_contained"

        def factory() -> Awaitable[None]:
            return c.containment(rec, s)
    elif name == "warm":
        rec.step = "acquire"

        def factory() -> Awaitable[None]:
            return c.warm(rec, s)
    elif name == "idle":
        rec.step = f"idle_cpu_{arg}"

        def factory() -> Awaitable[None]:
            return c.idle(rec, s, int(arg))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")

    async def main() -> None:
        try:
            await asyncio.wait_for(factory(), timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"{rec.step}: sample exceeded {timeout:g} s") from None

    asyncio.run(main())

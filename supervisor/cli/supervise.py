"""``kernel-supervisor supervise``: N kernels under a policy, with a live status view.

One ``asyncio.run()`` on the main thread owns the Supervisor, its actors, the
chaos timer and the status view; SIGINT and SIGTERM are handled on that loop.
Log lines go to stderr through :class:`~supervisor.cli._common.Console`, which
keeps the status table drawn below them on a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from supervisor.cli._common import (
    Console,
    Context,
    add_containment_arguments,
    add_launcher_arguments,
    containment_options,
    count_arg,
    delay_arg,
    format_table,
    human_bytes,
    human_seconds,
    isatty,
    kill_now,
    launcher_options,
    log,
    seconds_arg,
    signal_name,
)
from supervisor.errors import ConfigurationError
from supervisor.events import EVENT_KINDS, KernelEvent
from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import get_kernel_spec
from supervisor.policy import RESTART_TYPES, Backoff, RestartPolicy
from supervisor.supervisor import STRATEGIES, Supervisor

NAME = "supervise"
SUMMARY = "supervise N kernels with a live status view"
DESCRIPTION = (
    "Run a Supervisor with N kernels in the foreground: a status table on stdout\n"
    "(redrawn on a terminal, printed at each change of state otherwise), one log\n"
    "line per kernel event on stderr. SIGINT/SIGTERM or the end of --duration shut\n"
    "everything down and print a summary (a second signal kills the kernels).\n"
    "Exit 0, or 1 if a restart policy gave up on a kernel.")
BAD_KINDS = ("exited", "dead", "gave_up")


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults, backoff = RestartPolicy(), Backoff()
    p.add_argument("--kernel", required=True, metavar="NAME", help="kernelspec name")
    p.add_argument("--count", required=True, type=count_arg, metavar="N",
                   help="kernels to start and keep running")
    p.add_argument("--policy", choices=RESTART_TYPES, default=defaults.restart,
                   help="restart after any exit, after abnormal exits only, or never "
                        "(default permanent)")
    p.add_argument("--strategy", choices=STRATEGIES, default="one_for_one",
                   help="which kernels restart when one exits (default one_for_one)")
    p.add_argument("--max-restarts", type=count_arg, default=defaults.max_restarts, metavar="N",
                   help=f"give up on a kernel after N restarts within --within seconds "
                        f"(default {defaults.max_restarts})")
    p.add_argument("--within", type=seconds_arg, default=defaults.within_seconds, metavar="S",
                   help=f"the restart window (default {defaults.within_seconds:g})")
    p.add_argument("--backoff-initial", type=delay_arg, default=backoff.initial, metavar="S",
                   help="delay before the first restart of a streak (default 0: at once, "
                        "then 0.1 s doubling)")
    p.add_argument("--backoff-max", type=delay_arg, default=backoff.maximum, metavar="S",
                   help=f"longest delay between restarts (default {backoff.maximum:g})")
    p.add_argument("--warm", type=count_arg, default=0, metavar="N",
                   help="also keep N ready spare kernels (a warm pool)")
    p.add_argument("--chaos-kill-every", type=seconds_arg, metavar="S",
                   help="SIGKILL a random ready kernel every S seconds")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the chaos choices and jitter")
    p.add_argument("--duration", type=seconds_arg, metavar="S",
                   help="stop S seconds after the kernels are ready (default: at SIGINT/SIGTERM)")
    p.add_argument("--status-interval", type=seconds_arg, default=1.0, metavar="S",
                   help="seconds between redraws of the status table (default 1)")
    add_containment_arguments(p)
    p.add_argument("--startup-timeout", type=seconds_arg, default=60.0, metavar="S",
                   help="seconds a kernel may take to start (default 60)")
    add_launcher_arguments(p)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.count == 0 and args.warm == 0:
        args.parser.error("nothing to supervise: give --count or --warm above 0")
    if args.backoff_initial > args.backoff_max:
        args.parser.error("--backoff-initial must not be above --backoff-max")
    try:
        policy = RestartPolicy(restart=args.policy, max_restarts=args.max_restarts,
                               within_seconds=args.within,
                               backoff=Backoff(initial=args.backoff_initial,
                                               maximum=args.backoff_max))
    except ConfigurationError as exc:
        args.parser.error(str(exc))
    return asyncio.run(_Supervise(args, ctx.console, ctx.forward_stderr, policy).run())


class _Supervise:
    """One ``supervise`` run: the supervisor, its listener, chaos, the status view."""

    def __init__(self, args: argparse.Namespace, console: Console, forward_stderr: bool,
                 policy: RestartPolicy) -> None:
        self.args = args
        self.console = console
        self.live = isatty(sys.stdout)
        self.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.sup = Supervisor(
            policy=policy, strategy=args.strategy, name="supervise",
            warm={args.kernel: args.warm} if args.warm else None,
            launch=LaunchOptions(kernel_name=args.kernel, forward_stderr=forward_stderr,
                                 startup_timeout=args.startup_timeout,
                                 **launcher_options(args),
                                 **containment_options(args)),
            rng=random.Random(self.rng.random()))
        self.rows: dict[str, list[Any]] = {}  # id -> [last kind, last text, restarts]
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen = 0
        self.target: int | None = None
        self.drained = asyncio.Event()
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.started = time.monotonic()
        self.ready = False
        self.signature: tuple[tuple[str, str], ...] | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.tasks: set[asyncio.Future[Any]] = set()

    # -- events and status ---------------------------------------------------------------------
    async def on_event(self, ev: KernelEvent) -> None:
        self.counts[ev.kind] += 1
        row = self.rows.setdefault(ev.kernel_id, ["", "", 0])
        signum = ev.signal or (int(ev.reason) if ev.kind == "signalled" and ev.reason.isdigit()
                               else None)
        name = signal_name(signum) if signum else None
        detail = name or (f"exit {ev.exit_code}" if ev.exit_code is not None else "")
        row[:] = [ev.kind, f"{ev.kind} ({detail})" if detail else ev.kind, ev.restart_count]
        fields: dict[str, Any] = {
            "kernel_id": ev.kernel_id[:8], "kernel_name": ev.kernel_name,
            "reason": None if ev.kind == "signalled" else ev.reason,
            "exit_code": ev.exit_code, "signal": name, "restart_count": ev.restart_count,
            "delay": None if ev.delay is None else round(ev.delay, 3), "manual": ev.manual}
        emit = log.error if ev.kind == "gave_up" else (
            log.warning if ev.kind in BAD_KINDS else log.info)
        emit(f"kernel.{ev.kind}", _listener=True,
             **{k: v for k, v in fields.items() if v not in (None, "", False)})
        self.seen += 1
        if self.target is not None and self.seen >= self.target:
            self.drained.set()
        self.refresh()
        if self.ready and ev.kind in BAD_KINDS and not self.sup.all_kernel_ids():
            self.request_stop("no_kernels_left")

    def snapshot(self) -> tuple[str, list[tuple[str, ...]]]:
        sup, now = self.sup, time.monotonic()
        ids = sup.all_kernel_ids() if sup.alive else []
        for kid in ids:
            self.rows.setdefault(kid, ["", "", 0])
        table: list[tuple[str, ...]] = []
        ready = 0
        stats = sup.statistics()
        for kid, (kind, text, last_restarts) in self.rows.items():
            state, pid, uptime, restarts = kind or "gone", "-", None, last_restarts
            mem = cpu = procs = "-"
            if kid in ids:
                state = sup.child_status(kid)
                restarts = sup.child_record(kid)[0]
                actor = sup.actor_of(kid)
                if actor.is_alive():
                    pid = str(actor.pid)
                    res = stats.resources.get(kid)
                    if res is not None:
                        mem = human_bytes(res.memory)
                        cpu = "-" if res.cpu_seconds is None else f"{res.cpu_seconds:.1f}s"
                        procs = "-" if res.processes is None else str(res.processes)
                if state == "ready":
                    ready += 1
                    uptime = now - actor.started_at if actor.started_at else None
                if kid not in sup:
                    state += " (warm)"
            table.append((kid[:8], state, pid, str(restarts), human_seconds(uptime), mem, cpu,
                          procs, text or "-"))
        title = (f"status: {ready}/{len(ids)} ready, {stats.restarts} restarts, "
                 f"up {human_seconds(now - self.started)}")
        return title, table

    def refresh(self) -> None:
        title, table = self.snapshot()
        header = ("KERNEL", "STATE", "PID", "RESTARTS", "UPTIME", "MEM", "CPU", "PROCS",
                  "LAST EVENT")
        lines = [title, *format_table([header, *table])]
        if self.live:
            self.console.show(lines)
            return
        signature = tuple((row[0], row[1]) for row in table)
        if table and signature != self.signature:
            self.signature = signature
            print("\n".join(lines) + "\n", flush=True)

    def tick(self) -> None:
        self.refresh()
        self.later(self.args.status_interval, self.tick)

    # -- control ---------------------------------------------------------------------------------
    def later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers = [t for t in self.timers if not t.cancelled()]
        self.timers.append(asyncio.get_running_loop().call_later(delay, callback))

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            log.info("supervise.stopping", reason=reason)
            self.stop.set()

    def on_signal(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("supervise.kill_now", signal=signal_name(signum))
            kill_now(self.sup)
        else:
            self.request_stop(signal_name(signum))

    def chaos(self) -> None:
        self.later(self.args.chaos_kill_every, self.chaos)
        sup = self.sup
        ready = [k for k in sup.all_kernel_ids() if sup.child_status(k) == "ready"]
        if not ready:
            log.info("chaos.skipped", reason="no ready kernel")
            return
        victim = self.rng.choice(ready)
        log.info("chaos.kill", kernel_id=victim[:8], pid=sup.actor_of(victim).pid)
        task = asyncio.ensure_future(sup.signal_kernel(victim, signal.SIGKILL))
        self.tasks.add(task)
        task.add_done_callback(self._chaos_done)

    def _chaos_done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("chaos.kill_failed", error=str(task.exception()))

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> int:
        args, sup = self.args, self.sup
        get_kernel_spec(args.kernel)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.on_signal, signum)
        sup.subscribe(self.on_event)
        sup.start()
        log.info("supervise.start", kernel=args.kernel, count=args.count, warm=args.warm,
                 policy=args.policy, chaos_every=args.chaos_kill_every, seed=self.seed)
        self.tick()
        failure: BaseException | None = None
        starts = asyncio.gather(*(sup.start_kernel(args.kernel) for _ in range(args.count)),
                                return_exceptions=True)
        try:
            stopped = asyncio.ensure_future(self.stop.wait())
            waiting: set[asyncio.Future[Any]] = {starts, stopped}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if starts.done():
                failure = next((r for r in starts.result() if isinstance(r, BaseException)), None)
            if failure is None and not self.stop.is_set():
                self.ready = True
                log.info("supervise.ready", kernels=len(sup.all_kernel_ids()),
                         seconds=round(time.monotonic() - self.started, 3))
                if args.chaos_kill_every:
                    self.later(args.chaos_kill_every, self.chaos)
                if args.duration:
                    self.later(args.duration, lambda: self.request_stop("duration"))
                await self.stop.wait()
        finally:
            for timer in self.timers:
                timer.cancel()
            starts.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starts
            await sup.close()
            await self.drain()
            self.refresh()
            self.console.release()
        if failure is not None:
            raise failure
        return self.summary()

    async def drain(self) -> None:
        """Wait (bounded) until the listener has seen every event the supervisor emitted."""
        self.target = self.sup.statistics().events
        if self.seen < self.target:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.drained.wait(), 5.0)

    def summary(self) -> int:
        stats = self.sup.statistics()
        kinds = [k for k in EVENT_KINDS if self.counts[k]]
        print(f"summary: kernels={len(self.rows)} restarts={stats.restarts} "
              f"gave_up={stats.gave_up} ran={human_seconds(time.monotonic() - self.started)} "
              f"stopped_by={self.stop_reason or 'error'} seed={self.seed}")
        print("events: " + " ".join(f"{k}={self.counts[k]}" for k in kinds))
        for kid, (kind, _, restarts) in self.rows.items():
            print(f"kernel {kid[:8]}: restarts={restarts} last={kind or '-'}")
        sys.stdout.flush()
        if stats.gave_up:
            print(f"error: the restart policy gave up on {stats.gave_up} kernel(s)",
                  file=sys.stderr)
            return 1
        return 0

"""The ``kernel-supervisor`` command line (also ``python -m supervisor``).

Commands: ``kernelspecs``, ``run``, ``supervise``, ``connect`` and ``bench``;
``kernel-supervisor COMMAND --help`` describes each one.

Loop and threads: ``run``, ``connect`` and ``supervise`` each run in one
``asyncio.run()`` of a single main coroutine on the main thread. The
Supervisor, its kernel actors and the KernelClient all belong to that loop
(Tornado's ``IOLoop.current()`` wraps it); SIGINT and SIGTERM are handled on
it with ``loop.add_signal_handler``, never as KeyboardInterrupt. The blocking
API and its background loop are not used. ``kernelspecs`` needs no loop;
``bench`` runs ``python -m benchmarks`` in this process, on its own loops.
Only threads of ours: the reader of an ``input()`` prompt (daemon).

This is the only module that calls ``structlog.configure()``: log lines go to
stderr (console or JSON lines, ISO timestamps, filtered by level) so stdout
carries only the program's output. Exit status: 0 ok; 1 for a library error
(:class:`~supervisor.errors.SupervisorError`, printed as one ``error: ...``
line) or code that raised; 2 bad usage; 130 interrupted (143 SIGTERM, ``run``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import getpass
import importlib.util
import json
import logging
import os
import random
import re
import runpy
import shutil
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from supervisor import __version__
from supervisor.client import KernelClient
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    KernelDeadError,
    KernelDiedError,
    KernelStartupError,
    KernelStateError,
    NoSuchKernel,
    SupervisorError,
)
from supervisor.events import EVENT_KINDS, KernelEvent
from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import find_kernel_specs, get_all_specs, get_kernel_spec
from supervisor.manager import AsyncKernelManager
from supervisor.policy import RESTART_TYPES, Backoff, RestartPolicy
from supervisor.supervisor import STRATEGIES, Supervisor

__all__ = ["build_parser", "main"]

T = TypeVar("T")
Msg = dict[str, Any]
log = structlog.get_logger("supervisor.cli")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EVENT_LINES = frozenset(f"kernel.{kind}" for kind in EVENT_KINDS)
_BAD_KINDS = ("exited", "dead", "gave_up")


# == terminal and logging =========================================================================
class _Console:
    """Writes log lines to stderr; in live mode keeps a status table drawn below them.

    Any thread may log (a lock orders the writes); the table is redrawn in
    place with ANSI cursor moves, so log lines scroll above it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._footer: list[str] = []
        self._drawn = 0

    def log(self, line: str) -> None:
        with self._lock:
            self._erase()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._draw()

    def show(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        with self._lock:
            self._erase()
            self._footer = [line[:width] for line in lines]
            self._draw()

    def release(self) -> None:
        """Leave the table on screen as it is and stop redrawing it."""
        with self._lock:
            self._footer, self._drawn = [], 0

    def _erase(self) -> None:
        if self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}F\x1b[J")
            sys.stdout.flush()
            self._drawn = 0

    def _draw(self) -> None:
        if self._footer:
            sys.stdout.write("\n".join(self._footer) + "\n")
            sys.stdout.flush()
            self._drawn = len(self._footer)


class _LineLogger:
    """The structlog logger: hands every rendered line to the console."""

    def __init__(self, console: _Console) -> None:
        self._console = console

    def msg(self, message: str) -> None:
        self._console.log(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _event_lines(dedupe: bool) -> Processor:
    """With ``dedupe`` (``supervise`` below debug level), the listener's line is the one
    line per KernelEvent: the library's own lines about the same steps are dropped."""

    def process(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        if event_dict.pop("_listener", False) or not dedupe:
            return event_dict
        if event_dict.get("event") in _EVENT_LINES:
            raise structlog.DropEvent
        return event_dict

    return process


def configure_logging(fmt: str, level: str, console: _Console, *, dedupe: bool = False) -> None:
    """Configure structlog for the process: stderr, ``fmt`` renderer, ``level`` filter."""
    processors: list[Processor] = [structlog.contextvars.merge_contextvars,
                                   _event_lines(dedupe and level != "debug")]
    processors += [structlog.processors.add_log_level, structlog.processors.StackInfoRenderer(),
                   structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(sys.stderr)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_: _LineLogger(console),
        cache_logger_on_first_use=False,  # main() may run again in-process
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


# == argument parsing =============================================================================
def _number(kind: Callable[[str], T], minimum: float, strict: bool) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum or (strict and value == minimum):  # type: ignore[operator]
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum:g}, not {text}")
        return value
    return parse


_count = _number(int, 0, strict=False)
_seconds_arg = _number(float, 0.0, strict=True)
_delay_arg = _number(float, 0.0, strict=False)


def build_parser(prog: str = "kernel-supervisor") -> argparse.ArgumentParser:
    """The argument parser of every command (each subparser is in ``parser`` defaults)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("logging (before or after the command)")
    group.add_argument("--log-format", choices=("console", "json"), default=argparse.SUPPRESS,
                       help="console lines (default) or JSON lines, on stderr")
    group.add_argument("--log-level", choices=tuple(LEVELS), default=argparse.SUPPRESS,
                       help="least severe level shown (default info; warning for run and "
                            "connect); debug also forwards the kernels' stderr")
    parser = argparse.ArgumentParser(
        prog=prog, parents=[common],
        description="Start, supervise and stop Jupyter kernels.",
        epilog=f"'{prog} COMMAND --help' describes a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str,
                own_logging: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common] if own_logging else [], help=summary,
                           description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(parser=p)
        return p

    p = command("kernelspecs", "list the installed kernels",
                "List the kernelspecs found on the Jupyter path: name, display name and "
                "resource directory.")
    p.add_argument("--json", action="store_true",
                   help="print JSON shaped like 'jupyter kernelspec list --json'")

    p = command("run", "run code in a new kernel, print its output",
                "Start a kernel, run CODE or FILE ('-' reads stdin), stream its output as it\n"
                "arrives, shut the kernel down. Exit 1 if the code raised. Ctrl-C interrupts\n"
                "the kernel; a second Ctrl-C kills it and exits 130.")
    p.add_argument("--kernel", default="python3", metavar="NAME",
                   help="kernelspec name (default python3)")
    p.add_argument("-c", dest="code", metavar="CODE", help="code to run")
    p.add_argument("file", nargs="?", metavar="FILE", help="file of code to run ('-': stdin)")
    p.add_argument("--timeout", type=_seconds_arg, metavar="S",
                   help="give up if the code has not finished after S seconds (default: never)")
    p.add_argument("--startup-timeout", type=_seconds_arg, default=60.0, metavar="S",
                   help="seconds the kernel may take to start (default 60)")

    defaults, backoff = RestartPolicy(), Backoff()
    p = command("supervise", "supervise N kernels with a live status view",
                "Run a Supervisor with N kernels in the foreground: a status table on stdout\n"
                "(redrawn on a terminal, printed at each change of state otherwise), one log\n"
                "line per kernel event on stderr. SIGINT/SIGTERM or the end of --duration shut\n"
                "everything down and print a summary (a second signal kills the kernels).\n"
                "Exit 0, or 1 if a restart policy gave up on a kernel.")
    p.add_argument("--kernel", required=True, metavar="NAME", help="kernelspec name")
    p.add_argument("--count", required=True, type=_count, metavar="N",
                   help="kernels to start and keep running")
    p.add_argument("--policy", choices=RESTART_TYPES, default=defaults.restart,
                   help="restart after any exit, after abnormal exits only, or never "
                        "(default permanent)")
    p.add_argument("--strategy", choices=STRATEGIES, default="one_for_one",
                   help="which kernels restart when one exits (default one_for_one)")
    p.add_argument("--max-restarts", type=_count, default=defaults.max_restarts, metavar="N",
                   help=f"give up on a kernel after N restarts within --within seconds "
                        f"(default {defaults.max_restarts})")
    p.add_argument("--within", type=_seconds_arg, default=defaults.within_seconds, metavar="S",
                   help=f"the restart window (default {defaults.within_seconds:g})")
    p.add_argument("--backoff-initial", type=_delay_arg, default=backoff.initial, metavar="S",
                   help="delay before the first restart of a streak (default 0: at once, "
                        "then 0.1 s doubling)")
    p.add_argument("--backoff-max", type=_delay_arg, default=backoff.maximum, metavar="S",
                   help=f"longest delay between restarts (default {backoff.maximum:g})")
    p.add_argument("--warm", type=_count, default=0, metavar="N",
                   help="also keep N ready spare kernels (a warm pool)")
    p.add_argument("--chaos-kill-every", type=_seconds_arg, metavar="S",
                   help="SIGKILL a random ready kernel every S seconds")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the chaos choices and jitter")
    p.add_argument("--duration", type=_seconds_arg, metavar="S",
                   help="stop S seconds after the kernels are ready (default: at SIGINT/SIGTERM)")
    p.add_argument("--status-interval", type=_seconds_arg, default=1.0, metavar="S",
                   help="seconds between redraws of the status table (default 1)")
    p.add_argument("--startup-timeout", type=_seconds_arg, default=60.0, metavar="S",
                   help="seconds a kernel may take to start (default 60)")

    p = command("connect", "talk to a running kernel through its connection file",
                "Attach to a kernel we did not start. Without -c, print its kernel_info;\n"
                "with -c, run CODE there and print the output (exit 1 if it raised).")
    p.add_argument("file", metavar="FILE", help="the kernel's connection file")
    p.add_argument("-c", dest="code", metavar="CODE", help="code to run")
    p.add_argument("--timeout", type=_seconds_arg, metavar="S",
                   help="give up if the code has not finished after S seconds")
    p.add_argument("--ready-timeout", type=_seconds_arg, default=10.0, metavar="S",
                   help="seconds the kernel has to answer (default 10)")

    command("bench", "run the benchmark suite (python -m benchmarks)",
            "Run the benchmark suite of a source checkout in this process, --quick unless\n"
            "--full is given. Every argument after 'bench' goes to the suite; see its own\n"
            f"options with '{prog} bench -- --help'.\nLogging options go before 'bench'.",
            own_logging=False)
    return parser


def _command_index(argv: Sequence[str]) -> int | None:
    """Index of the command word, skipping global options (and their values)."""
    i = 0
    while i < len(argv):
        if argv[i] in ("--log-format", "--log-level"):
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return i
    return None


# == kernelspecs ==================================================================================
def _kernelspecs(args: argparse.Namespace) -> int:
    specs = get_all_specs()
    if args.json:
        print(json.dumps({"kernelspecs": specs}, indent=2))
        return 0
    if not specs:
        print("no kernelspecs found (installing ipykernel provides python3)", file=sys.stderr)
        return 0
    rows = [("NAME", "DISPLAY NAME", "RESOURCE DIR")]
    rows += [(name, s["spec"]["display_name"], s["resource_dir"])
             for name, s in sorted(specs.items())]
    print("\n".join(_table(rows)))
    return 0


# == run and connect ==============================================================================
class _Stopped(Exception):
    """The user stopped us (exit status ``code``)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped ({code})")
        self.code = code


async def _race(work: Awaitable[T], stop: asyncio.Future[BaseException]) -> T:
    """``work``'s result, unless ``stop`` resolves first: then cancel it and raise that."""
    task = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[Any]] = {task, stop}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise stop.result()


def _resolve(stop: asyncio.Future[BaseException], exc: BaseException) -> None:
    if not stop.done():
        stop.set_result(exc)


class _Output:
    """Writes a kernel's IOPub output to our stdout/stderr as it arrives."""

    def __init__(self) -> None:
        self.errors = 0
        self._plain = not _isatty(sys.stderr)

    def _write(self, stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    def _traceback(self, content: Msg) -> None:
        lines = content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]
        text = "\n".join(lines) + "\n"
        self._write(sys.stderr, _ANSI.sub("", text) if self._plain else text)

    def hook(self, msg: Msg) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out = sys.stderr if content.get("name") == "stderr" else sys.stdout
            self._write(out, content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text is not None:
                self._write(sys.stdout, text + "\n")
        elif kind == "error":
            self.errors += 1
            self._traceback(content)

    def finish(self, reply: Msg) -> bool:
        """True if the reply is ok; else print its traceback unless IOPub showed one."""
        content = reply["content"]
        if content.get("status") == "ok":
            return True
        if not self.errors and content.get("status") == "error":
            self._traceback(content)
        return False


def _stdin_hook(kc: KernelClient) -> Callable[[Msg], None]:
    """Answer input_request from our terminal on a daemon thread (never blocks the loop or exit)."""
    loop = asyncio.get_running_loop()

    def answer(value: str) -> None:
        if kc.stdin_channel.is_alive():
            kc.input(value)

    def on_request(msg: Msg) -> None:
        content = msg["content"]

        def read() -> None:
            try:
                ask = getpass.getpass if content.get("password") else input
                value = ask(content.get("prompt", ""))
            except (EOFError, OSError):
                value = ""
            loop.call_soon_threadsafe(answer, value)

        threading.Thread(target=read, name="kernel-supervisor-input", daemon=True).start()

    return on_request


async def _execute(kc: KernelClient, code: str, timeout: float | None,
                   stop: asyncio.Future[BaseException], allow_stdin: bool) -> bool:
    out = _Output()
    try:
        reply = await _race(kc.execute_interactive(
            code, allow_stdin=allow_stdin, timeout=timeout, output_hook=out.hook,
            stdin_hook=_stdin_hook(kc) if allow_stdin else None), stop)
    except ChannelTimeout:
        raise ChannelTimeout(f"the code did not finish within {timeout:g} s") from None
    return out.finish(reply)


def _kill_now(sup: Supervisor) -> None:
    """SIGKILL every kernel process of ``sup`` at once (the second Ctrl-C)."""
    for kid in sup.all_kernel_ids():
        with contextlib.suppress(KernelStateError):
            proc = sup.actor_of(kid).process
            if proc is not None:
                proc.kill_tree()


async def _run(args: argparse.Namespace, code: str, forward_stderr: bool) -> int:
    get_kernel_spec(args.kernel)  # a clear NoSuchKernel before anything starts
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[BaseException] = loop.create_future()
    sup = Supervisor(policy=RestartPolicy.never(), name="run")
    km = AsyncKernelManager(args.kernel, autorestart=False, supervisor=sup,
                            forward_stderr=forward_stderr, startup_timeout=args.startup_timeout)
    kc: KernelClient | None = None
    running = now = False
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and running:
            log.info("run.interrupt", kernel_id=km.kernel_id[:8])
            task = asyncio.ensure_future(km.interrupt_kernel())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif not stop.done():
            _resolve(stop, _Stopped(130))
        else:
            _kill_now(sup)

    async def on_event(event: KernelEvent) -> None:
        if running and event.kernel_id == km.kernel_id and event.kind == "exited":
            why = f"the kernel died while running the code ({event.reason})"
            _resolve(stop, KernelDiedError(why, exit_code=event.exit_code, signal=event.signal))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, lambda: _resolve(stop, _Stopped(143)))
    sup.start()
    sup.subscribe(on_event)
    try:
        await _race(km.start_kernel(), stop)
        kc = km.client()
        kc.start_channels()
        try:
            await _race(kc.wait_for_ready(timeout=30), stop)
        except ChannelTimeout:
            raise ChannelTimeout("the kernel started but its client got no answer in 30 s") \
                from None
        running = True
        ok = await _execute(kc, code, args.timeout, stop, allow_stdin=args.file != "-")
        return 0 if ok else (130 if interrupts else 1)
    except _Stopped as stopped:
        now = stopped.code == 130
        return stopped.code
    except ChannelTimeout:
        now = True  # the code is still running: no point asking nicely
        raise
    finally:
        running = False
        if kc is not None:
            kc.stop_channels()
        with contextlib.suppress(KernelDeadError, KernelStateError):
            if km.has_kernel:
                await km.shutdown_kernel(now=now)
        await sup.close(now=now)


async def _watch_heartbeat(kc: KernelClient, stop: asyncio.Future[BaseException]) -> None:
    misses = 0
    while misses < 3:
        await asyncio.sleep(kc.hb_channel.time_to_dead)  # pacing, one look per heartbeat
        misses = 0 if kc.hb_channel.is_beating() else misses + 1
    _resolve(stop, KernelDiedError("the kernel stopped answering its heartbeat"))


async def _connect(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[BaseException] = loop.create_future()
    kc = KernelClient(connection_file=args.file)
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and kc.control_channel.is_alive():
            kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        else:
            _resolve(stop, _Stopped(130))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, lambda: _resolve(stop, _Stopped(143)))
    kc.start_channels()
    watch: asyncio.Task[None] | None = None
    try:
        try:
            info = await _race(kc.wait_for_ready(timeout=args.ready_timeout), stop)
        except ChannelTimeout:
            raise ChannelTimeout(f"no answer from the kernel of {args.file} within "
                                 f"{args.ready_timeout:g} s; is it running?") from None
        if args.code is None:
            content = info["content"]
            language = content.get("language_info", {})
            rows = [("implementation", f"{content.get('implementation', '?')} "
                                       f"{content.get('implementation_version', '')}"),
                    ("language", f"{language.get('name', '?')} {language.get('version', '')}"),
                    ("protocol version", str(content.get("protocol_version", "?")))]
            print("\n".join(_table(rows)))
            return 0
        watch = asyncio.ensure_future(_watch_heartbeat(kc, stop))
        ok = await _execute(kc, args.code, args.timeout, stop, allow_stdin=True)
        return 0 if ok else (130 if interrupts else 1)
    except _Stopped as stopped:
        return stopped.code
    finally:
        if watch is not None:
            watch.cancel()
        kc.stop_channels()


# == supervise ====================================================================================
class _Supervise:
    """One ``supervise`` run: the supervisor, its listener, chaos, the status view."""

    def __init__(self, args: argparse.Namespace, console: _Console, forward_stderr: bool,
                 policy: RestartPolicy) -> None:
        self.args = args
        self.console = console
        self.live = _isatty(sys.stdout)
        self.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.sup = Supervisor(
            policy=policy, strategy=args.strategy, name="supervise",
            warm={args.kernel: args.warm} if args.warm else None,
            launch=LaunchOptions(kernel_name=args.kernel, forward_stderr=forward_stderr,
                                 startup_timeout=args.startup_timeout),
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
        name = _signal_name(signum) if signum else None
        detail = name or (f"exit {ev.exit_code}" if ev.exit_code is not None else "")
        row[:] = [ev.kind, f"{ev.kind} ({detail})" if detail else ev.kind, ev.restart_count]
        fields: dict[str, Any] = {
            "kernel_id": ev.kernel_id[:8], "kernel_name": ev.kernel_name,
            "reason": None if ev.kind == "signalled" else ev.reason,
            "exit_code": ev.exit_code, "signal": name, "restart_count": ev.restart_count,
            "delay": None if ev.delay is None else round(ev.delay, 3), "manual": ev.manual}
        emit = log.error if ev.kind == "gave_up" else (
            log.warning if ev.kind in _BAD_KINDS else log.info)
        emit(f"kernel.{ev.kind}", _listener=True,
             **{k: v for k, v in fields.items() if v not in (None, "", False)})
        self.seen += 1
        if self.target is not None and self.seen >= self.target:
            self.drained.set()
        self.refresh()
        if self.ready and ev.kind in _BAD_KINDS and not self.sup.all_kernel_ids():
            self.request_stop("no_kernels_left")

    def snapshot(self) -> tuple[str, list[tuple[str, ...]]]:
        sup, now = self.sup, time.monotonic()
        ids = sup.all_kernel_ids() if sup.alive else []
        for kid in ids:
            self.rows.setdefault(kid, ["", "", 0])
        table: list[tuple[str, ...]] = []
        ready = 0
        for kid, (kind, text, last_restarts) in self.rows.items():
            state, pid, uptime, restarts = kind or "gone", "-", None, last_restarts
            if kid in ids:
                state = sup.child_status(kid)
                restarts = sup.child_record(kid)[0]
                actor = sup.actor_of(kid)
                if actor.is_alive():
                    pid = str(actor.pid)
                if state == "ready":
                    ready += 1
                    uptime = now - actor.started_at if actor.started_at else None
                if kid not in sup:
                    state += " (warm)"
            table.append((kid[:8], state, pid, str(restarts), _seconds(uptime), text or "-"))
        title = (f"status: {ready}/{len(ids)} ready, {sup.statistics().restarts} restarts, "
                 f"up {_seconds(now - self.started)}")
        return title, table

    def refresh(self) -> None:
        title, table = self.snapshot()
        lines = [title, *_table([("KERNEL", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EVENT"),
                                 *table])]
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
            log.warning("supervise.kill_now", signal=_signal_name(signum))
            _kill_now(self.sup)
        else:
            self.request_stop(_signal_name(signum))

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
              f"gave_up={stats.gave_up} ran={_seconds(time.monotonic() - self.started)} "
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


# == bench ========================================================================================
def _bench(bench_args: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    if importlib.util.find_spec("benchmarks") is None and (root / "benchmarks").is_dir():
        sys.path.insert(0, str(root))
    try:
        found = importlib.util.find_spec("benchmarks.__main__") is not None
    except ImportError:
        found = False
    if not found:
        print("error: the benchmark suite is not importable: it lives in benchmarks/ of a "
              "source checkout; run this from there (with the 'bench' extra installed)",
              file=sys.stderr)
        return 1
    if not {"--quick", "--full"} & set(bench_args):
        bench_args = ["--quick", *bench_args]
    saved = sys.argv
    sys.argv = ["python -m benchmarks", *bench_args]
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except ModuleNotFoundError as exc:
        print(f"error: the benchmarks need the 'bench' extra: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


# == main =========================================================================================
def _error_line(exc: SupervisorError, debug: bool) -> str:
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    if isinstance(exc, NoSuchKernel):
        first += f" (available: {', '.join(sorted(find_kernel_specs())) or 'none'})"
    if isinstance(exc, KernelStartupError) and exc.stderr_tail.strip():
        first += f"; its stderr ended with: {exc.stderr_tail.strip().splitlines()[-1].strip()}"
    if debug:
        return text
    return f"{first} (more with --log-level debug)" if rest.strip() else first


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog or "kernel-supervisor")
    bench_args: list[str] = []
    at = _command_index(words)
    if at is not None and words[at] == "bench" and words[at + 1:at + 2] not in (["-h"], ["--help"]):
        bench_args = words[at + 1:]
        bench_args = bench_args[1:] if bench_args[:1] == ["--"] else bench_args
        words = words[:at + 1]
    args = parser.parse_args(words)
    level = getattr(args, "log_level", None) or (
        "warning" if args.command in ("run", "connect") else "info")
    forward_stderr = level == "debug"
    console = _Console()
    configure_logging(getattr(args, "log_format", "console"), level, console,
                      dedupe=args.command == "supervise")
    try:
        if args.command == "kernelspecs":
            return _kernelspecs(args)
        if args.command == "bench":
            return _bench(bench_args)
        if args.command == "connect":
            return asyncio.run(_connect(args))
        if args.command == "run":
            if (args.code is None) == (args.file is None):
                args.parser.error("give either -c CODE or FILE")
            code = args.code
            if code is None:
                try:
                    code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
                except (OSError, UnicodeDecodeError) as exc:
                    args.parser.error(f"cannot read {args.file}: {exc}")
            return asyncio.run(_run(args, code, forward_stderr))
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
        return asyncio.run(_Supervise(args, console, forward_stderr, policy).run())
    except SupervisorError as exc:
        print(f"error: {_error_line(exc, level == 'debug')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

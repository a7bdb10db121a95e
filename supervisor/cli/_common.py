"""What the commands share: the terminal, log rendering, argument types, running code.

Objects here belong to the command's one loop (see :mod:`supervisor.cli`), except
:class:`Console`, which any thread may write to, and the logging handler, which
runs on whichever thread logged.

The CLI is the only place that decides how log records are shown: it attaches one
handler to the ``supervisor`` logger of the standard ``logging`` module and
renders each record's structured fields (``record.supervisor_event``, see
:mod:`supervisor._log`) with structlog's console or JSON renderer, on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import re
import shutil
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import structlog
from structlog.typing import EventDict, Processor

from supervisor._log import EVENT_ATTRIBUTE, get_logger
from supervisor.client import KernelClient
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    KernelStartupError,
    KernelStateError,
    NoSuchKernel,
    SupervisorError,
)
from supervisor.events import EVENT_KINDS
from supervisor.kernelspec import find_kernel_specs
from supervisor.launchers import CONTAIN_MODES, format_bytes, parse_cpu_limit, parse_memory_limit
from supervisor.launchers.choose import LAUNCHER_NAMES, check_launcher
from supervisor.supervisor import Supervisor

T = TypeVar("T")
Msg = dict[str, Any]
log = get_logger("supervisor.cli")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EVENT_LINES = frozenset(f"kernel.{kind}" for kind in EVENT_KINDS)


@dataclass
class Context:
    """What main() hands a command besides its parsed arguments."""

    console: Console
    level: str
    forward_stderr: bool
    extra: list[str] = field(default_factory=list)  # bench: the suite's own arguments


# == terminal and logging =========================================================================
class Console:
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


class _Handler(logging.Handler):
    """Renders every ``supervisor.*`` record as one line on the console.

    With ``dedupe`` (``supervise`` below debug level), the listener's line is the
    one line per KernelEvent: the library's own lines about the same steps are
    dropped.
    """

    def __init__(self, console: Console, processors: list[Processor], dedupe: bool) -> None:
        super().__init__()
        self.console = console
        self.processors = processors
        self.dedupe = dedupe

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: EventDict = dict(getattr(record, EVENT_ATTRIBUTE, None)
                                    or {"event": record.getMessage()})
            if not event.pop("_listener", False) and self.dedupe and \
                    event.get("event") in _EVENT_LINES:
                return
            event.pop("log_level", None)
            method = record.levelname.lower()
            event["level"] = method
            if record.exc_info and "exc_info" not in event:
                event["exc_info"] = record.exc_info
            rendered: Any = event
            for processor in self.processors:
                rendered = processor(None, method, rendered)
            self.console.log(str(rendered))
        except Exception:
            self.handleError(record)


_installed: _Handler | None = None


def configure_logging(fmt: str, level: str, console: Console, *, dedupe: bool = False) -> None:
    """Show the library's log records on stderr: ``fmt`` renderer, ``level`` and above."""
    global _installed
    processors: list[Processor] = [structlog.processors.StackInfoRenderer(),
                                   structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=isatty(sys.stderr)))
    target = logging.getLogger("supervisor")
    if _installed is not None:  # main() may run again in-process
        target.removeHandler(_installed)
    _installed = _Handler(console, processors, dedupe and level != "debug")
    target.addHandler(_installed)
    target.setLevel(LEVELS[level])
    target.propagate = False


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def human_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


# == argument parsing =============================================================================
def number(kind: Callable[[str], T], minimum: float, strict: bool) -> Callable[[str], T]:
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


count_arg = number(int, 0, strict=False)
seconds_arg = number(float, 0.0, strict=True)
delay_arg = number(float, 0.0, strict=False)


def _checked(parse: Callable[[object], object]) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            parse(text)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


def add_containment_arguments(p: argparse.ArgumentParser) -> None:
    """``--memory-limit``, ``--cpu-limit`` and ``--contain``: the kernels' containment."""
    group = p.add_argument_group("containment (see docs/containment.md)")
    group.add_argument("--memory-limit", type=_checked(parse_memory_limit), metavar="SIZE",
                       help="memory limit of each kernel's process tree, e.g. 2G or 300M")
    group.add_argument("--cpu-limit", type=_checked(parse_cpu_limit), metavar="CPUS",
                       help="CPU quota of each kernel's process tree, in CPUs (0.5, 2)")
    group.add_argument("--contain", choices=CONTAIN_MODES, default="auto",
                       help="how each kernel's process tree is contained: auto (a cgroup "
                            "where possible, else session), cgroup (required), session, or "
                            "off (daemons it starts may outlive it); default auto")


def containment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The launch options the containment arguments ask for."""
    return {"memory_limit": args.memory_limit, "cpu_limit": args.cpu_limit,
            "contain": args.contain}


def slurm_option_arg(text: str) -> tuple[str, str | bool]:
    """``nodelist=node2`` -> ("nodelist", "node2"); ``exclusive`` -> ("exclusive", True)."""
    key, sep, value = text.partition("=")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value if sep else True


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """``--launcher`` and ``--slurm-option``: where the kernels run (see docs/slurm.md)."""
    group = p.add_argument_group("launcher (see docs/slurm.md)")
    group.add_argument("--launcher", choices=LAUNCHER_NAMES, default=None,
                       help="where kernels run: here (local) or as Slurm job steps (slurm); "
                            "default: the kernelspec's metadata.launcher, else local")
    group.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                       type=slurm_option_arg,
                       help="an srun long option for Slurm kernels, e.g. partition=debug, "
                            "nodelist=node2, time=1:00:00, mem=2G (repeatable; KEY alone "
                            "for a flag)")


def launcher_options(args: argparse.Namespace) -> dict[str, Any]:
    """The launch options the launcher arguments ask for; a bad one exits with usage."""
    options = {"launcher": args.launcher, "slurm_options": dict(args.slurm_option) or None}
    try:
        check_launcher(options["launcher"], options["slurm_options"])
    except ConfigurationError as exc:
        args.parser.error(str(exc))
    return options


def human_bytes(size: int | None) -> str:
    """``'-'`` for unknown, else ``format_bytes``."""
    return "-" if size is None else format_bytes(size)


# == running code ================================================================================
class Stopped(Exception):
    """The user stopped us (exit status ``code``)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped ({code})")
        self.code = code


async def race(work: Awaitable[T], stop: asyncio.Future[BaseException]) -> T:
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


def resolve(stop: asyncio.Future[BaseException], exc: BaseException) -> None:
    if not stop.done():
        stop.set_result(exc)


class Output:
    """Writes a kernel's IOPub output to our stdout/stderr as it arrives."""

    def __init__(self) -> None:
        self.errors = 0
        self._plain = not isatty(sys.stderr)

    def _write(self, stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    def _traceback(self, content: Msg) -> None:
        lines = content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]
        text = "\n".join(lines) + "\n"
        self._write(sys.stderr, ANSI.sub("", text) if self._plain else text)

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


def stdin_hook(kc: KernelClient) -> Callable[[Msg], None]:
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


async def execute(kc: KernelClient, code: str, timeout: float | None,
                   stop: asyncio.Future[BaseException], allow_stdin: bool) -> bool:
    out = Output()
    try:
        reply = await race(kc.execute_interactive(
            code, allow_stdin=allow_stdin, timeout=timeout, output_hook=out.hook,
            stdin_hook=stdin_hook(kc) if allow_stdin else None), stop)
    except ChannelTimeout:
        raise ChannelTimeout(f"the code did not finish within {timeout:g} s") from None
    return out.finish(reply)


def kill_now(sup: Supervisor) -> None:
    """SIGKILL every kernel process of ``sup`` at once (the second Ctrl-C)."""
    for kid in sup.all_kernel_ids():
        with contextlib.suppress(KernelStateError):
            proc = sup.actor_of(kid).process
            if proc is not None:
                proc.kill_tree()




def error_line(exc: SupervisorError, debug: bool) -> str:
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    if isinstance(exc, NoSuchKernel):
        first += f" (available: {', '.join(sorted(find_kernel_specs())) or 'none'})"
    if isinstance(exc, KernelStartupError) and exc.stderr_tail.strip():
        first += f"; its stderr ended with: {exc.stderr_tail.strip().splitlines()[-1].strip()}"
    if debug:
        return text
    return f"{first} (more with --log-level debug)" if rest.strip() else first

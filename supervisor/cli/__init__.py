"""The ``kernel-supervisor`` command line (also ``python -m supervisor``).

Commands: ``kernelspecs``, ``run``, ``supervise``, ``connect``, ``gateway`` and ``bench``, one
module each in this package; ``kernel-supervisor COMMAND --help`` describes each
one. A command module has ``NAME``, ``SUMMARY``, ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args, context) -> exit status``.

Loop and threads: ``run``, ``connect`` and ``supervise`` each run in one
``asyncio.run()`` of a single main coroutine on the main thread. The
Supervisor, its kernel actors and the KernelClient all belong to that loop
(Tornado's ``IOLoop.current()`` wraps it); SIGINT and SIGTERM are handled on
it with ``loop.add_signal_handler``, never as KeyboardInterrupt. The blocking
API and its background loop are not used. ``kernelspecs`` needs no loop;
``bench`` runs ``python -m benchmarks`` in this process, on its own loops.

The CLI is the only part of the package that decides how log records are
shown (:func:`supervisor.cli._common.configure_logging`): lines go to stderr
(console or JSON lines, ISO timestamps, filtered by level) so stdout carries
only the program's output. Exit status: 0 ok; 1 for a library error
(:class:`~supervisor.errors.SupervisorError`, printed as one ``error: ...``
line) or code that raised; 2 bad usage; 130 interrupted (143 SIGTERM, ``run``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from supervisor import __version__
from supervisor.cli import bench, connect, gateway, kernelspecs, run, supervise
from supervisor.cli._common import LEVELS, Console, Context, configure_logging, error_line
from supervisor.errors import SupervisorError

__all__ = ["build_parser", "main"]

COMMANDS: dict[str, ModuleType] = {m.NAME: m for m in (kernelspecs, run, supervise, connect,
                                                       gateway, bench)}


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
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, parents=[common] if getattr(module, "OWN_LOGGING", True) else [],
                           help=module.SUMMARY,
                           description=module.DESCRIPTION.replace("kernel-supervisor", prog),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(parser=p)
        module.add_arguments(p)
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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog or "kernel-supervisor")
    rest: list[str] = []
    at = _command_index(words)
    if (at is not None and getattr(COMMANDS.get(words[at]), "TAKES_REST", False)
            and words[at + 1:at + 2] not in (["-h"], ["--help"])):
        rest = words[at + 1:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        words = words[:at + 1]
    args = parser.parse_args(words)
    level = getattr(args, "log_level", None) or (
        "warning" if args.command in ("run", "connect") else "info")
    console = Console()
    configure_logging(getattr(args, "log_format", "console"), level, console,
                      dedupe=args.command == "supervise")
    context = Context(console=console, level=level, forward_stderr=level == "debug", extra=rest)
    try:
        return int(COMMANDS[args.command].run(args, context))
    except SupervisorError as exc:
        print(f"error: {error_line(exc, level == 'debug')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

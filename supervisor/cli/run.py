"""``kernel-supervisor run``: run code in a new kernel and print its output.

Everything runs in one ``asyncio.run()`` on the main thread: the Supervisor, the
kernel's actor and the client belong to that loop; SIGINT and SIGTERM are handled
on it with ``loop.add_signal_handler``. Only thread of ours: the reader of an
``input()`` prompt (daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from supervisor.cli._common import (
    Context,
    Stopped,
    add_containment_arguments,
    add_launcher_arguments,
    containment_options,
    execute,
    kill_now,
    launcher_options,
    log,
    race,
    resolve,
    seconds_arg,
)
from supervisor.client import KernelClient
from supervisor.errors import ChannelTimeout, KernelDeadError, KernelDiedError, KernelStateError
from supervisor.events import KernelEvent
from supervisor.kernelspec import get_kernel_spec
from supervisor.manager import AsyncKernelManager
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor

NAME = "run"
SUMMARY = "run code in a new kernel, print its output"
DESCRIPTION = ("Start a kernel, run CODE or FILE ('-' reads stdin), stream its output as it\n"
               "arrives, shut the kernel down. Exit 1 if the code raised. Ctrl-C interrupts\n"
               "the kernel; a second Ctrl-C kills it and exits 130.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="python3", metavar="NAME",
                   help="kernelspec name (default python3)")
    p.add_argument("-c", dest="code", metavar="CODE", help="code to run")
    p.add_argument("file", nargs="?", metavar="FILE", help="file of code to run ('-': stdin)")
    p.add_argument("--timeout", type=seconds_arg, metavar="S",
                   help="give up if the code has not finished after S seconds (default: never)")
    p.add_argument("--startup-timeout", type=seconds_arg, default=60.0, metavar="S",
                   help="seconds the kernel may take to start (default 60)")
    add_containment_arguments(p)
    add_launcher_arguments(p)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if (args.code is None) == (args.file is None):
        args.parser.error("give either -c CODE or FILE")
    code = args.code
    if code is None:
        try:
            code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            args.parser.error(f"cannot read {args.file}: {exc}")
    return asyncio.run(_run(args, code, ctx.forward_stderr))


async def _run(args: argparse.Namespace, code: str, forward_stderr: bool) -> int:
    get_kernel_spec(args.kernel)  # a clear NoSuchKernel before anything starts
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[BaseException] = loop.create_future()
    sup = Supervisor(policy=RestartPolicy.never(), name="run")
    km = AsyncKernelManager(args.kernel, autorestart=False, supervisor=sup,
                            forward_stderr=forward_stderr, startup_timeout=args.startup_timeout,
                            **containment_options(args), **launcher_options(args))
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
            resolve(stop, Stopped(130))
        else:
            kill_now(sup)

    async def on_event(event: KernelEvent) -> None:
        if running and event.kernel_id == km.kernel_id and event.kind == "exited":
            why = f"the kernel died while running the code ({event.reason})"
            resolve(stop, KernelDiedError(why, exit_code=event.exit_code, signal=event.signal))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, lambda: resolve(stop, Stopped(143)))
    sup.start()
    sup.subscribe(on_event)
    try:
        await race(km.start_kernel(), stop)
        kc = km.client()
        kc.start_channels()
        try:
            await race(kc.wait_for_ready(timeout=30), stop)
        except ChannelTimeout:
            raise ChannelTimeout("the kernel started but its client got no answer in 30 s") \
                from None
        running = True
        ok = await execute(kc, code, args.timeout, stop, allow_stdin=args.file != "-")
        return 0 if ok else (130 if interrupts else 1)
    except Stopped as stopped:
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

"""``kernel-supervisor connect``: talk to a running kernel through its connection file.

One ``asyncio.run()`` on the main thread owns the client; SIGINT and SIGTERM are
handled on that loop. Only thread of ours: the reader of an ``input()`` prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from supervisor.cli._common import (
    Context,
    Stopped,
    execute,
    format_table,
    race,
    resolve,
    seconds_arg,
)
from supervisor.client import KernelClient
from supervisor.errors import ChannelTimeout, KernelDiedError

NAME = "connect"
SUMMARY = "talk to a running kernel through its connection file"
DESCRIPTION = ("Attach to a kernel we did not start. Without -c, print its kernel_info;\n"
               "with -c, run CODE there and print the output (exit 1 if it raised).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the kernel's connection file")
    p.add_argument("-c", dest="code", metavar="CODE", help="code to run")
    p.add_argument("--timeout", type=seconds_arg, metavar="S",
                   help="give up if the code has not finished after S seconds")
    p.add_argument("--ready-timeout", type=seconds_arg, default=10.0, metavar="S",
                   help="seconds the kernel has to answer (default 10)")


def run(args: argparse.Namespace, ctx: Context) -> int:
    return asyncio.run(_connect(args))


async def watch_heartbeat(kc: KernelClient, stop: asyncio.Future[BaseException]) -> None:
    misses = 0
    while misses < 3:
        await asyncio.sleep(kc.hb_channel.time_to_dead)  # pacing, one look per heartbeat
        misses = 0 if kc.hb_channel.is_beating() else misses + 1
    resolve(stop, KernelDiedError("the kernel stopped answering its heartbeat"))


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
            resolve(stop, Stopped(130))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, lambda: resolve(stop, Stopped(143)))
    kc.start_channels()
    watch: asyncio.Task[None] | None = None
    try:
        try:
            info = await race(kc.wait_for_ready(timeout=args.ready_timeout), stop)
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
            print("\n".join(format_table(rows)))
            return 0
        watch = asyncio.ensure_future(watch_heartbeat(kc, stop))
        ok = await execute(kc, args.code, args.timeout, stop, allow_stdin=True)
        return 0 if ok else (130 if interrupts else 1)
    except Stopped as stopped:
        return stopped.code
    finally:
        if watch is not None:
            watch.cancel()
        kc.stop_channels()

"""The floor: the least work any kernel manager must do, done with raw pyzmq.

Nothing here supervises anything; it is the lower bound the managers are
compared against, using the same kernel argv (from our kernelspec), the same
environment rules and our wire :class:`~supervisor.wire.Session`:

* start: write a connection file, connect a DEALER (shell), a DEALER
  (control) and a SUB (iopub) *before* launching, ``Popen`` the argv, send
  ONE ``kernel_info_request`` and stop the clock when its reply AND any IOPub
  message have arrived. The request is not re-sent while waiting: zmq queues
  it on the connected DEALER's pipe and delivers it the moment the kernel's
  ROUTER is bound (the reconnect interval is 10 ms, as our client uses). Only
  if the reply came and no IOPub message followed within 100 ms is
  ``kernel_info`` asked again (its status messages prove the subscription;
  ipykernel >= 7 greets every subscriber anyway, so this never triggers there).
* shutdown: ``shutdown_request`` on control, then the exit seen on a pidfd
  and reaped; shutdown "now": SIGKILL to the group, then the same.
* interrupt: SIGINT to the kernel pid, until the ``execute_reply``.
* crash: SIGKILL, exit seen on the pidfd (detection), ``Popen`` again with the
  same connection file until ready (replacement).

Every object here belongs to the asyncio loop that created it (one
``asyncio.run`` per benchmark sample); nothing is shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from supervisor.connection import ConnectionInfo, new_connection_info, write_connection_file
from supervisor.kernelspec import KernelSpec, expand_env, format_kernel_cmd
from supervisor.wire import Message, Session

__all__ = ["FloorError", "FloorKernel", "FloorLauncher", "argv_of", "wait_exit"]

RECONNECT_IVL_MS = 10
REASK_AFTER = 0.1  # s after a kernel_info_reply without any IOPub message


class FloorError(Exception):
    """The floor itself failed (shown as FAILED in its cell)."""


async def wait_exit(proc: subprocess.Popen[bytes]) -> float:
    """Wait until ``proc`` has exited (pidfd readable), reap it; return the time seen."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return time.perf_counter()
    try:
        done: asyncio.Future[float] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(time.perf_counter())

        loop.add_reader(pidfd, readable)
        try:
            seen = await done
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    proc.wait()  # already a zombie: returns at once
    return seen


@dataclass
class FloorKernel:
    """One kernel launched by the floor, with its three raw sockets."""

    argv: list[str]
    env: dict[str, str]
    info: ConnectionInfo
    path: str
    session: Session
    ctx: zmq.asyncio.Context
    shell: zmq.asyncio.Socket
    control: zmq.asyncio.Socket
    iopub: zmq.asyncio.Socket
    proc: subprocess.Popen[bytes] | None = None
    kernel_session: str = ""

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def launch(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    async def recv(self, sock: zmq.asyncio.Socket) -> Message:
        return self.session.deserialize(await sock.recv_multipart())

    async def handshake(self, *, stale_session: str = "") -> None:
        """kernel_info reply + one IOPub message from this kernel (not ``stale_session``)."""
        request = self.session.msg("kernel_info_request", {})
        await self.session.send_async(self.shell, request)
        asked = {request.msg_id}
        got_reply = False
        got_iopub = False
        poller = zmq.asyncio.Poller()
        poller.register(self.shell, zmq.POLLIN)
        poller.register(self.iopub, zmq.POLLIN)
        reply_at = 0.0
        while not (got_reply and got_iopub):
            timeout_ms = 1000  # only to notice a kernel that died; nothing is re-sent
            if got_reply:
                timeout_ms = max(0, int((reply_at + REASK_AFTER - time.perf_counter()) * 1000))
            events = dict(await poller.poll(timeout_ms))
            if not events:
                self.proc_check()
                if not got_reply:
                    continue
                request = self.session.msg("kernel_info_request", {})
                await self.session.send_async(self.shell, request)
                asked.add(request.msg_id)
                reply_at = time.perf_counter()
                continue
            if self.iopub in events:
                msg = await self.recv(self.iopub)
                if msg.header.get("session") != stale_session or not stale_session:
                    got_iopub = True
            if self.shell in events:
                msg = await self.recv(self.shell)
                if msg.msg_type == "kernel_info_reply" and msg.parent_id in asked:
                    got_reply = True
                    reply_at = time.perf_counter()
                    self.kernel_session = str(msg.header.get("session", ""))
        self.proc_check()

    def proc_check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise FloorError(f"kernel exited with {self.proc.returncode} while starting")

    async def shutdown(self, *, restart: bool = False) -> None:
        """shutdown_request on control, until the process is reaped."""
        assert self.proc is not None
        msg = self.session.msg("shutdown_request", {"restart": restart})
        await self.session.send_async(self.control, msg)
        await wait_exit(self.proc)

    async def kill(self) -> float:
        """SIGKILL the group; return when reaped (the time the exit was seen)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return await wait_exit(self.proc)

    def close(self) -> None:
        """Kill whatever is left, close the sockets, remove the connection file."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for sock in (self.shell, self.control, self.iopub):
            sock.close(linger=0)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class FloorLauncher:
    """Builds floor kernels for one kernelspec (looked up once, beforehand)."""

    def __init__(self, spec: KernelSpec, ctx: zmq.asyncio.Context | None = None) -> None:
        self.spec = spec
        self.ctx = ctx
        env = dict(os.environ)
        env.update(expand_env(spec.env, env))
        env["JPY_PARENT_PID"] = str(os.getpid())
        self.env = env
        self.runtime = os.environ.get("JUPYTER_RUNTIME_DIR") or tempfile.gettempdir()

    def _socket(self, ctx: zmq.asyncio.Context, kind: int, url: str,
                identity: bytes | None = None) -> zmq.asyncio.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(url)
        return sock

    def prepare(self) -> FloorKernel:
        """Connection file and connected sockets; the process is not launched yet."""
        ctx = self.ctx or zmq.asyncio.Context.instance()
        info = new_connection_info(kernel_name=self.spec.name)
        fd, path = tempfile.mkstemp(prefix="floor-kernel-", suffix=".json", dir=self.runtime)
        os.close(fd)
        write_connection_file(info, path)
        session = Session(info.key, info.signature_scheme)
        ident = session.session_id.encode()
        argv = format_kernel_cmd(self.spec, path)
        return FloorKernel(
            argv=argv, env=self.env, info=info, path=path, session=session, ctx=ctx,
            shell=self._socket(ctx, zmq.DEALER, info.url("shell"), ident),
            control=self._socket(ctx, zmq.DEALER, info.url("control"), ident),
            iopub=self._socket(ctx, zmq.SUB, info.url("iopub")),
        )

    async def start(self) -> FloorKernel:
        """Everything a manager must do to get a ready kernel, and nothing else."""
        kernel = self.prepare()
        try:
            kernel.launch()
            await kernel.handshake()
        except BaseException:
            kernel.close()
            raise
        return kernel


def argv_of(spec: KernelSpec, connection_file: str = "{connection_file}",
            extra: Sequence[str] = ()) -> list[str]:
    """The argv the floor launches (for the record in results.json)."""
    return format_kernel_cmd(spec, connection_file, extra_arguments=extra)


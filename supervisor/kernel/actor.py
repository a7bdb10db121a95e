"""KernelActor: the one owner of one kernel process.

A :class:`KernelActor` lives on the IOLoop where it was started and takes its
messages one at a time, so conflicting requests have one defined outcome each:

==========================  ===================================================
Arrives while ...           Outcome
==========================  ===================================================
Interrupt during a start    waits; applied once the kernel is ready, or fails
                            with :class:`KernelStateError` if the start failed
Shutdown during a start     cuts the start short: the start fails with
                            :class:`KernelStartupError` ("cancelled"), then the
                            shutdown runs (nothing left to stop)
Restart during a shutdown   runs after it: the kernel starts again
Shutdown during a restart   cuts the restart's start short, then shuts down
The asker of a start goes   (its future cancelled: ``wait_for`` expired, task
away                        cancelled, Ctrl-C in the blocking face) a queued
                            Start/Restart is skipped; a running one is cut
                            short: the kernel it began is killed and reaped,
                            its files removed, ports given back; the start
                            fails with :class:`KernelStartupError`
                            ("cancelled") and the actor can start again
The asker of a shutdown     the shutdown goes on to its end (a cancelled
goes away                   wait does not leave a kernel half stopped)
Anything after ``stop()``   fails with :class:`KernelClosedError`
Process exits on its own    ``state`` becomes ``exited``; the parent is told
                            with :class:`ChildExited`; the actor never restarts
                            itself (that is the supervisor's decision)
==========================  ===================================================

Readiness is a ``kernel_info_reply`` on shell plus proof that our IOPub
subscription is live (``iopub_welcome`` from protocol 5.4 kernels, or any
IOPub message for older ones, re-asking ``kernel_info`` only while none has
arrived). Shutdown is ``shutdown_request`` on control, then SIGTERM, then
SIGKILL of the group, each after its own wait; it returns the moment the
process is reaped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal as _signal
import subprocess
import time
import uuid
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from supervisor._log import get_logger
from supervisor.actor import Actor
from supervisor.client import connect_channel
from supervisor.connection import (
    CHANNELS,
    ConnectionInfo,
    PortReservation,
    claim_ports,
    connection_file_path,
    ipc_paths,
    new_connection_info,
    remove_connection_files,
    reserve_ports,
    write_connection_file,
)
from supervisor.errors import (
    ConfigurationError,
    ConnectionFileError,
    KernelSpecError,
    KernelStartupError,
    KernelStateError,
    PortInUseError,
    ResourceExhaustedError,
    WireError,
)
from supervisor.kernel.messages import (
    ChildExited,
    FinishShutdown,
    Interrupt,
    ProcessExited,
    RequestShutdown,
    Restart,
    Shutdown,
    Signal,
    Start,
)
from supervisor.kernel.options import LaunchOptions
from supervisor.kernel.startchecks import (
    _check_fd_headroom,
    _exhaustion,
    _find_clash,
    _PortClash,
)
from supervisor.kernelspec import KernelSpec, expand_env, format_kernel_cmd
from supervisor.launchers import (
    Endpoint,
    ExitStatus,
    LaunchRequest,
    ProcessHandle,
    RemoteHandle,
    Resources,
)
from supervisor.wire import Message, Session

__all__ = ["KernelActor"]

log = get_logger("supervisor.kernel")


@atexit.register
def _kill_leftovers_at_exit() -> None:
    """Interpreter exit with kernels still running: kill them and remove their files.

    Runs without a loop (the loops may be gone); the reaper sidecar would kill
    the processes anyway, but only this removes their connection files.
    """
    for actor in list(_live):
        proc = actor.process
        if actor.options.independent:
            continue  # asked to outlive us
        if proc is not None and proc.running:
            proc.kill_tree()
        if actor.state != "shutdown":
            remove_connection_files(actor.connection_file, actor.connection_info)


class _StartCancelled(Exception):
    pass



# -- the actor ------------------------------------------------------------------
class KernelActor(Actor):
    """Owns one kernel process, its connection file and its control sockets.

    Read-only state for the owner (same loop): :attr:`state`, :attr:`pid`,
    :attr:`connection_info`, :attr:`connection_file`, :attr:`kernel_info`,
    :attr:`execution_state`, :attr:`last_activity`, :attr:`dropped`.
    """

    def __init__(
        self,
        options: LaunchOptions | None = None,
        *,
        kernel_id: str | None = None,
        parent: Actor | None = None,
        connection_info: ConnectionInfo | None = None,
        connection_file: str | os.PathLike[str] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.kernel_id = kernel_id or str(uuid.uuid4())
        super().__init__(name=f"kernel-{self.kernel_id[:8]}")
        self.options = options or LaunchOptions()
        self.parent = parent
        self.state = "new"  # new starting running restarting stopping exited shutdown
        self.connection_info: ConnectionInfo | None = connection_info
        self._fixed_file = connection_file is not None
        self.connection_file: Path = (
            Path(connection_file) if connection_file is not None
            else connection_file_path(self.kernel_id)
        )
        self.kernel_info: dict[str, Any] = {}
        self.execution_state = "starting"
        self.last_activity = time.monotonic()
        self.started_at: float | None = None
        self.dropped = 0
        self._restart_requested = False
        self._ctx = context or zmq.asyncio.Context.instance()
        self._proc: ProcessHandle | None = None
        self.last_exit: ExitStatus | None = None
        self._session: Session | None = None
        self._control: zmq.asyncio.Socket | None = None
        self._iopub: zmq.asyncio.Socket | None = None
        self._iopub_task: asyncio.Task[None] | None = None
        self._iopub_seen = asyncio.Event()
        self._abort = asyncio.Event()
        self._cancel = asyncio.Event()  # the asker of the running start went away
        self._starting: object | None = None  # the Start/Restart being handled
        self._pending_shutdowns = 0
        self._hurry = asyncio.Event()
        self._pending_kills = 0
        self._spec: KernelSpec | None = None
        self._ports: PortReservation | None = None  # held until the kernel is gone for good
        self._hb_echoed = False
        self._log = log.bind(kernel_id=self.kernel_id, kernel_name=self.options.kernel_name)
        _live.add(self)

    # -- read-only views ---------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The kernel's pid while a process exists."""
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> ProcessHandle | None:
        """The current kernel process, if any."""
        return self._proc

    def resources(self) -> Resources | None:
        """What the kernel's process tree uses now (None before the first launch)."""
        return self._proc.resources() if self._proc is not None else None

    @property
    def spec(self) -> KernelSpec | None:
        """The kernelspec of the last launch."""
        return self._spec

    def is_alive(self) -> bool:
        """True while the kernel process runs."""
        return self._proc is not None and self._proc.running

    # -- actor hooks -------------------------------------------------------------
    def on_tell(self, msg: object) -> None:
        # A queued Shutdown cancels any start before it that is not ready yet,
        # whatever the timing: the start fails "cancelled", then the shutdown runs.
        if isinstance(msg, Shutdown):
            self._pending_shutdowns += 1
            self._abort.set()
            # now=True cuts short a graceful shutdown queued or running before it:
            # its waits end, the kernel is killed, then this message finds it gone.
            if msg.now:
                self._pending_kills += 1
                self._hurry.set()

    async def on_stop(self) -> None:
        """Whatever the reason, nothing outlives the actor."""
        if self._proc is not None and self._proc.running:
            await self._shutdown(now=True, restart=False, cause="the supervisor stopped")
        else:
            if self._proc is not None:
                await self._proc.cleanup()
            self._teardown(keep_file=False)
        if self.state != "exited":
            self.state = "shutdown"

    def on_ask_cancelled(self, msg: object) -> None:
        if isinstance(msg, (Start, Restart)) and msg is self._starting:
            self.cancel_start()

    def skip_cancelled(self, msg: object) -> bool:
        return isinstance(msg, (Start, Restart))

    def cancel_start(self) -> None:
        """Cut the running start or restart short, if one runs; on the loop.

        For owners whose own asker went away (a Supervisor whose caller was
        cancelled): the start fails "cancelled" after killing what it began.
        """
        if self._starting is not None:
            self._cancel.set()

    def on_abandon(self) -> None:
        """Our loop is gone: kill the process tree, close sockets, remove the files."""
        if self._proc is not None:
            self._proc.abandon()
        with contextlib.suppress(RuntimeError):  # a task of a closed loop
            self._close_sockets()
        remove_connection_files(self.connection_file, self.connection_info)
        self._release_ports()
        self.execution_state = "dead"
        if self.state != "exited":
            self.state = "shutdown"
        self._log.debug("actor.abandoned", reason=self._stop_reason)

    async def receive(self, msg: object) -> Any:
        if isinstance(msg, (Start, Restart)):
            self._cancel.clear()
            self._starting = msg
            try:
                if isinstance(msg, Start):
                    return await self._start()
                return await self._restart(msg)
            finally:
                self._starting = None
                self._cancel.clear()
        if isinstance(msg, Shutdown):
            self._pending_shutdowns -= 1
            if not self._pending_shutdowns:
                self._abort.clear()
            if msg.now:
                self._pending_kills -= 1
                if not self._pending_kills:
                    self._hurry.clear()
            return await self._shutdown(now=msg.now, restart=msg.restart, cause=msg.cause)
        if isinstance(msg, RequestShutdown):
            return await self._request_shutdown(msg.restart)
        if isinstance(msg, FinishShutdown):
            return await self._finish_shutdown(msg.waittime)
        if isinstance(msg, Interrupt):
            return await self._interrupt()
        if isinstance(msg, Signal):
            return self._signal(msg.signum)
        if isinstance(msg, ProcessExited):
            return await self._process_exited(msg)
        raise KernelStateError(f"{self.name} does not understand {type(msg).__name__}")

    # -- start -------------------------------------------------------------------
    def _connection(self, fresh: bool, spec: KernelSpec) -> ConnectionInfo:
        """The ports to launch on, reserved in this process so no other start gets them.

        Given ports (a connection file's, or a restart's) are claimed; if another
        start of ours holds one, fresh ports are reserved instead.
        """
        opts = self.options
        info = self.connection_info
        if info is not None and not fresh:
            if info.transport != "tcp" or self._ports is not None:
                return info
            self._ports = claim_ports([info.port(c) for c in CHANNELS])
            if self._ports is not None:
                return info
            self._log.warning("kernel.ports_held_elsewhere", ports=[info.port(c) for c in CHANNELS])
        self._release_ports()
        ports: tuple[int, ...] | None = None
        if opts.transport == "tcp":
            self._ports = reserve_ports(len(CHANNELS), opts.ip)
            ports = self._ports.ports
        return new_connection_info(
            ip=opts.ip,
            transport=opts.transport,
            key=info.key if info is not None else None,
            kernel_name=spec.name,
            curve=self._want_curve(spec),
            ports=ports,
        )

    def _release_ports(self) -> None:
        if self._ports is not None:
            self._ports.release()
            self._ports = None

    def _want_curve(self, spec: KernelSpec) -> bool:
        mode = self.options.transport_encryption
        if mode == "disabled":
            return False
        supported = "curve" in (spec.metadata.get("supported_encryption") or ())
        available = bool(zmq.has("curve"))
        if mode == "required" and not (supported and available):
            why = "libzmq lacks CURVE" if not available else (
                f"kernelspec {spec.name!r} does not list 'curve' in metadata.supported_encryption"
            )
            raise ConfigurationError(f"transport_encryption='required' but {why}")
        return supported and available

    async def _start(self) -> dict[str, Any]:
        if self.state in ("starting", "running"):
            raise KernelStateError(f"kernel {self.kernel_id} is already {self.state}")
        if self._abort.is_set():
            raise KernelStartupError(
                f"start of kernel {self.kernel_id} cancelled: a shutdown was requested")
        self.state = "starting"
        try:
            _check_fd_headroom(self.kernel_id)
            spec = self.options.resolve_spec()
            self._spec = spec
            fresh = self.connection_info is None
            attempts = self.options.port_retries + 1
            clash = _PortClash(None, None)
            for attempt in range(attempts):
                if self._cancel.is_set():
                    raise KernelStartupError(
                        f"start of kernel {self.kernel_id} cancelled: its asker went away")
                info = self._connection(fresh, spec)
                try:
                    return await self._launch_once(spec, info)
                except _PortClash as exc:
                    clash = exc
                    self._log.warning("kernel.port_clash", attempt=attempt + 1,
                                      channel=exc.channel, port=exc.port)
                    fresh = True
            where = (f"its {clash.channel} channel on port {clash.port}" if clash.channel
                     else f"port {clash.port}" if clash.port else "its ports")
            raise PortInUseError(
                f"kernel {self.kernel_id} could not bind {where}: the address is in use "
                f"by another process (after {attempts} attempts on fresh ports)",
                channel=clash.channel, port=clash.port, attempts=attempts,
                stderr_tail=clash.tail,
            )
        except (OSError, zmq.ZMQError, KernelStartupError, ConnectionFileError) as exc:
            self.state = "exited"
            if isinstance(exc, ResourceExhaustedError):
                raise
            found = _exhaustion(self.kernel_id, exc)
            if found is not None:
                raise found from exc
            raise
        except BaseException:
            self.state = "exited"
            raise

    async def _launch_once(self, spec: KernelSpec, info: ConnectionInfo) -> dict[str, Any]:
        opts = self.options
        self.connection_info = info
        write_connection_file(info, self.connection_file)
        self._session = Session(info.key, info.signature_scheme)
        argv = list(opts.kernel_cmd) if opts.kernel_cmd else None
        if argv is None:
            argv = format_kernel_cmd(spec, str(self.connection_file),
                                     extra_arguments=opts.extra_arguments)
        else:
            argv = [a.replace("{connection_file}", str(self.connection_file)) for a in argv]
            argv += list(opts.extra_arguments)
        if opts.inherit_env:
            env = dict(os.environ)
            env.update(expand_env(spec.env, env))
            env.update(opts.env)
        else:  # jupyter_client's env=: the whole environment, the kernelspec's on top
            env = dict(opts.env)
            env.update(expand_env(spec.env, env))
        if not opts.independent:
            # ipykernel (and others) watch this pid and leave if it goes; a second
            # guard beside the reaper, and it quiets ipykernel's stand-alone banner.
            env["JPY_PARENT_PID"] = str(os.getpid())
        t0 = time.monotonic()
        launched: list[ProcessHandle] = []  # the exit callback fires on a later loop turn
        try:
            contain, limits = opts.containment(spec)
            request = LaunchRequest(
                argv=argv, env=env, cwd=opts.cwd,
                forward_stderr=opts.forward_stderr and opts.stderr is None,
                capture_stderr=opts.stderr in (None, subprocess.PIPE),
                stderr=None if opts.stderr in (None, subprocess.PIPE) else opts.stderr,
                # nobody could read a pipe we made for stdout: PIPE means "not inherited"
                stdout=subprocess.DEVNULL if opts.stdout == subprocess.PIPE else opts.stdout,
                independent=opts.independent,
                owned_files=[str(p) for p in (self.connection_file, *ipc_paths(info))],
                contain=contain, limits=limits, label=self.kernel_id,
                connection_file=str(self.connection_file),
            )
            launcher = opts.pick_launcher(spec)
            prepare = getattr(launcher, "prepare", None)
            if prepare is not None:  # e.g. the fork server starting its template
                await prepare(request)
            proc = launcher.launch(
                request, lambda status: self.tell(ProcessExited(launched[0], status)))
        except (KernelStartupError, KernelSpecError):
            self._teardown(keep_file=False)
            raise
        launched.append(proc)
        self._proc = proc
        self._log = self._log.bind(pid=proc.pid)
        self._log.debug("actor.launched", argv=argv)
        clash = self._watch_bind_errors(proc, info)
        try:
            timeout = opts.startup_timeout
            if isinstance(proc, RemoteHandle):  # the kernel says where it is, once it runs
                info = await self._wait_remote(proc, info, timeout)
                timeout = max(0.0, timeout - (time.monotonic() - t0))
            await self._wait_ready(proc, info, timeout, clash)
        except _PortClash:
            await self._kill_and_reap(proc)
            self._teardown(keep_file=True)
            raise
        except BaseException:
            await self._kill_and_reap(proc)
            self._teardown(keep_file=False)
            raise
        self.state = "running"
        self.started_at = time.monotonic()
        self._log.debug("actor.ready", seconds=round(self.started_at - t0, 4))
        return self.kernel_info

    async def _wait_remote(self, proc: RemoteHandle, info: ConnectionInfo,
                           timeout: float) -> ConnectionInfo:
        """Wait for a remote kernel's address (racing a cancel); rewrite our file with it."""
        where = asyncio.ensure_future(proc.wait_endpoint(timeout))
        abort = asyncio.ensure_future(self._abort.wait())
        gone = asyncio.ensure_future(self._cancel.wait())
        try:
            await asyncio.wait({where, abort, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (where, abort, gone):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(where, abort, gone, return_exceptions=True)
        if not where.done() or where.cancelled():
            why = "its asker went away" if gone.done() and not gone.cancelled() else \
                "a shutdown was requested"
            raise KernelStartupError(f"start of kernel {self.kernel_id} cancelled: {why}")
        endpoint: Endpoint = where.result()
        data = info.to_dict()
        data.update({f"{c}_port": int(endpoint.ports[c]) for c in CHANNELS}, ip=endpoint.ip)
        remote = self.connection_info = ConnectionInfo.from_dict(data)
        write_connection_file(remote, self.connection_file)
        self._log = self._log.bind(ip=remote.ip)
        return remote

    def _watch_bind_errors(
        self, proc: ProcessHandle, info: ConnectionInfo
    ) -> asyncio.Future[_PortClash]:
        """A future set when the starting kernel writes a bind error on stderr.

        ipykernel keeps running when its IOPub or heartbeat port is taken, so
        the exit alone does not tell; its traceback does, at once.
        """
        found: asyncio.Future[_PortClash] = asyncio.get_running_loop().create_future()
        seen = bytearray()

        def listen(chunk: bytes) -> None:
            if found.done():
                return
            seen.extend(chunk)
            del seen[:-16384]
            clash = _find_clash(bytes(seen), info)
            if clash is not None:
                clash.tail = proc.stderr_tail()
                found.set_result(clash)

        proc.stderr_listener = listen
        return found

    async def _wait_ready(
        self, proc: ProcessHandle, info: ConnectionInfo, timeout: float,
        clash: asyncio.Future[_PortClash],
    ) -> None:
        """Race readiness against the process exiting, a bind error, a cancel, the timeout."""
        self._open_sockets(info)
        shell = connect_channel(self._ctx, info, "shell")
        try:
            ready: asyncio.Future[Any] = asyncio.ensure_future(self._prove_ready(shell, info))
            exited: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(proc.exited))
            abort: asyncio.Future[Any] = asyncio.ensure_future(self._abort.wait())
            bind: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(clash))
            gone: asyncio.Future[Any] = asyncio.ensure_future(self._cancel.wait())
            racers = (ready, exited, abort, bind, gone)
            try:
                done, _ = await asyncio.wait(
                    racers, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                proc.stderr_tail()  # whatever the kernel wrote before its reply is seen now
                proc.stderr_listener = None
                for fut in racers:
                    if not fut.done():
                        fut.cancel()
                await asyncio.gather(*racers, return_exceptions=True)
            if clash.done():  # even beside a reply: a channel may belong to someone else
                raise clash.result()
            if ready in done and ready.exception() is None:
                return
            if exited in done or not proc.running:
                status = await proc.cleanup()
                self.last_exit = status
                tail = proc.stderr_tail()
                found = _find_clash(tail.encode(), info)
                if found is not None:
                    found.tail = tail
                    raise found
                raise KernelStartupError(
                    f"kernel {self.kernel_id} died while starting ({status.describe()})",
                    exit_code=status.exit_code, signal=status.signal, stderr_tail=tail,
                )
            if abort in done:
                raise KernelStartupError(
                    f"start of kernel {self.kernel_id} cancelled: a shutdown was requested"
                )
            if gone in done:
                raise KernelStartupError(
                    f"start of kernel {self.kernel_id} cancelled: its asker went away")
            if ready in done:  # the handshake itself failed
                exc = ready.exception()
                assert exc is not None
                raise exc
            raise KernelStartupError(
                f"kernel {self.kernel_id} was not ready within {timeout} s "
                f"(kernel_info_reply {'received' if self.kernel_info else 'not received'}, "
                f"IOPub {'live' if self._iopub_seen.is_set() else 'silent'}, "
                f"heartbeat {'echoed' if self._hb_echoed else 'silent'}, "
                f"{self.dropped} message(s) dropped)",
                stderr_tail=proc.stderr_tail(), timed_out=True,
            )
        finally:
            shell.close(linger=0)

    async def _prove_ready(self, shell: zmq.asyncio.Socket, info: ConnectionInfo) -> None:
        """Shell answers (signed with our key), IOPub is live, and the heartbeat echoes."""
        self._hb_echoed = False
        hb = connect_channel(self._ctx, info, "hb")
        proofs = [asyncio.ensure_future(self._handshake(shell)),
                  asyncio.ensure_future(self._echo(hb))]
        try:
            await asyncio.gather(*proofs)
        finally:
            for proof in proofs:
                proof.cancel()
            await asyncio.gather(*proofs, return_exceptions=True)
            hb.close(linger=0)

    async def _echo(self, hb: zmq.asyncio.Socket) -> None:
        token = b"ks-ready-" + uuid.uuid4().hex.encode()
        await hb.send(token)
        if await hb.recv() != token:
            raise KernelStartupError(
                f"kernel {self.kernel_id}: its heartbeat port answered with something else")
        self._hb_echoed = True

    async def _handshake(self, shell: zmq.asyncio.Socket) -> None:
        session = self._session
        assert session is not None
        self.kernel_info = {}
        request = session.msg("kernel_info_request", {})
        await session.send_async(shell, request)
        while True:
            reply = await self._recv_verified(shell, session)
            if reply.msg_type == "kernel_info_reply" and reply.parent_id == request.msg_id:
                self.kernel_info = dict(reply.content)
                break
        # IOPub proof: 5.4 kernels greet every subscriber; older ones only show
        # status messages, which each kernel_info_request provokes.
        while not self._iopub_seen.is_set():
            try:
                await asyncio.wait_for(self._iopub_seen.wait(), 0.1)
            except asyncio.TimeoutError:
                request = session.msg("kernel_info_request", {})
                await session.send_async(shell, request)

    async def _recv_verified(self, sock: zmq.asyncio.Socket, session: Session) -> Message:
        while True:
            frames = await sock.recv_multipart(copy=True)
            try:
                return session.deserialize(frames)
            except WireError as exc:
                self.dropped += 1
                self._log.warning("kernel.dropped_message", reason=str(exc))

    def _open_sockets(self, info: ConnectionInfo) -> None:
        self._close_sockets()
        self._iopub_seen.clear()
        self._control = connect_channel(self._ctx, info, "control")
        self._iopub = connect_channel(self._ctx, info, "iopub")
        self._iopub_task = self.spawn(self._watch_iopub(self._iopub))

    async def _watch_iopub(self, sock: zmq.asyncio.Socket) -> None:
        """Track readiness proof, execution_state and last_activity."""
        session = self._session
        assert session is not None
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                try:
                    msg = await self._recv_verified(sock, session)
                except zmq.ZMQError as exc:
                    if not sock.closed:  # a watcher that ends leaves readiness unproven
                        self._log.warning("kernel.iopub_watch_failed", error=str(exc))
                    return
                self.last_activity = time.monotonic()
                self._iopub_seen.set()
                if msg.msg_type == "status":
                    state = msg.content.get("execution_state")
                    if isinstance(state, str):
                        self.execution_state = state

    def _close_sockets(self) -> None:
        if self._iopub_task is not None:
            self._iopub_task.cancel()
            self._iopub_task = None
        for sock in (self._control, self._iopub):
            if sock is not None:
                sock.close(linger=0)
        self._control = self._iopub = None

    # -- shutdown ----------------------------------------------------------------
    async def _shutdown(self, *, now: bool, restart: bool, cause: str = "") -> None:
        proc = self._proc
        label = cause or ("restart" if restart else "shut down")
        if proc is None or not proc.running:
            if proc is not None:
                await proc.cleanup(f"shut down by the supervisor ({label})")
            self._teardown(keep_file=restart)
            if not restart:
                self.state = "shutdown"
            return
        self.state = "restarting" if restart else "stopping"
        t0 = time.monotonic()
        how = "killed"
        if not now:
            how = await self._graceful(proc, restart)
        else:
            proc.kill_tree()
        done = "shut down" if how == "shutdown_request" else f"killed ({how})"
        status = self.last_exit = await proc.cleanup(f"{done} by the supervisor ({label})")
        self._teardown(keep_file=restart)
        self.execution_state = "dead"
        if not restart:
            self.state = "shutdown"
        self._log.debug(
            "actor.shutdown", how=how, status=status.describe() if status else None,
            seconds=round(time.monotonic() - t0, 4), restart=restart,
        )

    async def _graceful(self, proc: ProcessHandle, restart: bool) -> str:
        """shutdown_request, then SIGTERM, then SIGKILL; returns which one ended it.

        A kernel that acknowledged the request (``shutdown_reply``) but is still
        alive ``exit_grace`` seconds later is stuck on its way out (ipykernel 7
        sometimes hangs closing its threads): it gets SIGTERM then, instead of
        after the whole ``shutdown_wait``.
        """
        opts = self.options
        control, session = self._control, self._session
        if control is not None and session is not None and not self._hurry.is_set():
            request = session.msg("shutdown_request", {"restart": restart})
            with contextlib.suppress(zmq.ZMQError):
                await session.send_async(control, request)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + opts.shutdown_wait
            replied = await self._race_exit(
                proc, self._await_reply(control, session, request), opts.shutdown_wait)
            if not proc.running:
                return "shutdown_request"
            if replied is not None:
                wait = max(0.0, min(opts.exit_grace, deadline - loop.time()))
                if await self._wait_exit(proc, wait) is not None:
                    return "shutdown_request"
                self._log.warning("kernel.stuck_after_shutdown_reply", grace=opts.exit_grace)
        if not self._hurry.is_set():
            proc.signal_tree(_signal.SIGTERM)
            if await self._wait_exit(proc, opts.terminate_wait) is not None:
                return "SIGTERM"
        proc.kill_tree()
        return "SIGKILL"

    async def _wait_exit(self, proc: ProcessHandle, timeout: float) -> ExitStatus | None:
        """Wait for the exit up to ``timeout``; None if it did not come or we must hurry."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(asyncio.shield(proc.exited)),
            asyncio.ensure_future(self._hurry.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return proc.exited.result() if proc.exited.done() else None

    async def _request_shutdown(self, restart: bool) -> None:
        self._running_process("request shutdown of")
        self.state = "stopping"
        self._restart_requested = restart
        if self._control is not None and self._session is not None:
            request = self._session.msg("shutdown_request", {"restart": restart})
            await self._session.send_async(self._control, request)

    async def _finish_shutdown(self, waittime: float | None) -> None:
        proc = self._proc
        restart = self._restart_requested
        if proc is not None and proc.running:
            wait = self.options.shutdown_wait if waittime is None else waittime
            if await proc.wait(wait) is None:
                proc.signal_tree(_signal.SIGTERM)
                if await proc.wait(self.options.terminate_wait) is None:
                    proc.kill_tree()
            await proc.wait()
        if proc is not None:
            label = "restart" if restart else "shut down"
            self.last_exit = await proc.cleanup(f"shut down by the supervisor ({label})")
        self._teardown(keep_file=restart)
        self.execution_state = "dead"
        self.state = "restarting" if restart else "shutdown"

    async def _kill_and_reap(self, proc: ProcessHandle) -> None:
        proc.kill_tree()
        await proc.cleanup("killed by the supervisor (start failed)")

    def _teardown(self, *, keep_file: bool) -> None:
        self._close_sockets()
        if self._proc is not None:
            self._proc.close()
        if not keep_file:
            remove_connection_files(self.connection_file, self.connection_info)
            self._release_ports()

    # -- restart -----------------------------------------------------------------
    async def _restart(self, msg: Restart) -> dict[str, Any]:
        if msg.overrides:
            self.options = self.options.replace(**dict(msg.overrides))
        await self._shutdown(now=msg.now, restart=True)
        if msg.newports:
            self.connection_info = None
        self.state = "restarting"
        return await self._start()

    # -- interrupt and signals -----------------------------------------------------
    def _running_process(self, what: str) -> ProcessHandle:
        proc = self._proc
        if proc is None or not proc.running or self.state not in ("running",):
            last = f" ({self.last_exit.describe()})" if self.last_exit is not None else ""
            raise KernelStateError(
                f"cannot {what} kernel {self.kernel_id}: it is {self.state}{last}")
        return proc

    async def _interrupt(self) -> None:
        proc = self._running_process("interrupt")
        spec = self._spec
        mode = spec.interrupt_mode if spec is not None else "signal"
        if mode == "signal":
            proc.signal_group(_signal.SIGINT)
            self._log.debug("actor.interrupted", mode=mode)
            return
        session, control = self._session, self._control
        assert session is not None and control is not None
        request = session.msg("interrupt_request", {})
        await session.send_async(control, request)
        reply = await self._race_exit(proc, self._await_reply(control, session, request), 5.0)
        self._log.debug("actor.interrupted", mode=mode, replied=reply is not None)

    async def _await_reply(
        self, sock: zmq.asyncio.Socket, session: Session, request: Message
    ) -> Message:
        while True:
            msg = await self._recv_verified(sock, session)
            if msg.parent_id == request.msg_id:
                return msg

    async def _race_exit(
        self, proc: ProcessHandle, work: Awaitable[Message], timeout: float
    ) -> Message | None:
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        exited: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(proc.exited))
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({task, exited, hurry}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (task, exited, hurry):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(task, exited, hurry, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is None:
            result: Message = task.result()
            return result
        return None

    def _signal(self, signum: int) -> None:
        proc = self._running_process("signal")
        proc.signal_group(signum)
        self._log.debug("actor.signalled", signum=signum)

    # -- exits -------------------------------------------------------------------
    async def _process_exited(self, msg: ProcessExited) -> None:
        if msg.process is not self._proc or self.state != "running":
            return  # a shutdown or a start already dealt with it
        uptime = time.monotonic() - (self.started_at or time.monotonic())
        self.state = "exited"
        self.execution_state = "dead"
        status = self.last_exit = await msg.process.cleanup()
        self._close_sockets()
        msg.process.close()
        self._log.debug("actor.exited", status=status.describe(), uptime=round(uptime, 3))
        if self.parent is not None:
            self.parent.tell(ChildExited(self.kernel_id, status, uptime, reason=status.describe()))


_live: weakref.WeakSet[KernelActor] = weakref.WeakSet()

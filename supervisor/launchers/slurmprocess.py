"""One Slurm kernel as seen from the supervisor: the local srun, the job, the remote kernel.

A :class:`SlurmProcess` is the handle :class:`~supervisor.launchers.slurm.SlurmLauncher`
returns (see that module for the whole picture). It belongs to the loop that
launched it: srun's exit is watched on a pidfd there, srun's stderr is read
there (pending and allocation lines, slurmstepd's last words, the kernel's own
stderr), and its report future resolves there. Slurm commands it runs
(``scancel``, ``squeue``, ``scontrol``) are asynchronous subprocesses on that
loop, except in :meth:`SlurmProcess.abandon`, which works without the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError
from supervisor.launchers import slurmjobs
from supervisor.launchers.base import Endpoint, ExitStatus, LaunchRequest, Resources
from supervisor.launchers.slurmreport import Expected, ReportServer

if TYPE_CHECKING:
    from supervisor.launchers.slurm import SlurmLauncher

__all__ = ["SlurmProcess"]

log = get_logger("supervisor.launchers.slurm")

_QUEUED = re.compile(rb"job (\d+) queued and waiting for resources")
_ALLOCATED = re.compile(rb"job (\d+) has been allocated resources")
_TAIL_BYTES = 16384
_SRUN_EXIT_WAIT = 15.0  # after scancel, srun normally returns within KillWait
_PENDING_RECHECK = 5.0
_FINAL_RECORD_WAIT = 5.0
_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


class SlurmProcess:
    """One kernel as a Slurm job step: the local srun, the job, the remote kernel."""

    method = "slurm"

    def __init__(self, launcher: SlurmLauncher, popen: subprocess.Popen[bytes],
                 request: LaunchRequest, *, launch_id: str,
                 job_name: str, server: ReportServer, expected: Expected,
                 on_exit: Callable[[ExitStatus], None] | None) -> None:
        self._launcher = launcher
        self._popen = popen
        self.pid = popen.pid
        self.launch_id = launch_id
        self.job_name = job_name
        self.job_id: str | None = None
        self.node: str | None = None
        self.remote_pid: int | None = None
        self.report: dict[str, Any] | None = None
        self._state = "submitted"  # submitted pending allocated running ended
        self._reason = ""
        self._changed = asyncio.Event()
        self.final: ExitStatus | None = None
        self.job: slurmjobs.JobInfo | None = None
        self.stderr_listener: Callable[[bytes], None] | None = None  # told each chunk
        self._server: ReportServer | None = server
        self._expected = expected
        self._on_exit = on_exit
        self._forward = request.forward_stderr
        self._loop = IOLoop.current()
        self._tail = bytearray()
        self._line = bytearray()
        self._stderr_fd: int | None = None
        self._pidfd: int | None = None
        self._cleanup: asyncio.Future[ExitStatus] | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._log = log.bind(label=request.label, job_name=job_name, srun_pid=self.pid)
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        expected.on_started = self._on_started
        expected.report.add_done_callback(self._on_report)
        self._files = list(request.owned_files)
        self._independent = request.independent  # not registered: may outlive us
        self._register(None)
        if popen.stderr is not None:
            fd = popen.stderr.fileno()
            os.set_blocking(fd, False)
            self._stderr_fd = fd
            self._loop.add_handler(fd, self._on_stderr, IOLoop.READ)
        self._watch_exit()

    def _register(self, job_id: str | None) -> None:
        if self._independent:
            return
        slurmjobs.job_reaper.register(self.launch_id, name=self.job_name, job_id=job_id,
                                      pgid=self.pid, conf=self._launcher.env().get("SLURM_CONF"),
                                      files=self._files)

    # -- views ------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``submitted``, ``pending``, ``allocated``, ``running`` (reported) or ``ended``."""
        return self._state

    @property
    def reason(self) -> str:
        """Slurm's reason while pending (``Resources``, ``Priority``...), else empty."""
        return self._reason

    def _set_state(self, state: str, reason: str = "") -> None:
        if (state, reason) != (self._state, self._reason):
            self._state, self._reason = state, reason
            self._changed.set()

    async def wait_state(self, *states: str) -> str:
        """Wait until the launch is in one of ``states`` (an event, set at each change)."""
        while self._state not in states:
            self._changed.clear()
            await self._changed.wait()
        return self._state

    @property
    def running(self) -> bool:
        """True until srun (and so the job step) has ended."""
        return not self.exited.done()

    @property
    def report_address(self) -> str | None:
        """host:port of the report server this launch reports to (while it is open)."""
        return None if self._server is None else self._server.address

    def describe_state(self) -> str:
        """``pending: Resources``, ``running on node2 (job 12)``..."""
        if self.state == "pending":
            return f"pending: {self.reason or 'unknown reason'}"
        if self.state == "running":
            return f"running on {self.node} (job {self.job_id})"
        return self.state

    def pids(self) -> list[int]:
        """The local processes of the launch (srun); the kernel runs on its node."""
        return [self.pid] if self.running else []

    def resources(self) -> Resources:
        """What we know here: the method only (figures live on the node, with Slurm)."""
        return Resources(method="slurm", processes=None)

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines srun wrote: its own messages and the kernel's stderr."""
        self._drain_stderr()
        text = self._tail.decode("utf-8", "replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    # -- the report -------------------------------------------------------------
    def _on_report(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        if fut.cancelled():
            return
        report = fut.result()
        self.report = report
        self.job_id = str(report.get("job") or self.job_id or "") or None
        self.node = str(report.get("node") or report.get("host") or "")
        self._set_state("running")
        self._cancel_recheck()
        self._register(self.job_id)
        self._log.info("slurm.running", job_id=self.job_id, node=self.node,
                       ip=report.get("ip"))

    def _on_started(self, pid: int) -> None:
        self.remote_pid = pid

    async def wait_endpoint(self, timeout: float) -> Endpoint:
        """The kernel's address and ports on its node, once the node side reports.

        Raises :class:`KernelStartupError` if the job ends first, or if
        ``timeout`` passes (pending or not): the job is then cancelled and the
        message says what Slurm said of it ("pending: Resources").
        """
        report_fut = self._expected.report
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.shield(report_fut)),
                                            asyncio.ensure_future(asyncio.shield(self.exited))]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if report_fut.done() and not report_fut.cancelled():
            report = report_fut.result()
            ports = report.get("ports") or {}
            try:
                return Endpoint(ip=str(report["ip"]),
                                ports={c: int(ports[c]) for c in _CHANNELS})
            except (KeyError, TypeError, ValueError) as exc:
                raise KernelStartupError(f"Slurm node report is incomplete: {exc}") from exc
        if self.exited.done():
            self._drain_stderr()
            raise KernelStartupError(
                f"Slurm job {self.job_id or self.job_name} ended before its kernel reported "
                f"(srun {self.exited.result().describe_code()})",
                stderr_tail=self.stderr_tail())
        self._server_retire()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._refresh_state(), _FINAL_RECORD_WAIT)
        what = self.describe_state() if self.state == "pending" else (
            f"{self.state}, no report from the node")
        self.kill_tree()
        raise KernelStartupError(
            f"Slurm kernel did not start within {timeout} s: job "
            f"{self.job_id or self.job_name} {what}; the job was cancelled", timed_out=True)

    # -- pending ----------------------------------------------------------------
    def _became_pending(self, job_id: str) -> None:
        self.job_id = job_id
        self._set_state("pending", self._reason)
        self._register(job_id)
        self._spawn_refresh()

    def _spawn_refresh(self) -> None:
        self._recheck = None
        if self.state != "pending" or not self.running:
            return
        task = asyncio.ensure_future(self._refresh_and_reschedule())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _refresh_and_reschedule(self) -> None:
        before = self.reason
        await self._refresh_state()
        if self.state == "pending":
            if self.reason != before:
                self._log.info("slurm.pending", job_id=self.job_id, reason=self.reason)
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(_PENDING_RECHECK, self._spawn_refresh)

    def _cancel_recheck(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None

    async def _refresh_state(self) -> None:
        job = await self._query_job()
        if job is None:
            return
        self.job = job
        if job.pending and self.state in ("submitted", "pending"):
            self._set_state("pending", job.reason)

    async def _query_job(self) -> slurmjobs.JobInfo | None:
        ref = self.job_id
        launcher = self._launcher
        if ref is None:
            _, out, _ = await slurmjobs.run(
                [launcher.command("squeue"), "-h", "-o", "%i", f"--name={self.job_name}"],
                launcher.env())
            ref = out.split()[0] if out.split() else None
            if ref is None:
                return None
            self.job_id = ref
        _, out, _ = await slurmjobs.run(
            [launcher.command("scontrol"), "-o", "show", "job", ref], launcher.env())
        return slurmjobs.parse_job(out)

    # -- signals ----------------------------------------------------------------
    def signal_group(self, signum: int) -> bool:
        """SIGINT through srun (forwarded at once); other signals to the step via scancel."""
        if not self.running:
            return False
        if signum == signal.SIGINT:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                return False
            return True
        return self._scancel(f"--signal={signum}", step=True)

    signal = signal_group
    signal_tree = signal_group

    def _scancel(self, *flags: str, step: bool = False) -> bool:
        launcher = self._launcher
        if self.job_id is not None:
            target = [f"{self.job_id}.0" if step and self.state == "running" else self.job_id]
        else:
            target = [f"--name={self.job_name}"]
        slurmjobs.run_nowait([launcher.command("scancel"), *flags, *target], launcher.env())
        return True

    def kill_tree(self) -> None:
        """Cancel the job now (``scancel``); srun then returns. Never blocks (a loop).

        Slurm sends the step SIGTERM, then SIGKILL after its ``KillWait``: the
        node side passes the SIGTERM on and removes its connection file.
        """
        if not self.running:
            return
        self._scancel()

    async def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait for the step to end; None if ``timeout`` expired first."""
        if timeout is None:
            return await asyncio.shield(self.exited)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return None

    async def cleanup(self, cause: str = "") -> ExitStatus:
        """Cancel what is left, wait for srun, and explain the end from Slurm's record."""
        if self._cleanup is None:
            self._cleanup = asyncio.ensure_future(self._do_cleanup(cause))
        return await asyncio.shield(self._cleanup)

    async def _do_cleanup(self, cause: str) -> ExitStatus:
        if self.running:
            self.kill_tree()
        status = await self.wait(_SRUN_EXIT_WAIT)
        if status is None:  # srun hangs: the job was cancelled; end srun itself
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            status = await asyncio.shield(self.exited)
        self._cancel_recheck()
        self._server_retire()
        job = await self._final_job()
        await slurmjobs.settle()
        if not self._independent:
            slurmjobs.job_reaper.unregister(self.launch_id)
        self._set_state("ended")
        oom = False
        if job is not None:
            self.job = job
            slurm_cause, oom = slurmjobs.job_cause(job, self.stderr_tail(40))
            if job.signal:
                status = dataclasses.replace(status, exit_code=None, signal=job.signal)
            elif job.exit_code is not None and status.signal is None:
                status = dataclasses.replace(status, exit_code=job.exit_code)
            cause = f"{cause}; {slurm_cause}" if cause else slurm_cause
        self.final = dataclasses.replace(status, cause=cause, oom=oom)
        self._log.debug("slurm.ended", status=self.final.describe())
        return self.final

    async def _final_job(self) -> slurmjobs.JobInfo | None:
        """The job's record, its state final or told by slurmstepd through srun.

        Right after srun returns the record may still say COMPLETING; srun's
        stderr usually says already how the step ended (cancelled, time limit,
        node failure, memory). Else a few looks, 1 s at most, then the record
        as it is (named from its reason and exit code).
        """
        last: list[slurmjobs.JobInfo | None] = [None]
        told = slurmjobs.state_from_stderr(self.stderr_tail(40))

        async def look() -> None:
            for _ in range(5):
                job = last[0] = await self._query_job()
                if job is None or job.finished:
                    return
                if told is not None:
                    last[0] = dataclasses.replace(job, state=told)
                    return
                await asyncio.sleep(0.2)  # Slurm gives no event for a job's last state

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(look(), _FINAL_RECORD_WAIT)
        return last[0]

    def _server_retire(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.retire(self.launch_id)
        self._expected.close_link()
        self._launcher._release(server)

    def close(self) -> None:
        """Stop reading srun's stderr; the step must be over or cancelled."""
        self._close_stderr()

    def abandon(self, timeout: float = 5.0) -> None:
        """The owning loop is closed or not running: end the job without it.

        From any thread: ``scancel`` (waited for, bounded), SIGKILL of srun's
        group, reap srun, close the report link and server, forget the job at
        the reaper. :attr:`exited` is resolved later if the loop runs again.
        """
        launcher = self._launcher
        if self._popen.returncode is None:
            target = self.job_id or f"--name={self.job_name}"
            slurmjobs.run_blocking([launcher.command("scancel"), target], launcher.env(),
                                   timeout=timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        with contextlib.suppress(RuntimeError, OSError):  # the server's loop is closed
            self._server_retire()
        if not self._independent:
            slurmjobs.job_reaper.unregister(self.launch_id)
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError, OSError):
                self._loop.remove_handler(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        with contextlib.suppress(RuntimeError, OSError):
            self._close_stderr()
        if self._stderr_fd is not None and self._popen.stderr is not None:
            self._popen.stderr.close()
            self._stderr_fd = None

    # -- srun's exit and stderr -------------------------------------------------
    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._loop.add_callback(self._reap)
            return
        self._loop.add_handler(self._pidfd, lambda fd, events: self._reap(), IOLoop.READ)

    def _reap(self) -> None:
        if self.exited.done():
            return
        returncode = self._popen.poll()
        if returncode is None:
            return
        if self._pidfd is not None:
            self._loop.remove_handler(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._drain_stderr()
        if 128 < returncode < 128 + 65:  # srun's way of saying "the task got a signal"
            status = ExitStatus(exit_code=None, signal=returncode - 128)
        else:
            status = ExitStatus.from_returncode(returncode)
        self.exited.set_result(status)
        if self._on_exit is not None:
            try:
                self._on_exit(status)
            except Exception as exc:
                self._log.error("process.exit_callback_failed", exc_info=exc)

    def _on_stderr(self, fd: int, events: int) -> None:
        if not self._drain_stderr():
            self._close_stderr()

    def _drain_stderr(self) -> bool:
        fd = self._stderr_fd
        if fd is None:
            return False
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._tail += chunk
            if len(self._tail) > _TAIL_BYTES:
                del self._tail[: len(self._tail) - _TAIL_BYTES]
            self._scan(chunk)
            if self.stderr_listener is not None:
                self.stderr_listener(chunk)
            if self._forward:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                    sys.stderr.flush()

    def _scan(self, chunk: bytes) -> None:
        self._line += chunk
        *lines, rest = bytes(self._line).split(b"\n")
        self._line = bytearray(rest[-4096:])
        for line in lines:
            if not line.startswith(b"srun: "):
                continue
            if (m := _QUEUED.search(line)) is not None:
                self._became_pending(m.group(1).decode())
            elif (m := _ALLOCATED.search(line)) is not None:
                self.job_id = m.group(1).decode()
                if self.state == "pending":
                    self._set_state("allocated")
                    self._cancel_recheck()
                    self._log.info("slurm.allocated", job_id=self.job_id)

    def _close_stderr(self) -> None:
        if self._stderr_fd is not None:
            self._drain_stderr()
            self._loop.remove_handler(self._stderr_fd)
            self._stderr_fd = None
            if self._popen.stderr is not None:
                self._popen.stderr.close()

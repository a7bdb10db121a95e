"""The Slurm launcher: each kernel is a Slurm job step on a compute node, under supervision.

``SlurmLauncher(options={"partition": "debug", "nodelist": "node2", "time":
"1:00:00", "mem": "2G"})`` starts a kernel as ``srun --disable-status
--ntasks=1 --OPTION=VALUE... python _slurmnode.py KERNEL_ARGV``. Options are
srun's long options, written without the dashes (``True`` for a bare flag).

How the pieces fit:

* The local handle is the ``srun`` process (its own session), so the handle's
  exit *is* the kernel's: srun returns when the step's task ends (an event on
  a pidfd, never a poll). ``--disable-status`` makes srun forward SIGINT to the
  task at once, so an interrupt is one signal.
* srun's stderr is read on the loop. "job N queued and waiting for resources"
  makes the handle *pending* (a state with Slurm's reason, "pending:
  Resources", fetched with ``squeue`` then, and again every few seconds while
  it lasts, bounded); "has been allocated resources" ends it.
* On the node, :mod:`._slurmnode` chooses the node's address and ports, writes
  the connection file there and reports back over the authenticated channel of
  :mod:`.slurmreport`; :meth:`SlurmProcess.wait_endpoint` returns the
  address and ports the kernel bound on its node. The startup timeout
  covers pending time: a job still pending then is cancelled and the start
  fails saying why.
* Ending: :meth:`kill_tree` is ``scancel`` (by job id, or by the job's unique
  name before the id is known); :meth:`cleanup` waits for srun, then reads
  the job's final record (``scontrol show job``) and names the death: cancelled,
  time limit, node failure, out of memory, failed with a signal.
* Nothing outlives the supervising process: the job reaper sidecar
  (:mod:`._slurmreaper`) cancels every registered job when we die, even by
  SIGKILL, and the node side kills its kernel when the report link closes.

Threading: a :class:`SlurmProcess` and its report server belong to the loop
that launched it. A :class:`SlurmLauncher` holds configuration, counters and
one report server per loop; share it between loops freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop

from supervisor._log import get_logger
from supervisor.errors import ConfigurationError, KernelStartupError
from supervisor.launchers import slurmjobs
from supervisor.launchers.base import Endpoint, ExitStatus, LaunchRequest, Resources
from supervisor.launchers.slurmreport import Expected, ReportCounts, ReportServer

__all__ = ["SlurmLauncher", "SlurmProcess", "slurm_launcher"]

log = get_logger("supervisor.launchers.slurm")

NODE_SCRIPT = str(Path(__file__).with_name("_slurmnode.py"))
_OURS = frozenset({"disable-status", "ntasks", "ntasks-per-node", "pty", "input", "export",
                   "jobid", "quit-on-interrupt", "label", "multi-prog", "het-group"})
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")
_QUEUED = re.compile(rb"job (\d+) queued and waiting for resources")
_ALLOCATED = re.compile(rb"job (\d+) has been allocated resources")
_TAIL_BYTES = 16384
_SRUN_EXIT_WAIT = 15.0  # after scancel, srun normally returns within KillWait
_PENDING_RECHECK = 5.0
_FINAL_RECORD_WAIT = 5.0
_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def _normalize(options: Mapping[str, object] | None) -> dict[str, str | None]:
    """Validated srun long options: ``{"nodelist": "node2"}``, ``{"exclusive": True}``."""
    out: dict[str, str | None] = {}
    for raw, value in (options or {}).items():
        if not isinstance(raw, str):
            raise ConfigurationError(f"slurm option names are strings, not {raw!r}")
        name = raw.strip().lstrip("-").replace("_", "-")
        if not _OPTION.match(name):
            raise ConfigurationError(f"slurm option {raw!r} is not a long option name of srun")
        if name in _OURS:
            raise ConfigurationError(f"slurm option {name!r} is set by the launcher itself")
        if value is True or value is None:
            out[name] = None
        elif value is False:
            continue
        elif isinstance(value, (str, int, float)):
            out[name] = str(value)
        else:
            raise ConfigurationError(f"slurm option {name!r}: a string or number, not {value!r}")
    return out


class SlurmLauncher:
    """Starts kernels as Slurm job steps (``srun``) and receives their reports.

    ``options`` are srun long options; ``report_host`` the address of ours the
    compute nodes reach (default: the one we use to reach slurmctld);
    ``node_python`` the interpreter on the nodes (default: ours; the package
    must be at the same path there, as on a shared file system); ``slurm_conf``
    a ``SLURM_CONF`` for every Slurm command (default: the environment's);
    ``on_launch`` is called with each new :class:`SlurmProcess` (on its loop),
    for an application that shows pending jobs ("pending: Resources").
    """

    name = "slurm"

    def __init__(self, options: Mapping[str, object] | None = None, *,
                 report_host: str | None = None, node_python: str | None = None,
                 slurm_conf: str | os.PathLike[str] | None = None, bin_dir: str | None = None,
                 on_launch: Callable[[SlurmProcess], None] | None = None) -> None:
        self.options = _normalize(options)
        self.node_python = node_python or sys.executable
        self.slurm_conf = None if slurm_conf is None else os.fspath(slurm_conf)
        self._bin = bin_dir
        self.on_launch = on_launch
        self._report_host = report_host
        self.counts = ReportCounts()
        self._servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReportServer] = (
            weakref.WeakKeyDictionary())
        self._users: dict[ReportServer, int] = {}
        self._lock = threading.Lock()

    def command(self, name: str) -> str:
        """The path of a Slurm command (``srun``, ``scancel``...)."""
        if self._bin is not None:
            return os.path.join(self._bin, name)
        return shutil.which(name) or name

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment Slurm commands run in."""
        env = dict(os.environ if base is None else base)
        if self.slurm_conf is not None:
            env["SLURM_CONF"] = self.slurm_conf
        elif "SLURM_CONF" in os.environ:  # a kernel's own environment still needs ours
            env.setdefault("SLURM_CONF", os.environ["SLURM_CONF"])
        return env

    def statistics(self) -> dict[str, int]:
        """Report-back counters: accepted, unauthenticated and late (dropped)."""
        return self.counts.as_dict()

    # -- the report server ------------------------------------------------------
    def report_host(self) -> str:
        """Our address as the compute nodes see it (found once, then kept)."""
        with self._lock:
            if self._report_host is None:
                self._report_host = _address_towards_controller(
                    self.command("scontrol"), self.env())
            return self._report_host

    def _server(self) -> ReportServer:
        loop = asyncio.get_running_loop()
        server = self._servers.get(loop)
        if server is None or server.closed:
            try:
                server = ReportServer(self.report_host(), self.counts)
            except OSError as exc:
                raise KernelStartupError(
                    f"cannot listen for Slurm node reports on {self.report_host()}: {exc}"
                ) from exc
            self._servers[loop] = server
            self._users[server] = 0
        self._users[server] += 1
        return server

    def _release(self, server: ReportServer) -> None:
        self._users[server] -= 1
        if self._users[server] <= 0:
            del self._users[server]
            server.close()

    # -- launch -----------------------------------------------------------------
    def launch(self, request: LaunchRequest,
               on_exit: Callable[[ExitStatus], None] | None = None) -> SlurmProcess:
        """Submit the kernel as a Slurm job step; must be called on the owning loop."""
        if not request.argv:
            raise KernelStartupError("cannot launch a kernel: its argv is empty")
        conn_file = request.connection_file or (
            request.owned_files[0] if request.owned_files else None)
        if conn_file is None:
            raise KernelStartupError("the Slurm launcher needs the kernel's connection file")
        try:
            with open(conn_file, encoding="utf-8") as f:
                local = json.load(f)
            if not isinstance(local, dict) or not isinstance(local.get("key"), str):
                raise TypeError("no key")
        except (OSError, ValueError, TypeError) as exc:
            raise KernelStartupError(f"cannot read the connection file {conn_file}: {exc}"
                                     ) from exc
        if local.get("transport", "tcp") != "tcp" or local.get("curve_secretkey"):
            raise KernelStartupError("Slurm kernels use the tcp transport without CurveZMQ")
        launch_id = secrets.token_hex(8)
        job_name = f"kernel-{(request.label or 'x')[:8]}-{launch_id}"
        server = self._server()
        try:
            expected = server.expect(launch_id)
            env = self.env(request.env)
            env.pop("JPY_PARENT_PID", None)
            env.update({
                "KS_SLURM_REPORT": server.address,
                "KS_SLURM_LAUNCH": launch_id,
                "KS_SLURM_SECRET": expected.secret.hex(),
                "KS_SLURM_DETACH": "1" if request.independent else "",
                "KS_SLURM_CONNECTION": json.dumps({
                    "key": local["key"],
                    "signature_scheme": local.get("signature_scheme", "hmac-sha256"),
                    "kernel_name": local.get("kernel_name", "")}),
            })
            kernel_argv = [a.replace(os.fspath(conn_file), "{connection_file}")
                           for a in request.argv]
            argv = [self.command("srun"), f"--job-name={job_name}", "--disable-status",
                    "--ntasks=1", "--kill-on-bad-exit=1"]
            argv += [f"--{k}" if v is None else f"--{k}={v}"
                     for k, v in _with_limits(self.options, request).items()]
            argv += [self.node_python, "-I", "-S", NODE_SCRIPT, *kernel_argv]
            try:
                popen = subprocess.Popen(
                    argv, env=env, cwd=request.cwd, stdin=subprocess.DEVNULL,
                    stdout=request.stdout,
                    stderr=subprocess.PIPE if request.capture_stderr else request.stderr,
                    start_new_session=True, close_fds=True)
            except OSError as exc:
                raise KernelStartupError(f"cannot run {argv[0]!r}: {exc}") from exc
        except BaseException:
            server.retire(launch_id)
            self._release(server)
            raise
        proc = SlurmProcess(self, popen, request, launch_id=launch_id,
                            job_name=job_name, server=server, expected=expected,
                            on_exit=on_exit)
        if self.on_launch is not None:
            self.on_launch(proc)
        return proc


def _with_limits(options: Mapping[str, str | None], request: LaunchRequest
                 ) -> dict[str, str | None]:
    """memory_limit and cpu_limit become --mem and --cpus-per-task unless given as options."""
    out = dict(options)
    limits = request.limits
    if limits.memory is not None and not {"mem", "mem-per-cpu", "mem-per-gpu"} & set(out):
        out["mem"] = f"{-(-limits.memory // (1 << 20))}M"
    if limits.cpu is not None and "cpus-per-task" not in out:
        out["cpus-per-task"] = str(max(1, math.ceil(limits.cpu)))
    return out


def _address_towards_controller(scontrol: str, env: Mapping[str, str]) -> str:
    """Our address on the route to slurmctld: the one compute nodes can reach too."""
    try:
        out = subprocess.run([scontrol, "show", "config"], env=dict(env), capture_output=True,
                             text=True, timeout=15, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelStartupError(f"cannot ask Slurm for its controller: {exc}") from exc
    match = re.search(r"^SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)]+)\))?", out, re.M)
    port_match = re.search(r"^SlurmctldPort\s*=\s*(\d+)", out, re.M)
    if match is None:
        raise KernelStartupError("cannot find SlurmctldHost in `scontrol show config`; "
                                 "give the launcher report_host=")
    host = match.group(2) or match.group(1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port_match.group(1)) if port_match else 6817))
            address: str = probe.getsockname()[0]
    except OSError as exc:
        raise KernelStartupError(f"no route to the Slurm controller {host}: {exc}") from exc
    return address


_launchers: dict[tuple[tuple[str, str | None], ...], SlurmLauncher] = {}
_launchers_lock = threading.Lock()


def slurm_launcher(options: Mapping[str, object] | None = None) -> SlurmLauncher:
    """The shared launcher for these srun options (one report server per loop for all)."""
    key = tuple(sorted(_normalize(options).items()))
    with _launchers_lock:
        launcher = _launchers.get(key)
        if launcher is None:
            launcher = _launchers[key] = SlurmLauncher(dict(key))
        return launcher


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

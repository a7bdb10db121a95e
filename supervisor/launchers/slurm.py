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
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

from supervisor._log import get_logger
from supervisor.errors import ConfigurationError, KernelStartupError
from supervisor.launchers.base import ExitStatus, LaunchRequest
from supervisor.launchers.slurmprocess import SlurmProcess
from supervisor.launchers.slurmreport import ReportCounts, ReportServer

__all__ = ["SlurmLauncher", "SlurmProcess", "slurm_launcher"]

log = get_logger("supervisor.launchers.slurm")

NODE_SCRIPT = str(Path(__file__).with_name("_slurmnode.py"))
_OURS = frozenset({"disable-status", "ntasks", "ntasks-per-node", "pty", "input", "export",
                   "jobid", "quit-on-interrupt", "label", "multi-prog", "het-group"})
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")


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

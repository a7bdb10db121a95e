"""The local launcher: exec the kernel here, contain its tree, watch its exit by event.

A :class:`LocalProcess` belongs to the asyncio/Tornado loop that was running
when :meth:`LocalLauncher.launch` made it; its callbacks and futures fire
there. A :class:`LocalLauncher` holds only configuration and a cached cgroup
probe: share it between loops freely.

* The kernel runs in a new session (``setsid``): it and what it spawns form one
  process group that :meth:`LocalProcess.signal_group` reaches (interrupts),
  and a terminal's Ctrl-C is not delivered to it behind our back.
* Its whole tree is contained (see :mod:`supervisor.launchers` for the choice):
  a cgroup per kernel where the machine lets us make one, else the process
  group plus an environment marker found in ``/proc``. :meth:`kill_tree`
  ends all of it; :meth:`cleanup`, after the exit, ends what is left, waits
  for it on pidfds, removes the cgroups and explains the death.
* Exit is an event: a pidfd registered with the loop (Linux >= 5.3), or a
  thread blocked in ``waitid`` elsewhere. Nothing polls.
* stderr goes through a pipe read by the loop: the last lines are kept and,
  by default, forwarded to our own stderr as the kernel wrote them.
* Every tree is registered with the reaper sidecar, which ends it if the
  supervising process dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from tornado.ioloop import IOLoop

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError
from supervisor.launchers import tree
from supervisor.launchers.base import ExitStatus, LaunchRequest, Resources, format_bytes
from supervisor.launchers.cgroups import CgroupSetup, KernelCgroup, detect, setup_from
from supervisor.launchers.reaper import reaper

__all__ = ["LocalLauncher", "LocalProcess"]

log = get_logger("supervisor.launchers.local")

_TAIL_BYTES = 16384
_GONE_TIMEOUT = 5.0
_FIGURES_AGE = 1.0  # seconds a /proc scan serves the resource figures of every kernel


class LocalLauncher:
    """Starts kernels as child processes of this one.

    ``cgroup_parent`` names a delegated cgroup v2 directory to make kernel
    groups in (default: beside ourselves, in each hierarchy we may write);
    ``cgroups`` replaces the probe of this machine entirely (tests use it to
    point at a read-only or non-cgroup path).
    """

    name = "local"

    def __init__(self, *, cgroup_parent: str | os.PathLike[str] | None = None,
                 cgroups: CgroupSetup | None = None) -> None:
        self._parent = None if cgroup_parent is None else os.fspath(cgroup_parent)
        self._setup = cgroups
        self._lock = threading.Lock()

    def cgroup_setup(self) -> CgroupSetup:
        """Where this launcher makes kernel cgroups (probed once)."""
        with self._lock:
            if self._setup is None:
                if self._parent is None:
                    self._setup = detect()
                else:
                    try:
                        self._setup = setup_from(Path("/proc/self/mountinfo").read_text(),
                                                 Path("/proc/self/cgroup").read_text(),
                                                 self._parent)
                    except OSError:
                        self._setup = CgroupSetup()
            return self._setup

    def launch(self, request: LaunchRequest,
               on_exit: Callable[[ExitStatus], None] | None = None) -> LocalProcess:
        """Start ``request.argv`` contained as asked; must be called on the owning loop.

        A missing or non-executable program, or ``contain="cgroup"`` on a
        machine without usable cgroups, raises :class:`KernelStartupError`
        and leaves nothing behind.
        """
        argv = list(request.argv)
        if not argv:
            raise KernelStartupError("cannot launch a kernel: its argv is empty")
        env = dict(request.env) if request.env is not None else dict(os.environ)
        token: str | None = None
        if request.contain != "off":
            token = uuid.uuid4().hex
            env[tree.TREE_ENV] = token
        group: KernelCgroup | None = None
        why_not = ""
        if request.contain in ("auto", "cgroup"):
            setup = self.cgroup_setup()
            if setup.usable:
                try:
                    group = KernelCgroup.create(setup, request.limits.memory, request.limits.cpu)
                except OSError as exc:
                    why_not = f"cannot make a cgroup: {exc}"
            else:
                why_not = "no writable cgroup hierarchy"
            if group is None and request.contain == "cgroup":
                raise KernelStartupError(f"contain='cgroup' but {why_not}")
        try:
            popen = _popen(argv, env, request)
        except KernelStartupError:
            if group is not None:
                group.remove()
            raise
        if group is not None:
            try:
                group.attach(popen.pid)
            except OSError as exc:
                group.remove()
                if request.contain == "cgroup":
                    popen.kill()
                    popen.wait()
                    raise KernelStartupError(f"contain='cgroup' but {exc}") from exc
                why_not = f"cannot join the kernel's cgroup: {exc}"
                group = None
        return LocalProcess(popen, request, on_exit=on_exit, cgroup=group, token=token,
                            fallback_reason=why_not)


def _popen(argv: list[str], env: dict[str, str], request: LaunchRequest
           ) -> subprocess.Popen[bytes]:
    cwd = request.cwd
    try:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=request.stdout,
            stderr=subprocess.PIPE if request.capture_stderr else request.stderr,
            start_new_session=True, close_fds=True,
        )
    except FileNotFoundError as exc:
        missing = exc.filename or argv[0]
        if cwd is not None and not Path(cwd).is_dir():
            raise KernelStartupError(f"cannot launch {argv[0]!r}: no directory {cwd!r}") from exc
        raise KernelStartupError(f"cannot launch the kernel: {missing!r} not found") from exc
    except PermissionError as exc:
        raise KernelStartupError(f"cannot launch {argv[0]!r}: permission denied") from exc
    except OSError as exc:
        raise KernelStartupError(f"cannot launch {argv[0]!r}: {exc}") from exc


class LocalProcess:
    """A kernel process we launched, its contained tree, and its exit."""

    def __init__(self, popen: subprocess.Popen[bytes], request: LaunchRequest, *,
                 on_exit: Callable[[ExitStatus], None] | None, cgroup: KernelCgroup | None,
                 token: str | None, fallback_reason: str = "") -> None:
        self._popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # session leader: its pid is the group id
        self._loop = IOLoop.current()
        self._forward = request.forward_stderr
        self._on_exit = on_exit
        self._tail = bytearray()
        # Called on the loop with each chunk read from stderr (the kernel actor
        # reads a start's bind errors through it).
        self.stderr_listener: Callable[[bytes], None] | None = None
        self._stderr_fd: int | None = None
        self._pidfd: int | None = None
        self._cgroup = cgroup
        self._token = token
        self._ended: set[int] = set()
        self._cleanup: asyncio.Future[ExitStatus] | None = None
        self._released = False
        self.final: ExitStatus | None = None
        self.limits = request.limits
        self.method = cgroup.method if cgroup is not None else (
            "session" if token is not None else "off")
        self.memory_method = cgroup.memory_method if cgroup is not None else "none"
        self.cpu_method = cgroup.cpu_method if cgroup is not None else "none"
        self._log = log.bind(pid=self.pid, label=request.label)
        if fallback_reason and request.contain == "auto":
            self._log.debug("containment.fallback", method=self.method, why=fallback_reason)
        self._apply_fallback_limits()
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._registered = not request.independent
        if self._registered:
            reaper.register(self.pid, pgid=self.pgid,
                            cgroups=[str(p) for p in cgroup.dirs] if cgroup else (),
                            token=token, files=request.owned_files)
        if popen.stderr is not None:
            fd = popen.stderr.fileno()
            os.set_blocking(fd, False)
            self._stderr_fd = fd
            self._loop.add_handler(fd, self._on_stderr, IOLoop.READ)
        self._watch_exit()

    def _apply_fallback_limits(self) -> None:
        limits = self.limits
        if limits.memory is not None and self.memory_method == "none":
            try:  # the tree inherits it from the kernel at each fork
                resource.prlimit(self.pid, resource.RLIMIT_DATA, (limits.memory, limits.memory))
                self.memory_method = "rlimit"
            except (OSError, ValueError) as exc:
                self._log.warning("limit.unenforced", limit="memory", error=str(exc))
        if limits.cpu is not None and self.cpu_method == "none":
            self._log.warning("limit.unenforced", limit="cpu",
                              why="no cgroup cpu controller we may use")

    # -- state -------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        """The raw return code once reaped (negative for a signal), else None."""
        return self._popen.returncode

    @property
    def running(self) -> bool:
        """True until the kernel process has been reaped."""
        return not self.exited.done() and self._popen.returncode is None

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the process wrote to stderr."""
        self._drain_stderr()
        text = self._tail.decode("utf-8", "replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def pids(self, *, max_age: float = 0.0) -> list[int]:
        """The live processes of the kernel's tree (the kernel first while it runs).

        Without a cgroup, ``max_age`` > 0 accepts a ``/proc`` scan that old.
        """
        if self._released:
            return []
        if self._cgroup is not None:
            found = self._cgroup.pids()
        elif self._token is not None:
            found = (tree.census(max_age, self._token).get(self._token, []) if max_age > 0
                     else tree.find(self._token))
        else:
            found = []
        head = [self.pid] if self.running else []
        return head + sorted(p for p in found if p != self.pid)

    def resources(self) -> Resources:
        """What the tree uses now, and how it is contained and limited."""
        group = self._cgroup
        memory = peak = None
        cpu: float | None = None
        if group is not None and not self._released:
            memory, peak = group.memory()
            cpu = group.cpu_seconds()
            count: int | None = group.count()
        else:
            count = len(self.pids(max_age=_FIGURES_AGE))
        if memory is None or cpu is None:
            pids = self.pids(max_age=_FIGURES_AGE)
            memory = tree.rss(pids) if memory is None else memory
            cpu = tree.cpu_seconds(pids) if cpu is None else cpu
        return Resources(memory=memory, memory_peak=peak, memory_limit=self.limits.memory,
                         cpu_seconds=cpu, cpu_limit=self.limits.cpu, processes=count,
                         method=self.method, memory_method=self.memory_method,
                         cpu_method=self.cpu_method)

    # -- signals -----------------------------------------------------------
    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the kernel's process group; False if it is gone."""
        if self._released:
            return False
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - the group id was reused
            return False
        return True

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to the kernel process only; False if it is gone."""
        if not self.running:
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def signal_tree(self, signum: int) -> bool:
        """Send ``signum`` to every process of the tree, escaped ones included."""
        sent = self.signal_group(signum)
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
                sent = True
        return sent

    def kill_tree(self) -> None:
        """SIGKILL the kernel and every process of its tree, now (never blocks)."""
        if self._released:
            return
        self.signal_group(signal.SIGKILL)
        if self._cgroup is not None:
            self._ended.update(self._cgroup.kill())
        elif self._token is not None:
            self._ended.update(tree.kill(self._token))

    kill = kill_tree  # the name the process layer used

    async def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait for the kernel's exit; None if ``timeout`` expired first."""
        if timeout is None:
            return await asyncio.shield(self.exited)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return None

    async def cleanup(self, cause: str = "") -> ExitStatus:
        """End whatever is left of the tree, remove its cgroups, explain the exit.

        Kills the kernel first if it still runs. ``cause`` is what the caller
        knows (``"killed by the supervisor (shut down)"``); an out-of-memory
        kill seen by the cgroup wins over it. Idempotent: later calls return
        the first result.
        """
        if self._cleanup is None:
            self._cleanup = asyncio.ensure_future(self._do_cleanup(cause))
        return await asyncio.shield(self._cleanup)

    async def _do_cleanup(self, cause: str) -> ExitStatus:
        if self.running:
            self.kill_tree()
        status = await asyncio.shield(self.exited)
        group = self._cgroup
        if not self._released:
            leftovers = [p for p in self.pids() if p != self.pid]
            self.kill_tree()
            if group is not None and self._token is not None:
                # Forked in the microseconds before the kernel joined its cgroup.
                self._ended.update(tree.kill(self._token))
            self._ended.update(leftovers)
            self._ended.discard(self.pid)
            await _wait_gone(self._ended, _GONE_TIMEOUT)
        oom = False
        peak = None
        if group is not None:
            oom = group.oom_kills() > 0 and status.signal == signal.SIGKILL
            peak = group.memory()[1]
            for _ in range(10):
                if group.remove():
                    break
                await _wait_gone(group.kill(), _GONE_TIMEOUT)
            else:
                self._log.warning("containment.cgroup_left", dirs=[str(d) for d in group.dirs])
        self._released = True
        if (group is None or not group.dirs) and self._registered:
            reaper.unregister(self.pid)
        if oom:
            cause = (f"out of memory (limit {format_bytes(self.limits.memory)}, "
                     f"peak {format_bytes(peak)})" if self.limits.memory is not None
                     else "out of memory (killed by the OOM killer)")
        self.final = dataclasses.replace(
            status, cause=cause, oom=oom, tree_ended=len(self._ended),
            memory_limit=self.limits.memory, memory_peak=peak)
        if self._ended:
            self._log.debug("containment.tree_ended", processes=len(self._ended))
        return self.final

    def close(self) -> None:
        """Stop watching stderr; the process must already be reaped or killed."""
        self._close_stderr()

    def abandon(self, timeout: float = 5.0) -> None:
        """The owning loop is closed or not running: end the tree without it.

        From any thread, while that loop is not running: SIGKILL the tree, reap
        the kernel (a blocking wait, short after SIGKILL), remove its cgroup,
        forget it at the reaper, close our pidfd and stderr pipe. :attr:`exited`
        is resolved later, if the loop ever runs again.
        """
        if self._popen.returncode is None:
            self.kill_tree()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        if not self._released:
            self.kill_tree()  # what the kernel left of its tree
            self._released = True
            # A cgroup still busy stays registered: the reaper removes it when we exit.
            removed = self._cgroup is None or self._cgroup.remove()
            if removed and self._registered:
                reaper.unregister(self.pid)
        if self._pidfd is not None:
            self._loop.remove_handler(self._pidfd)  # no-op on a closed loop
            os.close(self._pidfd)
            self._pidfd = None
        self._close_stderr()
        if not self._loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
            self._loop.add_callback(self._reap)

    # -- exit watch --------------------------------------------------------
    def _watch_exit(self) -> None:
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfd = pidfd_open(self.pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    self._pidfd = None
                else:  # already gone: reap now
                    self._loop.add_callback(self._reap)
                    return
            if self._pidfd is not None:
                self._loop.add_handler(self._pidfd, self._on_pidfd, IOLoop.READ)
                return
        # No pidfd: a thread blocked in waitid(WNOWAIT), reaping on the loop.
        thread = threading.Thread(target=self._wait_thread, name=f"wait-{self.pid}", daemon=True)
        thread.start()

    def _wait_thread(self) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self._loop.add_callback(self._reap)

    def _on_pidfd(self, fd: int, events: int) -> None:
        self._reap()

    def _reap(self) -> None:
        if self.exited.done():
            return
        returncode = self._popen.poll()
        if returncode is None:  # spurious wake-up
            return
        if self._pidfd is not None:
            self._loop.remove_handler(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._drain_stderr()
        status = ExitStatus.from_returncode(returncode)
        self.exited.set_result(status)
        if self._on_exit is not None:
            try:
                self._on_exit(status)
            except Exception as exc:
                self._log.error("process.exit_callback_failed", exc_info=exc)

    # -- stderr ------------------------------------------------------------
    def _on_stderr(self, fd: int, events: int) -> None:
        if not self._drain_stderr():
            self._close_stderr()

    def _drain_stderr(self) -> bool:
        """Read what is available; False at end of file."""
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
            if self.stderr_listener is not None:
                self.stderr_listener(chunk)
            if self._forward:
                try:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass

    def _close_stderr(self) -> None:
        if self._stderr_fd is not None:
            self._drain_stderr()
            self._loop.remove_handler(self._stderr_fd)
            self._stderr_fd = None
            if self._popen.stderr is not None:
                self._popen.stderr.close()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    """Wait on pidfds until every pid has exited, or ``timeout``."""
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    fds: list[int] = []
    for pid in set(pids):
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        fut: asyncio.Future[None] = loop.create_future()
        fds.append(fd)
        waits.append(fut)
        loop.add_reader(fd, _settle, fut)
    try:
        if waits:
            deadline = time.monotonic() + timeout
            await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)

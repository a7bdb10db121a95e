"""Kernel processes: launch in a new session, watch the exit by event, signal the group.

A :class:`KernelProcess` belongs to the IOLoop that was current when
:meth:`KernelProcess.launch` ran; its callbacks and futures fire there.

* The kernel runs in a new session (``setsid``), so it and everything it
  spawns form one process group that :meth:`KernelProcess.signal_group` and
  :meth:`KernelProcess.kill` reach, and a terminal's Ctrl-C is not delivered
  to it behind our back.
* Exit is an event: a pidfd registered with the IOLoop (Linux >= 5.3), or a
  thread blocked in ``waitpid`` elsewhere. Nothing polls. The process is
  reaped the moment it exits and :attr:`KernelProcess.exited` resolves.
* stderr goes through a pipe read by the loop: the last lines are kept (a
  kernel that dies while starting is reported with them) and, by default,
  forwarded to our own stderr as the kernel wrote them.
* Kernels never outlive the supervising process: every group is registered
  with a reaper sidecar (:mod:`supervisor._reaper`) that SIGKILLs the groups
  still registered when our end of its pipe closes, which the kernel sees
  even when we are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tornado.ioloop import IOLoop

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError

__all__ = ["ExitStatus", "KernelProcess", "reaper_pid"]

log = get_logger("supervisor.process")

_TAIL_BYTES = 16384


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Build from :attr:`subprocess.Popen.returncode` (negative: signal)."""
        if returncode < 0:
            return cls(exit_code=None, signal=-returncode)
        return cls(exit_code=returncode, signal=None)

    @property
    def abnormal(self) -> bool:
        """Non-zero exit code or killed by a signal."""
        return self.signal is not None or self.exit_code != 0

    def describe(self) -> str:
        """A short human text: ``exit code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"signal {name}"
        return f"exit code {self.exit_code}"


# -- the reaper sidecar ---------------------------------------------------------
class _Reaper:
    """One sidecar per supervising process; see :mod:`supervisor._reaper`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = 0

    def _ensure(self) -> subprocess.Popen[bytes] | None:
        if self._proc is not None and self._owner_pid == os.getpid():
            return self._proc
        script = str(Path(__file__).with_name("_reaper.py"))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # pragma: no cover - no interpreter to run
            log.warning("reaper.unavailable", error=str(exc))
            self._proc = None
            return None
        self._owner_pid = os.getpid()
        atexit.register(self._close, self._proc)
        return self._proc

    def _close(self, proc: subprocess.Popen[bytes]) -> None:
        """At interpreter exit: close our end of the pipe and reap the sidecar.

        The sidecar sees end of file, kills what is still registered and exits,
        so nothing is left behind and no Popen or pipe is left to the garbage
        collector. A forked child (other owner) only closes its copy of the pipe.
        """
        with self._lock:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if self._owner_pid == os.getpid():
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    proc.wait(timeout=2)
            if self._proc is proc:
                self._proc = None

    def _write(self, line: bytes) -> None:
        with self._lock:
            proc = self._ensure()
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError as exc:  # the reaper died; start another next time
                log.warning("reaper.lost", error=str(exc))
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                self._proc = None

    def register(self, pgid: int, files: Sequence[str] = ()) -> None:
        paths = [os.fsencode(f) for f in files if "\t" not in f and "\n" not in f]
        self._write(b"\t".join([b"+%d" % pgid, *paths]) + b"\n")

    def unregister(self, pgid: int) -> None:
        self._write(b"-%d\n" % pgid)

    def pid(self) -> int | None:
        with self._lock:
            proc = self._ensure()
            return None if proc is None else proc.pid


_reaper = _Reaper()


def reaper_pid() -> int | None:
    """The pid of this process's reaper sidecar (starting it if needed)."""
    return _reaper.pid()


# -- kernel processes -----------------------------------------------------------
class KernelProcess:
    """A kernel process we launched and will reap."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        forward_stderr: bool,
        on_exit: Callable[[ExitStatus], None] | None,
        owned_files: Sequence[str] = (),
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # session leader: its pid is the group id
        self._loop = IOLoop.current()
        self._forward = forward_stderr
        self._on_exit = on_exit
        self._tail = bytearray()
        self._stderr_fd: int | None = None
        self._pidfd: int | None = None
        self._group_released = False
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        _reaper.register(self.pgid, owned_files)
        if popen.stderr is not None:
            fd = popen.stderr.fileno()
            os.set_blocking(fd, False)
            self._stderr_fd = fd
            self._loop.add_handler(fd, self._on_stderr, IOLoop.READ)
        self._watch_exit()

    @classmethod
    def launch(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        forward_stderr: bool = True,
        capture_stderr: bool = True,
        stdout: int | None = None,
        on_exit: Callable[[ExitStatus], None] | None = None,
        owned_files: Sequence[str] = (),
    ) -> KernelProcess:
        """Start ``argv`` in a new session; must be called on the owning loop.

        ``owned_files`` (the connection file) are deleted by the reaper if this
        process dies with the kernel still registered. A missing or
        non-executable program raises :class:`KernelStartupError` and leaves
        nothing behind.
        """
        if not argv:
            raise KernelStartupError("cannot launch a kernel: its argv is empty")
        try:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE if capture_stderr else None,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            missing = exc.filename or argv[0]
            if cwd is not None and not Path(cwd).is_dir():
                raise KernelStartupError(
                    f"cannot launch {argv[0]!r}: no directory {cwd!r}") from exc
            raise KernelStartupError(f"cannot launch the kernel: {missing!r} not found") from exc
        except PermissionError as exc:
            raise KernelStartupError(f"cannot launch {argv[0]!r}: permission denied") from exc
        except OSError as exc:
            raise KernelStartupError(f"cannot launch {argv[0]!r}: {exc}") from exc
        return cls(popen, forward_stderr=forward_stderr, on_exit=on_exit,
                   owned_files=owned_files)

    # -- state -------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        """The raw return code once reaped (negative for a signal), else None."""
        return self._popen.returncode

    @property
    def running(self) -> bool:
        """True until the process has been reaped."""
        return not self.exited.done()

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the process wrote to stderr."""
        self._drain_stderr()
        text = self._tail.decode("utf-8", "replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    # -- signals -----------------------------------------------------------
    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the whole process group; False if it is gone."""
        if self._group_released:
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

    def kill(self) -> None:
        """SIGKILL the whole group (kernel and every descendant in it)."""
        self.signal_group(signal.SIGKILL)

    def release_group(self) -> None:
        """After the kernel is reaped: kill what is left of its group, forget it.

        Grandchildren a kernel left behind die here; afterwards the group id is
        never signalled again (it could be reused).
        """
        if self._group_released:
            return
        self.signal_group(signal.SIGKILL)
        self._group_released = True
        _reaper.unregister(self.pgid)

    async def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait for the exit; None if ``timeout`` expired first."""
        if timeout is None:
            return await asyncio.shield(self.exited)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        """Stop watching stderr; the process must already be reaped or killed."""
        self._close_stderr()

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
                log.error("process.exit_callback_failed", pid=self.pid, exc_info=exc)

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

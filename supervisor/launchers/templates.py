"""Fork-server templates: which kernels can be forked, and the process that forks them.

Ownership: a :class:`Template` may be used from any loop or thread (a lock
orders its state); its reader thread owns the receiving side of its socket
and hands each kernel's exit to its handle (:meth:`Exited.relay`, which must
be thread-safe). See :mod:`supervisor.launchers.forkserver` for the launcher
and :mod:`supervisor.launchers._forkserver` for the template process itself.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError
from supervisor.launchers import tree
from supervisor.launchers.base import LaunchRequest
from supervisor.launchers.reaper import reaper

__all__ = ["Exited", "ForkPlan", "Template", "TemplateGone", "plan_fork"]

log = get_logger("supervisor.launchers.forkserver")


class Exited(Protocol):
    """What a template tells a kernel's handle, from its reader thread."""

    def relay(self, raw: int) -> None: ...

    def orphaned(self) -> None: ...

_SCRIPT = Path(__file__).with_name("_forkserver.py")
_HEADER = struct.Struct(">I")
_MODULES = ("ipykernel_launcher", "ipykernel")
_PYTHON = re.compile(r"^python[0-9.]*$")
_FLAGS = {"-B", "-E", "-I", "-O", "-OO", "-P", "-s", "-S", "-u", "-q", "-b", "-bb", "-d", "-v"}
_FLAGS_WITH_VALUE = ("-X", "-W")
_IMPORT_ENV = ("PYTHON", "LD_", "LC_")
_IMPORT_ENV_NAMES = ("LANG", "HOME")


@dataclasses.dataclass(frozen=True)
class ForkPlan:
    """A kernel argv the template can run: ``python [flags] -m module args``."""

    python: str
    flags: tuple[str, ...]
    module: str
    args: tuple[str, ...]
    import_env: tuple[tuple[str, str], ...]

    @property
    def key(self) -> tuple[object, ...]:
        """Kernels with the same key share a template."""
        return (self.python, self.flags, self.import_env)


def _import_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(_IMPORT_ENV) or k in _IMPORT_ENV_NAMES))


def plan_fork(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ForkPlan | str:
    """The fork plan for ``argv``, or a sentence saying why it cannot be forked."""
    env = os.environ if env is None else env
    if not argv or not _PYTHON.match(os.path.basename(argv[0])):
        return f"the kernel command {argv[:1]!r} is not a Python interpreter"
    python = argv[0]
    if not os.path.isabs(python):
        found = shutil.which(python, path=env.get("PATH", os.defpath))
        if found is None:
            return f"no {python!r} on the kernel's PATH"
        python = found
    flags: list[str] = []
    rest = list(argv[1:])
    while rest and rest[0] != "-m":
        head = rest.pop(0)
        if head in _FLAGS:
            flags.append(head)
        elif head in _FLAGS_WITH_VALUE and rest:
            flags += [head, rest.pop(0)]
        elif head.startswith(_FLAGS_WITH_VALUE) and len(head) > 2:
            flags.append(head)
        elif not head.startswith("-"):
            return f"the kernel runs {head!r}, not 'python -m ipykernel_launcher' (or ipykernel)"
        else:
            return f"interpreter option {head!r} is not one the fork server reproduces"
    if len(rest) < 2 or rest[1] not in _MODULES:
        return "the kernel is not run as 'python -m ipykernel_launcher' (or ipykernel)"
    return ForkPlan(python=python, flags=tuple(flags), module=rest[1], args=tuple(rest[2:]),
                    import_env=_import_env(env))


class TemplateGone(Exception):
    """The template died, or stopped answering, during a request."""


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


class Template:
    """One template process, its socket and its reader thread."""

    def __init__(self, plan: ForkPlan, spawn_timeout: float = 10.0) -> None:
        self.plan = plan
        self.spawn_timeout = spawn_timeout
        self.hello: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.retired = False
        self.dead = False  # its reader thread saw the end of the channel
        self.broken = False  # a request failed on it: dying or useless
        self.reason = ""  # why it cannot be used, once known
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._handles: dict[int, Exited] = {}
        self._early: dict[int, int] = {}
        self._next_id = 0
        self._fingerprint: dict[str, tuple[int, int, int] | None] = {}
        self._stderr = bytearray()
        self.marker = uuid.uuid4().hex
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(plan.import_env)
        # Read when ipykernel is imported (a trait's default): the supervisor's pid.
        env["JPY_PARENT_PID"] = str(os.getpid())
        env["PATH"] = os.environ.get("PATH", os.defpath)
        env[tree.TREE_ENV] = self.marker  # its kernels carry it too: the reaper's net
        try:
            self._proc = subprocess.Popen(
                [plan.python, *plan.flags, str(_SCRIPT), str(theirs.fileno()),
                 "ipykernel-forkserver"],
                pass_fds=(theirs.fileno(),), env=env, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise KernelStartupError(f"cannot start the fork server {plan.python!r}: {exc}"
                                     ) from exc
        finally:
            theirs.close()
        self._sock = ours
        self._sock.settimeout(spawn_timeout)  # a send to a stuck template must not block us
        self.pid = self._proc.pid
        reaper.register(-self.pid, pgid=self.pid, token=self.marker)
        self._log = log.bind(template=self.pid, python=plan.python)
        self._thread = threading.Thread(target=self._read, name=f"forkserver-{self.pid}",
                                        daemon=True)
        self._thread.start()

    # -- state -----------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Ready, alive, not retired and able to run ipykernel."""
        return (self.hello.done() and self.alive() and not self.retired
                and not self.reason)

    def alive(self) -> bool:
        """Neither gone nor broken, as far as we can tell without a round trip."""
        return not (self.dead or self.broken) and self._proc.poll() is None

    def stale(self) -> bool:
        """True when a file or directory it imported from changed since it started."""
        return any(_stat(path) != seen for path, seen in self._fingerprint.items())

    def stderr_tail(self) -> str:
        """The last lines the template wrote to stderr."""
        with self._lock:
            text = self._stderr.decode("utf-8", "replace")
        return "\n".join(text.rstrip("\n").splitlines()[-10:])

    def retire(self) -> None:
        """No new kernels; end once the last one has exited."""
        with self._lock:
            self.retired = True
            idle = not self._handles
        if idle:
            self._quit()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the template has exited and been reaped (or ``timeout``)."""
        self._thread.join(timeout)

    def _quit(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # -- requests --------------------------------------------------------------
    def spawn(self, plan: ForkPlan, request: LaunchRequest, env: Mapping[str, str],
              stdio: Sequence[tuple[int, int]]) -> int:
        """Fork a kernel; its pid. Raises TemplateGone or KernelStartupError."""
        with self._lock:
            if self.dead:
                raise TemplateGone
            self._next_id += 1
            ident = self._next_id
            waiter: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            self._pending[ident] = waiter
        body = json.dumps({"op": "spawn", "id": ident, "module": plan.module,
                           "args": list(plan.args), "env": dict(env), "cwd": request.cwd,
                           "stdio": [target for target, _ in stdio]}).encode()
        fds = array.array("i", [fd for _, fd in stdio])
        try:
            with self._send_lock:
                self._sock.sendmsg([_HEADER.pack(len(body)) + body],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            reply = waiter.result(self.spawn_timeout)
        except (ConnectionError, TimeoutError, concurrent.futures.TimeoutError) as exc:
            self.broken = True
            self._kill()  # dead, or alive and not answering: of no use either way
            raise TemplateGone from exc
        except OSError as exc:
            raise KernelStartupError(f"cannot send the fork request: {exc}") from exc
        finally:
            with self._lock:
                self._pending.pop(ident, None)
        if reply.get("op") == "gone":
            self.broken = True
            raise TemplateGone
        if reply.get("op") != "spawned":
            raise KernelStartupError(f"cannot fork the kernel: {reply.get('error', reply)}")
        return int(reply["pid"])

    def adopt(self, pid: int, handle: Exited) -> None:
        """Route ``pid``'s exit to ``handle`` (at once if it is already known)."""
        with self._lock:
            early = self._early.pop(pid, None)
            gone = self.dead
            if early is None and not gone:
                self._handles[pid] = handle
        if early is not None:
            handle.relay(early)
        elif gone:
            handle.orphaned()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)

    # -- the reader thread -----------------------------------------------------
    def _read(self) -> None:
        buffer = bytearray()
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "sock")
        assert self._proc.stderr is not None
        sel.register(self._proc.stderr, selectors.EVENT_READ, "stderr")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stderr":
                        chunk = os.read(self._proc.stderr.fileno(), 65536)
                        if not chunk:
                            sel.unregister(self._proc.stderr)
                        with self._lock:
                            self._stderr += chunk
                            del self._stderr[:-8192]
                        continue
                    data = self._sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                    while len(buffer) >= 4:
                        (size,) = _HEADER.unpack(bytes(buffer[:4]))
                        if len(buffer) < 4 + size:
                            break
                        message = json.loads(bytes(buffer[4:4 + size]))
                        del buffer[:4 + size]
                        self._dispatch(message)
        except (OSError, ValueError) as exc:
            self._log.warning("forkserver.channel_broken", error=str(exc))
        finally:
            sel.close()
            self._gone()

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "hello":
            failed = message.get("failed", {})
            if "ipykernel.kernelapp" in failed:
                self.reason = f"the fork server cannot import ipykernel: " \
                              f"{failed['ipykernel.kernelapp']}"
            self._fingerprint = {p: _stat(p) for p in message.get("fingerprint", [])}
            self.hello.set_result(message)
        elif op == "exit":
            pid, status = int(message["pid"]), int(message["status"])
            with self._lock:
                handle = self._handles.pop(pid, None)
                if handle is None:
                    self._early[pid] = status
                idle = self.retired and not self._handles
            if handle is not None:
                handle.relay(status)
            if idle:
                self._quit()
        else:
            with self._lock:
                waiter = self._pending.get(int(message.get("id") or 0))
            if waiter is not None and not waiter.done():
                waiter.set_result(message)

    def _gone(self) -> None:
        with self._lock:
            self.dead = True
            handles, self._handles = list(self._handles.values()), {}
            pending = list(self._pending.values())
        for waiter in pending:
            if not waiter.done():
                waiter.set_result({"op": "gone"})
        if not self.hello.done():
            self.hello.set_exception(KernelStartupError(
                f"the fork server exited before it was ready: {self.stderr_tail() or 'no output'}"))
        for handle in handles:
            handle.orphaned()
        self._sock.close()
        self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        reaper.unregister(-self.pid)
        self._log.debug("forkserver.exited", returncode=self._proc.returncode)

"""The fork-server template: a Python process that has imported a kernel and forks copies.

This file runs as its own interpreter (``python [flags] _forkserver.py FD``),
started by :mod:`supervisor.launchers.forkserver`, one per (interpreter,
interpreter flags, import environment). It imports nothing of the package and
starts nothing: no thread, no zmq context, no event loop. It is single
threaded, so ``fork`` here is as safe as ``fork`` before ``exec``.

1. It imports what an IPython kernel needs (ipykernel, IPython, zmq, tornado,
   debugpy when present), collects and freezes the garbage collector's view
   (``gc.freeze``: those objects are never written by the collector again, so
   their pages stay shared with every kernel it forks), and says hello.
2. It serves requests on FD, a Unix stream socket whose other end only the
   supervising process holds. Messages are a 4-byte big-endian length and a
   JSON object; a spawn request carries the kernel's stdin, stdout and stderr
   as file descriptors (``SCM_RIGHTS``).
3. For each spawn it forks. The parent replies with the child's pid, watches
   the child on a pidfd, reaps it (it is its parent: nobody else can) and
   relays the raw wait status, so the supervisor sees the same exit code or
   signal an exec'd kernel would give.
4. The child becomes the kernel: its own session and process group, SIGKILL
   when the template dies (``PR_SET_PDEATHSIG``), its stdio replaced and every
   other descriptor closed, signal dispositions as a fresh interpreter has
   them, the kernel's environment and working directory, random state
   reseeded, the collector re-enabled; then it unwinds to the top of this
   script and runs ``ipykernel`` as ``python -m MODULE ARGS`` would, and ends
   like an interpreter does (atexit handlers, exit code, traceback).
5. It exits when the socket reaches end of file: the supervisor is gone
   (however it died) or let it go. Its kernels die with it (step 4).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import struct
import sys
import types
from typing import Any

PRELOAD = (
    "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.iostream",
    "ipykernel.heartbeat", "ipykernel.comm", "ipykernel.eventloops", "ipykernel.debugger",
    "IPython.core.interactiveshell", "IPython.core.completer", "IPython.core.history",
    "IPython.core.debugger", "IPython.core.completerlib", "IPython.core.logger",
    "IPython.core.oinspect", "IPython.extensions.storemagic", "IPython.utils.wildcard",
    "jupyter_client.session", "zmq.asyncio", "tornado.ioloop", "tornado.platform.asyncio",
    "faulthandler", "sqlite3", "pdb", "pydoc", "psutil",
)
_HEADER = struct.Struct(">I")
_MAX_FDS = 3
_PR_SET_PDEATHSIG = 1


class Spawn:
    """What the child runs once it has left the server loop."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.module: str = request["module"]
        self.args: list[str] = list(request["args"])
        self.cwd: str | None = request.get("cwd")
        self.env: dict[str, str] = request["env"]


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _complete(buffer: bytearray) -> bool:
    return len(buffer) >= 4 and len(buffer) >= 4 + _HEADER.unpack(bytes(buffer[:4]))[0]


def _recv(sock: socket.socket, buffer: bytearray
          ) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its fds, or None at end of file."""
    fds: list[int] = []
    while True:
        if len(buffer) >= 4:
            (size,) = _HEADER.unpack(bytes(buffer[:4]))
            if len(buffer) >= 4 + size:
                body = bytes(buffer[4:4 + size])
                del buffer[:4 + size]
                return json.loads(body), fds
        data, ancillary, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(_MAX_FDS * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        buffer += data


def _preload() -> dict[str, str]:
    failed = {}
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported: the kernel decides
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def _fingerprint() -> list[str]:
    """Files whose change means what we imported is no longer what is installed."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    for name in ("ipykernel", "IPython", "zmq", "tornado", "jupyter_client"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            paths.append(path)
    return paths


def _pdeathsig() -> bool:
    """Ask the kernel to be SIGKILLed when its parent (this template) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0)
    except Exception:  # not Linux, or no libc: the reaper still holds
        return False


_SIGNALS_PRESET = {signal.SIGPIPE, signal.SIGXFSZ}  # Python's own start-up choices


def _become_kernel(sock: socket.socket, request: dict[str, Any], fds: list[int],
                   template_pid: int) -> Spawn:
    """In the forked child: shed the template, take the kernel's identity."""
    os.setsid()
    _pdeathsig()
    if os.getppid() != template_pid:  # the template died before prctl took effect
        os._exit(1)
    sock.detach()  # the number is closed below with the rest
    stdio = dict(zip(request.get("stdio", []), fds, strict=False))
    for target in (0, 1, 2):
        fd = stdio.get(target)
        if fd is None:
            fd = os.open(os.devnull, os.O_RDWR)
        if fd != target:
            os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP) or signum in _SIGNALS_PRESET:
            continue
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    spawn = Spawn(request)
    os.environ.clear()
    os.environ.update(spawn.env)
    if spawn.cwd:
        os.chdir(spawn.cwd)
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    gc.enable()
    return spawn


def _relay_exits(sock: socket.socket, children: dict[int, int]) -> None:
    for pid, pidfd in list(children.items()):
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got, status = pid, -1
        if got == 0:
            continue
        os.close(pidfd)
        del children[pid]
        _send(sock, {"op": "exit", "pid": pid, "status": status})


def serve(fd: int) -> Spawn | None:
    """The template's loop; returns a :class:`Spawn` in a forked child, None at the end."""
    sock = socket.socket(fileno=fd)
    try:
        return _serve(sock)
    except (BrokenPipeError, ConnectionResetError):  # the supervisor is gone
        return None


def _serve(sock: socket.socket) -> Spawn | None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # our session's Ctrl-C is not for us
    failed = _preload()
    gc.collect()
    gc.freeze()
    template_pid = os.getpid()
    _send(sock, {"op": "hello", "pid": template_pid, "python": sys.version,
                 "executable": sys.executable, "failed": failed,
                 "fingerprint": _fingerprint()})
    children: dict[int, int] = {}  # pid -> pidfd
    buffer = bytearray()
    while True:
        waiting = _complete(buffer)  # a whole request already read: do not block
        ready, _, _ = select.select([sock.fileno(), *children.values()], [], [],
                                    0 if waiting else None)
        if waiting:
            ready.append(sock.fileno())
        if any(fd != sock.fileno() for fd in ready):
            _relay_exits(sock, children)
        if sock.fileno() not in ready:
            continue
        got = _recv(sock, buffer)
        if got is None:
            return None
        request, fds = got
        op = request.get("op")
        if op == "quit":
            return None
        if op != "spawn":
            _send(sock, {"op": "error", "id": request.get("id"), "error": f"unknown op {op!r}"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd_ in fds:
                os.close(fd_)
            _send(sock, {"op": "error", "id": request.get("id"), "errno": exc.errno,
                         "error": f"fork failed: {exc.strerror or exc}"})
            continue
        if pid == 0:
            for pidfd in children.values():
                os.close(pidfd)
            return _become_kernel(sock, request, fds, template_pid)
        for fd_ in fds:
            os.close(fd_)
        try:
            children[pid] = os.pidfd_open(pid)
        except OSError:  # pragma: no cover - gone and reaped cannot happen: we reap
            children[pid] = os.open(os.devnull, os.O_RDONLY)
        _send(sock, {"op": "spawned", "id": request.get("id"), "pid": pid})


def run_kernel(spawn: Spawn) -> None:
    """Run the kernel module as ``python -m`` would, at the top of the stack."""
    sys.argv = [spawn.module, *spawn.args]  # runpy puts the module's path first
    sys.path.insert(0, os.getcwd())  # what -m puts first (ipykernel_launcher drops it)
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    runpy.run_module(spawn.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    gc.disable()  # until the imports are done and frozen; each kernel turns it on
    # Run as a script, sys.path[0] is this directory: our own modules must not
    # shadow anything the kernel imports.
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(
            os.path.abspath(__file__)):
        del sys.path[0]
    _spawn = serve(int(sys.argv[1]))
    if _spawn is not None:
        try:
            run_kernel(_spawn)
        except Exception:
            # What the interpreter prints and returns, without its exit handlers:
            # a kernel that failed half-way (a port it could not bind) hangs in
            # them (zmq's context termination waits for its open sockets), and
            # the supervisor should see the exit, and the traceback, at once.
            sys.excepthook(*sys.exc_info())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

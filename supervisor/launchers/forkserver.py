"""The fork-server launcher: IPython kernels forked from a template that imported them once.

Ownership: a :class:`ForkServerLauncher` and its :class:`Template` objects may
be shared between loops and threads (a lock orders their state); each
template has one reader thread that owns its socket's receiving side. A
:class:`ForkedProcess` belongs to the loop that launched it, like a
:class:`~supervisor.launchers.local.LocalProcess`: the reader thread hands
it its exit through ``call_soon_threadsafe``.

How a start goes
================

``prepare(request)`` (awaited by the kernel actor before ``launch``) finds
the template for the request's interpreter, interpreter flags and import
environment, starting one if needed (:mod:`supervisor.launchers._forkserver`,
a few hundred milliseconds once), and waits for its hello. ``launch`` then
sends a spawn request with the kernel's argv, env, cwd and stdio descriptors
and gets the child's pid back in a millisecond or two: no interpreter start,
no imports. The kernel is then contained and registered with the reaper as
an exec'd one is (cgroup or session + marker, limits, owned files).

Exit status. The kernel is the template's child, not ours: only the template
can reap it, so the template watches it on a pidfd, reaps it and relays the
raw wait status over the socket; the handle resolves ``exited`` with the same
code or signal an exec'd kernel gives. We do not make the supervising process
a child subreaper instead: that changes the host process for every orphan of
every library in it, and a subreaper only adopts a process after its parent
(the template) died. If the template dies, its kernels are SIGKILLed with it
(``PR_SET_PDEATHSIG``, set in each child); the handles then see the exit on
their own pidfds and report ``signal SIGKILL`` with the cause "its fork
server died".

When it is not used. A kernelspec that is not ``PYTHON [flags] -m
ipykernel_launcher|ipykernel ...``, no ``pidfd_open``, a template that cannot
import ``ipykernel``, or one still starting when ``launch`` is called without
``prepare``: the kernel is exec'd by the local launcher instead, with a
``launcher.fork_fallback`` warning naming why (``strict=True`` makes it a
:class:`KernelStartupError`). A different ``PYTHONPATH`` (any ``PYTHON*``,
``LD_*``, locale or ``HOME`` variable) is a different template, never the
old one's modules.

Staleness. A template remembers the directories of its ``sys.path`` and the
packages it imported, with their modification times; when any changed (a
package installed, upgraded or removed) the next start uses a fresh template.
``refresh()`` does the same on demand. A retired template lives on, unused,
until its last kernel exits, since its kernels die with it.
"""

from __future__ import annotations

import array
import asyncio
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
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError
from supervisor.launchers import tree
from supervisor.launchers.base import ExitStatus, LaunchRequest
from supervisor.launchers.cgroups import KernelCgroup
from supervisor.launchers.local import LocalLauncher, LocalProcess
from supervisor.launchers.reaper import reaper

__all__ = ["ForkPlan", "ForkServerLauncher", "ForkedProcess", "Template", "plan_fork"]

log = get_logger("supervisor.launchers.forkserver")

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


class _TemplateGone(Exception):
    pass


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
        self.dead = False
        self.reason = ""  # why it cannot be used, once known
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._handles: dict[int, ForkedProcess] = {}
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
        return (self.hello.done() and not self.dead and not self.retired
                and not self.reason)

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
        """Fork a kernel; its pid. Raises _TemplateGone or KernelStartupError."""
        with self._lock:
            if self.dead:
                raise _TemplateGone
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
        except (OSError, concurrent.futures.TimeoutError) as exc:
            self._kill()
            raise _TemplateGone from exc
        finally:
            with self._lock:
                self._pending.pop(ident, None)
        if reply.get("op") == "gone":
            raise _TemplateGone
        if reply.get("op") != "spawned":
            raise KernelStartupError(f"cannot fork the kernel: {reply.get('error', reply)}")
        return int(reply["pid"])

    def adopt(self, pid: int, handle: ForkedProcess) -> None:
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


class _Child:
    """The part of a Popen a LocalProcess reads, for a kernel the template forked."""

    def __init__(self, pid: int, stderr: Any) -> None:
        self.pid = pid
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class ForkedProcess(LocalProcess):
    """A kernel forked by a template: contained, limited and ended like an exec'd one.

    Its exit comes from the template (:meth:`relay`), or, if the template
    died first, from its own pidfd (:meth:`orphaned`).
    """

    launched_by = "fork"

    def __init__(self, template: Template, pid: int, stderr: Any, request: LaunchRequest, *,
                 on_exit: Callable[[ExitStatus], None] | None, cgroup: KernelCgroup | None,
                 token: str | None, fallback_reason: str = "") -> None:
        self._child = _Child(pid, stderr)
        self.template = template
        self._cause = ""
        self._watch: int | None = None
        super().__init__(cast("subprocess.Popen[bytes]", self._child), request, on_exit=on_exit,
                         cgroup=cgroup, token=token, fallback_reason=fallback_reason)
        self._aloop = asyncio.get_running_loop()

    def _watch_exit(self) -> None:
        """The template watches and reaps; nothing to do here."""

    def relay(self, raw: int) -> None:
        """Any thread: the template reaped the kernel with wait status ``raw``."""
        code = os.waitstatus_to_exitcode(raw) if raw >= 0 else 1
        if raw < 0:
            self._cause = "exit status lost by the fork server"
        self._call(self._settle, code)

    def orphaned(self) -> None:
        """Any thread: the template is gone; the kernel dies with it (PDEATHSIG)."""
        self._call(self._watch_orphan)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._aloop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # its loop is closed: nobody is left to tell
            pass

    def _watch_orphan(self) -> None:
        if self.exited.done() or self._watch is not None:
            return
        try:
            self._watch = os.pidfd_open(self.pid)
        except OSError:
            self._settle(-signal.SIGKILL, "its fork server died")
            return
        self._aloop.add_reader(self._watch, self._settle, -signal.SIGKILL,
                               "its fork server died")

    def _settle(self, code: int, cause: str = "") -> None:
        if self._watch is not None:
            self._aloop.remove_reader(self._watch)
            os.close(self._watch)
            self._watch = None
        if self.exited.done():
            return
        self._cause = self._cause or cause
        self._child.returncode = code
        self._reap()

    async def cleanup(self, cause: str = "") -> ExitStatus:
        """As :meth:`LocalProcess.cleanup`; a dead template is named as the cause."""
        return await super().cleanup(cause or self._cause)


class ForkServerLauncher:
    """Forks ipykernel kernels from templates; execs what it cannot fork.

    ``strict`` turns every fall back into a :class:`KernelStartupError`;
    ``start_timeout`` bounds a template's start, ``spawn_timeout`` one fork
    (a template that does not answer in time is killed: never a hang);
    ``fallback`` is the launcher used otherwise (a :class:`LocalLauncher`,
    whose cgroup probe the forked kernels share).
    """

    name = "fork"

    def __init__(self, *, fallback: LocalLauncher | None = None, strict: bool = False,
                 start_timeout: float = 60.0, spawn_timeout: float = 10.0) -> None:
        self._local = fallback or LocalLauncher()
        self.strict = strict
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._templates: dict[tuple[object, ...], Template] = {}
        self._refused: dict[tuple[object, ...], str] = {}
        self._started: list[Template] = []
        self.spawn_timeout = spawn_timeout
        self.forks = 0
        self.fallbacks = 0

    def templates(self) -> list[Template]:
        """The templates in use (not retired)."""
        with self._lock:
            return list(self._templates.values())

    def refresh(self) -> None:
        """Retire every template: the next start imports afresh."""
        with self._lock:
            old, self._templates = list(self._templates.values()), {}
            self._refused.clear()
        for template in old:
            template.retire()

    def close(self, timeout: float = 5.0) -> bool:
        """Retire every template and wait for the idle ones to exit; True if all did.

        A template that still has kernels lives until they exit (they die with it).
        """
        self.refresh()
        with self._lock:
            started, self._started = self._started, []
        deadline = time.monotonic() + timeout
        left = []
        for template in started:
            template.join(max(0.0, deadline - time.monotonic()))
            if not template.dead:
                left.append(template)
        with self._lock:
            self._started.extend(left)
        return not left

    def _template(self, plan: ForkPlan) -> Template | str:
        """The live template for ``plan``, started if needed; or why there is none."""
        with self._lock:
            if plan.key in self._refused:
                return self._refused[plan.key]
            template = self._templates.get(plan.key)
            if template is not None and (template.dead or template.retired or (
                    template.hello.done() and template.stale())):
                del self._templates[plan.key]
                template.retire()
                template = None
            if template is None:
                template = self._templates[plan.key] = Template(plan, self.spawn_timeout)
                self._started = [t for t in self._started if not t.dead] + [template]
            return template

    async def prepare(self, request: LaunchRequest) -> None:
        """Start (or reuse) the template ``request`` needs and wait until it is ready."""
        plan = plan_fork(request.argv, request.env)
        if isinstance(plan, str) or not hasattr(os, "pidfd_open"):
            return
        try:
            template = self._template(plan)
        except KernelStartupError as exc:
            with self._lock:
                self._refused[plan.key] = str(exc)
            return
        if isinstance(template, str):
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(template.hello), self.start_timeout)
        except (KernelStartupError, asyncio.TimeoutError) as exc:
            template._kill()
            with self._lock:
                self._refused[plan.key] = str(exc) or "the fork server did not start in time"
                if self._templates.get(plan.key) is template:
                    del self._templates[plan.key]
            return
        if template.reason:
            with self._lock:
                self._refused[plan.key] = template.reason
                if self._templates.get(plan.key) is template:
                    del self._templates[plan.key]
            template.retire()

    def launch(self, request: LaunchRequest,
               on_exit: Callable[[ExitStatus], None] | None = None) -> LocalProcess:
        """Fork the kernel from its template, or exec it (see the module's docstring)."""
        plan = plan_fork(request.argv, request.env)
        if isinstance(plan, str):
            return self._fall_back(request, on_exit, plan)
        if not hasattr(os, "pidfd_open"):
            return self._fall_back(request, on_exit, "no pidfd_open on this system")
        template = self._template(plan)
        if isinstance(template, str):
            return self._fall_back(request, on_exit, template)
        if not template.usable:
            why = template.reason or "its fork server is still starting (call prepare first)"
            return self._fall_back(request, on_exit, why)
        return self._fork(template, plan, request, on_exit)

    def _fall_back(self, request: LaunchRequest, on_exit: Callable[[ExitStatus], None] | None,
                   why: str) -> LocalProcess:
        if self.strict:
            raise KernelStartupError(f"cannot fork the kernel: {why}")
        self.fallbacks += 1
        log.warning("launcher.fork_fallback", label=request.label, why=why)
        proc = self._local.launch(request, on_exit)
        proc.launch_note = f"exec'd, not forked: {why}"
        return proc

    def _fork(self, template: Template, plan: ForkPlan, request: LaunchRequest,
              on_exit: Callable[[ExitStatus], None] | None) -> ForkedProcess:
        if request.cwd is not None and not os.path.isdir(request.cwd):
            raise KernelStartupError(f"cannot launch the kernel: no directory {request.cwd!r}")
        env = dict(request.env) if request.env is not None else dict(os.environ)
        token = None
        if request.contain != "off":
            token = uuid.uuid4().hex
            env[tree.TREE_ENV] = token
        group, why_not = None, ""
        if request.contain in ("auto", "cgroup"):
            setup = self._local.cgroup_setup()
            try:
                group = KernelCgroup.create(setup, request.limits.memory, request.limits.cpu) \
                    if setup.usable else None
            except OSError as exc:
                why_not = f"cannot make a cgroup: {exc}"
            if group is None and request.contain == "cgroup":
                raise KernelStartupError(f"contain='cgroup' but {why_not or 'no cgroups'}")
        read_end = write_end = None
        stdio: list[tuple[int, int]] = []
        if request.capture_stderr:
            read_end, write_end = os.pipe()
            stdio.append((2, write_end))
        else:
            stdio.append((2, 2))
        stdio.append((1, request.stdout if request.stdout is not None else 1))
        try:
            pid = template.spawn(plan, request, env, stdio)
        except BaseException as exc:
            if read_end is not None:
                os.close(read_end)
            if group is not None:
                group.remove()
            if isinstance(exc, _TemplateGone):
                raise KernelStartupError(
                    "the fork server died while starting the kernel; the next start uses a "
                    f"fresh one ({template.stderr_tail() or 'no output'})") from None
            raise
        finally:
            if write_end is not None:
                os.close(write_end)
        if group is not None:
            try:
                group.attach(pid)
            except OSError as exc:
                group.remove()
                group, why_not = None, f"cannot join the kernel's cgroup: {exc}"
        stderr = open(read_end, "rb", buffering=0) if read_end is not None else None  # noqa: SIM115
        handle = ForkedProcess(template, pid, stderr, request, on_exit=on_exit, cgroup=group,
                               token=token, fallback_reason=why_not)
        template.adopt(pid, handle)
        self.forks += 1
        return handle

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

import asyncio
import os
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from supervisor._log import get_logger
from supervisor.errors import KernelStartupError
from supervisor.launchers import tree
from supervisor.launchers.base import ExitStatus, LaunchRequest
from supervisor.launchers.cgroups import KernelCgroup
from supervisor.launchers.local import LocalLauncher, LocalProcess
from supervisor.launchers.templates import ForkPlan, Template, TemplateGone, plan_fork

__all__ = ["ForkPlan", "ForkServerLauncher", "ForkedProcess", "Template", "plan_fork"]

log = get_logger("supervisor.launchers.forkserver")


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Child:
    """The part of a Popen a LocalProcess reads, for a kernel the template forked."""

    def __init__(self, pid: int, stderr: Any) -> None:
        self.pid = pid
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the kernel has exited (a pidfd: it is not our child to reap)."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:  # gone already
            return self.returncode
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        finally:
            os.close(fd)
        return self.returncode


class ForkedProcess(LocalProcess):
    """A kernel forked by a template: contained, limited and ended like an exec'd one.

    Its exit comes from the template (:meth:`relay`), or, if the template
    died first, from its own pidfd (:meth:`orphaned`).
    """

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
        self.launch_note = f"forked by the fork server (template pid {template.pid})"

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
            if template is not None and (not template.alive() or template.retired or (
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
        if isinstance(plan, str) or request.independent or not hasattr(os, "pidfd_open"):
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
        if request.independent:
            return self._fall_back(request, on_exit, "an independent kernel must be able to "
                                   "outlive us, and a forked one dies with its template")
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
        out = request.stdout if request.stdout is not None else 1
        stdio: list[tuple[int, int]] = [(1, out)]
        if request.capture_stderr:
            read_end, write_end = os.pipe()
            stdio.append((2, write_end))
        elif request.stderr == subprocess.STDOUT:
            stdio.append((2, out))
        else:
            stdio.append((2, request.stderr if request.stderr is not None else 2))
        # DEVNULL (a negative number) or a closed descriptor: /dev/null in the kernel
        stdio = [(target, fd) for target, fd in stdio if _valid(fd)]
        try:
            pid = template.spawn(plan, request, env, stdio)
        except BaseException as exc:
            if read_end is not None:
                os.close(read_end)
            if group is not None:
                group.remove()
            if isinstance(exc, TemplateGone):
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

"""Reliability: no orphans, no leaks, races with one outcome, bad input, restart storms.

Every test here runs real kernel processes (tests/kernels/fakekernel.py, and
ipykernel where it matters), waits on events (pidfds, inotify, lifecycle
events, log records) with deadlines, and proves it left no process and no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import gc
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from conftest import FAKE_KERNEL, Events, fake_spec, kernel_descendants, pid_gone

from supervisor._log import capture_logs
from supervisor.client import KernelClient
from supervisor.connection import ConnectionInfo, new_key, runtime_dir
from supervisor.errors import (
    KernelSpecError,
    KernelStartupError,
    KernelStateError,
    SupervisorError,
)
from supervisor.events import KernelEvent
from supervisor.kernel import KernelActor, LaunchOptions, Start
from supervisor.manager import KernelManager
from supervisor.policy import Backoff, RestartPolicy
from supervisor.supervisor import Supervisor
from supervisor.wire import Session

ROOT = Path(__file__).resolve().parents[1]
QUIET = LaunchOptions(forward_stderr=False, startup_timeout=20, shutdown_wait=1, terminate_wait=1)
NO_WAIT = Backoff(initial=0.01, maximum=0.05, jitter=0.0)
IPY_ARGS = ("--HistoryManager.hist_file=:memory:",)


# -- waiting on events, never sleeping ----------------------------------------------------------
async def apid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Async :func:`pid_gone`: wait on a pidfd through the running loop (which stays free)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_libc = ctypes.CDLL(None, use_errno=True)


class DirWatch:
    """inotify on one directory: wait (blocking or async) until a condition on it holds.

    Every file created, written, renamed or deleted there wakes the waiter, which then
    re-checks the condition; nothing polls.
    """

    MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE

    def __init__(self, path: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), self.MASK) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path} failed")

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 65536)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Block until ``condition()``; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                return condition()
            self._drain()
        return True

    async def await_(self, condition: Callable[[], bool], timeout: float) -> None:
        """Wait on the running loop until ``condition()``; TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_readable() -> None:
            self._drain()
            changed.set()

        async def until() -> None:
            while True:
                changed.clear()
                if condition():
                    return
                await changed.wait()

        loop.add_reader(self.fd, on_readable)
        try:
            await asyncio.wait_for(until(), timeout)
        finally:
            loop.remove_reader(self.fd)


async def wait_for_file(path: Path, timeout: float = 10.0,
                        accept: Callable[[str], bool] = bool) -> str:
    """Wait until ``path`` exists with text that ``accept`` likes; return the text."""
    found: list[str] = []

    def ready() -> bool:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return False
        if accept(text):
            found.append(text)
            return True
        return False

    with DirWatch(path.parent) as watch:
        await watch.await_(ready, timeout)
    return found[-1]


async def read_pids(path: Path, not_before: list[int] | None = None) -> list[int]:
    """The pids a fake kernel wrote to ``--pid-file`` (waiting for a new file if asked)."""
    old = "".join(f"{p}\n" for p in not_before or [])
    text = await wait_for_file(path, 10, lambda t: bool(t.strip()) and t != old)
    return [int(x) for x in text.split()]


class LogWatch:
    """A structlog processor (for ``capture_logs(processors=...)``) one can await."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, logger: object, method: str, event_dict: Any) -> Any:
        self.entries.append(dict(event_dict))
        self._changed.set()
        return event_dict

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1,
                       timeout: float = 10) -> list[dict[str, Any]]:
        async def matching() -> list[dict[str, Any]]:
            while True:
                found = [e for e in self.entries if predicate(e)]
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(matching(), timeout)


def sup(**kw: Any) -> Supervisor:
    kw.setdefault("launch", QUIET)
    return Supervisor(**kw)


def runtime_files() -> set[str]:
    """Names in the suite's runtime dir (connection files and ipc sockets live there)."""
    path = runtime_dir()
    return set(os.listdir(path)) if path.exists() else set()


@contextlib.contextmanager
def leaves_nothing() -> Iterator[None]:
    """Prove the block leaves the runtime dir as it found it and no kernel process behind."""
    before = runtime_files()
    yield
    assert runtime_files() == before, f"files left: {runtime_files() - before}"
    assert not kernel_descendants(), f"processes left: {kernel_descendants()}"


# == 1. no orphans ==============================================================================
@pytest.mark.parametrize("now", [False, True], ids=["graceful", "now"])
async def test_shutdown_leaves_no_kernel_grandchild_or_file(tmp_path: Path, now: bool) -> None:
    """shutdown_kernel (graceful or now=True) kills the kernel and its grandchild, removes the file."""
    pid_file = tmp_path / "pids"
    with leaves_nothing():
        async with sup() as s:
            kid = await s.start_kernel(spec=fake_spec("--spawn-grandchild", "--pid-file",
                                                      str(pid_file)))
            kernel, grandchild = await read_pids(pid_file)
            assert s.actor_of(kid).pid == kernel
            conn = s.actor_of(kid).connection_file
            assert conn.exists()
            await s.shutdown_kernel(kid, now=now)
            assert await apid_gone(kernel) and await apid_gone(grandchild)
            assert not conn.exists() and kid not in s


async def test_restart_leaves_no_old_kernel_or_grandchild(tmp_path: Path) -> None:
    """A manual restart (graceful, then now=True) leaves nothing of the replaced kernels."""
    pid_file = tmp_path / "pids"
    with leaves_nothing():
        async with sup() as s:
            kid = await s.start_kernel(spec=fake_spec("--spawn-grandchild", "--pid-file",
                                                      str(pid_file)))
            first = await read_pids(pid_file)
            await s.restart_kernel(kid)
            second = await read_pids(pid_file, not_before=first)
            assert all([await apid_gone(p) for p in first])
            await s.restart_kernel(kid, now=True)
            third = await read_pids(pid_file, not_before=second)
            assert all([await apid_gone(p) for p in second])
            assert s.actor_of(kid).pid == third[0]
        assert all([await apid_gone(p) for p in third])


async def test_crash_with_autorestart_leaves_no_grandchild(tmp_path: Path) -> None:
    """SIGKILL of a kernel: its orphaned grandchild is killed, the restarted one runs, and
    closing the supervisor ends it too."""
    pid_file = tmp_path / "pids"
    events = Events()
    with leaves_nothing():
        async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec("--spawn-grandchild", "--pid-file",
                                                      str(pid_file)))
            old = await read_pids(pid_file)
            os.kill(old[0], signal.SIGKILL)
            await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == kid)
            new = await read_pids(pid_file, not_before=old)
            assert await apid_gone(old[0]) and await apid_gone(old[1])
            assert s.actor_of(kid).is_alive() and s.actor_of(kid).pid == new[0]
        assert await apid_gone(new[0]) and await apid_gone(new[1])


@pytest.mark.parametrize("now", [False, True], ids=["graceful", "now"])
async def test_closing_a_supervisor_mid_start_leaves_nothing(tmp_path: Path, now: bool) -> None:
    """close() with two ready kernels and two still starting (--slow-start 30): the starts fail
    KernelStartupError, and no kernel, grandchild or connection file remains."""
    files = [tmp_path / f"pids{i}" for i in range(4)]
    with leaves_nothing():
        s = sup()
        s.start()
        for f in files[:2]:
            await s.start_kernel(spec=fake_spec("--spawn-grandchild", "--pid-file", str(f)))
        starting = [asyncio.ensure_future(s.start_kernel(spec=fake_spec(
            "--slow-start", "30", "--spawn-grandchild", "--pid-file", str(f)))) for f in files[2:]]
        pids = [p for f in files for p in await read_pids(f)]  # the slow ones are in their sleep
        assert len(pids) == 8
        await asyncio.wait_for(s.close(now=now), 15)
        results = await asyncio.gather(*starting, return_exceptions=True)
        assert all(isinstance(r, KernelStartupError) for r in results), results
        assert all([await apid_gone(p) for p in pids])


_SUPERVISE = """
import asyncio, json, os, sys
sys.path.insert(0, {root!r})
from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import KernelSpec
from supervisor.process import reaper_pid
from supervisor.supervisor import Supervisor

async def main():
    spec = KernelSpec(name="fake", argv={fake_argv!r}, display_name="fake", language="python",
                      resource_dir={resources!r})
    s = Supervisor(launch=LaunchOptions(forward_stderr=False, startup_timeout=60))
    s.start()
    kids = await asyncio.gather(
        s.start_kernel("python3", extra_arguments={ipy_args!r}),
        s.start_kernel("python3", extra_arguments={ipy_args!r}),
        s.start_kernel(spec=spec))
    with open({pid_file!r}) as f:
        grandchild = int(f.read().split()[1])
    with open({report!r} + ".tmp", "w") as f:
        json.dump({{
            "kernels": [s.actor_of(k).pid for k in kids],
            "files": [s.actor_of(k).connection_file.name for k in kids],
            "grandchild": grandchild,
            "reaper": reaper_pid(),
        }}, f)
    os.replace({report!r} + ".tmp", {report!r})
    # Wait for our stdin to close, then leave without closing the supervisor.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_the_supervising_process_dying_leaves_no_process(tmp_path: Path, how: str) -> None:
    """When a process supervising 2 ipykernels and a fake kernel with a grandchild is killed
    with SIGKILL, or exits without closing its supervisor, every kernel and the grandchild die
    (the reaper sidecar kills their groups) and no connection file is left (the reaper deletes
    the files of the kernels it kills; a normal exit removes them itself)."""
    runtime = tmp_path / "runtime"
    pid_file = tmp_path / "pids"
    fake_argv = (sys.executable, str(FAKE_KERNEL), "-f", "{connection_file}",
                 "--spawn-grandchild", "--pid-file", str(pid_file))
    script = tmp_path / "supervise.py"
    report_file = tmp_path / "report.json"
    output = tmp_path / "output.txt"  # the script's (and its kernels') stdout and stderr
    script.write_text(_SUPERVISE.format(root=str(ROOT), fake_argv=fake_argv,
                                        resources=str(FAKE_KERNEL.parent), ipy_args=IPY_ARGS,
                                        pid_file=str(pid_file), report=str(report_file)))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime),
           "IPYTHONDIR": str(tmp_path / "ipython")}
    with DirWatch(tmp_path) as watch:
        with open(output, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        assert proc.stdin is not None
        try:
            # the report appears, or the script dies (closing output.txt wakes us too)
            watch.wait(lambda: report_file.exists() or proc.poll() is not None, 60)
            assert report_file.exists(), f"no report:\n{output.read_text()[-3000:]}"
            report = json.loads(report_file.read_text())
            if how == "exit":
                proc.stdin.close()
                assert proc.wait(30) == 0, output.read_text()[-3000:]
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()
    victims = [*report["kernels"], report["grandchild"], report["reaper"]]
    assert all(pid_gone(pid, 10) for pid in victims), [p for p in victims if not pid_gone(p, 0)]
    left = sorted(os.listdir(runtime))
    print(f"\nruntime dir after the supervisor's {how}: {left}")
    assert report["files"] and left == []  # the reaper exits only after deleting them


# == 2. no leaks ================================================================================
@dataclass(frozen=True)
class Usage:
    """What a process holds that a start/shutdown cycle must give back."""

    fds: int
    zmq_sockets: int  # every live (not closed) zmq socket object, found through the gc
    context_sockets: int  # sockets of the shared zmq.asyncio context the actors use
    threads: int
    tasks: int
    runtime: frozenset[str]

    @classmethod
    def now(cls) -> Usage:
        gc.collect()
        sockets = sum(1 for obj in gc.get_objects()
                      if isinstance(obj, zmq.Socket) and not obj.closed)
        shared = zmq.asyncio.Context.instance()._sockets  # pyzmq keeps a WeakSet
        return cls(fds=len(os.listdir("/proc/self/fd")), zmq_sockets=sockets,
                   context_sockets=sum(1 for sock in shared if not sock.closed),
                   threads=threading.active_count(), tasks=len(asyncio.all_tasks()),
                   runtime=frozenset(runtime_files()))


FD_SLACK = 4  # fds that may come and go for reasons of their own (asyncio, logging)


async def _cycles(spec_or_name: Any, count: int, **kw: Any) -> tuple[Usage, Usage, Usage]:
    """Start, talk to and shut down a kernel ``count`` times; usage before, during (one
    kernel up with a client connected) and after."""
    start_kw: dict[str, Any] = dict(kw)
    if isinstance(spec_or_name, str):
        start_kw["kernel_name"] = spec_or_name
    else:
        start_kw["spec"] = spec_or_name
    during: list[Usage] = []

    async with sup() as s:
        async def one() -> None:
            kid = await s.start_kernel(**start_kw)
            kc = s.get_kernel(kid).client()
            kc.start_channels()  # all five channels, the heartbeat too
            try:
                reply = await kc.kernel_info(reply=True, timeout=20)
                assert reply["content"]["status"] == "ok"
                if not during:
                    during.append(Usage.now())
            finally:
                kc.stop_channels()
            await s.shutdown_kernel(kid)

        await one()  # warm-up: the reaper sidecar, the shared zmq context, lazy imports
        before = Usage.now()
        for _ in range(count):
            await one()
        after = Usage.now()
    return before, during[0], after


def _report(label: str, count: int, before: Usage, during: Usage, after: Usage) -> None:
    print(f"\n{label}: {count} cycles (before -> with a kernel up -> after): fds "
          f"{before.fds} -> {during.fds} -> {after.fds}, live zmq sockets {before.zmq_sockets} "
          f"-> {during.zmq_sockets} -> {after.zmq_sockets} (shared context "
          f"{before.context_sockets} -> {during.context_sockets} -> {after.context_sockets}), "
          f"threads {before.threads} -> {after.threads}, tasks {before.tasks} -> {after.tasks}, "
          f"runtime files {len(before.runtime)} -> {len(during.runtime)} -> {len(after.runtime)}")


def _check_no_leak(before: Usage, during: Usage, after: Usage) -> None:
    # the counters do see what a running kernel and a connected client hold
    assert during.zmq_sockets >= 6 and during.context_sockets >= 2 and during.fds > before.fds
    assert after.fds - before.fds <= FD_SLACK, (before, after)
    assert after.zmq_sockets <= before.zmq_sockets, (before, after)
    assert after.context_sockets <= before.context_sockets, (before, after)
    assert after.threads <= before.threads + 1, (before, after)
    assert after.tasks <= before.tasks, (before, after)
    assert after.runtime == before.runtime, (before, after)


async def test_twenty_cycles_with_the_fake_kernel_leak_nothing() -> None:
    """20 start/kernel_info/shutdown cycles leave fds (slack 4), live zmq sockets (all, and the
    shared context's), threads, tasks and the runtime dir as they were."""
    count = 20
    before, during, after = await _cycles(fake_spec(), count)
    _report("fake kernel", count, before, during, after)
    _check_no_leak(before, during, after)


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_two_hundred_cycles_with_ipykernel_leak_nothing() -> None:
    """200 start/kernel_info/shutdown cycles of ipykernel leak no fd, socket, thread or file."""
    faulthandler.cancel_dump_traceback_later()  # longer than faulthandler_timeout, on purpose
    count = 200
    before, during, after = await _cycles("python3", count, extra_arguments=IPY_ARGS)
    _report("ipykernel", count, before, during, after)
    _check_no_leak(before, during, after)


async def test_stop_channels_ends_the_heartbeat_task() -> None:
    """stop_channels right after the first pong came back (before the heartbeat task resumed)
    still ends the heartbeat task instead of leaving it pinging."""
    async with sup() as s:
        kid = await s.start_kernel(spec=fake_spec())
        ctx = zmq.asyncio.Context()
        tasks: list[asyncio.Task[None]] = []
        try:
            for _ in range(3):
                kc = s.get_kernel(kid).client(context=ctx)
                kc.start_channels(shell=False, iopub=False, stdin=False, control=False)
                task = kc.hb_channel._task
                assert task is not None
                tasks.append(task)
                await _until_resumable(task)
                kc.stop_channels()
            _, pending = await asyncio.wait(tasks, timeout=1.5)
        finally:
            await _finish_tasks(tasks)
            ctx.destroy(linger=0)
        # ended = cancelled, or returned; not still pinging, not failed
        outlived = [t for t in tasks if t in pending or (not t.cancelled() and t.exception())]
        assert not outlived, f"{len(outlived)} of {len(tasks)} heartbeat tasks outlived the client"


async def _until_resumable(task: asyncio.Task[None]) -> None:
    """Yield loop turns (no timer) until what ``task`` awaits has completed but the task has
    not resumed yet: for a fresh heartbeat task, its first pong has just been received."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if waiter is not None and waiter.done():
            return
        assert loop.time() < deadline, "no pong within 10 s"
        await asyncio.sleep(0)


async def _finish_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel until every task is done (a cancel may be swallowed), and retrieve outcomes."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=2)
    for task in tasks:
        if not task.cancelled():
            task.exception()


# == 3. races ===================================================================================
async def test_restart_queued_behind_a_shutdown_starts_the_kernel_again() -> None:
    """shutdown_kernel then restart_kernel at once: both succeed, in that order, and the
    kernel runs again (a new process; the old one is gone)."""
    events = Events()
    with leaves_nothing():
        async with sup() as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec())
            old = s.actor_of(kid).pid
            assert old is not None
            shutdown = asyncio.ensure_future(s.shutdown_kernel(kid))
            restart = asyncio.ensure_future(s.restart_kernel(kid))
            await asyncio.wait_for(asyncio.gather(shutdown, restart), 20)
            assert await apid_gone(old)
            actor = s.actor_of(kid)
            assert kid in s and actor.state == "running" and actor.pid not in (None, old)
            assert events.kinds(kid)[-2:] == ["restarting", "restarted"]


async def test_shutdown_queued_behind_a_restart_cancels_its_start() -> None:
    """restart_kernel then shutdown_kernel at once: the restart fails 'cancelled'
    (KernelStartupError), the shutdown wins, and nothing is restarted by policy."""
    events = Events()
    with leaves_nothing():
        async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec())
            old = s.actor_of(kid).pid
            assert old is not None
            restart = asyncio.ensure_future(s.restart_kernel(kid))
            shutdown = asyncio.ensure_future(s.shutdown_kernel(kid))
            results = await asyncio.wait_for(
                asyncio.gather(restart, shutdown, return_exceptions=True), 20)
            assert isinstance(results[0], KernelStartupError) and "cancelled" in str(results[0])
            assert results[1] is None
            assert kid not in s and await apid_gone(old)
            assert events.kinds(kid)[-1] == "shutdown" and "restarted" not in events.kinds(kid)


async def test_interrupt_during_start_runs_once_the_kernel_is_ready() -> None:
    """An interrupt asked while the kernel starts waits for readiness, then is delivered."""
    events = Events()
    async with sup() as s:
        s.subscribe(events)
        start = asyncio.ensure_future(s.start_kernel(kernel_id="k",
                                                     spec=fake_spec("--slow-start", "0.5")))
        await events.wait_for(lambda e: e.kind == "starting")
        assert s.child_status("k") == "starting"
        await asyncio.wait_for(s.interrupt_kernel("k"), 10)
        assert await asyncio.wait_for(start, 10) == "k"
        await events.wait_for(lambda e: e.kind == "interrupted")
        assert events.kinds("k") == ["starting", "ready", "interrupted"]


async def test_interrupt_during_a_failing_start_is_a_state_error() -> None:
    """An interrupt queued behind a start that fails raises KernelStateError, not a hang."""
    events = Events()
    with leaves_nothing():
        async with sup() as s:
            s.subscribe(events)
            start = asyncio.ensure_future(s.start_kernel(kernel_id="k",
                                                         spec=fake_spec("--crash-on-start")))
            await events.wait_for(lambda e: e.kind == "starting")
            results = await asyncio.wait_for(
                asyncio.gather(start, s.interrupt_kernel("k"), return_exceptions=True), 10)
            assert isinstance(results[0], KernelStartupError) and results[0].exit_code == 3
            assert isinstance(results[1], KernelStateError)
            assert "k" not in s and events.kinds("k") == ["starting", "dead"]


async def test_restart_during_start_settles_the_start() -> None:
    """restart_kernel while start_kernel is pending: once the restart is done, the start call
    has returned too (the kernel id, or a typed error; it must not hang)."""
    events = Events()
    start: asyncio.Future[str] | None = None
    try:
        async with sup() as s:
            s.subscribe(events)
            start = asyncio.ensure_future(s.start_kernel(kernel_id="k",
                                                         spec=fake_spec("--slow-start", "0.5")))
            await events.wait_for(lambda e: e.kind == "starting")
            await asyncio.wait_for(s.restart_kernel("k"), 10)
            assert s.child_status("k") == "ready" and s.actor_of("k").is_alive()
            done, _ = await asyncio.wait({start}, timeout=1)  # a bounded wait: it should be done
            assert start in done, "start_kernel() still pending after the restart finished"
            error = start.exception()  # the kernel id or a typed refusal; anything but a hang
            assert (error is None and start.result() == "k") or isinstance(error, SupervisorError)
    finally:
        if start is not None:  # closing the supervisor settles it at the latest
            await asyncio.gather(start, return_exceptions=True)


async def test_shutdown_all_during_pending_restarts(tmp_path: Path) -> None:
    """shutdown_all while two kernels wait out a 30 s backoff and a third is mid-way through
    an automatic restart: it returns at once, nothing is restarted, nothing is left, and the
    supervisor still starts kernels afterwards."""
    events = Events()
    pid_file = tmp_path / "pids"
    slow = RestartPolicy(backoff=Backoff(initial=30, maximum=30, jitter=0))
    quick = RestartPolicy(backoff=NO_WAIT)
    with leaves_nothing():
        async with sup() as s:
            s.subscribe(events)
            waiting = [await s.start_kernel(spec=fake_spec(), policy=slow) for _ in range(2)]
            busy = await s.start_kernel(policy=quick, spec=fake_spec(
                "--slow-start", "1", "--pid-file", str(pid_file)))
            first = await read_pids(pid_file)
            pids = [s.actor_of(k).pid or 0 for k in waiting] + first
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            await events.wait_for(lambda e: e.kind == "restarting", count=3)
            pids += await read_pids(pid_file, not_before=first)  # busy is restarting now
            assert s.child_status(busy) == "restarting"
            t0 = time.monotonic()
            await asyncio.wait_for(s.shutdown_all(), 20)
            assert time.monotonic() - t0 < 15  # not the 30 s backoff
            assert len(s) == 0 and "restarted" not in events.kinds()
            assert all([await apid_gone(p) for p in pids])
            assert events.kinds().count("shutdown") == 3
            kid = await s.start_kernel(spec=fake_spec())
            assert s.actor_of(kid).is_alive()


async def test_restart_during_shutdown_all_is_refused_or_kept() -> None:
    """A restart asked while shutdown_all is stopping that kernel either fails, or wins and the
    kernel is kept; it is never reported done for a kernel the supervisor then drops."""
    restarts: list[asyncio.Future[None]] = []
    actors: list[KernelActor] = []
    try:
        async with sup(strategy="one_for_all", launch=QUIET.replace(shutdown_wait=0.5)) as s:
            await s.start_kernel(kernel_id="a", spec=fake_spec("--ignore-shutdown"))
            await s.start_kernel(kernel_id="b", spec=fake_spec())
            actor = s.actor_of("a")
            actors.append(actor)

            async def on_event(event: KernelEvent) -> None:
                # one_for_all stops in reverse order, one by one: b is done, a is being
                # stopped (it ignores shutdown_request, so that takes shutdown_wait=0.5 s).
                if event.kind == "shutdown" and event.kernel_id == "b":
                    restarts.append(asyncio.ensure_future(s.restart_kernel("a")))

            s.subscribe(on_event)
            await asyncio.wait_for(s.shutdown_all(), 10)
            assert len(restarts) == 1
            (outcome,) = await asyncio.wait_for(
                asyncio.gather(*restarts, return_exceptions=True), 10)
            kept = "a" in s and actor.is_alive()
            assert isinstance(outcome, SupervisorError) or kept, (
                f"restart_kernel returned {outcome!r}, but 'a' in supervisor: {'a' in s}, "
                f"its actor is {actor.actor_state} with a live kernel: {actor.is_alive()}")
    finally:  # the supervisor is closed: a dropped actor must still be waited for
        await asyncio.gather(*restarts, return_exceptions=True)
        for dropped in actors:
            await asyncio.wait_for(dropped.join(), 10)


async def test_no_unretrieved_exceptions_when_closing_during_an_automatic_restart(
        tmp_path: Path) -> None:
    """Closing a supervisor while it restarts a kernel by policy leaves no internal future
    with an exception nobody retrieved (asyncio would log 'never retrieved')."""
    pid_file = tmp_path / "pids"
    reports: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        events = Events()
        async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec("--slow-start", "1", "--pid-file",
                                                      str(pid_file)))
            first = await read_pids(pid_file)
            os.kill(first[0], signal.SIGKILL)
            await read_pids(pid_file, not_before=first)  # the automatic restart is under way
            assert s.child_status(kid) == "restarting"
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    never = [f"{r.get('message')}: {r.get('exception')!r}" for r in reports
             if "never retrieved" in str(r.get("message", ""))]
    assert not never, never


def _expected_outcomes(ops: list[str]) -> list[type[BaseException] | None]:
    """The documented outcome of each op when all are queued at once to one running kernel.

    The actor takes them in order. A queued shutdown cancels every start queued before it
    (a restart stops the kernel, then its start fails 'cancelled'); interrupts and signals
    need a running kernel.
    """
    running = True
    shutdowns_left = ops.count("shutdown")
    out: list[type[BaseException] | None] = []
    for op in ops:
        if op in ("interrupt", "signal"):
            out.append(None if running else KernelStateError)
        elif op.startswith("restart"):
            running = shutdowns_left == 0
            out.append(None if running else KernelStartupError)
        else:
            shutdowns_left -= 1
            running = False
            out.append(None)
    return out


@pytest.mark.parametrize("last", ["shutdown", "restart"])
async def test_many_tasks_conflicting_on_one_kernel(last: str) -> None:
    """40 tasks issue restart/interrupt/signal/shutdown to one kernel at once (seeded order):
    each gets exactly its documented outcome, nothing hangs, and the last op decides the end
    state (removed with no process, or running and answering)."""
    rng = random.Random(f"tasks-{last}")
    kinds = ["restart", "restart_now", "interrupt", "signal", "signal", "interrupt", "shutdown"]
    ops = [rng.choice(kinds) for _ in range(39)] + [last]
    expected = _expected_outcomes(ops)
    events = Events()
    with leaves_nothing():
        async with sup() as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec())
            first = s.actor_of(kid).pid

            def call(op: str) -> Any:
                if op.startswith("restart"):
                    return s.restart_kernel(kid, now=op == "restart_now")
                if op == "interrupt":
                    return s.interrupt_kernel(kid)
                if op == "signal":
                    return s.signal_kernel(kid, signal.SIGWINCH)  # ignored by the kernel
                return s.shutdown_kernel(kid)

            results = await asyncio.wait_for(
                asyncio.gather(*(call(op) for op in ops), return_exceptions=True), 30)
            got = [None if r is None else type(r) for r in results]
            assert got == expected, list(zip(ops, got, expected, strict=True))
            if last == "shutdown":
                assert kid not in s and first is not None and await apid_gone(first)
            else:
                assert s.child_status(kid) == "ready"
                kc = s.get_kernel(kid).client()
                kc.start_channels(hb=False)
                try:
                    reply = await kc.kernel_info(reply=True, timeout=10)
                    assert reply["content"]["status"] == "ok"
                finally:
                    kc.stop_channels()
            manual = [e for e in events.seen if e.kind == "restarting" and e.manual]
            assert len(manual) == sum(op.startswith("restart") for op in ops)


async def test_every_completed_request_is_reported() -> None:
    """Requests that overlap all complete and are all reported: an interrupt and a signal
    followed by a restart, then two restarts at once (two 'restarted', restart_count 2)."""
    events = Events()
    problems: list[str] = []
    async with sup() as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec())
        results = await asyncio.wait_for(asyncio.gather(
            s.interrupt_kernel(kid), s.signal_kernel(kid, signal.SIGWINCH),
            s.restart_kernel(kid)), 20)
        assert results == [None, None, None]
        await events.wait_for(lambda e: e.kind == "restarted")
        for kind in ("interrupted", "signalled"):
            if kind not in events.kinds(kid):
                problems.append(f"a delivered request has no {kind!r} event")
        before = s.get_kernel(kid).restart_count
        assert await asyncio.wait_for(asyncio.gather(
            s.restart_kernel(kid), s.restart_kernel(kid)), 20) == [None, None]
        with contextlib.suppress(asyncio.TimeoutError):  # a bounded wait for the last event
            await events.wait_for(lambda e: e.kind == "restarted", count=3, timeout=2)
        if events.kinds(kid).count("restarted") != 3:
            problems.append(f"{events.kinds(kid).count('restarted')} 'restarted' events for 3")
        after = s.get_kernel(kid).restart_count
        if after - before != 2:
            problems.append(f"two completed restarts counted as {after - before}")
    assert not problems, problems


def test_many_threads_conflicting_on_one_blocking_manager() -> None:
    """8 threads x 6 random requests (restart, interrupt, signal, shutdown, is_alive) on one
    KernelManager: every call returns or raises a typed SupervisorError, none hangs, and the
    manager ends consistent with nothing left behind."""
    before = runtime_files()
    with leaves_nothing():
        km = KernelManager(spec=fake_spec(), **{"forward_stderr": False, "shutdown_wait": 1,
                                                "terminate_wait": 1})
        km.start_kernel()
        barrier = threading.Barrier(8)
        outcomes: Counter[str] = Counter()
        unexpected: list[BaseException] = []
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            barrier.wait(10)
            for _ in range(6):
                op = rng.choices(["restart", "restart_now", "interrupt", "signal", "alive",
                                  "shutdown"], weights=[3, 2, 3, 3, 2, 1])[0]
                try:
                    if op.startswith("restart"):
                        km.restart_kernel(now=op == "restart_now")
                    elif op == "interrupt":
                        km.interrupt_kernel()
                    elif op == "signal":
                        km.signal_kernel(signal.SIGWINCH)
                    elif op == "alive":
                        km.is_alive()
                    else:
                        km.shutdown_kernel(now=rng.random() < 0.5)
                    result = "ok"
                except SupervisorError as exc:
                    result = type(exc).__name__
                except BaseException as exc:  # reported by the assertion below
                    with lock:
                        unexpected.append(exc)
                    continue
                with lock:
                    outcomes[f"{op}:{result}"] += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not [t for t in threads if t.is_alive()], "a request hung"
        assert not unexpected, unexpected
        print(f"\nthread outcomes: {dict(sorted(outcomes.items()))}")
        assert sum(outcomes.values()) == 48
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        assert not km.has_kernel and not km.is_alive()
        # Nothing may outlive the manager; give a process that is being killed time to go.
        assert all(pid_gone(proc.pid, 10) for proc in kernel_descendants())
        with DirWatch(runtime_dir()) as watch:
            assert watch.wait(lambda: runtime_files() == before, 10), runtime_files()


@pytest.mark.parametrize("when", ["stopping", "starting"])
async def test_kernel_dying_during_a_manual_restart(tmp_path: Path, when: str) -> None:
    """A kernel killed in the middle of restart_kernel: while the old one is being stopped the
    restart just goes on (no 'exited' event, no waiting out shutdown_wait); while the new one
    starts, restart_kernel raises KernelStartupError(SIGKILL) and the policy restarts it."""
    events = Events()
    pid_file = tmp_path / "pids"
    with leaves_nothing():
        async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
            s.subscribe(events)
            if when == "stopping":
                kid = await s.start_kernel(spec=fake_spec("--ignore-shutdown"), shutdown_wait=30)
                old = s.actor_of(kid).pid or 0
                restart = asyncio.ensure_future(s.restart_kernel(kid))
                await events.wait_for(lambda e: e.kind == "restarting")
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)
                await asyncio.wait_for(restart, 10)
                assert time.monotonic() - t0 < 15  # not the 30 s shutdown_wait
                assert await apid_gone(old) and s.actor_of(kid).pid != old
                assert events.kinds(kid) == ["starting", "ready", "restarting", "restarted"]
                await s.close(now=True)  # the new kernel ignores shutdown_request too
                return
            else:
                kid = await s.start_kernel(spec=fake_spec())
                restart = asyncio.ensure_future(s.restart_kernel(kid, spec=fake_spec(
                    "--slow-start", "1", "--pid-file", str(pid_file))))
                new, = await read_pids(pid_file)
                os.kill(new, signal.SIGKILL)
                with pytest.raises(KernelStartupError) as err:
                    await asyncio.wait_for(restart, 10)
                assert err.value.signal == signal.SIGKILL
                await events.wait_for(lambda e: e.kind == "restarted" and not e.manual)
                assert events.kinds(kid) == ["starting", "ready", "restarting", "exited",
                                             "restarting", "restarted"]
                assert [e.manual for e in events.seen] == [False, False, True, True, False, False]
                assert s.actor_of(kid).is_alive() and s.child_status(kid) == "ready"


# == 4. bad input ===============================================================================
@pytest.mark.parametrize("flag", ["--bad-signature", "--truncated-frames"])
async def test_unverifiable_replies_are_dropped_and_the_start_times_out(flag: str) -> None:
    """A kernel whose replies carry forged signatures (or are cut short) never counts as ready:
    each reply is dropped and counted, the start fails KernelStartupError(timed_out=True), and
    neither process nor connection file is left."""
    watch = LogWatch()
    with leaves_nothing(), capture_logs(processors=[watch]):
        actor = KernelActor(LaunchOptions(spec=fake_spec(flag), startup_timeout=1,
                                          forward_stderr=False))
        actor.start()
        try:
            with pytest.raises(KernelStartupError) as err:
                await actor.ask(Start())
            assert err.value.timed_out and "not ready within 1" in str(err.value)
            assert actor.dropped > 0
            drops = [e for e in watch.entries if e["event"].endswith("dropped_message")]
            assert len(drops) == actor.dropped
            expected = "signature" if flag == "--bad-signature" else "frame"
            assert all(expected in e["reason"].lower() or "delimiter" in e["reason"].lower()
                       or "frames" in e["reason"].lower() for e in drops), drops
            assert actor.pid is not None and await apid_gone(actor.pid)
            assert not actor.connection_file.exists()
        finally:
            actor.stop()
            await actor.join()


async def test_garbage_on_iopub_is_counted_and_harmless() -> None:
    """5 garbage frames before every status message: the kernel still becomes ready and runs
    code, the garbage is counted in KernelActor.dropped and the client's dropped counter,
    and the kernel is never seen as exited."""
    watch = LogWatch()
    events = Events()
    with leaves_nothing(), capture_logs(processors=[watch]):
        async with sup() as s:
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec("--garbage-iopub", "5"))
            kc = s.get_kernel(kid).client()
            kc.start_channels(hb=False)
            try:
                await kc.wait_for_ready(timeout=10)
                output: list[str] = []
                reply = await kc.execute_interactive(
                    "print('still fine')", timeout=10, allow_stdin=False,
                    output_hook=lambda m: output.append(m["content"].get("text", "")))
                assert reply["content"]["status"] == "ok" and "".join(output) == "still fine\n"
                # busy and idle of the execute each came after 5 garbage messages
                assert sum(kc.dropped.values()) >= 10, kc.dropped
                assert set(kc.dropped) <= {"frame", "signature"}
            finally:
                kc.stop_channels()
            mine = await watch.wait_for(lambda e: e["event"].endswith("dropped_message")
                                        and e.get("kernel_id") == kid, count=10)
            assert s.actor_of(kid).dropped >= len(mine) >= 10
            assert s.actor_of(kid).state == "running" and "exited" not in events.kinds(kid)


async def test_replayed_forged_and_truncated_messages_to_a_client_are_dropped() -> None:
    """On a socket the test binds, a replayed copy, a message signed with another key and a
    truncated one are dropped and counted by reason, while the messages around them arrive."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        key = new_key()
        kc = KernelClient(ConnectionInfo(iopub_port=port, key=key))
        kc.start_channels(shell=False, stdin=False, control=False, hb=False)
        try:
            subscription = await asyncio.wait_for(pub.recv(), 10)
            assert subscription[:1] == b"\x01"
            ours, theirs = Session(key), Session(b"not-the-key")

            def stream(session: Session, text: str) -> list[bytes]:
                return session.serialize(session.msg("stream", {"name": "stdout", "text": text}))

            once = stream(ours, "once\n")
            for frames in (once, once, stream(theirs, "forged\n"), stream(ours, "cut\n")[:3],
                           stream(ours, "after\n")):
                await pub.send_multipart(frames)
            texts = [(await kc.get_iopub_msg(timeout=10))["content"]["text"] for _ in range(2)]
            assert texts == ["once\n", "after\n"]
            assert kc.dropped == Counter({"replay": 1, "signature": 1, "frame": 1})
        finally:
            kc.stop_channels()
    finally:
        pub.close(linger=0)
        ctx.destroy(linger=0)


BAD_SPECS: dict[str, tuple[str, type[SupervisorError], str | None, str]] = {
    # name: (kernel.json text, error, field named, text in the message)
    "bad-exe": (json.dumps({"argv": ["/nonexistent/kernel-exe", "-f", "{connection_file}"],
                            "display_name": "bad exe", "language": "python"}),
                KernelStartupError, None, "not found"),
    "bad-noargv": (json.dumps({"display_name": "no argv", "language": "python"}),
                   KernelSpecError, "argv", "is missing"),
    "bad-emptyargv": (json.dumps({"argv": [], "display_name": "empty", "language": "python"}),
                      KernelSpecError, "argv", "non-empty"),
    "bad-json": ('{"argv": ["python3", "-f", ', KernelSpecError, None, "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
async def test_broken_kernelspecs_fail_typed_and_leave_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A kernel.json found through JUPYTER_PATH with a missing executable, no argv, an empty
    argv or broken JSON fails start_kernel with a typed error naming the file (and field),
    reports the kernel dead, and leaves no process and no file."""
    text, error, field, words = BAD_SPECS[name]
    kernel_dir = tmp_path / "kernels" / name
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(text)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    events = Events()
    with leaves_nothing():
        async with sup() as s:
            s.subscribe(events)
            with pytest.raises(error) as err:
                await asyncio.wait_for(s.start_kernel(name, kernel_id="k"), 10)
            assert words in str(err.value)
            if isinstance(err.value, KernelSpecError):
                assert err.value.path == str(kernel_dir / "kernel.json")
                assert err.value.path in str(err.value) and err.value.field == field
            await events.wait_for(lambda e: e.kind == "dead")
            assert "k" not in s and events.kinds("k") == ["starting", "dead"]
            assert "start failed" in events.seen[-1].reason


# == 5. restart storms ==========================================================================
async def test_restart_storm_stays_within_the_policy_intensity() -> None:
    """A kernel that exits every 0.2 s under max_restarts=4 within 60 s is restarted exactly
    4 times, then given up; listeners that raise (sync and async) see every event anyway."""
    policy = RestartPolicy(max_restarts=4, within_seconds=60, backoff=NO_WAIT)
    events = Events()
    calls = {"sync": 0, "async": 0}
    sync_saw_dead = threading.Event()

    def raising_sync(event: KernelEvent) -> None:
        calls["sync"] += 1
        if event.kind == "dead":
            sync_saw_dead.set()
        raise RuntimeError("a buggy listener")

    async def raising_async(event: KernelEvent) -> None:
        calls["async"] += 1
        raise ValueError("another buggy listener")

    with leaves_nothing():
        async with sup(policy=policy) as s:
            s.subscribe(raising_sync)
            s.subscribe(raising_async)
            s.subscribe(events)
            kid = await s.start_kernel(spec=fake_spec("--exit-after", "0.2", "--exit-code", "1"))
            await events.wait_for(lambda e: e.kind == "dead", timeout=30)
            assert events.kinds(kid) == (["starting", "ready"]
                                         + ["exited", "restarting", "restarted"] * 4
                                         + ["exited", "gave_up", "dead"])
            restarted = [e for e in events.seen if e.kind == "restarted"]
            assert restarted[-1].at - restarted[0].at < 60 and s.statistics().restarts == 4
            assert [e.restart_count for e in restarted] == [1, 2, 3, 4]
            assert "4 restarts within 60" in events.seen[-2].reason
            assert await asyncio.to_thread(sync_saw_dead.wait, 10)
            assert calls == {"sync": len(events.seen), "async": len(events.seen)}


async def test_concurrent_storms_are_counted_per_kernel() -> None:
    """Three kernels crash-looping at once each get exactly their own 2 restarts."""
    policy = RestartPolicy(max_restarts=2, within_seconds=60, backoff=NO_WAIT)
    events = Events()
    with leaves_nothing():
        async with sup(policy=policy) as s:
            s.subscribe(events)
            kids = await asyncio.gather(*(s.start_kernel(spec=fake_spec(
                "--exit-after", "0.2", "--exit-code", "1")) for _ in range(3)))
            await events.wait_for(lambda e: e.kind == "dead", count=3, timeout=30)
            for kid in kids:
                assert events.kinds(kid).count("restarted") == 2
            assert s.statistics().restarts == 6 and s.statistics().gave_up == 3

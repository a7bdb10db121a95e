"""Cancelled starts, restarts and shutdown waits leave a defined state.

A start whose asker went away (``asyncio.wait_for`` expired, ``task.cancel()``,
Ctrl-C in the blocking face) stops the kernel it began, removes its files and
gives its ports back, and the same actor or manager can start again. Points of
cancellation: before the actor takes the start, once the process exists, while
the kernel is bound but not answering, and (for restarts) mid-restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_KERNEL, fake_spec, kernel_descendants, pid_gone
from test_reliability import read_pids

from supervisor.connection import CHANNELS, reserved_ports, runtime_dir
from supervisor.errors import KernelStartupError
from supervisor.kernel import KernelActor, LaunchOptions, Shutdown, Start
from supervisor.manager import AsyncKernelManager
from supervisor.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]


def _files() -> set[str]:
    return {p.name for p in runtime_dir().iterdir()} if runtime_dir().exists() else set()


def _opts(*flags: str) -> LaunchOptions:
    return LaunchOptions(spec=fake_spec(*flags), forward_stderr=False, startup_timeout=60)


@pytest.mark.parametrize("point", ["queued", "launched", "bound"])
async def test_a_start_whose_asker_went_away_leaves_nothing_and_can_start_again(
        point: str, tmp_path: Path) -> None:
    """Cancelling an actor's Start before it is taken, once the process runs, or while
    the kernel is bound but silent kills what it began, removes its files, frees its
    ports, and the actor then starts a kernel normally."""
    pid_file = tmp_path / "pids"
    flags = {"queued": ("--slow-start", "30"), "launched": ("--slow-start", "30"),
             "bound": ("--never-ready",)}[point]
    before = _files()
    actor = KernelActor(_opts(*flags, "--pid-file", str(pid_file)))
    actor.start()
    try:
        start = actor.ask(Start())
        pid = None
        if point == "queued":
            start.cancel()  # before the actor's coroutine took the message
        else:
            pid = (await read_pids(pid_file))[0]
            start.cancel()
        # The next message runs after the cancelled start has ended.
        await actor.ask(Shutdown(now=True))
        if point == "queued":
            assert not pid_file.exists()  # never launched
        else:
            assert pid is not None and pid_gone(pid, 5)
        assert _files() == before
        info = actor.connection_info
        if info is not None:
            assert not {info.port(c) for c in CHANNELS} & reserved_ports()
        actor.options = _opts()
        await asyncio.wait_for(actor.ask(Start()), 30)
        assert actor.state == "running"
    finally:
        actor.stop()
        await actor.join()
    assert _files() == before and not kernel_descendants()


@pytest.mark.parametrize("timeout", [0.0, 0.1, 0.5])
async def test_wait_for_on_the_async_manager_start_leaves_nothing(timeout: float) -> None:
    """``asyncio.wait_for(km.start_kernel(), t)`` that expires returns with no kernel
    process and no connection file left, and the manager starts again afterwards."""
    before = _files()
    km = AsyncKernelManager(spec=fake_spec("--slow-start", "30"), forward_stderr=False)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(km.start_kernel(), timeout)
    assert not kernel_descendants()
    assert _files() == before
    assert not await km.is_alive()
    await km.start_kernel(spec=fake_spec())
    try:
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    assert _files() == before and not kernel_descendants()


async def test_wait_for_on_an_ipykernel_start_leaves_nothing() -> None:
    """The case from the field: wait_for(km.start_kernel(), 0.1) on ipykernel leaves no
    kernel running and no file, and a retry starts the kernel (no "already exists")."""
    before = _files()
    km = AsyncKernelManager(forward_stderr=False)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(km.start_kernel(), 0.1)
    assert not kernel_descendants() and _files() == before
    await km.start_kernel()
    try:
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_cancelled_supervisor_start_task_stops_its_kernel(tmp_path: Path) -> None:
    """task.cancel() of Supervisor.start_kernel once the kernel runs ends with the kernel
    gone, its files removed, and the supervisor knowing nothing of it."""
    pid_file = tmp_path / "pids"
    before = _files()
    async with Supervisor(launch=_opts("--never-ready", "--pid-file", str(pid_file))) as sup:
        task = asyncio.ensure_future(sup.start_kernel(kernel_id="k1"))
        pid = (await read_pids(pid_file))[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pid_gone(pid, 0.5)
        assert "k1" not in sup and _files() == before
        kid = await sup.start_kernel(kernel_id="k1", spec=fake_spec())
        assert kid == "k1"
    assert _files() == before and not kernel_descendants()


async def test_a_cancelled_restart_leaves_the_kernel_stopped_and_startable(
        tmp_path: Path) -> None:
    """wait_for(km.restart_kernel(), t) that expires while the new kernel starts leaves no
    process; the manager then starts a kernel again."""
    pid_file = tmp_path / "pids"
    km = AsyncKernelManager(spec=fake_spec(), forward_stderr=False)
    await km.start_kernel()
    old = km.pid
    slow = fake_spec("--slow-start", "30", "--pid-file", str(pid_file))
    restart = asyncio.ensure_future(km.restart_kernel(spec=slow))
    new = (await read_pids(pid_file))[0]
    restart.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restart
    assert old is not None and pid_gone(old, 0.5) and pid_gone(new, 0.5)
    assert not await km.is_alive()
    await km.start_kernel(spec=fake_spec())
    try:
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    assert not kernel_descendants()


async def test_a_cancelled_shutdown_wait_still_shuts_down() -> None:
    """Cancelling the wait of a graceful shutdown does not leave a kernel half stopped:
    the shutdown runs to its end."""
    async with Supervisor(launch=_opts("--ignore-shutdown").replace(shutdown_wait=1)) as sup:
        kid = await sup.start_kernel()
        pid = sup.get_kernel(kid).actor.pid
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sup.shutdown_kernel(kid), 0.05)
        assert pid is not None
        assert await asyncio.get_running_loop().run_in_executor(None, pid_gone, pid, 10)


_CTRL_C = """
import json, logging, os, signal, sys, threading
sys.path[:0] = [{root!r}, {tests!r}]
from supervisor.connection import runtime_dir
from supervisor.manager import KernelManager
from conftest import fake_spec
pid_file = {pid_file!r}


import psutil
launched = []
MAIN = threading.main_thread().ident


class InterruptOnceLaunched(logging.Handler):
    # Ctrl-C the moment the kernel process exists (the actor logs its launch), to the
    # main thread as a terminal's reaches it (a process-directed kill from this
    # background thread may land on the background thread itself).
    def emit(self, record):
        if "actor.launched" in record.getMessage():
            launched.extend(p.pid for p in psutil.Process().children()
                            if "fakekernel" in " ".join(p.cmdline()))
            signal.pthread_kill(MAIN, signal.SIGINT)


logger = logging.getLogger("supervisor.kernel")
logger.setLevel(logging.DEBUG)
logger.addHandler(InterruptOnceLaunched())
km = KernelManager(spec=fake_spec("--slow-start", "30", "--pid-file", pid_file),
                   forward_stderr=False)
outcome = "returned"
try:
    km.start_kernel()
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
logger.handlers.clear()
alive = any(psutil.pid_exists(pid) for pid in launched)
left = sorted(p.name for p in runtime_dir().iterdir())
km.start_kernel(spec=fake_spec())
again = km.is_alive()
km.shutdown_kernel(now=True)
print(json.dumps({{"outcome": outcome, "alive": alive, "left": left, "again": again,
                  "launched": len(launched)}}))
"""


def test_ctrl_c_during_the_blocking_start_leaves_nothing(tmp_path: Path) -> None:
    """KeyboardInterrupt during the blocking KernelManager.start_kernel() is raised once
    the kernel it began is gone and its files removed; the manager starts again."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    script = _CTRL_C.format(root=str(ROOT), tests=str(ROOT / "tests"),
                            pid_file=str(tmp_path / "pids"))
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"outcome": "KeyboardInterrupt", "alive": False, "left": [],
                      "again": True, "launched": 1}
    assert FAKE_KERNEL.exists()


def test_a_start_failure_is_still_a_startup_error() -> None:
    """The cancel machinery leaves ordinary failures alone: a crash is a KernelStartupError."""
    async def run() -> None:
        actor = KernelActor(_opts("--crash-on-start"))
        actor.start()
        with pytest.raises(KernelStartupError, match="died while starting"):
            await actor.ask(Start())
        actor.stop()
        await actor.join()

    asyncio.run(run())

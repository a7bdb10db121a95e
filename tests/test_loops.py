"""Managers and supervisors used from another loop than the one they started on.

Each test drives its own loops (``asyncio.run``, a loop left idle, a loop running
in a thread), so these are plain functions, not pytest-asyncio tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_spec, pid_gone

from supervisor.errors import KernelDeadError, KernelStateError
from supervisor.manager import AsyncKernelManager
from supervisor.supervisor import Supervisor

QUIET: dict[str, Any] = {"forward_stderr": False, "shutdown_wait": 2, "terminate_wait": 1}


@pytest.fixture
def thread_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio loop running in its own thread, stopped and closed afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_shutdown_after_the_start_loop_closed() -> None:
    """asyncio.run(km.shutdown_kernel()) after the start's loop closed stops the kernel
    process and removes its file at once; a second shutdown is quiet."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    asyncio.run(km.start_kernel())
    pid, path = km.pid, km.connection_file
    assert pid is not None and Path(path).exists() and km.has_kernel
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(km.shutdown_kernel(), 10))
    assert time.monotonic() - t0 < 5
    assert pid_gone(pid, 0.5) and not Path(path).exists()
    assert not km.has_kernel and not asyncio.run(km.is_alive())
    asyncio.run(asyncio.wait_for(km.shutdown_kernel(), 5))
    km.cleanup_resources()


def test_other_operations_after_the_start_loop_closed_fail_at_once() -> None:
    """With the start's loop closed, interrupt raises KernelDeadError naming the cause at
    once; restart works (the kernel is killed from here and started on this loop)."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    asyncio.run(km.start_kernel())
    first = km.pid
    with pytest.raises(KernelDeadError, match="loop it started on is closed"):
        asyncio.run(asyncio.wait_for(km.interrupt_kernel(), 5))

    async def restart_then_stop() -> int | None:
        await km.restart_kernel()
        pid = km.pid
        assert await km.is_alive()
        await km.shutdown_kernel()
        return pid

    second = asyncio.run(asyncio.wait_for(restart_then_stop(), 30))
    assert first is not None and pid_gone(first, 0.5)
    assert second is not None and second != first and pid_gone(second, 5)
    assert not Path(km.connection_file).exists()


def test_manager_on_a_loop_in_another_thread(thread_loop: asyncio.AbstractEventLoop) -> None:
    """A manager started on a loop running in another thread is driven from this thread's
    own loop: interrupt and a graceful shutdown go through the thread-safe door."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    asyncio.run_coroutine_threadsafe(km.start_kernel(), thread_loop).result(30)
    pid, path = km.pid, km.connection_file

    async def drive() -> None:
        await km.interrupt_kernel()
        assert await km.is_alive()
        await km.shutdown_kernel()

    asyncio.run(asyncio.wait_for(drive(), 20))
    assert pid is not None and pid_gone(pid, 0.5) and not Path(path).exists()


def test_supervisor_whose_loop_is_idle() -> None:
    """A Supervisor whose loop is open but not running: another loop's interrupt raises
    KernelStateError at once, close() kills the kernel, removes its file and lets the
    supervisor's tasks finish, so the idle loop closes with nothing pending."""
    loop = asyncio.new_event_loop()
    try:
        sup = Supervisor(launch=fake_spec_options())

        async def start() -> str:
            sup.start()
            return await sup.start_kernel(spec=fake_spec())

        kid = loop.run_until_complete(start())
        actor = sup.actor_of(kid)
        pid, path = actor.pid, actor.connection_file
        with pytest.raises(KernelStateError, match="not running"):
            asyncio.run(asyncio.wait_for(sup.interrupt_kernel(kid), 5))
        asyncio.run(asyncio.wait_for(sup.close(), 10))
        assert pid is not None and pid_gone(pid, 0.5) and not path.exists()
        assert not sup.alive
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    finally:
        loop.close()


def fake_spec_options() -> Any:
    from supervisor.kernel import LaunchOptions

    return LaunchOptions(**QUIET)

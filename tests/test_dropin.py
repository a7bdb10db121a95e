"""The plain managers behave like jupyter_client's where a host can observe them.

No restart unless asked, quiet idempotent shutdown and cleanup, an awaitable
``is_alive`` on the async client, jupyter_client's launch keywords with their
meaning, and ``get_connection_info`` shaped like its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_spec, pid_gone

from supervisor.errors import ConfigurationError, KernelStateError
from supervisor.events import KernelEvent
from supervisor.manager import AsyncKernelManager, KernelManager
from supervisor.wire import Session

QUIET: dict[str, Any] = {"forward_stderr": False, "shutdown_wait": 2, "terminate_wait": 1}
CHANNEL_PORTS = {"shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"}


def environ_of(pid: int) -> dict[str, str]:
    """A process's environment, as the kernel sees it (from /proc)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode().split("=", 1) for item in raw if b"=" in item)
    return dict(pair for pair in pairs if len(pair) == 2)


def file_exists(path: str) -> bool:
    """A quick stat of a local file (kept out of the coroutines for the linter)."""
    return Path(path).exists()


async def dead_event(km: AsyncKernelManager) -> asyncio.Event:
    """An event set when the manager reports its kernel lost for good."""
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()  # plain callbacks run on a worker thread
    km.add_restart_callback(lambda: loop.call_soon_threadsafe(gone.set), "dead")
    return gone


async def test_a_dead_kernel_is_not_restarted_by_default() -> None:
    """Without autorestart or policy, a killed kernel stays dead: is_alive turns False,
    'dead' fires, nothing is launched again, and shutdown then cleans up quietly."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    assert km.autorestart is False
    restarts: list[str] = []
    km.add_restart_callback(lambda: restarts.append("restart"), "restart")
    await km.start_kernel()
    gone = await dead_event(km)
    pid, path = km.pid, km.connection_file
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(gone.wait(), 20)
    assert not await km.is_alive() and not km.has_kernel and km.pid is None
    assert restarts == [] and km.restart_count == 0
    await km.shutdown_kernel()
    await km.shutdown_kernel(now=True)
    await km.finish_shutdown()
    km.cleanup_resources()
    assert not file_exists(path)


async def test_autorestart_true_restarts_and_calls_back() -> None:
    """autorestart=True restarts a killed kernel (a new process) and fires 'restart'."""
    km = AsyncKernelManager(spec=fake_spec(), autorestart=True, **QUIET)
    await km.start_kernel()
    announced = asyncio.Event()
    loop = asyncio.get_running_loop()
    km.add_restart_callback(lambda: loop.call_soon_threadsafe(announced.set), "restart")
    restarted = asyncio.Event()

    async def on_event(event: KernelEvent) -> None:
        if event.kind == "restarted":
            restarted.set()

    assert km.supervisor is not None
    km.supervisor.subscribe(on_event)
    first = km.pid
    assert first is not None
    try:
        os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(announced.wait(), restarted.wait()), 20)
        assert await km.is_alive() and km.pid != first and km.restart_count == 1
    finally:
        await km.shutdown_kernel(now=True)
    assert pid_gone(first, 1)


async def test_shutdown_of_a_kernel_never_started_is_quiet() -> None:
    """shutdown_kernel, finish_shutdown and cleanup_resources on a manager that never
    started a kernel return quietly, as jupyter_client's do."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.shutdown_kernel()
    await km.finish_shutdown()
    km.cleanup_resources()
    assert not km.has_kernel and not await km.is_alive()


async def test_async_client_is_alive_is_awaitable_and_follows_the_process() -> None:
    """The async client's is_alive() is awaited, and answers with the manager's view of
    the process (False right after the kernel is killed)."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    gone = await dead_event(km)
    try:
        assert await kc.is_alive() is True
        os.kill(km.pid or 0, signal.SIGKILL)
        await asyncio.wait_for(gone.wait(), 20)
        assert await kc.is_alive() is False
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()


def test_blocking_client_is_alive_stays_a_bool() -> None:
    """The blocking client's is_alive() returns a plain bool."""
    km = KernelManager(spec=fake_spec(), **QUIET)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        assert kc.is_alive() is True
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


async def test_env_replaces_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_kernel(env=...) is the kernel's whole environment (plus JPY_PARENT_PID), as in
    jupyter_client: a variable of ours that is not in it does not reach the kernel."""
    monkeypatch.setenv("DROPIN_PARENT_ONLY", "1")
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.start_kernel(env={"DROPIN_GIVEN": "yes"})
    try:
        env = environ_of(km.pid or 0)
        assert env["DROPIN_GIVEN"] == "yes" and env["JPY_PARENT_PID"] == str(os.getpid())
        assert "DROPIN_PARENT_ONLY" not in env
    finally:
        await km.shutdown_kernel()


async def test_independent_kernel_is_not_tied_to_us(monkeypatch: pytest.MonkeyPatch) -> None:
    """independent=True launches without JPY_PARENT_PID (the kernel does not watch us)."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.start_kernel(independent=True)
    try:
        assert "JPY_PARENT_PID" not in environ_of(km.pid or 0)
    finally:
        await km.shutdown_kernel()
    assert not file_exists(km.connection_file)


@pytest.mark.parametrize("streams", [
    {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE},
    {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT},
])
async def test_stdout_and_stderr_keywords_are_accepted(streams: dict[str, int]) -> None:
    """start_kernel(stdout=..., stderr=...) with subprocess constants starts the kernel."""
    km = AsyncKernelManager(spec=fake_spec())
    await km.start_kernel(**streams)
    try:
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)


async def test_unknown_launch_keywords_are_a_typed_error() -> None:
    """An unknown keyword, or a bad stream value, is a ConfigurationError naming it, both in
    the constructor and in start_kernel; nothing is launched."""
    with pytest.raises(ConfigurationError, match="no_such_option"):
        AsyncKernelManager(spec=fake_spec(), no_such_option=1)
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    with pytest.raises(ConfigurationError, match="no_such_option"):
        await km.start_kernel(no_such_option=1)
    with pytest.raises(ConfigurationError, match="stdout"):
        await km.start_kernel(stdout="a file name")
    assert not km.has_kernel


async def test_get_connection_info_is_shaped_like_jupyter_clients() -> None:
    """Before the start: the ports and bytes key the start then uses; session=True gives a
    Session instead of key and scheme."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    info = km.get_connection_info()
    assert set(info) == {"transport", "ip", "key", "signature_scheme", *CHANNEL_PORTS}
    assert isinstance(info["key"], bytes) and info["key"]
    with_session = km.get_connection_info(session=True)
    assert isinstance(with_session["session"], Session) and "key" not in with_session
    await km.start_kernel()
    try:
        assert km.get_connection_info() == info
        assert km.connection_info is not None and km.connection_info.key == info["key"]
    finally:
        await km.shutdown_kernel()


async def test_a_second_start_refuses() -> None:
    """start_kernel on a manager whose kernel runs refuses (jupyter_client would launch a
    second process and lose the first)."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.start_kernel()
    try:
        pid = km.pid
        with pytest.raises(KernelStateError):
            await km.start_kernel()
        assert km.pid == pid and await km.is_alive()
    finally:
        await km.shutdown_kernel()


async def test_a_given_zmq_context_is_used_and_left_open() -> None:
    """context= (as jupyter_client's shared-context hosts pass it) is the manager's
    context and stays open after shutdown; without it, the process-wide one is used."""
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    try:
        km = AsyncKernelManager(spec=fake_spec(), context=ctx, **QUIET)
        assert km.context is ctx
        await km.start_kernel()
        await km.shutdown_kernel()
        assert not ctx.closed
        assert AsyncKernelManager().context is zmq.asyncio.Context.instance()
    finally:
        ctx.term()

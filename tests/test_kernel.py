"""KernelActor: start, readiness, shutdown escalation, restarts, conflicts, failures."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import zmq
from conftest import fake_spec, pid_gone

from supervisor._log import capture_logs
from supervisor.actor import Actor
from supervisor.connection import new_connection_info
from supervisor.errors import KernelClosedError, KernelStartupError, KernelStateError
from supervisor.kernel import (
    ChildExited,
    Interrupt,
    KernelActor,
    LaunchOptions,
    Restart,
    Shutdown,
    Signal,
    Start,
)
from supervisor.kernelspec import KernelSpec


class Parent(Actor):
    """Records what its child kernels report."""

    def __init__(self) -> None:
        super().__init__()
        self.exits: asyncio.Queue[ChildExited] = asyncio.Queue()

    async def receive(self, msg: object) -> Any:
        if isinstance(msg, ChildExited):
            self.exits.put_nowait(msg)


def fake(*flags: str, **opts: Any) -> LaunchOptions:
    opts.setdefault("startup_timeout", 10)
    opts.setdefault("forward_stderr", False)
    return LaunchOptions(spec=fake_spec(*flags, interrupt_mode=opts.pop("interrupt_mode", "signal")), **opts)


async def stop(actor: Actor) -> None:
    actor.stop()
    await actor.join()


async def test_ipykernel_start_restart_shutdown_keeps_then_removes_files() -> None:
    """A real ipykernel becomes ready; restart keeps ports and file; shutdown removes both."""
    actor = KernelActor(LaunchOptions(forward_stderr=False))
    actor.start()
    try:
        info = await actor.ask(Start())
        assert info["protocol_version"].startswith("5.")
        first_pid, ports = actor.pid, actor.connection_info
        assert actor.state == "running" and actor.connection_file.exists()
        assert oct(actor.connection_file.stat().st_mode & 0o777) == "0o600"
        await actor.ask(Restart())
        assert actor.pid != first_pid and actor.connection_info == ports
        assert pid_gone(first_pid or 0, 5)
        await actor.ask(Restart(newports=True))
        assert actor.connection_info is not None and ports is not None
        assert actor.connection_info.shell_port != ports.shell_port
        second = actor.pid
        await actor.ask(Shutdown())
        assert actor.state == "shutdown" and not actor.connection_file.exists()
        assert pid_gone(second or 0, 5)
    finally:
        await stop(actor)


async def test_crash_on_start_reports_exit_code_and_stderr() -> None:
    """A kernel that dies while starting fails the start at once with its code and stderr."""
    actor = KernelActor(fake("--crash-on-start"))
    actor.start()
    with pytest.raises(KernelStartupError) as err:
        await actor.ask(Start())
    assert err.value.exit_code == 3
    assert "crashing on start" in err.value.stderr_tail
    assert not err.value.timed_out
    assert not actor.connection_file.exists() and actor.pid is not None and pid_gone(actor.pid)
    await stop(actor)


async def test_never_ready_times_out_and_is_killed() -> None:
    """startup_timeout raises KernelStartupError(timed_out) and leaves no process."""
    actor = KernelActor(fake("--never-ready", startup_timeout=0.5))
    actor.start()
    with pytest.raises(KernelStartupError) as err:
        await actor.ask(Start())
    assert err.value.timed_out
    assert actor.pid is not None and pid_gone(actor.pid)
    assert not actor.connection_file.exists()
    await stop(actor)


async def test_missing_executable_is_a_typed_error_and_leaves_nothing() -> None:
    """A kernelspec whose program does not exist fails with KernelStartupError, no file left."""
    spec = KernelSpec(name="ghost", argv=("/nonexistent/ghost-kernel", "-f", "{connection_file}"),
                      display_name="ghost", language="none", resource_dir=fake_spec().resource_dir)
    actor = KernelActor(LaunchOptions(spec=spec))
    actor.start()
    with pytest.raises(KernelStartupError, match="not found"):
        await actor.ask(Start())
    assert not actor.connection_file.exists()
    await stop(actor)


@pytest.mark.parametrize(
    ("flags", "how"),
    [((), "shutdown_request"),
     (("--ignore-shutdown",), "SIGTERM"),
     (("--ignore-shutdown", "--ignore-sigterm"), "SIGKILL")],
)
async def test_shutdown_escalates(flags: tuple[str, ...], how: str) -> None:
    """Graceful shutdown escalates shutdown_request -> SIGTERM -> SIGKILL as needed."""
    actor = KernelActor(fake(*flags, shutdown_wait=0.3, terminate_wait=0.3))
    actor.start()
    await actor.ask(Start())
    pid = actor.pid
    with capture_logs() as logs:
        await actor.ask(Shutdown())
    done = [e for e in logs if e["event"] == "actor.shutdown"]
    assert done and done[0]["how"] == how
    assert pid is not None and pid_gone(pid, 0.5)
    await stop(actor)


async def test_grandchildren_die_with_the_kernel(tmp_path: Any) -> None:
    """Shutdown leaves no grandchild: the kernel's `sleep 600` is killed with its group."""
    pid_file = tmp_path / "pids"
    actor = KernelActor(fake("--spawn-grandchild", "--pid-file", str(pid_file)))
    actor.start()
    await actor.ask(Start())
    grandchild = int(pid_file.read_text().split()[1])
    await actor.ask(Shutdown())
    assert pid_gone(grandchild, 5)
    await stop(actor)


async def test_unexpected_exit_is_reported_to_the_parent_not_restarted() -> None:
    """A kernel that exits by itself is reported with its code; the actor does not restart it."""
    parent = Parent()
    parent.start()
    actor = KernelActor(fake("--exit-after", "0.3", "--exit-code", "7"), parent=parent)
    actor.start()
    await actor.ask(Start())
    report = await asyncio.wait_for(parent.exits.get(), 10)
    assert report.kernel_id == actor.kernel_id and report.status.exit_code == 7
    assert actor.state == "exited" and not actor.is_alive()
    await stop(actor)
    assert not actor.connection_file.exists()
    await stop(parent)


async def test_readiness_falls_back_without_iopub_welcome() -> None:
    """A kernel without iopub_welcome is still seen ready (through its status messages)."""
    actor = KernelActor(fake("--no-welcome"))
    actor.start()
    await actor.ask(Start())
    assert actor.state == "running"
    await actor.ask(Shutdown())
    await stop(actor)


async def test_port_collision_is_retried_on_fresh_ports() -> None:
    """A kernel whose shell port is taken is restarted on fresh ports instead of failing."""
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.ROUTER)
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    info = new_connection_info()
    from dataclasses import replace
    info = replace(info, shell_port=port)
    actor = KernelActor(LaunchOptions(forward_stderr=False), connection_info=info)
    actor.start()
    try:
        with capture_logs() as logs:
            await actor.ask(Start())
        assert any(e["event"] == "kernel.port_clash" for e in logs)
        assert actor.connection_info is not None and actor.connection_info.shell_port != port
    finally:
        await stop(actor)
        squatter.close(0)
        ctx.term()


async def test_bind_failures_are_bounded() -> None:
    """A kernel that can never bind fails after port_retries + 1 attempts, not forever."""
    actor = KernelActor(fake("--bind-fail", port_retries=2))
    actor.start()
    with capture_logs() as logs, pytest.raises(KernelStartupError, match="3 attempts"):
        await actor.ask(Start())
    assert sum(e["event"] == "kernel.port_clash" for e in logs) == 3
    await stop(actor)


async def test_shutdown_during_start_cancels_the_start() -> None:
    """A shutdown that arrives while a slow kernel starts cuts the start short."""
    actor = KernelActor(fake("--slow-start", "30"))
    actor.start()
    start = actor.ask(Start())
    stopping = actor.ask(Shutdown())
    with pytest.raises(KernelStartupError, match="cancelled"):
        await asyncio.wait_for(start, 10)
    await asyncio.wait_for(stopping, 10)
    assert actor.state == "shutdown" and (actor.pid is None or pid_gone(actor.pid))
    await stop(actor)


async def test_interrupt_during_start_applies_after_ready() -> None:
    """An interrupt queued behind a start runs once the kernel is ready."""
    actor = KernelActor(fake("--slow-start", "0.2"))
    actor.start()
    start = actor.ask(Start())
    interrupt = actor.ask(Interrupt())
    await start
    assert await interrupt is None and actor.state == "running"
    await actor.ask(Shutdown(now=True))
    await stop(actor)


async def test_requests_on_a_kernel_that_is_not_running() -> None:
    """Interrupt and signal need a running kernel; after stop every ask fails closed."""
    actor = KernelActor(fake())
    actor.start()
    with pytest.raises(KernelStateError):
        await actor.ask(Interrupt())
    with pytest.raises(KernelStateError):
        await actor.ask(Signal(signal.SIGUSR1))
    await stop(actor)
    with pytest.raises(KernelClosedError):
        await actor.ask(Start())


async def test_stopping_the_actor_kills_a_running_kernel() -> None:
    """Stopping the actor never leaves its kernel behind."""
    actor = KernelActor(fake())
    actor.start()
    await actor.ask(Start())
    pid = actor.pid
    await stop(actor)
    assert pid is not None and pid_gone(pid, 5)
    assert not actor.connection_file.exists()


async def test_shutdown_now_cuts_a_graceful_shutdown_short() -> None:
    """Shutdown(now=True) sent while a graceful shutdown waits on a deaf kernel kills it at once."""
    actor = KernelActor(fake("--ignore-shutdown", "--ignore-sigterm", shutdown_wait=60,
                             terminate_wait=60))
    actor.start()
    await actor.ask(Start())
    pid = actor.pid
    graceful = actor.ask(Shutdown())
    forced = actor.ask(Shutdown(now=True))
    await asyncio.wait_for(asyncio.gather(graceful, forced), 10)
    assert actor.state == "shutdown" and pid is not None and pid_gone(pid, 0.5)
    await stop(actor)

"""The seed API: KernelManager (blocking) and AsyncKernelManager on real kernels."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_spec, pid_gone

from supervisor.client import BlockingKernelClient, KernelClient
from supervisor.errors import KernelStartupError, KernelStateError
from supervisor.manager import (
    AsyncKernelManager,
    KernelManager,
    run_async_kernel,
    run_kernel,
    start_new_async_kernel,
    start_new_kernel,
)
from supervisor.policy import Backoff, RestartPolicy

QUIET: dict[str, Any] = {"forward_stderr": False, "shutdown_wait": 2, "terminate_wait": 1}


def stream_text(kc: BlockingKernelClient, msg_id: str) -> str:
    """Collect the stdout a request produced, until its idle status."""
    text = ""
    while True:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text


async def astream_text(kc: KernelClient, msg_id: str) -> str:
    """Async twin of :func:`stream_text`."""
    text = ""
    while True:
        msg = await kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text


def shell_reply(kc: BlockingKernelClient, msg_id: str) -> dict[str, Any]:
    """The shell reply to ``msg_id`` (earlier replies are skipped)."""
    while True:
        msg = kc.get_shell_msg(timeout=20)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


# Short sleeps in a loop: a SIGINT that the OS hands to another thread than the
# main one would not cut a single long sleep short (CPython runs handlers on the
# main thread between bytecodes), so the loop keeps the interrupt prompt.
SLEEPER = "import time\nprint('sleeping', flush=True)\nfor _ in range(6000): time.sleep(0.01)"


def wait_running(kc: BlockingKernelClient, msg_id: str) -> None:
    """Wait until the cell's own code runs (its first output), so an interrupt hits it:
    a SIGINT that lands between the busy status and the cell is absorbed by ipykernel."""
    while True:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
            return


def test_blocking_seed_api_end_to_end() -> None:
    """Every seed method on a real ipykernel: execute, interrupt, signal, restart, shutdown."""
    km = KernelManager("python3", **QUIET)
    assert not km.has_kernel
    with pytest.raises(KernelStateError):
        km.interrupt_kernel()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        assert km.has_kernel and km.is_alive()
        assert km.kernel_spec.name == "python3" and km.ipykernel
        assert km.format_kernel_cmd()[-2:] == ["-f", km.connection_file]
        assert km.get_connection_info()["shell_port"] == km.connection_info.shell_port
        kc.wait_for_ready(timeout=20)
        assert stream_text(kc, kc.execute("print('hello seed')")) == "hello seed\n"

        msg_id = kc.execute(SLEEPER)
        wait_running(kc, msg_id)
        km.interrupt_kernel()
        reply = shell_reply(kc, msg_id)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        ports, path, pid = km.connection_info, km.connection_file, km.pid
        km.restart_kernel()
        assert km.connection_info == ports and km.connection_file == path and km.pid != pid
        assert pid is not None and pid_gone(pid)
        assert stream_text(kc, kc.execute("print(40 + 2)")) == "42\n"

        km.restart_kernel(newports=True)
        assert km.connection_info.shell_port != ports.shell_port

        pid = km.pid
        km.signal_kernel(signal.SIGTERM)
        assert pid is not None and pid_gone(pid)
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert not km.has_kernel and not km.is_alive()
    assert not Path(km.connection_file).exists()


def test_request_and_finish_shutdown() -> None:
    """The seed's two-step shutdown: request_shutdown, then finish_shutdown reaps and cleans."""
    km = KernelManager("python3", **QUIET)
    km.start_kernel()
    pid, path = km.pid, km.connection_file
    km.request_shutdown()
    km.finish_shutdown(waittime=10, pollinterval=0.1)
    assert pid is not None and pid_gone(pid, 0.1)
    assert not km.is_alive() and not Path(path).exists()
    km.cleanup()
    km.cleanup_resources()


def test_shutdown_leaves_no_grandchild(tmp_path: Path) -> None:
    """A kernel that spawned `sleep 600` leaves neither process nor connection file."""
    pid_file = tmp_path / "pids"
    km = KernelManager(spec=fake_spec("--spawn-grandchild", "--pid-file", str(pid_file)), **QUIET)
    km.start_kernel()
    kernel_pid, grandchild = (int(x) for x in pid_file.read_text().split())
    path = km.connection_file
    km.shutdown_kernel()
    assert pid_gone(kernel_pid) and pid_gone(grandchild)
    assert not Path(path).exists()


def test_autorestart_fires_restart_then_dead_callbacks() -> None:
    """autorestart restarts a dying kernel and calls 'restart', then 'dead' when exhausted."""
    calls: list[str] = []
    dead = threading.Event()
    policy = RestartPolicy(max_restarts=2, within_seconds=60,
                           backoff=Backoff(initial=0.01, maximum=0.01, jitter=0))
    km = KernelManager(spec=fake_spec("--exit-after", "0.4", "--exit-code", "3"),
                       policy=policy, **QUIET)
    km.add_restart_callback(lambda: calls.append("restart"), "restart")

    def on_dead() -> None:
        calls.append("dead")
        dead.set()

    km.add_restart_callback(on_dead, "dead")
    km.start_kernel()
    assert dead.wait(30)
    assert calls == ["restart", "restart", "dead"]
    assert not km.has_kernel and not km.is_alive()


def test_raising_callback_is_logged_not_fatal() -> None:
    """A restart callback that raises does not stop the restart it announces."""
    policy = RestartPolicy(backoff=Backoff(initial=0.01, maximum=0.01, jitter=0))
    km = KernelManager(spec=fake_spec(), policy=policy, **QUIET)
    restarted = threading.Event()

    def bad() -> None:
        raise ValueError("callback bug")

    km.add_restart_callback(bad, "restart")
    km.add_restart_callback(restarted.set, "restart")
    km.start_kernel()
    try:
        pid = km.pid
        os.kill(pid or 0, signal.SIGKILL)
        assert restarted.wait(20)
        km.remove_restart_callback(bad, "restart")
    finally:
        km.shutdown_kernel(now=True)


def test_start_new_kernel_and_run_kernel() -> None:
    """start_new_kernel returns a ready client; run_kernel shuts down even on an exception."""
    km, kc = start_new_kernel(kernel_name="python", **QUIET)
    try:
        assert kc.execute("1 + 1", reply=True, timeout=20)["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError), run_kernel(kernel_name="python3", **QUIET) as kc2:
        reply = kc2.execute("import os; print(os.getpid())", reply=True, timeout=20)
        assert reply["content"]["status"] == "ok"
        pids.append(int(stream_text(kc2, kc2.execute("print(os.getpid())"))))
        raise ZeroDivisionError
    assert pid_gone(pids[0])


def test_start_new_kernel_cleans_up_when_readiness_fails() -> None:
    """A kernel that never becomes ready fails start_new_kernel and leaves nothing behind."""
    with pytest.raises(KernelStartupError):
        start_new_kernel(startup_timeout=0.5, spec=fake_spec("--never-ready"), **QUIET)


async def test_async_seed_api() -> None:
    """AsyncKernelManager: start, execute, restart, interrupt by message, shutdown(now)."""
    km = AsyncKernelManager(spec=fake_spec(interrupt_mode="message"), **QUIET)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=20)
        assert await astream_text(kc, kc.execute("print('async')")) == "async\n"
        assert await km.is_alive()
        msg_id = kc.execute(SLEEPER)
        while True:
            msg = await kc.get_iopub_msg(timeout=20)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                break
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=20)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        await km.restart_kernel(now=True)
        assert await km.is_alive()
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not await km.is_alive() and not km.has_kernel


async def test_async_helpers() -> None:
    """start_new_async_kernel and run_async_kernel give ready clients and clean up."""
    km, kc = await start_new_async_kernel(kernel_name="python3", **QUIET)
    try:
        reply = await kc.execute("2 ** 10", reply=True, timeout=20)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    async with run_async_kernel(spec=fake_spec(), **QUIET) as kc2:
        assert (await kc2.kernel_info(reply=True, timeout=20))["content"]["status"] == "ok"


async def test_conflicting_requests_from_many_tasks() -> None:
    """Restarts, interrupts and a shutdown issued at once: no hang, documented outcomes only."""
    km = AsyncKernelManager(spec=fake_spec(), **QUIET)
    await km.start_kernel()
    ops = [km.restart_kernel(), km.interrupt_kernel(), km.restart_kernel(now=True),
           km.interrupt_kernel(), km.shutdown_kernel()]
    results = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 60)
    for result in results:
        assert result is None or isinstance(result, (KernelStateError, KernelStartupError)), result
    assert not await km.is_alive()


def test_conflicting_requests_from_many_threads() -> None:
    """Threads hammering one blocking manager never hang or see undocumented errors."""
    km = KernelManager(spec=fake_spec(), **QUIET)
    km.start_kernel()
    errors: list[BaseException] = []

    def worker(op: str) -> None:
        try:
            if op == "restart":
                km.restart_kernel(now=True)
            elif op == "interrupt":
                km.interrupt_kernel()
            else:
                km.is_alive()
        except (KernelStateError, KernelStartupError):
            pass
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(op,))
               for op in ["restart", "interrupt", "alive"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert km.is_alive()
    km.shutdown_kernel()
    assert not km.is_alive()

"""Supervisor: policies on real processes, strategies, nesting, pool, limits, culling, events."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest
from conftest import Events, fake_kernel_spec_dir, fake_spec, pid_gone

from supervisor._log import capture_logs
from supervisor.errors import ConfigurationError, KernelLimitError, KernelStartupError
from supervisor.events import KernelEvent
from supervisor.kernel import LaunchOptions
from supervisor.policy import Backoff, RestartPolicy
from supervisor.supervisor import Supervisor

QUIET = LaunchOptions(forward_stderr=False, startup_timeout=20, shutdown_wait=1, terminate_wait=1)
NO_WAIT = Backoff(initial=0.01, maximum=0.05, jitter=0.0)


def sup(**kw: Any) -> Supervisor:
    kw.setdefault("launch", QUIET)
    return Supervisor(**kw)


async def test_exit_at_once_is_restarted_exactly_max_restarts_times_then_dead() -> None:
    """max_restarts=3 within 10 s: three restarts with the backoff's delays, then gave_up, dead."""
    policy = RestartPolicy(max_restarts=3, within_seconds=10,
                           backoff=Backoff(initial=0.05, maximum=1, multiplier=2, jitter=0))
    events = Events()
    async with sup(policy=policy) as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec("--exit-after", "0.5", "--exit-code", "2"))
        await events.wait_for(lambda e: e.kind == "dead")
        kinds = events.kinds(kid)
        assert kinds == ["starting", "ready"] + ["exited", "restarting", "restarted"] * 3 + [
            "exited", "gave_up", "dead"]
        delays = [e.delay for e in events.seen if e.kind == "restarting"]
        assert delays == [0.05, 0.1, 0.2]
        exits = [e for e in events.seen if e.kind == "exited"]
        assert all(e.exit_code == 2 and not e.manual for e in exits)
        assert "3 restarts within 10s" in events.seen[-1].reason
        assert kid not in s and s.statistics().gave_up == 1 and s.statistics().restarts == 3


async def test_sigkill_of_ipykernel_is_restarted_and_answers_again() -> None:
    """kill -9 of a real ipykernel yields exited then restarted, and the kernel executes code."""
    events = Events()
    async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        handle = s.get_kernel(kid)
        old_pid = handle.actor.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == kid)
        exited = next(e for e in events.seen if e.kind == "exited")
        assert exited.signal == signal.SIGKILL and exited.exit_code is None
        assert handle.actor.pid != old_pid and handle.restart_count == 1
        kc = handle.client()
        kc.start_channels()
        try:
            reply = await kc.execute("x = 6 * 7", reply=True, timeout=20)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()


@pytest.mark.parametrize(("strategy", "expect"), [
    ("one_for_one", {"b"}), ("one_for_all", {"a", "b", "c"}), ("rest_for_one", {"b", "c"})])
async def test_strategies_restart_exactly_the_right_siblings(strategy: str,
                                                            expect: set[str]) -> None:
    """one_for_one, one_for_all and rest_for_one restart exactly the children they name."""
    events = Events()
    async with sup(strategy=strategy, policy=RestartPolicy(backoff=NO_WAIT)) as s:
        s.subscribe(events)
        for kid in "abc":
            await s.start_kernel(kernel_id=kid, spec=fake_spec())
        pids = {kid: s.actor_of(kid).pid for kid in "abc"}
        os.kill(pids["b"] or 0, signal.SIGKILL)
        await events.wait_for(lambda e: e.kind == "restarted", count=len(expect))
        restarted = {e.kernel_id for e in events.seen if e.kind == "restarted"}
        assert restarted == expect
        for kid in "abc":
            changed = s.actor_of(kid).pid != pids[kid]
            assert changed == (kid in expect)
        sibling = [e for e in events.seen if e.kind == "restarting" and e.kernel_id != "b"]
        assert all("sibling b exited" in e.reason for e in sibling)


async def test_temporary_children_are_never_restarted_even_by_a_sibling() -> None:
    """Under one_for_all a temporary sibling is shut down, not restarted; a temporary child
    that exits is reported dead."""
    events = Events()
    async with sup(strategy="one_for_all", policy=RestartPolicy(backoff=NO_WAIT)) as s:
        s.subscribe(events)
        await s.start_kernel(kernel_id="perm", spec=fake_spec())
        await s.start_kernel(kernel_id="temp", spec=fake_spec(), policy=RestartPolicy.never())
        temp_pid = s.actor_of("temp").pid
        os.kill(s.actor_of("perm").pid or 0, signal.SIGKILL)
        await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == "perm")
        assert "temp" not in s and "restarting" not in events.kinds("temp")
        assert temp_pid is not None and pid_gone(temp_pid)
        await s.start_kernel(kernel_id="temp2", spec=fake_spec(), policy=RestartPolicy.never())
        os.kill(s.actor_of("temp2").pid or 0, signal.SIGKILL)
        dead = await events.wait_for(lambda e: e.kind == "dead" and e.kernel_id == "temp2")
        assert "temporary" in dead[0].reason


async def test_transient_restarts_only_abnormal_exits() -> None:
    """A transient child that exits 0 is left dead; one that exits 1 is restarted."""
    events = Events()
    transient = RestartPolicy(restart="transient", backoff=NO_WAIT)
    async with sup(policy=transient) as s:
        s.subscribe(events)
        clean = await s.start_kernel(spec=fake_spec("--exit-after", "0.2", "--exit-code", "0"))
        await events.wait_for(lambda e: e.kind == "dead" and e.kernel_id == clean)
        bad = await s.start_kernel(spec=fake_spec("--exit-after", "0.2", "--exit-code", "1"))
        await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == bad)


async def test_nested_supervisor_escalates_to_its_parent() -> None:
    """A nested supervisor that gives up fails as a whole; its parent restarts it, then gives
    up too and reports every kernel of the subtree dead."""
    events = Events()
    async with sup(policy=RestartPolicy(max_restarts=1, within_seconds=60, backoff=NO_WAIT),
                   name="top") as top:
        top.subscribe(events)
        inner = await top.start_supervisor(
            policy=RestartPolicy(max_restarts=0), launch=QUIET, name="inner")
        inner_events = Events()
        inner.subscribe(inner_events)
        kid = await inner.start_kernel(spec=fake_spec("--exit-after", "0.3", "--exit-code", "4"))
        restarted = await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == "inner")
        assert restarted
        dead = await events.wait_for(lambda e: e.kind == "dead" and e.kernel_id == kid)
        assert "gave_up" in events.kinds("inner")
        assert dead[0].supervisor == "top"
        assert inner_events.kinds().count("gave_up") >= 2


async def test_max_kernels_counts_pending_starts() -> None:
    """With max_kernels=2 and two slow starts pending, a third start fails at once."""
    async with sup(max_kernels=2) as s:
        slow = [asyncio.ensure_future(s.start_kernel(spec=fake_spec("--slow-start", "0.5")))
                for _ in range(2)]
        await asyncio.sleep(0)  # one turn: both tasks have queued their asks (FIFO), no waiting
        with pytest.raises(KernelLimitError):
            await s.start_kernel(spec=fake_spec())
        assert s.statistics().pending_starts == 2
        await asyncio.gather(*slow)
        assert len(s) == 2


async def test_max_concurrent_starts_throttles() -> None:
    """With max_concurrent_starts=1 each kernel is launched only after the previous is ready."""
    async with sup(max_concurrent_starts=1) as s:
        with capture_logs() as logs:
            starts = [asyncio.ensure_future(s.start_kernel(spec=fake_spec("--slow-start", "0.1")))
                      for _ in range(3)]
            await asyncio.gather(*starts)
        steps = [e["event"] for e in logs if e["event"] in ("actor.launched", "actor.ready")]
        assert steps == ["actor.launched", "actor.ready"] * 3
        assert len(s) == 3


async def test_warm_pool_acquire_returns_a_ready_kernel_that_executes_code() -> None:
    """acquire hands over a pooled, ready ipykernel at once and the pool refills."""
    events = Events()
    async with sup(warm={"python3": 1}) as s:
        s.subscribe(events)
        await events.wait_for(lambda e: e.kind == "ready")
        assert s.statistics().pool["python3"] == 1 and len(s) == 0
        kid = await s.acquire("python3")
        assert kid in s and "acquired" in events.kinds(kid)
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            reply = await kc.execute("print('warm')", reply=True, timeout=20)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
        await events.wait_for(lambda e: e.kind == "ready", count=2)
        assert s.statistics().pool["python3"] == 1


async def test_acquire_on_an_empty_pool_starts_a_kernel(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no warm kernel of that name, acquire starts one (found by kernelspec name)."""
    fake_kernel_spec_dir(tmp_path, "fake-acquire")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    async with sup() as s:
        kid = await s.acquire("fake-acquire")
        assert kid in s and s.actor_of(kid).state == "running"
        assert s.actor_of(kid).spec is not None
        assert s.actor_of(kid).spec.name == "fake-acquire"  # type: ignore[union-attr]


async def test_idle_kernels_are_culled() -> None:
    """A kernel idle longer than cull_idle_timeout is shut down with a culled event."""
    events = Events()
    async with sup(cull_idle_timeout=0.3, cull_interval=0.1) as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec())
        await events.wait_for(lambda e: e.kind == "shutdown" and e.kernel_id == kid)
        assert "culled" in events.kinds(kid) and kid not in s


async def test_a_raising_or_blocking_listener_does_not_stop_supervision() -> None:
    """A listener that raises and one that blocks do not delay the next restart."""
    events = Events()
    release = threading.Event()

    def raising(event: KernelEvent) -> None:
        raise RuntimeError("listener bug")

    def blocking(event: KernelEvent) -> None:
        release.wait(30)

    async with sup(policy=RestartPolicy(backoff=NO_WAIT, max_restarts=10)) as s:
        s.subscribe(raising)
        s.subscribe(blocking)
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec("--exit-after", "0.2", "--exit-code", "1"))
        await events.wait_for(lambda e: e.kind == "restarted" and e.kernel_id == kid, count=2)
        release.set()


async def test_seed_restart_and_dead_callbacks() -> None:
    """add_restart_callback fires 'restart' on automatic restarts and 'dead' when lost."""
    calls: list[str] = []
    fired = threading.Event()
    events = Events()
    policy = RestartPolicy(max_restarts=1, within_seconds=60, backoff=NO_WAIT)
    async with sup(policy=policy) as s:
        s.subscribe(events)
        s.add_restart_callback(lambda: calls.append("restart"), "restart")
        s.add_restart_callback(lambda: (calls.append("dead"), fired.set()), "dead")
        await s.start_kernel(spec=fake_spec("--exit-after", "0.2", "--exit-code", "1"))
        await events.wait_for(lambda e: e.kind == "dead")
        await asyncio.to_thread(fired.wait, 10)
        assert calls == ["restart", "dead"]
        with pytest.raises(ConfigurationError):
            s.add_restart_callback(lambda: None, "sometimes")


async def test_manual_and_automatic_restarts_are_distinguishable() -> None:
    """restart_kernel emits restarting/restarted with manual=True; a crash restart has False."""
    events = Events()
    async with sup(policy=RestartPolicy(backoff=NO_WAIT)) as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec())
        await s.restart_kernel(kid)
        os.kill(s.actor_of(kid).pid or 0, signal.SIGKILL)
        await events.wait_for(lambda e: e.kind == "restarted", count=2)
        flags = [e.manual for e in events.seen if e.kind == "restarted"]
        assert flags == [True, False]


async def test_shutdown_all_during_pending_restarts() -> None:
    """shutdown_all while restarts wait out a long backoff returns promptly, without error."""
    events = Events()
    slow = RestartPolicy(backoff=Backoff(initial=30, maximum=30, jitter=0))
    async with sup(policy=slow) as s:
        s.subscribe(events)
        kids = [await s.start_kernel(spec=fake_spec()) for _ in range(3)]
        for kid in kids:
            os.kill(s.actor_of(kid).pid or 0, signal.SIGKILL)
        await events.wait_for(lambda e: e.kind == "restarting", count=3)
        await asyncio.wait_for(s.shutdown_all(), 10)
        assert len(s) == 0 and "restarted" not in events.kinds()


async def test_shutdown_kernel_cancels_a_pending_start() -> None:
    """Shutting a kernel down while it starts fails that start with KernelStartupError."""
    async with sup() as s:
        start = asyncio.ensure_future(s.start_kernel(kernel_id="slow",
                                                     spec=fake_spec("--slow-start", "30")))
        await asyncio.sleep(0)  # one turn: the start's ask is queued first (FIFO), no waiting
        await s.shutdown_kernel("slow")
        with pytest.raises(KernelStartupError, match="cancelled"):
            await start
        assert "slow" not in s


async def test_statistics_snapshot_is_frozen() -> None:
    """statistics() is an immutable snapshot of counts by state."""
    async with sup() as s:
        await s.start_kernel(spec=fake_spec())
        stats = s.statistics()
        assert stats.kernels == 1 and stats.by_state["ready"] == 1
        with pytest.raises(AttributeError):
            stats.kernels = 2  # type: ignore[misc]
        with pytest.raises(TypeError):
            stats.by_state["ready"] = 5  # type: ignore[index]


def test_bad_configuration_is_rejected() -> None:
    """Unknown strategies and bad limits raise ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        Supervisor(strategy="one_for_some")
    with pytest.raises(ConfigurationError):
        Supervisor(max_kernels=0)
    with pytest.raises(ConfigurationError):
        Supervisor(warm={"python3": -1})


async def test_culling_spares_busy_kernels_and_honours_the_spec_override() -> None:
    """A busy kernel is not culled (cull_busy=False); metadata.cull_idle_timeout overrides."""
    events = Events()
    async with sup(cull_idle_timeout=3600, cull_interval=0.05) as s:
        s.subscribe(events)
        busy = await s.start_kernel(spec=fake_spec())
        never = await s.start_kernel(spec=fake_spec(name="keep",
                                                    metadata={"cull_idle_timeout": 0}))
        kc = s.get_kernel(busy).client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=10)  # our IOPub subscription is live: 'go' arrives
            msg_id = kc.execute("import time\nprint('go', flush=True)\ntime.sleep(30)")
            while True:
                msg = await kc.get_iopub_msg(timeout=10)
                if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                    break
            idle = await s.start_kernel(spec=fake_spec())
            s.cull_idle_timeout = 0.3  # only now: the busy kernel is busy, the others idle
            await events.wait_for(lambda e: e.kind == "culled" and e.kernel_id == idle)
            assert busy in s and never in s
            assert "culled" not in events.kinds(busy) and "culled" not in events.kinds(never)
            assert s.actor_of(busy).execution_state == "busy"
        finally:
            kc.stop_channels()


async def test_cull_busy_culls_busy_kernels_too() -> None:
    """With cull_busy=True a kernel busy for longer than the timeout is culled."""
    events = Events()
    async with sup(cull_idle_timeout=0.3, cull_interval=0.05, cull_busy=True) as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=fake_spec())
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            kc.execute("import time\ntime.sleep(30)")
            await events.wait_for(lambda e: e.kind == "culled" and e.kernel_id == kid)
        finally:
            kc.stop_channels()


async def test_a_supervisor_never_started_says_what_to_do() -> None:
    """Using a Supervisor before start() fails at once with a typed error that says to start it,
    and names no internal message class."""
    from supervisor.errors import KernelClosedError

    sup = Supervisor(name="unstarted")
    with pytest.raises(KernelClosedError, match=r"unstarted was never started: call its start\(\)"
                       ) as err:
        await sup.start_kernel(spec=fake_spec())
    assert "_StartChild" not in str(err.value)

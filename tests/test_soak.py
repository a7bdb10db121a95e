"""Soak: 20 supervised kernels under seeded chaos for a few minutes, then the invariants.

Run with ``python3 -m pytest -m soak -s`` (deselected by default). ``SOAK_SECONDS`` sets
the length of the chaos phase (default 150 s, about 3 minutes in all) and ``SOAK_SEED``
the random seed, so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import fake_spec, kernel_descendants

from supervisor.errors import ChannelTimeout, SupervisorError
from supervisor.events import KernelEvent
from supervisor.kernel import LaunchOptions
from supervisor.policy import Backoff, RestartPolicy
from supervisor.supervisor import Supervisor

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "150"))
SOAK_SEED = int(os.environ.get("SOAK_SEED", "20261124"))
IPY_ARGS = ("--HistoryManager.hist_file=:memory:",)
OP_DEADLINE = 90.0  # no single request may take longer: that would be a hang


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Recorder:
    """Counts every event by kind and remembers every kernel pid ever seen (loop-owned)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.kinds: Counter[str] = Counter()
        self.restarted: Counter[str] = Counter()  # "manual" / "automatic"
        self.dead: set[str] = set()
        self.procs: dict[int, float] = {}  # pid -> create time (pids get reused)
        self._changed = asyncio.Event()

    async def __call__(self, event: KernelEvent) -> None:
        self.kinds[event.kind] += 1
        if event.kind == "dead":
            self.dead.add(event.kernel_id)
        if event.kind == "restarted":
            self.restarted["manual" if event.manual else "automatic"] += 1
        self.note_pid(event.kernel_id)
        self._changed.set()

    def note_pid(self, kernel_id: str) -> None:
        if kernel_id in self.sup:
            actor = self.sup.actor_of(kernel_id)
            if actor.pid is not None and actor.is_alive():  # not reaped: still that process
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.procs[actor.pid] = psutil.Process(actor.pid).create_time()

    def still_running(self) -> list[int]:
        """Kernel processes seen during the run that still exist (same pid and start time)."""
        alive = []
        for pid, created in sorted(self.procs.items()):
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    async def wait_until(self, condition: Any, timeout: float) -> None:
        async def loop() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 480)
async def test_soak_twenty_kernels_under_chaos(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """20 kernels (15 fake, 5 ipykernel) take seeded SIGKILLs, interrupts, signals and manual
    restarts while clients run code: no request hangs, every kernel ends ready and answering
    kernel_info or reported dead by an event, and nothing (process, file) outlives close()."""
    faulthandler.cancel_dump_traceback_later()  # longer than faulthandler_timeout, on purpose
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    rng = random.Random(SOAK_SEED)
    policy = RestartPolicy(max_restarts=30, within_seconds=60,
                           backoff=Backoff(initial=0.05, maximum=2, jitter=0.2))
    launch = LaunchOptions(forward_stderr=False, startup_timeout=60, shutdown_wait=2,
                           terminate_wait=1)
    fds_before = open_fds()
    max_fds = fds_before
    ops: Counter[str] = Counter()
    client_runs: Counter[str] = Counter()
    crashes = 0
    t_start = time.monotonic()

    async with Supervisor(policy=policy, launch=launch, rng=random.Random(SOAK_SEED),
                          max_concurrent_starts=6, name="soak") as sup:
        recorder = Recorder(sup)
        sup.subscribe(recorder)
        specs: list[dict[str, Any]] = (
            [{"spec": fake_spec()} for _ in range(5)]
            + [{"spec": fake_spec("--spawn-grandchild")} for _ in range(5)]
            + [{"spec": fake_spec("--flood-iopub", "20")} for _ in range(5)]
            + [{"kernel_name": "python3", "extra_arguments": IPY_ARGS} for _ in range(5)])
        kids = list(await asyncio.gather(*(sup.start_kernel(**kw) for kw in specs)))
        for kid in kids:
            recorder.note_pid(kid)
        t_ready = time.monotonic()
        stop = asyncio.Event()

        def ready_kids() -> list[str]:
            return [k for k in kids if k in sup and sup.child_status(k) == "ready"]

        async def client_loop(seed: int) -> None:
            nonlocal max_fds
            crng = random.Random(seed)
            while not stop.is_set():
                candidates = ready_kids()
                if not candidates:
                    await recorder.wait_until(lambda: bool(ready_kids()) or stop.is_set(), 120)
                    continue
                kid = crng.choice(candidates)
                try:
                    kc = sup.get_kernel(kid).client()
                except SupervisorError:
                    client_runs["kernel gone"] += 1
                    continue
                kc.start_channels()
                try:
                    await kc.wait_for_ready(timeout=10)
                    reply = await kc.execute("total = sum(range(10000))", reply=True, timeout=10)
                    client_runs[f"execute {reply['content']['status']}"] += 1
                except ChannelTimeout:
                    client_runs["timed out (kernel restarting)"] += 1
                except SupervisorError as exc:
                    client_runs[type(exc).__name__] += 1
                finally:
                    kc.stop_channels()
                max_fds = max(max_fds, open_fds())

        async def operate(kind: str, kid: str) -> None:
            try:
                if kind == "restart":
                    await asyncio.wait_for(sup.restart_kernel(kid, now=rng.random() < 0.3),
                                           OP_DEADLINE)
                elif kind == "interrupt":
                    await asyncio.wait_for(sup.interrupt_kernel(kid), OP_DEADLINE)
                else:
                    await asyncio.wait_for(sup.signal_kernel(kid, signal.SIGWINCH), OP_DEADLINE)
                ops[f"{kind}: ok"] += 1
            except SupervisorError as exc:
                ops[f"{kind}: {type(exc).__name__}"] += 1

        clients = [asyncio.ensure_future(client_loop(SOAK_SEED + i)) for i in range(3)]
        pending: set[asyncio.Task[None]] = set()
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline:
            kind = rng.choices(["sigkill", "interrupt", "restart", "signal"],
                               weights=[4, 3, 2, 1])[0]
            kid = rng.choice(kids)
            if kind == "sigkill":
                actor = sup.actor_of(kid) if kid in sup else None
                # Only a process not reaped yet: its pid cannot have been reused.
                if actor is not None and actor.is_alive() and actor.pid is not None:
                    os.kill(actor.pid, signal.SIGKILL)
                    crashes += 1
                    ops["sigkill: sent"] += 1
                else:
                    ops["sigkill: no live process"] += 1
            elif kid in sup:
                task = asyncio.ensure_future(operate(kind, kid))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                ops[f"{kind}: kernel gone"] += 1
            max_fds = max(max_fds, open_fds())
            # Pacing of the chaos itself (not a wait for an outcome): 2-10 actions a second.
            await asyncio.sleep(rng.uniform(0.1, 0.5))

        if pending:
            _, hung = await asyncio.wait(pending, timeout=OP_DEADLINE + 10)
            assert not hung, f"{len(hung)} requests never finished"
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)

        # Settle: every kernel ends ready or reported dead.
        def settled() -> bool:
            return all(k in recorder.dead or (k in sup and sup.child_status(k) == "ready")
                       for k in kids)

        await recorder.wait_until(settled, 180)
        answered = 0
        for kid in kids:
            if kid in recorder.dead:
                assert kid not in sup
                continue
            recorder.note_pid(kid)
            kc = sup.get_kernel(kid).client()
            kc.start_channels(hb=False)
            try:
                reply = await kc.kernel_info(reply=True, timeout=30)
                assert reply["content"]["status"] == "ok", kid
                answered += 1
            finally:
                kc.stop_channels()
        stats = sup.statistics()
        events_by_kind = dict(sorted(recorder.kinds.items()))

    elapsed = time.monotonic() - t_start
    fds_after = open_fds()
    leaked = recorder.still_running()  # close() reaped every kernel: none may be left
    left_files = sorted(os.listdir(runtime)) if runtime.exists() else []
    print(f"""
==================== soak report (seed {SOAK_SEED}) ====================
duration            {elapsed:.1f} s (chaos {SOAK_SECONDS:.0f} s, start-up {t_ready - t_start:.1f} s)
kernels             20 (15 fake, 5 ipykernel): {answered} ready and answering at the end, \
{len(recorder.dead)} reported dead
operations          {dict(sorted(ops.items()))}
crashes injected    {crashes} (SIGKILL)
restarts done       {recorder.restarted['automatic']} automatic ({stats.restarts} attempted), \
{recorder.restarted['manual']} manual reported ({ops['restart: ok']} restart_kernel calls \
succeeded); gave up {stats.gave_up}
client executions   {dict(sorted(client_runs.items()))}
events by kind      {events_by_kind}
open fds            {fds_before} before, max {max_fds} during, {fds_after} after close
kernel pids seen    {len(recorder.procs)}, still alive after close: {leaked}
runtime dir         {left_files}
=======================================================================""")
    assert answered + len(recorder.dead) == 20
    assert crashes > 0 and client_runs["execute ok"] > 0
    assert not leaked and not kernel_descendants()
    assert left_files == []
    assert fds_after <= fds_before + 8

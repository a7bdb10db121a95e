"""Scale: N kernels in one Supervisor, on this machine, in this process.

``python -m benchmarks.scale [--kernels 100] [--kill 10] [--kernel fake|NAME]
[--window 5] [--out DIR]`` starts N kernels at once in one
:class:`~supervisor.supervisor.Supervisor` and measures, for our library only
(the rows that compare us with the floor and jupyter_client are in
:mod:`benchmarks.rows`):

* ``scale_ready``: seconds from the first ``start_kernel`` until all N are ready;
* ``scale_rss_per_kernel``: growth of this process's RSS with N kernels, per kernel;
* ``scale_fds_per_kernel``: growth of this process's open fds, per kernel;
* ``scale_lag_idle_p99``: event-loop lag, 99th percentile, while the N run idle;
* ``scale_lag_kill_p99``: the same while ``--kill`` of them are SIGKILLed at once
  and restarted by the supervisor (until all are ready again), and
  ``scale_kill_recovered``: seconds from the kill until all are ready again.

Event-loop lag is how late a probe that asks to wake every 5 ms actually wakes
(the time a callback waits for the loop). ``--kernel fake`` (the default) is
tests/kernels/fakekernel.py, a real but cheap kernel; any kernelspec name works
(``python3`` for ipykernel). Everything runs on one asyncio loop; every kernel is
shut down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import KernelSpec
from supervisor.policy import Backoff, RestartPolicy
from supervisor.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "kernels" / "fakekernel.py"
PROBE_INTERVAL = 0.005


def fake_spec() -> KernelSpec:
    """The fake kernel's spec (no kernelspec directory needed)."""
    return KernelSpec(name="fake", argv=(sys.executable, str(FAKE), "-f", "{connection_file}"),
                      display_name="fake", language="python", resource_dir=FAKE.parent)


class LagProbe:
    """Wakes every PROBE_INTERVAL s and records how late each wake-up was."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PROBE_INTERVAL
            await asyncio.sleep(PROBE_INTERVAL)  # the probe's own pacing: what it measures
            self.samples.append(max(0.0, loop.time() - due))

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.samples


def p99(samples: list[float]) -> float:
    """The 99th percentile (0 for no samples)."""
    if not samples:
        return 0.0
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def measure(kernels: int, kill: int, kernel: str, window: float) -> dict[str, Any]:
    """One run; returns the figures (seconds, bytes, counts)."""
    me = psutil.Process()
    spec = fake_spec() if kernel == "fake" else None
    launch = LaunchOptions(kernel_name=kernel if spec is None else "fake", spec=spec,
                           forward_stderr=False, startup_timeout=300,
                           extra_arguments=() if spec else ("--HistoryManager.hist_file=:memory:",))
    policy = RestartPolicy(max_restarts=kill * 10, within_seconds=60,
                           backoff=Backoff(initial=0.0, maximum=0.0, jitter=0.0))
    probe = LagProbe()
    out: dict[str, Any] = {"kernels": kernels, "kill": kill, "kernel": kernel,
                           "cpus": os.cpu_count()}
    async with Supervisor(policy=policy, launch=launch) as sup:
        rss0, fds0 = me.memory_info().rss, me.num_fds()
        probe.start()
        t0 = time.perf_counter()
        try:
            ids = await asyncio.gather(*(sup.start_kernel() for _ in range(kernels)))
            out["scale_ready"] = time.perf_counter() - t0
            out["scale_lag_start_p99"] = p99(await probe.stop())
            out["scale_rss_per_kernel"] = (me.memory_info().rss - rss0) / kernels
            out["scale_fds_per_kernel"] = (me.num_fds() - fds0) / kernels
            probe.start()
            await asyncio.sleep(window)  # the measured idle window itself
            out["scale_lag_idle_p99"] = p99(await probe.stop())

            victims = ids[:kill]
            ready_again = asyncio.Event()
            restarted: set[str] = set()

            async def on_event(event: Any) -> None:
                if event.kind == "restarted" and event.kernel_id in victims:
                    restarted.add(event.kernel_id)
                    if len(restarted) == len(victims):
                        ready_again.set()

            sup.subscribe(on_event)
            pids = [sup.get_kernel(k).actor.pid for k in victims]
            probe.start()
            t1 = time.perf_counter()
            for pid in pids:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(ready_again.wait(), 300)
            out["scale_kill_recovered"] = time.perf_counter() - t1
            out["scale_lag_kill_p99"] = p99(await probe.stop())
            out["scale_lag_kill_max"] = max(probe.samples, default=0.0)
        finally:
            await probe.stop()
            await sup.shutdown_all(now=True)
    return out


def render(r: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    rows = [
        ("scale_ready", f"{r['kernels']} concurrent starts -> all ready", f"{r['scale_ready']:.2f} s"),
        ("scale_rss_per_kernel", "supervising RSS growth per kernel",
         f"{r['scale_rss_per_kernel'] / 2**20:.2f} MiB"),
        ("scale_fds_per_kernel", "supervising open fds per kernel",
         f"{r['scale_fds_per_kernel']:.1f}"),
        ("scale_lag_start_p99", "event-loop lag p99 while they start",
         f"{r['scale_lag_start_p99'] * 1000:.1f} ms"),
        ("scale_lag_idle_p99", f"event-loop lag p99, {r['kernels']} idle kernels",
         f"{r['scale_lag_idle_p99'] * 1000:.1f} ms"),
        ("scale_lag_kill_p99", f"event-loop lag p99, {r['kill']} SIGKILLed at once until "
         "restarted", f"{r['scale_lag_kill_p99'] * 1000:.1f} ms"),
        ("scale_kill_recovered", f"{r['kill']} SIGKILLed -> all restarted and ready",
         f"{r['scale_kill_recovered']:.2f} s"),
    ]
    lines = [f"Scale: {r['kernels']} x {r['kernel']} kernels in one Supervisor "
             f"({r['cpus']} CPUs)", "", "| row | what | ours |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run once, print the table, write results-scale.json/.md to --out."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    p.add_argument("--kernels", type=int, default=100)
    p.add_argument("--kill", type=int, default=10)
    p.add_argument("--kernel", default="fake", help="'fake' or a kernelspec name (python3)")
    p.add_argument("--window", type=float, default=5.0, help="idle window, seconds")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    result = asyncio.run(measure(args.kernels, args.kill, args.kernel, args.window))
    table = render(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"results-scale-{args.kernel}-{args.kernels}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

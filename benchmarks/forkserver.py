"""The fork server beside exec and jupyter_client, in one run: ``python -m benchmarks.forkserver``.

Contenders, interleaved sample by sample in this order, all starting the same
kernelspec (``python3`` unless ``--kernel``):

* **floor**: raw pyzmq + ``Popen`` (:mod:`benchmarks.floor`), the exec floor;
* **exec**: ours, ``AsyncKernelManager(kernel)`` (the local exec launcher);
* **fork**: ours, ``AsyncKernelManager(kernel, launcher="fork")``;
* **jupyter_client**: its ``AsyncKernelManager``.

Rows: one start -> ready; N concurrent starts (10, 20) -> all ready; restart
-> ready; PSS per idle kernel (the sum of ``Pss`` in ``/proc/PID/smaps_rollup``
over the kernels, and the fork server's template too, divided by the number of
kernels: the template's pages are the kernels' shared pages); and, ours only,
SIGKILL -> the Supervisor's ``exited`` event (the fork server relays the
status), and a warm pool of 2 serving a burst of 6 acquires (pool + exec vs
pool + fork).

The template is started by one untimed warm-up start (and timed once, as
``fork cold start``). Results: a markdown table printed and written with the
samples to ``--out`` (default ``bench-results/forkserver.json``). Every object
here belongs to the ``asyncio.run`` loop of its sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.floor import FloorLauncher
from benchmarks.rows import Floor, JupyterClient, Ours

NAMES = ("floor", "exec", "fork", "jupyter_client")


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Bench:
    """The four contenders and the samples they produced."""

    def __init__(self, kernel: str) -> None:
        from supervisor.kernelspec import get_kernel_spec
        from supervisor.launchers import launcher_named
        from supervisor.manager import AsyncKernelManager
        from supervisor.supervisor import Supervisor

        self.kernel = kernel
        self.floor = Floor(FloorLauncher(get_kernel_spec(kernel)))
        self.ours = Ours(kernel)
        self.jc = JupyterClient(kernel)
        self.akm = AsyncKernelManager
        self.Supervisor = Supervisor
        self.fork_launcher = launcher_named("fork")
        self.samples: dict[str, dict[str, list[float]]] = {}

    def put(self, row: str, name: str, value: float) -> None:
        self.samples.setdefault(row, {}).setdefault(name, []).append(value)

    # -- one contender's primitives -----------------------------------------------------
    async def start(self, name: str) -> tuple[Any, float]:
        if name == "floor":
            return await self.floor.start()
        if name == "exec":
            return await self.ours.start()
        if name == "fork":
            return await self.ours.start(lambda: self.akm(self.kernel, launcher="fork"))
        return await self.jc.start()

    async def dispose(self, name: str, h: Any) -> None:
        owner = {"floor": self.floor, "jupyter_client": self.jc}.get(name, self.ours)
        await owner.dispose(h)

    async def restart(self, name: str, h: Any) -> float:
        owner = {"floor": self.floor, "jupyter_client": self.jc}.get(name, self.ours)
        return float(await owner.restart(h))

    def pid(self, name: str, h: Any) -> int:
        if name == "floor":
            return int(h.pid)
        if name == "jupyter_client":
            return int(h.km.provisioner.pid)
        return int(h.km.pid)

    # -- scenarios ----------------------------------------------------------------------
    async def lifecycle(self, name: str) -> None:
        h, elapsed = await self.start(name)
        try:
            self.put("start", name, elapsed)
            self.put("restart", name, await self.restart(name, h))
        finally:
            await self.dispose(name, h)

    async def concurrent(self, name: str, n: int) -> None:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.start(name) for _ in range(n)),
                                       return_exceptions=True)
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*(self.dispose(name, r[0]) for r in results
                               if isinstance(r, tuple)), return_exceptions=True)
        errors = [r for r in results if not isinstance(r, tuple)]
        if errors:
            raise RuntimeError(f"{name}: {len(errors)}/{n} starts failed: {errors[0]!r}")
        self.put(f"concurrent_{n}", name, elapsed)

    async def idle_pss(self, name: str, n: int, settle: float) -> None:
        results = await asyncio.gather(*(self.start(name) for _ in range(n)),
                                       return_exceptions=True)
        handles = [r[0] for r in results if isinstance(r, tuple)]
        try:
            if len(handles) != n:
                raise RuntimeError(f"{name}: {n - len(handles)} starts failed")
            await asyncio.sleep(settle)  # idle steady state, not a wait for an event
            pids = [self.pid(name, h) for h in handles]
            if name == "fork":
                pids += [t.pid for t in self.fork_launcher.templates()]  # type: ignore[attr-defined]
            self.put(f"pss_{n}", name, sum(pss_kib(p) for p in pids) / n / 1024)
        finally:
            await asyncio.gather(*(self.dispose(name, h) for h in handles),
                                 return_exceptions=True)

    async def crash(self, name: str) -> None:
        """SIGKILL of an idle kernel -> the Supervisor's 'exited' event (ours only)."""
        from supervisor.kernel import LaunchOptions
        from supervisor.policy import RestartPolicy

        launch = LaunchOptions(forward_stderr=False, launcher=name)
        async with self.Supervisor(launch=launch,
                                   policy=RestartPolicy(restart="temporary")) as sup:
            exited = asyncio.Event()

            async def listener(ev: Any) -> None:
                if ev.kind == "exited":
                    exited.set()

            sup.subscribe(listener)
            kid = await sup.start_kernel(self.kernel)
            pid = sup.actor_of(kid).pid
            assert pid is not None
            t0 = time.perf_counter()
            os.kill(pid, 9)
            await asyncio.wait_for(exited.wait(), 30)
            self.put("crash_detect", name, time.perf_counter() - t0)

    async def pool_burst(self, name: str, pool: int, burst: int) -> None:
        from supervisor.kernel import LaunchOptions

        launch = LaunchOptions(forward_stderr=False, launcher=name)
        async with self.Supervisor(warm={self.kernel: pool}, launch=launch) as sup:
            changed = asyncio.Event()

            async def listener(ev: Any) -> None:
                changed.set()

            sup.subscribe(listener)
            while sup.statistics().pool.get(self.kernel, 0) < pool:
                await asyncio.wait_for(changed.wait(), 120)
                changed.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(sup.acquire(self.kernel) for _ in range(burst)))
            self.put(f"pool_{pool}_burst_{burst}", name, time.perf_counter() - t0)
            await sup.shutdown_all(now=True)


SAMPLE_TIMEOUT = 240.0


def run(coro_factory: Callable[[], Awaitable[None]]) -> str | None:
    """One sample on its own loop, bounded; the error in words, or None."""
    async def bounded() -> None:
        await asyncio.wait_for(coro_factory(), SAMPLE_TIMEOUT)

    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError:
        return f"sample exceeded {SAMPLE_TIMEOUT:g} s"
    except Exception as exc:  # a failed sample is reported, the run goes on
        return repr(exc)
    return None


def table(samples: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| row | floor | exec (ours) | fork (ours) | jupyter_client | fork / floor "
             "| fork / exec |", "|---|---|---|---|---|---|---|"]
    for row, by in samples.items():
        med = {n: statistics.median(v) for n, v in by.items() if v}
        unit = "MiB" if row.startswith("pss") else "s"
        digits = 4 if row == "crash_detect" else 3

        def cell(n: str, med: dict[str, float] = med, unit: str = unit,
                 by: dict[str, list[float]] = by, digits: int = digits) -> str:
            if n not in med:
                return "n/a"
            return f"{med[n]:.{digits}f} {unit} (n={len(by[n])})"

        def ratio(a: str, b: str, med: dict[str, float] = med) -> str:
            return f"{med[a] / med[b]:.2f}x" if a in med and b in med and med[b] else "n/a"

        lines.append(f"| {row} | " + " | ".join(cell(n) for n in NAMES)
                     + f" | {ratio('fork', 'floor')} | {ratio('fork', 'exec')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forkserver")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--runs", type=int, default=7, help="samples of start and restart")
    parser.add_argument("--concurrent-runs", type=int, default=2)
    parser.add_argument("--idle", type=int, default=10, help="kernels for the PSS row")
    parser.add_argument("--out", default="bench-results/forkserver.json")
    args = parser.parse_args(argv)
    bench = Bench(args.kernel)
    failures: list[str] = []
    t0 = time.perf_counter()
    error = run(lambda: bench.lifecycle("fork"))  # starts the template: the cold start
    if error:
        failures.append(f"fork cold start: {error}")
    cold = bench.samples.pop("start", {}).get("fork", [])
    bench.samples.clear()
    for name in NAMES:  # one untimed warm-up each
        run(lambda name=name: bench.lifecycle(name))
    bench.samples.clear()
    plan: list[tuple[str, Callable[[str], Awaitable[None]], int]] = [
        ("lifecycle", bench.lifecycle, args.runs),
        ("concurrent_10", lambda n: bench.concurrent(n, 10), args.concurrent_runs),
        ("concurrent_20", lambda n: bench.concurrent(n, 20), args.concurrent_runs),
        ("idle", lambda n: bench.idle_pss(n, args.idle, 2.0), 1),
    ]
    for label, scenario, runs in plan:
        for i in range(runs):
            for name in NAMES:
                error = run(lambda name=name, scenario=scenario: scenario(name))
                if error:
                    failures.append(f"{label}[{i}] {name}: {error}")
            print(f"  {label} {i + 1}/{runs} done", file=sys.stderr, flush=True)
    for i in range(args.runs):
        for name in ("exec", "fork"):
            error = run(lambda name=name: bench.crash(name))
            if error:
                failures.append(f"crash[{i}] {name}: {error}")
    for i in range(max(1, args.concurrent_runs)):
        for name in ("exec", "fork"):
            error = run(lambda name=name: bench.pool_burst(name, 2, 6))
            if error:
                failures.append(f"pool[{i}] {name}: {error}")
    bench.fork_launcher.close()  # type: ignore[attr-defined]
    text = table(bench.samples)
    if cold:
        text += f"\n\nfork cold start (template start + first kernel): {cold[0]:.3f} s"
    text += (f"\n\n{platform.python_version()} on {platform.platform()}, "
             f"{os.cpu_count()} CPUs; run took {time.perf_counter() - t0:.0f} s")
    if failures:
        text += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"samples": bench.samples, "cold_start": cold,
                               "failures": failures, "table": text}, indent=1))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

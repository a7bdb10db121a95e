"""Slurm kernels beside local ones: ``python -m benchmarks.slurm`` (needs a running cluster).

Start the test cluster first (``tests/slurm/cluster.sh start``; it prints the
``SLURM_CONF`` to export). Rows, each the median (and min-max) of ``--runs``
samples taken interleaved local / Slurm so that machine load hits both alike:

* start -> ready: ``Supervisor.start_kernel`` until it returns (ready =
  ``kernel_info_reply`` plus live IOPub); for Slurm this includes srun,
  scheduling, the node side's report and the connection from here to the node;
* shutdown: ``shutdown_kernel`` until the kernel is gone (Slurm: the job step
  ended and its final record read);
* crash detection: SIGKILL of the kernel process (on its node, for Slurm)
  until the supervisor's ``exited`` event;
* 20 kernels across 3 nodes: 20 concurrent ``start_kernel`` calls, Slurm
  placing them; time until all are ready, how they spread over the nodes, and
  the time to shut them all down.

The kernel is ``python3`` (ipykernel). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from supervisor.events import KernelEvent
from supervisor.kernel import LaunchOptions
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor

LOCAL = LaunchOptions(forward_stderr=False, startup_timeout=60)
SLURM = LOCAL.replace(launcher="slurm")


def _stats(samples: list[float]) -> str:
    if not samples:
        return "-"
    return (f"{statistics.median(samples):.3f} ({min(samples):.3f}-{max(samples):.3f})")


async def _lifecycle(opts: LaunchOptions) -> tuple[float, float]:
    async with Supervisor(launch=opts) as s:
        t0 = time.perf_counter()
        kid = await s.start_kernel("python3")
        t1 = time.perf_counter()
        await s.shutdown_kernel(kid)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


async def _crash(opts: LaunchOptions) -> float:
    seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def listener(ev: KernelEvent) -> None:
        if ev.kind == "exited" and not seen.done():
            seen.set_result(time.perf_counter())

    async with Supervisor(launch=opts, policy=RestartPolicy(restart="temporary")) as s:
        s.subscribe(listener)
        kid = await s.start_kernel("python3")
        proc: Any = s.actor_of(kid).process
        pid = getattr(proc, "remote_pid", None) or proc.pid
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        t1 = await asyncio.wait_for(seen, 30)
    return t1 - t0


async def _many(n: int) -> dict[str, Any]:
    async with Supervisor(launch=SLURM) as s:
        t0 = time.perf_counter()
        kids = await asyncio.gather(*(s.start_kernel("python3") for _ in range(n)))
        ready = time.perf_counter() - t0
        nodes = collections.Counter(getattr(s.actor_of(k).process, "node", "?") for k in kids)
        t1 = time.perf_counter()
        await s.shutdown_all()
        down = time.perf_counter() - t1
    return {"ready": ready, "shutdown": down, "nodes": dict(sorted(nodes.items()))}


async def measure(runs: int, many: int) -> list[tuple[str, str, str]]:
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(runs):
        for name, opts in (("local", LOCAL), ("slurm", SLURM)):
            start, stop = await _lifecycle(opts)
            samples[f"start {name}"].append(start)
            samples[f"stop {name}"].append(stop)
            samples[f"crash {name}"].append(await _crash(opts))
    rows = [
        ("start -> ready (s)", _stats(samples["start local"]), _stats(samples["start slurm"])),
        ("shutdown (s)", _stats(samples["stop local"]), _stats(samples["stop slurm"])),
        ("crash detection: SIGKILL -> exited event (s)", _stats(samples["crash local"]),
         _stats(samples["crash slurm"])),
    ]
    if many:
        result = await _many(many)
        spread = ", ".join(f"{node}: {count}" for node, count in result["nodes"].items())
        rows.append((f"{many} kernels concurrently: all ready (s)", "-",
                     f"{result['ready']:.2f} ({spread})"))
        rows.append((f"{many} kernels: shutdown_all (s)", "-", f"{result['shutdown']:.2f}"))
    return rows


def main(argv: list[str] | None = None,
         runner: Callable[[Awaitable[list[tuple[str, str, str]]]], Any] = asyncio.run) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="samples per row (default 5)")
    parser.add_argument("--many", type=int, default=20,
                        help="kernels started at once across the cluster (default 20; 0: skip)")
    args = parser.parse_args(argv)
    if not os.environ.get("SLURM_CONF"):
        raise SystemExit("export SLURM_CONF (tests/slurm/cluster.sh env) first")
    rows = runner(measure(args.runs, args.many))
    print(f"| row (median, min-max of {args.runs}) | local | Slurm (3 nodes) |")
    print("|---|---:|---:|")
    for title, local, slurm in rows:
        print(f"| {title} | {local} | {slurm} |")


if __name__ == "__main__":
    main()

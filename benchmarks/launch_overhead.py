"""The launcher's own cost per kernel, by containment mode: ``python -m benchmarks.launch_overhead``.

Launches ``/bin/true`` through :class:`supervisor.launchers.LocalLauncher` N
times per mode (off, session, auto, auto with a memory and a CPU limit) and
prints the median time of ``launch()`` (Popen plus the cgroup work) and of
``cleanup()`` (ending the tree, removing the cgroups, the ``/proc`` scan).
Start-to-ready with and without containment is the ``containment`` scenario
of ``python -m benchmarks``; this isolates the part containment adds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from supervisor.launchers import LaunchRequest, Limits, LocalLauncher

MODES = (("off", Limits()), ("session", Limits()), ("auto", Limits()),
         ("auto", Limits.parse("1G", 0.5)))


async def measure(runs: int) -> list[tuple[str, str, float, float]]:
    launcher = LocalLauncher()
    rows = []
    for mode, limits in MODES:
        launches, cleanups = [], []
        method = ""
        for _ in range(runs):
            request = LaunchRequest(argv=["/bin/true"], contain=mode, limits=limits,
                                    forward_stderr=False)
            t0 = time.perf_counter()
            proc = launcher.launch(request)
            launches.append(time.perf_counter() - t0)
            method = proc.method
            await proc.wait()
            t0 = time.perf_counter()
            await proc.cleanup()
            cleanups.append(time.perf_counter() - t0)
            proc.close()
        label = mode + (" + limits" if limits else "")
        rows.append((label, method, statistics.median(launches), statistics.median(cleanups)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    print("| contain | method | launch() median (ms) | cleanup() median (ms) |")
    print("|---|---|---:|---:|")
    for label, method, launch, cleanup in asyncio.run(measure(args.runs)):
        print(f"| {label} | {method} | {launch * 1e3:.2f} | {cleanup * 1e3:.2f} |")


if __name__ == "__main__":
    main()

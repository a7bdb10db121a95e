"""``python -m benchmarks``: run the rows, interleaved, and write the results.

    python -m benchmarks [--quick|--full] [--kernel NAME] [--only ROW,...] [--out DIR]
                         [--runs N] [--warmup N] [--seed N] [--list]

Everything runs in this one process, on the main thread (one ``asyncio.run``
per sample) except blocking-API samples, which run on one long-lived worker
thread so that a hang can be timed out. While measuring, file descriptors 1
and 2 point to ``DIR/run.log``: the library's structlog lines, the kernels'
stderr and any traceback go there; the progress bar and the final table go to
the real terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import psutil

from benchmarks import report
from benchmarks.rows import (
    CONTENDERS,
    ROW_BY_ID,
    ROWS,
    BenchError,
    NotApplicable,
    Recorder,
    Row,
    Settings,
    make_contenders,
    run_scenario,
)

MODES: dict[str, dict[str, Any]] = {
    # warmup: discarded runs per scenario and contender, on top of the global
    # warm-up (one full lifecycle per contender) that always comes first.
    "quick": {"runs": 3, "warmup": 0, "idle_window": 3.0,
              "runs_by_scenario": {"idle:10": 1}},
    "full": {"runs": 10, "warmup": 1, "idle_window": 10.0,
             "runs_by_scenario": {"concurrent:20": 5, "idle:10": 3, "idle:50": 1}},
}
SCENARIO_TIMEOUT = {"lifecycle": 180.0, "blocking": 150.0, "crash": 150.0, "warm": 240.0,
                    "containment": 180.0}
CRASH_PAUSE_MAX = 3.0  # jupyter_client's KernelRestarter polls every 3 s


def scenario_timeout(scenario: str) -> float:
    name, _, arg = scenario.partition(":")
    if name == "concurrent":
        return 60.0 + 10.0 * int(arg)
    if name == "idle":
        return 120.0 + 6.0 * int(arg)
    return SCENARIO_TIMEOUT[name]


# -- process hygiene --------------------------------------------------------------------------
def _children() -> list[psutil.Process]:
    """Our descendants, except kernel-supervisor's reaper sidecar (it exits with us)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("_reaper.py" in part for part in child.cmdline()):
                continue
        except psutil.ZombieProcess:
            pass
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out.append(child)
    return out


def sweep(runtime: Path, where: str) -> list[str]:
    """Kill kernels and remove connection files left after a sample; describe them."""
    found: list[str] = []
    alive = []
    for child in _children():
        try:
            status = child.status()
        except psutil.NoSuchProcess:
            continue
        if status == psutil.STATUS_ZOMBIE:
            found.append(f"{where}: unreaped zombie pid {child.pid}")
            continue
        alive.append(child)
    if alive:
        found.append(f"{where}: {len(alive)} process(es) still running "
                     f"(pids {', '.join(str(p.pid) for p in alive)})")
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
    files = sorted(p.name for p in runtime.iterdir()) if runtime.is_dir() else []
    if files:
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        found.append(f"{where}: {len(files)} file(s) left in the runtime dir ({shown})")
        for name in files:
            path = runtime / name
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


class _Worker:
    """One long-lived daemon thread for blocking-API samples (replaced if one hangs)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], queue.SimpleQueue[Any]]] | None
        self._jobs = None

    def _loop(self, jobs: queue.SimpleQueue[Any]) -> None:
        while True:
            fn, answer = jobs.get()
            try:
                fn()
                answer.put(None)
            except BaseException as exc:
                answer.put(exc)

    def run(self, fn: Callable[[], None], timeout: float) -> None:
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(self._jobs,), daemon=True,
                             name="bench-blocking").start()
        answer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._jobs.put((fn, answer))
        try:
            exc = answer.get(timeout=timeout)
        except queue.Empty:
            self._jobs = None  # abandon the stuck thread; the next sample gets a fresh one
            raise BenchError(f"blocking sample exceeded {timeout:g} s") from None
        if exc is not None:
            raise exc


# -- progress ---------------------------------------------------------------------------------
class _Progress:
    """tqdm on the real terminal, or plain lines when tqdm is missing."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.out = out
        self.total = total
        self.done = 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, file=out, unit="sample", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def show(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=self.out, flush=True)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the run ----------------------------------------------------------------------------------
def select_rows(mode: str, only: str | None) -> list[Row]:
    if not only:
        return [r for r in ROWS if mode == "full" or not r.full_only]
    picked: list[Row] = []
    for word in (w.strip() for w in only.split(",")):
        if not word:
            continue
        if word in ROW_BY_ID:
            matches = [ROW_BY_ID[word]]
        else:
            matches = [r for r in ROWS if r.scenario.partition(":")[0] == word
                       and (mode == "full" or not r.full_only)]
        if not matches:
            known = ", ".join(r.id for r in ROWS)
            raise SystemExit(f"--only: no row or scenario {word!r}; rows: {known}; scenarios: "
                             "lifecycle, blocking, crash, concurrent, warm, idle")
        picked += [m for m in matches if m not in picked]
    return [r for r in ROWS if r in picked]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run(args: argparse.Namespace, out_dir: Path, tty: TextIO) -> dict[str, Any]:
    mode = MODES[args.mode]
    rows = select_rows(args.mode, args.only)
    scenarios: list[str] = []
    for row in rows:
        if row.scenario not in scenarios:
            scenarios.append(row.scenario)
    warmup = mode["warmup"] if args.warmup is None else args.warmup

    def runs_of(scenario: str) -> int:
        if args.runs is not None:
            return args.runs
        return int(mode["runs_by_scenario"].get(scenario, mode["runs"]))

    def warmup_of(scenario: str) -> int:
        return 0 if scenario.startswith("idle") else warmup

    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    loadavg_at_start = [round(x, 2) for x in os.getloadavg()]
    contenders = make_contenders(args.kernel)
    rng = random.Random(args.seed)
    cells: dict[str, dict[str, dict[str, Any]]] = {
        r.id: {c: {"samples": [], "failures": [], "status": "ok", "reason": ""}
               for c in CONTENDERS} for r in rows}
    leaks: list[str] = []
    wall: dict[str, float] = {}
    notes: list[str] = []
    worker = _Worker()
    total = sum((warmup_of(s) + runs_of(s)) * len(contenders) for s in scenarios)
    global_warmup = args.warmup != 0  # only an explicit --warmup 0 skips it
    total += len(contenders) if global_warmup else 0
    progress = _Progress(total, tty)
    started = time.perf_counter()

    def sample(scenario: str, contender: Any, wanted: frozenset[str], label: str,
               settings: Settings) -> Recorder:
        rec = Recorder(wanted)
        progress.show(label)
        print(f"\n==== {label} ====", flush=True)  # into run.log
        try:
            if scenario == "blocking":
                worker.run(lambda: run_scenario(scenario, contender, rec, settings, 0.0),
                           scenario_timeout(scenario))
            else:
                run_scenario(scenario, contender, rec, settings, scenario_timeout(scenario))
        except NotApplicable:
            raise
        except Exception as exc:
            traceback.print_exc()
            rec.error = _reason(exc)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            leaks.extend(sweep(runtime, label))
            progress.step()
        return rec

    try:
        if global_warmup:  # start, 2 interrupts, restart, shutdown: nobody runs cold
            every = frozenset({"start", "interrupt", "restart", "shutdown"})
            for contender in contenders:
                settings = Settings(args.kernel, mode["idle_window"], 0.0)
                label = f"global warm-up · {contender.name}"
                rec = sample("lifecycle", contender, every, label, settings)
                if rec.error is not None:
                    notes.append(f"{label} failed at {rec.step}: {rec.error}")
        for scenario in scenarios:
            scenario_t0 = time.perf_counter()
            wanted = frozenset(r.id for r in rows if r.scenario == scenario)
            skip: set[str] = set()
            n_warm, n_runs = warmup_of(scenario), runs_of(scenario)
            for i in range(n_warm + n_runs):
                is_warm = i < n_warm
                pause = rng.uniform(0.0, CRASH_PAUSE_MAX)  # drawn for every i: same per seed
                settings = Settings(args.kernel, mode["idle_window"], 0.0 if is_warm else pause)
                for contender in contenders:
                    phase = "warm-up" if is_warm else f"run {i - n_warm + 1}/{n_runs}"
                    shown = "+".join(r.id for r in rows if r.scenario == scenario)
                    label = f"{shown} · {contender.name} · {phase}"
                    if contender.name in skip:
                        progress.step()
                        continue
                    try:
                        rec = sample(scenario, contender, wanted, label, settings)
                    except NotApplicable as na:
                        skip.add(contender.name)
                        for rid in wanted:
                            cells[rid][contender.name].update(status="n/a", reason=str(na))
                        continue
                    error = rec.error
                    for rid in wanted:
                        cell = cells[rid][contender.name]
                        if rid in rec.values:
                            if not is_warm:
                                cell["samples"].append(rec.values[rid])
                        elif error is not None:
                            why = error if rid == rec.step else (
                                f"not reached ({rec.step} failed: {error})")
                            cell["failures"].append(
                                f"{'warm-up' if is_warm else 'run ' + str(i - n_warm + 1)}: {why}")
            wall[scenario] = round(time.perf_counter() - scenario_t0, 2)
    finally:
        progress.close()
        leaks.extend(sweep(runtime, "end of run"))

    out_rows = []
    for row in rows:
        contender_cells = {}
        for name in CONTENDERS:
            cell = cells[row.id][name]
            if cell["status"] != "n/a":
                if cell["samples"]:
                    cell["status"] = "ok"
                else:
                    cell["status"] = "failed"
                    cell["reason"] = (cell["failures"][0].split(": ", 1)[-1]
                                      if cell["failures"] else "no sample")
            cell["stats"] = report.cell_stats(cell["samples"])
            contender_cells[name] = cell

        def median(name: str, cc: dict[str, Any] = contender_cells) -> float | None:
            st = cc[name]["stats"]
            return None if st is None else float(st["median"])

        out_rows.append({
            "id": row.id, "title": row.title, "unit": row.unit, "scenario": row.scenario,
            "note": row.note, "contenders": contender_cells,
            "ratios": {"ours/floor": report.ratio(median("ours"), median("floor")),
                       "ours/jupyter_client": report.ratio(median("ours"),
                                                           median("jupyter_client"))},
        })
    floor = contenders[0]
    machine = report.machine(loadavg_at_start)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "machine": machine,
        "config": {
            "mode": args.mode, "kernel": args.kernel, "runs": args.runs or mode["runs"],
            "runs_by_scenario": {s: runs_of(s) for s in scenarios},
            "warmup": warmup, "global_warmup": global_warmup, "seed": args.seed, "idle_window_s": mode["idle_window"],
            "kernel_argv": report_argv(floor),
            "jupyter_client_argv": jupyter_client_argv(args.kernel),
            "order": list(CONTENDERS),
            "scenario_wall_s": wall,
        },
        "rows": out_rows,
        "leaks": leaks,
        "notes": notes,
        "duration_s": time.perf_counter() - started,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report_argv(floor: Any) -> list[str]:
    from benchmarks.floor import argv_of

    return argv_of(floor.launcher.spec)


def jupyter_client_argv(kernel: str) -> list[str] | str:
    """The argv jupyter_client builds for the same kernel (to show it is the same)."""
    try:
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name=kernel)
        km.connection_file = os.path.abspath("CONNECTION-FILE")
        return [a.replace(km.connection_file, "{connection_file}")
                for a in km.format_kernel_cmd()]
    except Exception as exc:
        return f"unknown: {_reason(exc)}"


@contextlib.contextmanager
def redirected(log_path: Path) -> Any:
    """Point fds 1 and 2 at ``log_path``; yield a stream on the real stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    tty = os.fdopen(os.dup(saved_err), "w", buffering=1)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield tty
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        tty.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Kernel start/stop/restart/interrupt/crash/idle benchmarks: the raw "
                    "floor, kernel-supervisor and jupyter_client, interleaved, same kernel.")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--quick", dest="mode", action="store_const", const="quick",
                   help="few runs, no 20-kernel / 50-kernel rows (default; < 2 min on 2 cores)")
    m.add_argument("--full", dest="mode", action="store_const", const="full",
                   help="10 runs per row and the large rows (about 10 min on 2 cores)")
    p.set_defaults(mode="quick")
    p.add_argument("--kernel", default="python3", help="kernelspec name (default python3)")
    p.add_argument("--only", metavar="ROW,...",
                   help="row ids or scenario names (lifecycle, blocking, crash, concurrent, "
                        "warm, idle); see --list")
    p.add_argument("--out", default="bench-results", type=Path,
                   help="output directory (default bench-results)")
    p.add_argument("--runs", type=int, help="measured runs per row and contender (overrides mode)")
    p.add_argument("--warmup", type=int,
                   help="discarded warm-up runs per scenario and contender (quick 0, full 1), "
                        "after one global warm-up lifecycle per contender; --warmup 0 given "
                        "explicitly skips the global warm-up too")
    p.add_argument("--seed", type=int, default=1, help="seed of the random pre-crash pauses")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for row in ROWS:
            extra = " [full only]" if row.full_only else ""
            print(f"{row.id:15} {row.scenario:14} {row.title}{extra}")
        return 0
    select_rows(args.mode, args.only)  # a bad --only fails here, before anything starts
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    results: dict[str, Any] | None = None
    failure: BaseException | None = None
    try:
        with redirected(out_dir / "run.log") as tty:
            try:
                results = run(args, out_dir, tty)
            except BaseException as exc:  # KeyboardInterrupt too: report it outside
                traceback.print_exc()
                failure = exc
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if results is None:
        if isinstance(failure, KeyboardInterrupt):
            print("interrupted: no results written", file=sys.stderr)
            return 130
        print(f"the benchmark runner failed (details in {out_dir / 'run.log'}):",
              file=sys.stderr)
        if failure is not None:
            traceback.print_exception(failure)
        return 1
    report.write_json(results, out_dir / "results.json")
    (out_dir / "results.md").write_text(report.markdown_table(results), encoding="utf-8")
    why_not = report.chart(results, out_dir / "benchmark.png")
    print(report.text_table(results))
    for leak in results["leaks"]:
        print(f"left behind: {leak}")
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + ("" if why_not else f", {out_dir / 'benchmark.png'}")
          + f"; library and kernel output in {out_dir / 'run.log'}")
    if why_not:
        print(f"no chart: {why_not}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())

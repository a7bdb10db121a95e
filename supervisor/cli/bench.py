"""``kernel-supervisor bench``: the benchmark suite of a source checkout, in this process.

The suite (``benchmarks/``) is not part of the installed package: it is looked
for in the current directory, then beside the source tree this package was
imported from (an editable install). It runs its own loops.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from pathlib import Path

from supervisor.cli._common import Context

NAME = "bench"
SUMMARY = "run the benchmark suite (python -m benchmarks)"
DESCRIPTION = (
    "Run the benchmark suite of a source checkout in this process (from the checkout's\n"
    "directory, with the 'bench' extra installed), --quick unless --full is given.\n"
    "Every argument after 'bench' goes to the suite; see its own options with\n"
    "'kernel-supervisor bench -- --help'. Logging options go before 'bench'.")
OWN_LOGGING = False
TAKES_REST = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite parses its own arguments (see TAKES_REST)."""


def _checkout() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


def run(args: argparse.Namespace, ctx: Context) -> int:
    root = _checkout()
    if root is None:
        print("error: no benchmark suite here: run this from the directory of a source "
              "checkout of kernel-supervisor (it holds benchmarks/), with the 'bench' extra "
              "installed", file=sys.stderr)
        return 1
    bench_args = ctx.extra
    if not {"--quick", "--full"} & set(bench_args):
        bench_args = ["--quick", *bench_args]
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.path.insert(0, str(root))
    sys.argv = ["python -m benchmarks", *bench_args]
    try:
        if importlib.util.find_spec("benchmarks.__main__") is None:
            print(f"error: benchmarks/ of {root} is not importable", file=sys.stderr)
            return 1
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except ModuleNotFoundError as exc:
        print(f"error: the benchmarks need the 'bench' extra: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0

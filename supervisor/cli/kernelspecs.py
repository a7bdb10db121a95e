"""``kernel-supervisor kernelspecs``: list the installed kernels (no loop, no threads)."""

from __future__ import annotations

import argparse
import json
import sys

from supervisor.cli._common import Context, format_table
from supervisor.kernelspec import get_all_specs

NAME = "kernelspecs"
SUMMARY = "list the installed kernels"
DESCRIPTION = ("List the kernelspecs found on the Jupyter path: name, display name and "
               "resource directory.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print JSON shaped like 'jupyter kernelspec list --json'")


def run(args: argparse.Namespace, ctx: Context) -> int:
    specs = get_all_specs()
    if args.json:
        print(json.dumps({"kernelspecs": specs}, indent=2))
        return 0
    if not specs:
        print("no kernelspecs found (installing ipykernel provides python3)", file=sys.stderr)
        return 0
    rows = [("NAME", "DISPLAY NAME", "RESOURCE DIR")]
    rows += [(name, s["spec"]["display_name"], s["resource_dir"])
             for name, s in sorted(specs.items())]
    print("\n".join(format_table(rows)))
    return 0

"""``python -m supervisor``: the kernel-supervisor command line.

Runs :func:`supervisor.cli.main` on the main thread; see :mod:`supervisor.cli`
for the loop it runs (one ``asyncio.run`` of one main coroutine per command).
"""

from __future__ import annotations

import sys

from supervisor.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m supervisor"))

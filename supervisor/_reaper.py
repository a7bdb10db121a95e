"""The reaper sidecar: kills our kernels' process groups when we die.

This file runs as its own tiny process (``python -I -S _reaper.py``), started
once per supervising process by :mod:`supervisor.process`. It reads lines from
its stdin, a pipe whose only writer is the supervising process:

* ``+PGID`` registers a kernel's process group,
* ``-PGID`` forgets it (the kernel was shut down and reaped).

When the pipe reaches end of file, the supervising process is gone, however it
died (normal exit, exception, SIGKILL): every group still registered gets
SIGKILL, children and grandchildren alike, and the reaper exits. It never
polls: it blocks in ``read``.

It imports nothing of the package, so it starts in a few milliseconds and
survives a broken installation.
"""

import os
import signal
import sys


def main() -> int:
    # Own session already (start_new_session); a terminal's Ctrl-C is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if len(line) < 2 or not line[1:].isdigit():
                continue
            pgid = int(line[1:])
            if pgid <= 1:
                continue
            if line[:1] == b"+":
                groups.add(pgid)
            elif line[:1] == b"-":
                groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

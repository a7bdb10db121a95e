"""The reaper sidecar: kills our kernels' process groups when we die.

This file runs as its own tiny process (``python -I -S _reaper.py``), started
once per supervising process by :mod:`supervisor.process`. It reads lines from
its stdin, a pipe whose only writer is the supervising process:

* ``+PGID`` registers a kernel's process group, optionally followed by
  tab-separated paths of files to delete with it (its connection file),
* ``-PGID`` forgets it (the kernel was shut down and reaped).

When the pipe reaches end of file, the supervising process is gone, however it
died (normal exit, exception, SIGKILL): every group still registered gets
SIGKILL, children and grandchildren alike, its files are deleted, and the
reaper exits. It never polls: it blocks in ``read``.

It imports nothing of the package, so it starts in a few milliseconds and
survives a broken installation.
"""

import os
import signal
import sys


def main() -> int:
    # Own session already (start_new_session); a terminal's Ctrl-C is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: dict[int, list[bytes]] = {}
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
            head, *paths = line.split(b"\t")
            if len(head) < 2 or not head[1:].isdigit():
                continue
            pgid = int(head[1:])
            if pgid <= 1:
                continue
            if head[:1] == b"+":
                groups[pgid] = paths
            elif head[:1] == b"-":
                groups.pop(pgid, None)
    for pgid, paths in groups.items():
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Start processes that try to outlive their kernel, then become the kernel.

``python escaper.py MODE PID_FILE -- KERNEL_ARGV...``: starts the processes
MODE names, writes their pids to PID_FILE (one per line, written and renamed
into place before the kernel binds, so a test that saw the kernel become
ready reads a complete file), then ``exec``s the kernel argv in this same
process (same pid, same environment):

* ``setsid``: ``sleep 600`` in a new session (``start_new_session``);
* ``doublefork``: a classic daemon: fork, setsid, fork, the parent exits, so
  the grandchild is orphaned into its own session;
* ``sigterm``: a child in its own session that ignores SIGTERM;
* ``forks:N``: a child in its own session that forks N more children, each
  calling setsid, and lists all N + 1 pids;
* ``none``: nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def _daemon() -> int:
    """Fork twice with a setsid between; return the grandchild's pid."""
    read, write = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(read)
        os.setsid()
        second = os.fork()
        if second == 0:
            os.close(write)
            signal.pause()
            os._exit(0)
        os.write(write, str(second).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 64):
        data += chunk
    os.close(read)
    os.waitpid(first, 0)
    return int(data)


PAUSE = "import signal; signal.pause()"
IGNORE_TERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"
FORKER = """
import os, signal, sys
n = int(sys.argv[1])
pids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.setsid()
        signal.pause()
        os._exit(0)
    pids.append(pid)
sys.stdout.write(" ".join(map(str, pids)) + "\\n")
sys.stdout.flush()
sys.stdout.close()
signal.pause()
"""


def spawn(mode: str) -> list[int]:
    if mode == "none":
        return []
    if mode == "setsid":
        return [subprocess.Popen(["sleep", "600"], start_new_session=True).pid]
    if mode == "doublefork":
        return [_daemon()]
    if mode == "sigterm":
        return [subprocess.Popen([sys.executable, "-c", IGNORE_TERM],
                                 start_new_session=True).pid]
    if mode.startswith("forks:"):
        parent = subprocess.Popen([sys.executable, "-c", FORKER, mode[6:]],
                                  start_new_session=True, stdout=subprocess.PIPE)
        assert parent.stdout is not None
        children = [int(p) for p in parent.stdout.readline().split()]
        parent.stdout.close()
        return [parent.pid, *children]
    raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    mode, pid_file, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv
    pids = spawn(mode)
    with open(pid_file + ".tmp", "w") as f:
        f.write("".join(f"{p}\n" for p in pids))
    os.replace(pid_file + ".tmp", pid_file)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()

"""The reaper sidecar: ends our kernels' whole process trees when we die.

This file runs as its own tiny process (``python -I -S _reaper.py``), started
once per supervising process by :mod:`supervisor.launchers.reaper`. It reads
lines from its stdin, a pipe whose only writer is the supervising process:

* ``+ID`` then tab-separated fields registers one kernel: ``g<pgid>`` its
  process group, ``c<dir>`` a cgroup directory of its tree, ``e<token>`` the
  marker its tree carries in the environment, ``f<path>`` a file to delete
  with it (its connection file);
* ``-ID`` forgets it (the kernel was shut down and its tree ended).

When the pipe reaches end of file, the supervising process is gone, however it
died (normal exit, exception, SIGKILL). For every kernel still registered it
SIGKILLs the process group, every process in its cgroups (``cgroup.kill``, or
one by one) and every process carrying its marker, waits on pidfds until they
are gone, removes the cgroup directories and the files, and exits. It never
polls while the supervisor lives: it blocks in ``read``.

It imports nothing of the package, so it starts in a few milliseconds and
survives a broken installation.
"""

import os
import select
import signal
import sys
import time
from collections.abc import Iterable

TREE_ENV = b"KERNEL_SUPERVISOR_TREE="


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _procs(group: bytes) -> list[int]:
    try:
        with open(os.path.join(group, b"cgroup.procs"), "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _marked(tokens: list[bytes]) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if any(TREE_ENV + t in entries for t in tokens):
            found.append(int(name))
    return found


def _end(entries: list[dict[bytes, list[bytes]]]) -> set[int]:
    """SIGKILL every tree until nothing new shows up; the pids signalled."""
    seen: set[int] = set()
    groups = [c for e in entries for c in e.get(b"c", ())]
    tokens = [t for e in entries for t in e.get(b"e", ())]
    for entry in entries:
        for pgid in entry.get(b"g", ()):
            try:
                os.killpg(int(pgid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for group in groups:
        try:
            with open(os.path.join(group, b"cgroup.kill"), "wb") as f:
                f.write(b"1")
        except OSError:
            pass
    for _ in range(50):
        new = [p for g in groups for p in _procs(g)] + (_marked(tokens) if tokens else [])
        new = [p for p in new if p not in seen]
        if not new:
            break
        for pid in new:
            _kill(pid)
        seen.update(new)
    return seen


def _wait_gone(pids: Iterable[int], deadline: float) -> None:
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def main() -> int:
    # Own session already (start_new_session); a terminal's Ctrl-C is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernels: dict[bytes, dict[bytes, list[bytes]]] = {}
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
            head, *fields = line.split(b"\t")
            if head[:1] == b"+":
                entry: dict[bytes, list[bytes]] = {}
                for item in fields:
                    if item:
                        entry.setdefault(item[:1], []).append(item[1:])
                kernels[head[1:]] = entry
            elif head[:1] == b"-":
                kernels.pop(head[1:], None)
    if not kernels:
        return 0
    entries = list(kernels.values())
    deadline = time.monotonic() + 5.0
    _wait_gone(_end(entries), deadline)
    groups = [c for e in entries for c in e.get(b"c", ())]
    # Deepest first; a group whose last process is still exiting gets a few more tries.
    for group in sorted(groups, key=len, reverse=True):
        while True:
            try:
                os.rmdir(group)
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                _wait_gone(_end([{b"c": [group]}]), deadline)
                select.select([], [], [], 0.005)
                continue
            break
    for entry in entries:
        for path in entry.get(b"f", ()):
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

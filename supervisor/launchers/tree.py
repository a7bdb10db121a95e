"""A kernel's process tree without cgroups: a marker in the environment, read from /proc.

Plain synchronous functions, safe from any thread.

Every process a kernel starts inherits its environment, and keeps it through
``setsid``, double forks and ``nohup``: we put ``KERNEL_SUPERVISOR_TREE=<token>``
(a random token per kernel launch) in the kernel's environment and find its
tree by reading ``/proc/<pid>/environ`` of the processes we may read (our own
user's, or all as root). Jenkins ends a build's stray daemons the same way.
A process that replaces its environment on ``exec`` (``env -i``, ``sudo``)
is not found this way; cgroups (:mod:`supervisor.launchers.cgroups`) close
that gap where the machine offers them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

__all__ = ["TREE_ENV", "census", "cpu_seconds", "find", "kill", "rss"]

TREE_ENV = "KERNEL_SUPERVISOR_TREE"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_census: tuple[float, dict[str, list[int]]] = (float("-inf"), {})


def find(token: str) -> list[int]:
    """Pids of the live processes whose environment carries ``token``."""
    marker = f"{TREE_ENV}={token}".encode()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if marker in data and any(entry == marker for entry in data.split(b"\0")):
            found.append(int(name))
    return found


def census(max_age: float = 1.0, token: str | None = None) -> dict[str, list[int]]:
    """Every marked process by token, from one ``/proc`` scan reused for ``max_age`` s.

    For figures (``statistics()`` of many kernels costs one scan, not one per
    kernel); a ``token`` missing from the last scan (a new kernel) forces a
    new one; ending a tree always scans afresh (:func:`find`).
    """
    global _census
    now = time.monotonic()
    at, found = _census
    if now - at <= max_age and (token is None or token in found):
        return found
    prefix = f"{TREE_ENV}=".encode()
    found = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if prefix not in data:
            continue
        for entry in data.split(b"\0"):
            if entry.startswith(prefix):
                found.setdefault(entry[len(prefix):].decode("ascii", "replace"), []).append(
                    int(name))
                break
    _census = (now, found)
    return found


def kill(token: str, signum: int = signal.SIGKILL, rounds: int = 50) -> list[int]:
    """Signal every process of the tree until no new one appears; the pids signalled.

    With SIGKILL a forking process stops forking when the signal lands, so each
    round finds only children born before it and the loop ends.
    """
    seen: set[int] = set()
    for _ in range(rounds):
        new = [p for p in find(token) if p not in seen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        seen.update(new)
        if signum != signal.SIGKILL:
            break
    return sorted(seen)


def rss(pids: Iterable[int]) -> int:
    """Sum of the resident set sizes of ``pids`` (bytes; shared pages counted per process)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * _PAGE
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU seconds of ``pids`` and of their children already reaped."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
            fields = text.rpartition(")")[2].split()
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / _TICKS

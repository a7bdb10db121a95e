"""The client side of the reaper sidecar (:mod:`supervisor.launchers._reaper`).

One sidecar per supervising process, started on first use; any thread may
register and unregister (a lock orders the writes). After a fork the child
starts its own sidecar.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from supervisor._log import get_logger

__all__ = ["Reaper", "reaper", "reaper_pid"]

log = get_logger("supervisor.launchers.reaper")


def _clean(value: str) -> bytes | None:
    return None if "\t" in value or "\n" in value else os.fsencode(value)


class Reaper:
    """Talks to this process's sidecar over its stdin pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = 0
        self._entries: dict[int, bytes] = {}  # replayed to a sidecar started after a loss

    def _ensure(self) -> subprocess.Popen[bytes] | None:
        if self._proc is not None and self._owner_pid == os.getpid():
            return self._proc
        if self._owner_pid != os.getpid():
            self._entries.clear()  # a forked child: the parent's kernels are not ours
        script = str(Path(__file__).with_name("_reaper.py"))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # pragma: no cover - no interpreter to run
            log.warning("reaper.unavailable", error=str(exc))
            self._proc = None
            return None
        self._owner_pid = os.getpid()
        atexit.register(self._close, self._proc)
        if self._entries and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.write(b"".join(self._entries.values()))
                self._proc.stdin.flush()
        return self._proc

    def _close(self, proc: subprocess.Popen[bytes]) -> None:
        """At interpreter exit: close our end of the pipe and reap the sidecar.

        The sidecar sees end of file, ends what is still registered and exits,
        so nothing is left behind and no Popen or pipe is left to the garbage
        collector. A forked child (other owner) only closes its copy of the pipe.
        """
        with self._lock:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if self._owner_pid == os.getpid():
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    proc.wait(timeout=6)  # its own deadline for ending trees is 5 s
            if self._proc is proc:
                self._proc = None

    def _write(self, line: bytes, key: int | None = None) -> None:
        with self._lock:
            proc = self._ensure()
            if key is not None:
                if line.startswith(b"+"):
                    self._entries[key] = line
                else:
                    self._entries.pop(key, None)
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError as exc:  # the reaper died; start another next time
                log.warning("reaper.lost", error=str(exc))
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                self._proc = None

    def register(self, key: int, *, pgid: int | None = None, cgroups: Sequence[str] = (),
                 token: str | None = None, files: Sequence[str] = ()) -> None:
        """Remember a kernel's tree: its group, cgroup dirs, env marker and files."""
        fields = [b"+%d" % key]
        if pgid is not None:
            fields.append(b"g%d" % pgid)
        for tag, values in ((b"c", cgroups), (b"e", [token] if token else []), (b"f", files)):
            for value in values:
                clean = _clean(value)
                if clean:
                    fields.append(tag + clean)
        self._write(b"\t".join(fields) + b"\n", key)

    def unregister(self, key: int) -> None:
        """Forget a kernel whose tree is gone."""
        self._write(b"-%d\n" % key, key)

    def pid(self) -> int | None:
        """The sidecar's pid, starting it if needed."""
        with self._lock:
            proc = self._ensure()
            return None if proc is None else proc.pid


reaper = Reaper()


def reaper_pid() -> int | None:
    """The pid of this process's reaper sidecar (starting it if needed)."""
    return reaper.pid()

"""Checks on the way into a start: descriptors left, errors that mean exhaustion, port clashes.

Plain functions over values (a kernel id, an exception, the bytes a kernel
wrote to stderr); they run on the actor's loop but keep no state.
"""

from __future__ import annotations

import errno
import os
import re
import resource

from supervisor.connection import (
    CHANNELS,
    ConnectionInfo,
)
from supervisor.errors import (
    ConnectionFileError,
    KernelStartupError,
    ResourceExhaustedError,
)

__all__: list[str] = []


_PORT_CLASH = b"Address already in use"
# pyzmq names the endpoint: "Address already in use (addr='tcp://127.0.0.1:5555')"
_BIND_ERROR = re.compile(rb"Address already in use \(addr='(?P<url>[^']*)'\)")


_FDS_PER_START = 16  # descriptors a start may hold at its peak (probes, pipes, sockets)
_EXHAUSTED = {
    errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors",
    errno.EAGAIN: "processes", errno.ENOMEM: "memory",
    errno.ENOSPC: "disk space", errno.EDQUOT: "disk space",
}
_WHAT = {
    "file descriptors": "too many open files", "processes": "no more processes",
    "memory": "out of memory", "disk space": "no space left on the device",
}


def _check_fd_headroom(kernel_id: str) -> None:
    """Refuse a start at once when the fd limit is (nearly) reached.

    At the limit, ZeroMQ fails to connect silently and retries forever; a
    start would wait its whole startup timeout for a kernel it cannot reach.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except FileNotFoundError:  # no /proc: nothing to measure with
        return
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            used = soft
        else:
            return
    if soft != resource.RLIM_INFINITY and soft - used < _FDS_PER_START:
        raise ResourceExhaustedError(
            f"kernel {kernel_id} not started: too many open files ({used} in use, the "
            f"limit is {soft}; a start needs about {_FDS_PER_START} more)",
            resource="file descriptors", errno=errno.EMFILE)


def _exhaustion(kernel_id: str, exc: BaseException) -> ResourceExhaustedError | None:
    """The resource a failed start ran out of, if that is what ``exc`` (or its cause) says."""
    seen: BaseException | None = exc
    path = exc.path if isinstance(exc, ConnectionFileError) else None
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int) and code in _EXHAUSTED:
            what = _EXHAUSTED[code]
            if isinstance(seen, OSError) and seen.filename:
                path = str(seen.filename)
            where = f" ({path})" if path else ""
            return ResourceExhaustedError(
                f"kernel {kernel_id} not started: {_WHAT[what]}{where}: {seen}",
                resource=what, errno=code)
        if isinstance(seen, KernelStartupError) and "Too many open files" in seen.stderr_tail:
            return ResourceExhaustedError(
                f"kernel {kernel_id} not started: the kernel ran out of file descriptors "
                f"(too many open files)\n{seen.stderr_tail}",
                resource="file descriptors", errno=errno.EMFILE)
        seen = seen.__cause__
    return None


class _PortClash(Exception):
    """A launch found one of its ports taken (by the kernel's stderr or the exit)."""

    def __init__(self, channel: str | None, port: int | None, tail: str = "") -> None:
        super().__init__(channel, port)
        self.channel = channel
        self.port = port
        self.tail = tail


def _find_clash(stderr: bytes, info: ConnectionInfo) -> _PortClash | None:
    """The port clash a kernel's stderr reports, naming the channel when it can."""
    if _PORT_CLASH not in stderr:
        return None
    channel: str | None = None
    port: int | None = None
    for match in _BIND_ERROR.finditer(stderr):
        url = match.group("url").decode("utf-8", "replace")
        suffix = url.rsplit(":" if url.startswith("tcp") else "-", 1)[-1]
        if suffix.isdigit():
            port = int(suffix)
            channel = next((c for c in CHANNELS if info.port(c) == port), None)
    return _PortClash(channel, port)



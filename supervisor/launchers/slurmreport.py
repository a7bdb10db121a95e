"""The report-back channel of the Slurm launcher: signed reports from compute nodes.

A kernel started by Slurm runs on a node we do not choose; its node side
(:mod:`supervisor.launchers._slurmnode`) picks the address and ports there and
tells us. This module is the receiving end: a TCP server on an address the
nodes can reach, one per launcher and loop, open while a kernel of that loop
is starting or running.

Protocol (one JSON line each way, then the connection stays open as a link):

* node -> us: ``{"launch": ID, "body": TEXT, "mac": HEX}`` where ``TEXT`` is the
  JSON report (``launch``, ``ip``, ``ports``, ``node``, ``host``, ``job``,
  ``step``, ``pid``, ``connection_file``) and ``HEX`` its HMAC-SHA256 under the
  launch's one-time secret (given to the job in its environment, never on a
  command line);
* us -> node: ``ok`` (the node side starts the kernel) or ``no`` (it exits);
* node -> us: ``{"started": PID}`` once the kernel runs; closing the link
  either way means "gone": the node side kills its kernel when we close it or
  die.

A report is accepted once: the secret is retired when it is, and when its
launch gives up (a start timed out while the job was pending). Reports with an
unknown launch id, a bad MAC or bad JSON are *unauthenticated*; reports for a
retired launch are *late*; both are dropped, logged and counted
(:attr:`ReportCounts`).

Threading: a :class:`ReportServer` and its :class:`Expected` entries belong to
the loop that made them (a Tornado ``TCPServer`` on the current IOLoop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.tcpserver import TCPServer

from supervisor._log import get_logger

__all__ = ["Expected", "ReportCounts", "ReportServer", "sign"]

log = get_logger("supervisor.launchers.slurm")

_MAX_LINE = 65536
_REPORT_WAIT = 10.0  # seconds a connected peer has to send its report line
_RETIRED_KEPT = 4096


def sign(secret: bytes, body: str) -> str:
    """HMAC-SHA256 of the report text under the launch's secret, in hex."""
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


@dataclass
class ReportCounts:
    """Reports seen by a launcher's servers: accepted, and dropped by kind."""

    accepted: int = 0
    unauthenticated: int = 0
    late: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"reports_accepted": self.accepted,
                "reports_unauthenticated": self.unauthenticated,
                "reports_late": self.late}


class Expected:
    """One launch waiting for its report; then its open link to the node side."""

    def __init__(self, launch: str, secret: bytes) -> None:
        self.launch = launch
        self.secret = secret
        self.report: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.kernel_pid: int | None = None
        self.on_started: Callable[[int], None] | None = None
        self._stream: IOStream | None = None

    def accept(self, report: dict[str, Any], stream: IOStream) -> None:
        self._stream = stream
        if not self.report.done():
            self.report.set_result(report)

    def close_link(self) -> None:
        """Close the link: the node side kills its kernel if it still runs."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _Server(TCPServer):
    def __init__(self, owner: ReportServer) -> None:
        super().__init__(max_buffer_size=_MAX_LINE * 2)
        self._owner = owner

    async def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        await self._owner._handle(stream, address)


class ReportServer:
    """Listens on ``host`` (an address the compute nodes reach) for node reports."""

    def __init__(self, host: str, counts: ReportCounts) -> None:
        self.counts = counts
        self._expected: dict[str, Expected] = {}
        self._retired: collections.OrderedDict[str, None] = collections.OrderedDict()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.host, self.port = sock.getsockname()[:2]
        self._server = _Server(self)
        self._server.add_socket(sock)
        self._streams: set[IOStream] = set()
        self.closed = False

    @property
    def address(self) -> str:
        """``host:port`` as the node side reads it."""
        return f"{self.host}:{self.port}"

    def expect(self, launch: str) -> Expected:
        """Register a launch; its one-time secret is ``.secret``."""
        entry = Expected(launch, secrets.token_bytes(32))
        self._expected[launch] = entry
        return entry

    def retire(self, launch: str) -> None:
        """The launch is over or gave up: a report for it from now on is late."""
        entry = self._expected.pop(launch, None)
        if entry is not None and not entry.report.done():
            entry.report.cancel()
        self._retired[launch] = None
        while len(self._retired) > _RETIRED_KEPT:
            self._retired.popitem(last=False)

    @property
    def busy(self) -> bool:
        """True while a launch still waits for its report or a link is open."""
        return bool(self._expected) or bool(self._streams)

    def close(self) -> None:
        """Stop listening and close every link."""
        self.closed = True
        self._server.stop()
        for stream in list(self._streams):
            stream.close()
        for launch in list(self._expected):
            self.retire(launch)

    # -- one connection -------------------------------------------------------
    def _drop(self, stream: IOStream, kind: str, why: str, peer: str) -> None:
        if kind == "late":
            self.counts.late += 1
        else:
            self.counts.unauthenticated += 1
        log.warning("slurm.report_dropped", kind=kind, why=why, peer=peer)
        with contextlib.suppress(StreamClosedError):
            stream.write(b"no\n")
        stream.close()

    async def _handle(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        peer = f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)
        self._streams.add(stream)
        try:
            await self._serve(stream, peer)
        finally:
            self._streams.discard(stream)

    async def _serve(self, stream: IOStream, peer: str) -> None:
        try:
            line = await asyncio.wait_for(
                stream.read_until(b"\n", max_bytes=_MAX_LINE), _REPORT_WAIT)
        except (StreamClosedError, UnsatisfiableReadError, asyncio.TimeoutError, OSError) as exc:
            self._drop(stream, "unauthenticated", f"no report line ({type(exc).__name__})", peer)
            return
        try:
            msg = json.loads(line)
            launch, body, mac = msg["launch"], msg["body"], msg["mac"]
            if not all(isinstance(v, str) for v in (launch, body, mac)):
                raise TypeError("fields must be strings")
        except (ValueError, TypeError, KeyError) as exc:
            self._drop(stream, "unauthenticated", f"malformed report: {exc}", peer)
            return
        entry = self._expected.get(launch)
        if entry is None:
            kind = "late" if launch in self._retired else "unauthenticated"
            self._drop(stream, kind, f"no launch {launch[:16]!r} waits for a report", peer)
            return
        if not hmac.compare_digest(sign(entry.secret, body), mac):
            self._drop(stream, "unauthenticated", "bad signature", peer)
            return
        try:
            report = json.loads(body)
            if not isinstance(report, dict) or report.get("launch") != launch:
                raise TypeError("the body names another launch")
        except (ValueError, TypeError) as exc:
            self._drop(stream, "unauthenticated", f"bad report body: {exc}", peer)
            return
        self._expected.pop(launch, None)
        self._retired[launch] = None
        self.counts.accepted += 1
        try:
            await stream.write(b"ok\n")
        except StreamClosedError:
            return
        entry.accept(report, stream)
        await self._follow(stream, entry)

    async def _follow(self, stream: IOStream, entry: Expected) -> None:
        """Read the node side's later lines until the link closes."""
        with contextlib.suppress(StreamClosedError, UnsatisfiableReadError, OSError):
            while True:
                line = await stream.read_until(b"\n", max_bytes=_MAX_LINE)
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    pid = int(json.loads(line)["started"])
                    entry.kernel_pid = pid
                    if entry.on_started is not None:
                        entry.on_started(pid)

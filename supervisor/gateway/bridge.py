"""One kernel's relay between its ZMQ channels and any number of WebSocket peers.

A :class:`KernelBridge` holds one set of sockets per kernel (shell, control
and stdin DEALERs sharing one routing identity, so ``input_request`` comes
back to us; an IOPub SUB) however many clients are connected:

* a request from a peer is re-signed with the kernel's key and sent; its
  ``msg_id`` is remembered so the reply (and any ``input_request``) goes back
  to that peer only (by the parent header's ``msg_id``, else its ``session``);
* every IOPub message goes to every peer and into a bounded replay buffer, so
  a peer that reconnects with the same ``session_id`` within the replay
  window receives what it missed.

Requests are held back (bounded) until the IOPub subscription is proven
live, after the first connection and after each kernel restart: a welcome or
any IOPub message opens the gate, and until one comes the bridge asks the
kernel for ``kernel_info`` every half second (as jupyter_server's "nudge"
does). So no client request runs before its output can be seen.

A :class:`Peer` is one WebSocket client seen from here: an outgoing queue with
a byte budget, written one batch at a time. When a peer cannot keep up, IOPub
messages other than ``status``, ``execute_input``, ``error`` and
``clear_output`` are dropped (and counted) once what waits behind the batch
being written passes the budget; if even those and the replies pile up past
twice the budget the peer is closed (1013). One slow client never slows the
kernel or the others, and never grows memory without bound (at most about
twice the budget and one message waiting, plus the batch in flight).

Everything here belongs to the gateway's IOLoop: the reader tasks, the
peers' writer tasks and the routing tables are touched only from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from supervisor._log import get_logger
from supervisor.client import connect_channel
from supervisor.connection import ConnectionInfo
from supervisor.gateway.metrics import Metrics
from supervisor.gateway.wsproto import Incoming, encode_legacy, encode_v1
from supervisor.wire import DELIMITER, PROTOCOL_VERSION, Session, utcnow

__all__ = ["KernelBridge", "Peer"]

log = get_logger("supervisor.gateway")

_ROUTES_MAX = 10_000
_HELD_MAX = 1000
_NUDGE_EVERY = 0.5  # s between kernel_info requests while IOPub is unproven
_NUDGE_FOR = 30.0  # s after which the gate opens anyway
_ALWAYS_KEEP = frozenset({"status", "execute_input", "error", "clear_output"})
CLOSE_TOO_SLOW = 1013


class Peer:
    """One WebSocket client of a kernel: framing, a bounded queue, a writer task."""

    def __init__(self, session_id: str, *, v1: bool,
                 write: Callable[[str | bytes], Awaitable[None]],
                 close: Callable[[int, str], None], budget: int, metrics: Metrics) -> None:
        self.key = uuid.uuid4().hex
        self.session_id = session_id
        self.v1 = v1
        self._write = write
        self._close = close
        self.budget = budget
        self._metrics = metrics
        self._queue: deque[tuple[str | bytes, int, int]] = deque()
        self.queued_bytes = 0  # waiting, plus the batch being written
        self.waiting_bytes = 0
        self._waiting_max = 0  # the largest message waiting: one may exceed the budget
        self.dropped = 0
        self.garbage = 0
        self.written_seq = 0
        self.closed = False
        self._wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._writer())

    def push(self, channel: str, parts: list[bytes], msg_id: str, msg_type: str,
             seq: int = 0) -> None:
        """Queue one kernel message for this client (may drop IOPub when over budget)."""
        if self.closed:
            return
        frame = encode_v1(channel, parts) if self.v1 else encode_legacy(
            channel, parts, msg_id, msg_type)
        size = len(frame)
        # Only what waits behind the batch being written counts against the budget,
        # and a message bigger than the budget still goes when nothing is waiting.
        waiting = self.waiting_bytes
        if channel == "iopub" and msg_type not in _ALWAYS_KEEP and waiting and \
                waiting + size > self.budget:
            self.dropped += 1
            self._metrics.count("ws_dropped", reason="slow_client")
            self.written_seq = max(self.written_seq, seq)
            return
        if waiting - self._waiting_max > 2 * self.budget:
            self._metrics.count("ws_closed", reason="slow_client")
            self.shut(CLOSE_TOO_SLOW, "client too slow: outgoing buffer full")
            return
        self._queue.append((frame, size, seq))
        self.queued_bytes += size
        self.waiting_bytes += size
        self._waiting_max = max(self._waiting_max, size)
        self._wake.set()

    async def _writer(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                while self._queue and not self.closed:
                    batch = list(self._queue)
                    self._queue.clear()
                    self.waiting_bytes = self._waiting_max = 0
                    pending: Awaitable[None] | None = None
                    try:
                        for frame, _, _ in batch:
                            pending = self._write(frame)
                            self._metrics.count("ws_messages_out")
                        if pending is not None:
                            # shielded: cancelling the writer must not cancel tornado's future
                            await asyncio.shield(pending)
                    except Exception:  # the socket went away under us
                        self.shut(1001, "gone")
                        return
                    self.queued_bytes -= sum(size for _, size, _ in batch)
                    last = max((seq for _, _, seq in batch), default=0)
                    self.written_seq = max(self.written_seq, last)

    def shut(self, code: int = 1000, reason: str = "") -> None:
        """Stop writing and close the WebSocket (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self.queued_bytes = self.waiting_bytes = 0
        self._wake.set()
        self.task.cancel()
        with contextlib.suppress(Exception):
            self._close(code, reason)


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class KernelBridge:
    """The relay of one kernel; see the module docstring."""

    def __init__(self, kernel_id: str, info: ConnectionInfo, *, ctx: zmq.asyncio.Context,
                 metrics: Metrics, replay_messages: int, replay_bytes: int,
                 replay_window: float) -> None:
        self.kernel_id = kernel_id
        self._ctx = ctx
        self._metrics = metrics
        self.peers: dict[str, Peer] = {}
        self._routes: OrderedDict[str, str] = OrderedDict()
        self._sessions: dict[str, str] = {}  # client session id -> peer key
        self._replay: deque[tuple[int, list[bytes], str, str]] = deque()
        self._replay_bytes = 0
        self._replay_max = replay_messages
        self._replay_max_bytes = replay_bytes
        self._window = replay_window
        self._departed: dict[str, tuple[int, float]] = {}
        self._seq = 0
        self._own_session = str(uuid.uuid4())
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._iopub_live = asyncio.Event()
        self._held: deque[tuple[Peer, Incoming]] = deque()
        self._nudges: deque[str] = deque(maxlen=64)  # our own kernel_info requests
        self._nudger: asyncio.Task[None] | None = None
        self.info: ConnectionInfo | None = None
        self._signer = Session(info.key, info.signature_scheme, check_replay=False)
        self.closed = False
        # Set whenever a peer comes or goes (tests and dashboards wait on it).
        self.peers_changed = asyncio.Event()
        self.attach(info)

    # -- sockets -------------------------------------------------------------------------
    def attach(self, info: ConnectionInfo) -> None:
        """(Re)connect the four channels to the kernel ``info`` describes."""
        if info == self.info and self._sockets:
            return
        self.detach()
        self.info = info
        self._signer = Session(info.key, info.signature_scheme, check_replay=False)
        identity = f"gateway-{uuid.uuid4().hex}".encode()
        for channel in ("shell", "control", "stdin", "iopub"):
            sock = connect_channel(self._ctx, info, channel,
                                   identity=None if channel == "iopub" else identity)
            self._sockets[channel] = sock
            self._tasks.append(asyncio.ensure_future(self._read(channel, sock)))
        self.kernel_back()

    def kernel_gone(self) -> None:
        """The kernel exited or is restarting: hold requests until IOPub is proven again."""
        self._iopub_live.clear()
        if self._nudger is not None:
            self._nudger.cancel()
            self._nudger = None

    def kernel_back(self) -> None:
        """The kernel is (again) ready: prove IOPub, then release held requests."""
        if self._iopub_live.is_set() or self._nudger is not None or not self._sockets:
            return
        self._nudger = asyncio.ensure_future(self._nudge())

    async def _nudge(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _NUDGE_FOR
            while not self._iopub_live.is_set() and loop.time() < deadline:
                sock = self._sockets.get("shell")
                if sock is None:
                    return
                msg = self._signer.msg("kernel_info_request")
                self._nudges.append(msg.msg_id)
                pending = sock.send_multipart(self._signer.serialize(msg))
                if isinstance(pending, asyncio.Future):
                    pending.add_done_callback(lambda f: f.cancelled() or f.exception())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._iopub_live.wait(), _NUDGE_EVERY)
            self._open_gate()
        self._nudger = None

    def _open_gate(self) -> None:
        self._iopub_live.set()
        held, self._held = self._held, deque()
        for peer, msg in held:
            if not peer.closed:
                self._send_now(peer, msg)

    def detach(self) -> None:
        """Close the kernel-side sockets (peers stay connected)."""
        self.kernel_gone()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()

    async def _read(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            while True:
                frames = await sock.recv_multipart()
                self._on_kernel(channel, frames)

    def _on_kernel(self, channel: str, frames: list[bytes]) -> None:
        try:
            idx = frames.index(DELIMITER)
        except ValueError:
            self._metrics.count("kernel_dropped", reason="frame")
            return
        signature, parts = frames[idx + 1], frames[idx + 2:]
        if len(parts) < 4:
            self._metrics.count("kernel_dropped", reason="frame")
            return
        if self._signer.key and not hmac.compare_digest(signature,
                                                        self._signer.sign(parts[:4])):
            self._metrics.count("kernel_dropped", reason="signature")
            return
        header = _loads(parts[0])
        msg_id, msg_type = header.get("msg_id"), header.get("msg_type")
        if not isinstance(msg_id, str) or not isinstance(msg_type, str):
            self._metrics.count("kernel_dropped", reason="frame")
            return
        self._metrics.count("kernel_messages", channel=channel)
        if channel == "iopub":
            if not self._iopub_live.is_set():
                self._open_gate()
            if msg_type == "iopub_welcome" or (
                    self._nudges and _loads(parts[1]).get("msg_id") in self._nudges):
                return  # our own traffic: the clients never asked for it
            self._publish(parts, msg_id, msg_type)
            return
        parent = _loads(parts[1])
        parent_id = parent.get("msg_id")
        if isinstance(parent_id, str) and parent_id in self._nudges:
            return
        key = self._routes.get(parent_id) if isinstance(parent_id, str) else None
        if key is not None and channel in ("shell", "control") and msg_type.endswith("_reply"):
            self._routes.pop(parent_id, None)  # type: ignore[arg-type]
        if key is None or key not in self.peers:
            session = parent.get("session")
            key = self._sessions.get(session) if isinstance(session, str) else None
        peer = self.peers.get(key) if key is not None else None
        if peer is None:
            self._metrics.count("kernel_dropped", reason="unrouted")
            return
        peer.push(channel, parts, msg_id, msg_type)
        if peer.closed:
            self.remove_peer(peer)

    def _publish(self, parts: list[bytes], msg_id: str, msg_type: str) -> None:
        self._seq += 1
        seq = self._seq
        if self._replay_max:
            size = sum(len(p) for p in parts)
            self._replay.append((seq, parts, msg_id, msg_type))
            self._replay_bytes += size
            while self._replay and (len(self._replay) > self._replay_max
                                    or self._replay_bytes > self._replay_max_bytes):
                _, old, _, _ = self._replay.popleft()
                self._replay_bytes -= sum(len(p) for p in old)
        for peer in list(self.peers.values()):
            peer.push("iopub", parts, msg_id, msg_type, seq)
            if peer.closed:  # shut for being too slow: gone now, not when its TCP times out
                self.remove_peer(peer)

    def publish_status(self, state: str) -> None:
        """Tell every peer the kernel's state (``restarting``, ``dead``), as IOPub."""
        header = {"msg_id": str(uuid.uuid4()), "msg_type": "status",
                  "session": self._own_session, "username": "kernel-supervisor",
                  "date": utcnow(), "version": PROTOCOL_VERSION}
        parts = [json.dumps(header).encode(), b"{}", b"{}",
                 json.dumps({"execution_state": state}).encode()]
        self._publish(parts, header["msg_id"], "status")

    # -- peers ---------------------------------------------------------------------------
    def add_peer(self, peer: Peer) -> int:
        """Register a client; replay missed IOPub if it is a known session. Returns replayed."""
        self.peers[peer.key] = peer
        self.peers_changed.set()
        self._sessions[peer.session_id] = peer.key
        now = time.monotonic()
        self._departed = {s: v for s, v in self._departed.items() if v[1] > now}
        seen = self._departed.pop(peer.session_id, None)
        replayed = 0
        if seen is not None:
            for seq, parts, msg_id, msg_type in list(self._replay):
                if seq > seen[0]:
                    peer.push("iopub", parts, msg_id, msg_type, seq)
                    replayed += 1
            self._metrics.count("ws_replayed", amount=replayed)
        peer.written_seq = max(peer.written_seq, self._seq)
        return replayed

    def remove_peer(self, peer: Peer) -> None:
        """Forget a client; remember where its session was for the replay window."""
        if self.peers.pop(peer.key, None) is None:
            return
        self.peers_changed.set()
        if self._sessions.get(peer.session_id) == peer.key:
            del self._sessions[peer.session_id]
        if self._window > 0 and self._replay_max:
            # What was queued but not yet written is replayed too.
            self._departed[peer.session_id] = (peer.written_seq,
                                               time.monotonic() + self._window)

    def send(self, peer: Peer, msg: Incoming) -> bool:
        """Sign and send a client's message to the kernel (held until IOPub is live).

        False if it cannot go: the kernel is gone, or too much is held already.
        """
        if not self._sockets:
            return False
        if not self._iopub_live.is_set():
            if len(self._held) >= _HELD_MAX:
                return False
            self._held.append((peer, msg))
            return True
        return self._send_now(peer, msg)

    def _send_now(self, peer: Peer, msg: Incoming) -> bool:
        sock = self._sockets.get(msg.channel)
        if sock is None:
            return False
        msg_id = msg.header["msg_id"]
        self._routes[msg_id] = peer.key
        if len(self._routes) > _ROUTES_MAX:
            self._routes.popitem(last=False)
        session = msg.header.get("session")
        if isinstance(session, str) and session:
            self._sessions[session] = peer.key
        frames = [DELIMITER, self._signer.sign(msg.parts[:4]), *msg.parts]
        try:
            pending = sock.send_multipart(frames, copy=False)
        except zmq.ZMQError:
            return False
        if isinstance(pending, asyncio.Future):
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._metrics.count("ws_messages_in", channel=msg.channel)
        return True

    def tasks(self) -> list[asyncio.Task[None]]:
        """The reader, writer and nudge tasks (to await after :meth:`close`)."""
        nudger = [self._nudger] if self._nudger is not None else []
        return [*self._tasks, *(p.task for p in self.peers.values()), *nudger]

    def close(self, code: int = 1000, reason: str = "kernel shut down") -> None:
        """Close every peer and socket."""
        self.closed = True
        for peer in list(self.peers.values()):
            peer.shut(code, reason)
        self.peers.clear()
        self.detach()
        self._replay.clear()
        self._held.clear()

"""The channels of a kernel client: one ZeroMQ socket each, read by a task on the client's loop.

* :func:`connect_channel` makes one connected ``zmq.asyncio`` socket of the
  right type for a channel (the kernel actor reuses it).
* :class:`Channel` (shell, iopub, stdin, control) has a reader task that
  verifies every message with the client's :class:`~supervisor.wire.Session`
  and keeps good ones in an inbox; :class:`HeartbeatChannel` pings the kernel.

Every inbox is bounded, in messages and in bytes (the frames' sizes):
:attr:`Channel.max_messages` and :attr:`Channel.max_bytes`, by default
:data:`IOPUB_LIMITS` for IOPub and :data:`REPLY_LIMITS` for the others. What
happens when one is full:

* IOPub drops its *oldest* messages (the newest, such as the final ``idle``
  status, are what a late reader needs) and counts them in
  :attr:`Channel.overflowed` and the client's ``dropped["overflow"]``.
* shell, control and stdin stop reading until the consumer takes a message:
  nothing is dropped by us, and ZeroMQ's high-water mark applies again (the
  kernel's socket queues, then drops, what we do not read).

Below the inbox, each socket's ZeroMQ receive queue holds at most
:data:`RCVHWM` messages; beyond that ZeroMQ stops reading the connection and
the kernel's own send queue (its high-water mark, 1000 by default) takes the
rest. Stopping a channel empties its inbox and closes its socket, so what it
held is freed at once.

Both belong to their :class:`~supervisor.client.KernelClient` and to the loop it
runs on; every method must be called on that loop's thread.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import zmq
import zmq.asyncio

from supervisor.connection import ConnectionInfo
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    KernelStateError,
    ReplayError,
    SignatureError,
    WireError,
)
from supervisor.wire import Message

if TYPE_CHECKING:
    from supervisor.client.kernelclient import KernelClient

__all__ = [
    "CHANNELS",
    "IOPUB_LIMITS",
    "RCVHWM",
    "REPLY_LIMITS",
    "Channel",
    "HeartbeatChannel",
    "connect_channel",
    "next_message",
]

P = ParamSpec("P")
T = TypeVar("T")
Msg = dict[str, Any]
OutputHook = Callable[[Msg], object]

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
IOPUB_LIMITS = (4096, 32 << 20)  # (messages, bytes) kept for a reader; then drop oldest
REPLY_LIMITS = (1024, 32 << 20)  # shell/control/stdin; then stop reading (zmq HWM)
RCVHWM = 16  # messages ZeroMQ queues in this process per socket before the kernel's side holds them
_SOCKET_TYPES = {
    "shell": zmq.DEALER, "control": zmq.DEALER, "stdin": zmq.DEALER,
    "iopub": zmq.SUB, "hb": zmq.REQ,
}


def connect_channel(
    ctx: zmq.asyncio.Context,
    info: ConnectionInfo,
    channel: str,
    *,
    identity: bytes | None = None,
) -> zmq.asyncio.Socket:
    """A socket of ``channel``'s type, connected to the kernel ``info`` describes.

    shell/control/stdin are DEALERs, hb a REQ, iopub a SUB subscribed to
    everything and to a topic of its own, so that the kernel greets it with
    ``iopub_welcome`` even when another subscriber took the empty topic first.
    LINGER is 0 and the reconnect interval 10 ms, so a kernel that binds late
    is reached quickly. With Curve keys in ``info`` the socket is a CurveZMQ
    client trusting the kernel's public key (the connection file's keypair is
    both the server's and the client's, as ipykernel does it).
    """
    try:
        kind = _SOCKET_TYPES[channel]
    except KeyError:
        raise ConfigurationError(f"unknown channel {channel!r}; expected {CHANNELS}") from None
    sock = ctx.socket(kind)
    url = info.url(channel)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind != zmq.REQ:
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            # ipykernel's XPUB greets each *new* topic only: a second b"" subscriber
            # would get no iopub_welcome. A topic of our own always gets one.
            sock.setsockopt(zmq.SUBSCRIBE, b"ks-welcome-" + uuid.uuid4().hex.encode())
        public, secret = info.curve_publickey, info.curve_secretkey
        if info.encrypted and public is not None and secret is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(url)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigurationError(f"cannot connect the {channel} channel to {url}: {exc}") from exc
    return sock


def drop_reason(exc: WireError) -> str:
    if isinstance(exc, ReplayError):
        return "replay"
    if isinstance(exc, SignatureError):
        return "signature"
    return "frame"


class Channel:
    """One message channel: its socket, reader task and inbox (loop-owned)."""

    def __init__(self, client: KernelClient, name: str) -> None:
        self.name = name
        self.socket: zmq.asyncio.Socket | None = None
        limits = IOPUB_LIMITS if name == "iopub" else REPLY_LIMITS
        self.max_messages, self.max_bytes = limits
        self.drop_oldest = name == "iopub"
        self.overflowed = 0  # messages dropped because the inbox was full (IOPub)
        self.received = 0  # messages accepted by the reader since the client was made
        self._client = client
        self._items: deque[Msg] = deque()
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._room = asyncio.Event()  # set while the inbox has room (readers that wait)
        self._room.set()
        self._waiters: list[asyncio.Future[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Future[Any]] = set()

    # -- the inbox ---------------------------------------------------------
    @property
    def buffered(self) -> tuple[int, int]:
        """(messages, bytes) waiting in the inbox now."""
        return len(self._items), self._bytes

    def _full(self) -> bool:
        return len(self._items) >= self.max_messages or self._bytes >= self.max_bytes

    def _push(self, msg: Msg, size: int) -> None:
        self.received += 1
        if self.drop_oldest:
            while self._items and (len(self._items) >= self.max_messages
                                   or self._bytes + size > self.max_bytes):
                self._items.popleft()
                self._bytes -= self._sizes.popleft()
                self.overflowed += 1
                self._client.dropped["overflow"] += 1
        self._items.append(msg)
        self._sizes.append(size)
        self._bytes += size
        if self._full():
            self._room.clear()

    def _pop(self) -> Msg:
        msg = self._items.popleft()
        self._bytes -= self._sizes.popleft()
        if not self._full():
            self._room.set()
        return msg

    def _unpop(self, msgs: Sequence[Msg]) -> None:
        """Put messages taken by :func:`next_message` back at the front (sizes estimated)."""
        for msg in reversed(msgs):
            size = len(str(msg.get("content", "")))
            self._items.appendleft(msg)
            self._sizes.appendleft(size)
            self._bytes += size
        if self._full():
            self._room.clear()

    def _clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self._bytes = 0
        self._room.set()

    def _start(self, sock: zmq.asyncio.Socket) -> None:
        self.socket = sock
        self._reader = asyncio.ensure_future(self._read(sock))

    def _stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        self._clear()
        self._wake()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        session = self._client.session
        while True:
            if not self.drop_oldest and not self._room.is_set():
                await self._room.wait()  # the consumer is behind: let ZeroMQ's HWM apply
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as exc:
                if not sock.closed:
                    self._client._log.warning(
                        "client.recv_failed", channel=self.name, error=str(exc))
                return
            try:
                msg = session.deserialize(frames)
            except WireError as exc:
                self._client._dropped(self.name, exc)
                continue
            self._push(msg.to_dict(), sum(len(f) for f in frames))
            self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def is_alive(self) -> bool:
        """True while the channel's socket is open and its reader runs."""
        return self.socket is not None and self._reader is not None and not self._reader.done()

    def msg_ready(self) -> bool:
        """True when a message is waiting in the inbox."""
        return bool(self._items)

    async def get_msg(self, timeout: float | None = None, *, block: bool = True) -> Msg:
        """The next message; waits up to ``timeout`` s (None: forever) or raises ChannelTimeout."""
        got = await next_message((self,), timeout if block else 0)
        if got is None:
            raise ChannelTimeout(f"no message on the {self.name} channel within {timeout} s")
        return got[1]

    def get_msgs(self) -> list[Msg]:
        """Every message waiting now, without waiting for more."""
        out = list(self._items)
        self._clear()
        return out

    def send(self, msg: Message | Mapping[str, Any]) -> None:
        """Sign and send ``msg`` (a Message or a jupyter_client-shaped dict); never blocks."""
        if self.socket is None:
            raise KernelStateError(f"the {self.name} channel is not running")
        if not isinstance(msg, Message):
            msg = Message(
                header=dict(msg["header"]), parent_header=dict(msg.get("parent_header") or {}),
                metadata=dict(msg.get("metadata") or {}), content=dict(msg.get("content") or {}),
                buffers=tuple(bytes(b) for b in msg.get("buffers") or ()),
            )
        frames = self._client.session.serialize(msg)
        pending = asyncio.ensure_future(self.socket.send_multipart(frames))
        self._sends.add(pending)  # keep it referenced until sent
        pending.add_done_callback(self._sent)

    def _sent(self, pending: asyncio.Future[Any]) -> None:
        self._sends.discard(pending)
        if not pending.cancelled() and (exc := pending.exception()) is not None:
            self._client._log.warning("client.send_failed", channel=self.name, error=str(exc))


async def next_message(
    channels: Sequence[Channel], timeout: float | None
) -> tuple[Channel, Msg] | None:
    """The first message waiting on any of ``channels``; None once ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None or math.isinf(timeout) else loop.time() + timeout
    while True:
        for channel in channels:
            if channel._items:
                return channel, channel._pop()
        for channel in channels:
            if not channel.is_alive():
                raise KernelStateError(f"the {channel.name} channel is not running")
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return None
        waiter: asyncio.Future[None] = loop.create_future()
        for channel in channels:
            channel._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, remaining)
        except asyncio.TimeoutError:
            pass
        finally:
            for channel in channels:
                channel._waiters.remove(waiter)


class HeartbeatChannel:
    """Pings the kernel's heartbeat every ``time_to_dead`` s (loop-owned).

    ``is_beating()`` is True from the start (benefit of the doubt, as in
    jupyter_client) and after every echo; False once a ping went unanswered
    for ``time_to_dead`` s, while paused, or when stopped.
    """

    def __init__(self, client: KernelClient) -> None:
        self.time_to_dead = 1.0
        self.beats = 0  # echoes received since the channel started
        self.socket: zmq.asyncio.Socket | None = None
        self._client = client
        self._task: asyncio.Task[None] | None = None
        self._beating = False
        self._paused = False
        self._generation = 0  # bumped by start and stop; a task of an older one ends

    def _start(self, ctx: zmq.asyncio.Context, info: ConnectionInfo) -> None:
        self._beating = True
        self.beats = 0
        self._generation += 1
        self._task = asyncio.ensure_future(self._run(ctx, info, self._generation))

    def _stop(self) -> None:
        # The flag, not only the cancel: before Python 3.12, asyncio.wait_for can
        # swallow a cancel that lands just as the pong arrives.
        self._generation += 1
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._close_socket()
        self._beating = False

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    async def _run(self, ctx: zmq.asyncio.Context, info: ConnectionInfo, generation: int) -> None:
        loop = asyncio.get_running_loop()
        while self._generation == generation:
            started = loop.time()
            if not self._paused:
                if self.socket is None:
                    self.socket = connect_channel(ctx, info, "hb")
                await self.socket.send(b"ping")
                try:
                    await asyncio.wait_for(self.socket.recv(), self.time_to_dead)
                except asyncio.TimeoutError:
                    if self._beating:
                        self._client._log.debug("client.heartbeat_lost")
                    self._beating = False
                    self._close_socket()  # a REQ socket stuck awaiting a reply: start afresh
                    continue
                if self._generation != generation:
                    return
                self._beating = True
                self.beats += 1
            # Protocol pacing, not waiting for an event: one ping per time_to_dead.
            await asyncio.sleep(max(0.0, started + self.time_to_dead - loop.time()))

    def is_alive(self) -> bool:
        """True while the heartbeat task runs."""
        return self._task is not None and not self._task.done()

    def is_beating(self) -> bool:
        """True while running, not paused, and the kernel answered the last ping in time."""
        return self.is_alive() and not self._paused and self._beating

    def pause(self) -> None:
        """Stop pinging (``is_beating()`` is False until :meth:`unpause`)."""
        self._paused = True

    def unpause(self) -> None:
        """Resume pinging."""
        self._paused = False



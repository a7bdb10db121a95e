"""Kernel clients: talk to one running kernel over its five ZeroMQ channels.

* :func:`connect_channel` makes one connected ``zmq.asyncio`` socket of the
  right type for a channel (the kernel actor reuses it).
* :class:`KernelClient` is the asyncio client. It binds to the loop that is
  running when :meth:`KernelClient.start_channels` is called, and from then on
  every method must be called on that loop's thread. Each channel has a reader
  task that verifies every message with the :class:`~supervisor.wire.Session`;
  a message that fails (bad frames, bad signature, replay) is dropped, counted
  in :attr:`KernelClient.dropped` by reason and logged at debug level. Good
  messages wait in the channel's inbox as jupyter_client-shaped dicts.
* :class:`BlockingKernelClient` has the same API, blocking. It owns a
  :class:`KernelClient` that lives on the process-wide background loop
  (:func:`supervisor.actor.background_loop`); each of its methods is the async
  one run there through :func:`supervisor.actor.run_blocking`. Hooks given to
  its ``execute_interactive`` run on that loop's thread: from there, calls that
  only send (``kc.input(...)``) work, calls that must wait raise
  :class:`~supervisor.errors.KernelStateError`.

Every wait that can expire raises :class:`~supervisor.errors.ChannelTimeout`,
which is a :class:`queue.Empty` (what nbclient catches around ``get_msg``).
That includes ``wait_for_ready`` (jupyter_client raises a RuntimeError there;
nbclient catches any ``Exception`` around it) and ``reply=True`` requests
(jupyter_client raises TimeoutError there).
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import math
import sys
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from inspect import isawaitable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog
import zmq
import zmq.asyncio

from supervisor.actor import in_background_thread, run_blocking
from supervisor.connection import ConnectionInfo, read_connection_file
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    KernelStateError,
    ReplayError,
    SignatureError,
    WireError,
)
from supervisor.wire import Message, Session

__all__ = ["CHANNELS", "BlockingKernelClient", "KernelClient", "connect_channel"]

P = ParamSpec("P")
T = TypeVar("T")
Msg = dict[str, Any]
OutputHook = Callable[[Msg], object]

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_SOCKET_TYPES = {
    "shell": zmq.DEALER, "control": zmq.DEALER, "stdin": zmq.DEALER,
    "iopub": zmq.SUB, "hb": zmq.REQ,
}
_ASK_AGAIN = 0.25  # s after a kernel_info_reply without IOPub traffic: ask again
_ASK_AGAIN_UNANSWERED = 1.0  # s after an unanswered kernel_info_request: ask again

log = structlog.get_logger("supervisor.client")


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


def _drop_reason(exc: WireError) -> str:
    if isinstance(exc, ReplayError):
        return "replay"
    if isinstance(exc, SignatureError):
        return "signature"
    return "frame"


class _Channel:
    """One message channel: its socket, reader task and inbox (loop-owned)."""

    def __init__(self, client: KernelClient, name: str) -> None:
        self.name = name
        self.socket: zmq.asyncio.Socket | None = None
        self._client = client
        self._items: deque[Msg] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Future[Any]] = set()

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
        self._wake()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        session = self._client.session
        while True:
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
            self._items.append(msg.to_dict())
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
        got = await _next_message((self,), timeout if block else 0)
        if got is None:
            raise ChannelTimeout(f"no message on the {self.name} channel within {timeout} s")
        return got[1]

    def get_msgs(self) -> list[Msg]:
        """Every message waiting now, without waiting for more."""
        out = list(self._items)
        self._items.clear()
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


async def _next_message(
    channels: Sequence[_Channel], timeout: float | None
) -> tuple[_Channel, Msg] | None:
    """The first message waiting on any of ``channels``; None once ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None or math.isinf(timeout) else loop.time() + timeout
    while True:
        for channel in channels:
            if channel._items:
                return channel, channel._items.popleft()
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


class _HeartbeatChannel:
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


class KernelClient:
    """Asyncio client of one kernel (see the module docstring for loop rules).

    Request methods send at once and return the msg_id; with ``reply=True``
    they return an awaitable of the matching reply dict instead (replies to
    other requests that arrive first are skipped, as in jupyter_client).
    """

    def __init__(
        self,
        connection_info: ConnectionInfo | None = None,
        *,
        connection_file: str | Path | None = None,
        session: Session | None = None,
        kernel_name: str = "",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if connection_info is not None and connection_file is not None:
            raise ConfigurationError("give connection_info or connection_file, not both")
        self.connection_info = connection_info
        self.connection_file: Path | None = None
        self._session = session
        self._own_session = session is None
        self.kernel_name = kernel_name
        self.allow_stdin = True
        self.dropped: Counter[str] = Counter()
        self._given_context = context
        self._context: zmq.asyncio.Context | None = None
        self._channels = {name: _Channel(self, name) for name in CHANNELS if name != "hb"}
        self._hb = _HeartbeatChannel(self)
        self.shell_channel = self._channels["shell"]  # requests and replies
        self.iopub_channel = self._channels["iopub"]  # broadcast output and status
        self.stdin_channel = self._channels["stdin"]  # input_request / input_reply
        self.control_channel = self._channels["control"]  # shutdown, interrupt, debug
        self.hb_channel = self._hb  # the heartbeat
        # Set by a manager: "does the kernel process run?" (jupyter_client's clients
        # made by a manager ask it too); without it, is_alive() asks the heartbeat.
        self.liveness: Callable[[], bool] | None = None
        self._log = log
        if connection_file is not None:
            self.load_connection_file(connection_file)
        elif connection_info is not None and not kernel_name:
            self.kernel_name = connection_info.kernel_name

    # -- configuration -----------------------------------------------------
    def load_connection_file(self, path: str | Path) -> None:
        """Read the kernel's ports, key and scheme from a connection file."""
        if self.channels_running:
            raise KernelStateError("stop the channels before loading another connection file")
        self.connection_info = read_connection_file(path)
        self.connection_file = Path(path)
        self.kernel_name = self.kernel_name or self.connection_info.kernel_name
        if self._own_session:
            self._session = None

    @property
    def session(self) -> Session:
        """The Session signing and verifying messages (made from the connection info)."""
        if self._session is None:
            info = self._info()
            self._session = Session(info.key, info.signature_scheme)
            self._log = log.bind(session=self._session.session_id[:8])
        return self._session

    def _info(self) -> ConnectionInfo:
        if self.connection_info is None:
            raise KernelStateError("no connection info: pass one or call load_connection_file()")
        return self.connection_info

    def _dropped(self, channel: str, exc: WireError) -> None:
        reason = _drop_reason(exc)
        self.dropped[reason] += 1
        self._log.debug("client.message_dropped", channel=channel, reason=reason, error=str(exc))

    # -- channels ----------------------------------------------------------
    def start_channels(
        self, shell: bool = True, iopub: bool = True, stdin: bool = True,
        hb: bool = True, control: bool = True,
    ) -> None:
        """Connect the chosen channels and start their readers on the running loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise KernelStateError("start_channels() needs a running asyncio loop") from None
        info = self._info()
        identity = self.session.session_id.encode()
        if self._context is None:
            given = self._given_context
            self._context = zmq.asyncio.Context() if given is None else given
        wanted = {"shell": shell, "iopub": iopub, "stdin": stdin, "control": control}
        for name, on in wanted.items():
            channel = self._channels[name]
            if on and not channel.is_alive():
                ident = None if name == "iopub" else identity
                channel._start(connect_channel(self._context, info, name, identity=ident))
        if hb and not self._hb.is_alive():
            self._hb._start(self._context, info)

    def stop_channels(self) -> None:
        """Close every socket (and the zmq context, unless it was given)."""
        for channel in self._channels.values():
            channel._stop()
        self._hb._stop()
        if self._context is not None and self._given_context is None:
            self._context.destroy(linger=0)
        self._context = None

    @property
    def channels_running(self) -> bool:
        """True while any channel runs."""
        return self._hb.is_alive() or any(c.is_alive() for c in self._channels.values())

    async def is_alive(self) -> bool:
        """Awaitable, as jupyter_client's async client: the manager's answer for a client
        it made, else the heartbeat's verdict, else whether any channel runs."""
        if self.liveness is not None:
            return self.liveness()
        return self._hb.is_beating() if self._hb.is_alive() else self.channels_running

    async def __aenter__(self) -> KernelClient:
        self.start_channels()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_channels()

    # -- receiving ---------------------------------------------------------
    async def get_shell_msg(self, timeout: float | None = None, *, block: bool = True) -> Msg:
        """The next shell message (ChannelTimeout after ``timeout`` s)."""
        return await self.shell_channel.get_msg(timeout, block=block)

    async def get_iopub_msg(self, timeout: float | None = None, *, block: bool = True) -> Msg:
        """The next IOPub message (ChannelTimeout after ``timeout`` s)."""
        return await self.iopub_channel.get_msg(timeout, block=block)

    async def get_stdin_msg(self, timeout: float | None = None, *, block: bool = True) -> Msg:
        """The next stdin message (ChannelTimeout after ``timeout`` s)."""
        return await self.stdin_channel.get_msg(timeout, block=block)

    async def get_control_msg(self, timeout: float | None = None, *, block: bool = True) -> Msg:
        """The next control message (ChannelTimeout after ``timeout`` s)."""
        return await self.control_channel.get_msg(timeout, block=block)

    async def _recv_reply(self, msg_id: str, timeout: float | None, channel: str) -> Msg:
        chan = self._channels[channel]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            got = await _next_message((chan,), remaining)
            if got is None:
                raise ChannelTimeout(f"no reply to {msg_id} on {channel} within {timeout} s")
            if got[1]["parent_header"].get("msg_id") == msg_id:
                return got[1]
            self._log.debug("client.reply_skipped", channel=channel, msg_type=got[1]["msg_type"])

    async def wait_for_ready(self, timeout: float | None = None) -> Msg:
        """Wait for a kernel_info_reply and a live IOPub subscription; return the reply.

        IOPub is live once an ``iopub_welcome`` (protocol 5.4) or any other
        IOPub message arrives. Until then kernel_info is asked again 0.25 s
        after each reply (its status messages prove the subscription), or
        after 1 s without one. Replies to those extra asks are consumed here
        (waiting for them briefly), other shell messages are kept. Raises
        ChannelTimeout (a queue.Empty) after ``timeout`` s.
        """
        shell, iopub = self.shell_channel, self.iopub_channel
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        asked_at = loop.time()
        pending = {self.kernel_info()}  # asks not answered yet
        reply: Msg | None = None
        subscribed = False
        kept: list[Msg] = []
        try:
            while reply is None or not subscribed:
                now = loop.time()
                if now >= deadline:
                    raise ChannelTimeout(f"the kernel was not ready within {timeout} s")
                wake = deadline
                if not subscribed:
                    wake = min(wake, asked_at + (_ASK_AGAIN_UNANSWERED if pending else _ASK_AGAIN))
                got = await _next_message((shell, iopub), max(0.0, wake - now))
                if got is None:
                    if not subscribed and loop.time() < deadline:
                        pending.add(self.kernel_info())
                        asked_at = loop.time()
                elif got[0] is iopub:
                    subscribed = True
                elif got[1]["msg_type"] == "kernel_info_reply":
                    reply = got[1]
                    pending.discard(got[1]["parent_header"].get("msg_id"))
                    asked_at = loop.time()
                else:
                    kept.append(got[1])
            grace = min(deadline, loop.time() + _ASK_AGAIN)
            while pending and (got := await _next_message((shell,), grace - loop.time())):
                if got[1]["parent_header"].get("msg_id") in pending:
                    pending.discard(got[1]["parent_header"].get("msg_id"))
                else:
                    kept.append(got[1])
            return reply
        finally:
            shell._items.extendleft(reversed(kept))

    # -- requests ----------------------------------------------------------
    def _request(
        self, channel: str, msg_type: str, content: Mapping[str, Any],
        reply: bool, timeout: float | None,
    ) -> Any:
        msg = self.session.msg(msg_type, content)
        self._channels[channel].send(msg)
        if reply:
            return self._recv_reply(msg.msg_id, timeout, channel)
        return msg.msg_id

    def execute(  # noqa: PLR0917 (jupyter_client's positional signature)
        self, code: str, silent: bool = False, store_history: bool = True,
        user_expressions: Mapping[str, str] | None = None, allow_stdin: bool | None = None,
        stop_on_error: bool = True, *, reply: bool = False, timeout: float | None = None,
    ) -> Any:
        """Send an execute_request (``allow_stdin`` defaults to ``self.allow_stdin``)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        expressions = dict(user_expressions or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in expressions.items()):
            raise TypeError("user_expressions must map str to str")
        content = {
            "code": code, "silent": silent, "store_history": store_history,
            "user_expressions": expressions, "stop_on_error": stop_on_error,
            "allow_stdin": self.allow_stdin if allow_stdin is None else allow_stdin,
        }
        return self._request("shell", "execute_request", content, reply, timeout)

    def complete(self, code: str, cursor_pos: int | None = None, *,
                 reply: bool = False, timeout: float | None = None) -> Any:
        """Ask for completions at ``cursor_pos`` (default: the end of ``code``)."""
        pos = len(code) if cursor_pos is None else cursor_pos
        return self._request("shell", "complete_request", {"code": code, "cursor_pos": pos},
                             reply, timeout)

    def inspect(self, code: str, cursor_pos: int | None = None, detail_level: int = 0, *,
                reply: bool = False, timeout: float | None = None) -> Any:
        """Ask for documentation of the object at ``cursor_pos``."""
        pos = len(code) if cursor_pos is None else cursor_pos
        content = {"code": code, "cursor_pos": pos, "detail_level": detail_level}
        return self._request("shell", "inspect_request", content, reply, timeout)

    def history(self, /, raw: bool = True, output: bool = False, hist_access_type: str = "range",
                *, reply: bool = False, timeout: float | None = None, **kw: Any) -> Any:
        """Ask for history (``kw``: session/start/stop, n, pattern, unique)."""
        if hist_access_type == "range":
            kw.setdefault("session", 0)
            kw.setdefault("start", 0)
        content = {"raw": raw, "output": output, "hist_access_type": hist_access_type, **kw}
        return self._request("shell", "history_request", content, reply, timeout)

    def kernel_info(self, *, reply: bool = False, timeout: float | None = None) -> Any:
        """Ask for the kernel's info (language, protocol version, banner)."""
        return self._request("shell", "kernel_info_request", {}, reply, timeout)

    def comm_info(self, target_name: str | None = None, *, reply: bool = False,
                  timeout: float | None = None) -> Any:
        """Ask for the open comms (of ``target_name`` only, if given)."""
        content = {} if target_name is None else {"target_name": target_name}
        return self._request("shell", "comm_info_request", content, reply, timeout)

    def is_complete(self, code: str, *, reply: bool = False,
                    timeout: float | None = None) -> Any:
        """Ask whether ``code`` is a complete statement."""
        return self._request("shell", "is_complete_request", {"code": code}, reply, timeout)

    def shutdown(self, restart: bool = False, *, reply: bool = False,
                 timeout: float | None = None) -> Any:
        """Send shutdown_request on the control channel."""
        return self._request("control", "shutdown_request", {"restart": restart}, reply, timeout)

    def input(self, string: str) -> str:
        """Answer an input_request with ``string`` (input_reply on stdin)."""
        result: str = self._request("stdin", "input_reply", {"value": string}, False, None)
        return result

    # -- interactive execution --------------------------------------------
    async def execute_interactive(  # noqa: PLR0917 (jupyter_client's signature)
        self, code: str, silent: bool = False, store_history: bool = True,
        user_expressions: Mapping[str, str] | None = None, allow_stdin: bool | None = None,
        stop_on_error: bool = True, timeout: float | None = None,
        output_hook: OutputHook | None = None, stdin_hook: OutputHook | None = None,
    ) -> Msg:
        """Run ``code``, pass its IOPub messages to ``output_hook`` until idle; return the reply.

        The default output hook writes streams, results and errors to
        sys.stdout/sys.stderr; ``stdin_hook`` (default: prompt on the
        terminal) gets each input_request and should call :meth:`input`.
        Hooks may return awaitables. ChannelTimeout after ``timeout`` s.
        """
        if not self.iopub_channel.is_alive():
            raise KernelStateError("the iopub channel must run to receive output")
        stdin = self.allow_stdin if allow_stdin is None else allow_stdin
        if stdin and not self.stdin_channel.is_alive():
            raise KernelStateError("the stdin channel must run to allow input")
        msg_id = self.execute(code, silent, store_history, user_expressions, stdin, stop_on_error)
        on_output = output_hook or _default_output_hook
        on_input = stdin_hook or self._default_stdin_hook
        channels = (self.stdin_channel, self.iopub_channel) if stdin else (self.iopub_channel,)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            got = await _next_message(channels, remaining)
            if got is None:
                raise ChannelTimeout(f"no output from {msg_id} within {timeout} s")
            channel, msg = got
            from_stdin = channel is self.stdin_channel
            if not from_stdin and msg["parent_header"].get("msg_id") != msg_id:
                continue
            result = (on_input if from_stdin else on_output)(msg)
            if isawaitable(result):
                await result
            if not from_stdin and msg["msg_type"] == "status" and (
                msg["content"].get("execution_state") == "idle"
            ):
                break
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        return await self._recv_reply(msg_id, remaining, "shell")

    async def _default_stdin_hook(self, msg: Msg) -> None:
        content = msg["content"]
        prompt = getpass.getpass if content.get("password") else input
        try:
            value = await asyncio.get_running_loop().run_in_executor(
                None, prompt, content.get("prompt", ""))
        except EOFError:
            value = "\x04"
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return
        if not (self.stdin_channel.msg_ready() or self.shell_channel.msg_ready()):
            self.input(value)


def _default_output_hook(msg: Msg) -> None:
    content = msg["content"]
    if msg["msg_type"] == "stream":
        (sys.stderr if content.get("name") == "stderr" else sys.stdout).write(content["text"])
    elif msg["msg_type"] in ("display_data", "execute_result"):
        sys.stdout.write(content["data"].get("text/plain", "") + "\n")
    elif msg["msg_type"] == "error":
        sys.stderr.write("\n".join(content["traceback"]) + "\n")


# -- the blocking face ---------------------------------------------------------
async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _blocking(
    func: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[Any, P], T]:
    """The blocking form of an async method of the wrapped object (``self._async``)."""

    @functools.wraps(func)
    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_blocking(lambda: _await(func(self._async, *args, **kwargs)))

    return method


def _on_loop(func: Callable[Concatenate[Any, P], T]) -> Callable[Concatenate[Any, P], Any]:
    """A plain method of the wrapped object run on the background loop.

    An awaitable result (``reply=True``) is awaited there. Called on the loop's
    own thread (from a hook) it runs in place; a result that must be awaited
    then raises KernelStateError.
    """

    @functools.wraps(func)
    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        if in_background_thread():
            if kwargs.get("reply"):
                raise KernelStateError("cannot wait for a reply on the background loop's thread")
            result = func(self._async, *args, **kwargs)
            if isawaitable(result):
                if isinstance(result, Coroutine):
                    result.close()
                raise KernelStateError("cannot wait for a reply on the background loop's thread")
            return result

        async def call() -> Any:
            result = func(self._async, *args, **kwargs)
            return await result if isawaitable(result) else result

        return run_blocking(call)

    return method


class _BlockingChannel:
    """A channel of a :class:`BlockingKernelClient`; methods block the caller."""

    def __init__(self, channel: _Channel) -> None:
        self._async = channel

    get_msg = _blocking(_Channel.get_msg)
    msg_ready = _on_loop(_Channel.msg_ready)
    get_msgs = _on_loop(_Channel.get_msgs)
    is_alive = _on_loop(_Channel.is_alive)
    send = _on_loop(_Channel.send)


class _BlockingHeartbeat:
    """The heartbeat of a :class:`BlockingKernelClient`."""

    def __init__(self, hb: _HeartbeatChannel) -> None:
        self._async = hb

    @property
    def time_to_dead(self) -> float:
        """Seconds a ping may go unanswered (also the ping interval)."""
        return self._async.time_to_dead

    @time_to_dead.setter
    def time_to_dead(self, value: float) -> None:
        self._async.time_to_dead = value

    @property
    def beats(self) -> int:
        """Echoes received since the channel started."""
        return self._async.beats

    is_alive = _on_loop(_HeartbeatChannel.is_alive)
    is_beating = _on_loop(_HeartbeatChannel.is_beating)
    pause = _on_loop(_HeartbeatChannel.pause)
    unpause = _on_loop(_HeartbeatChannel.unpause)


class BlockingKernelClient:
    """The blocking client: a :class:`KernelClient` on the background loop.

    Same constructor and methods as :class:`KernelClient`; every method blocks
    until done and returns what the async one returns (``execute(...,
    reply=True)`` returns the reply dict). Safe to call from any thread but
    the background loop's own.
    """

    def __init__(
        self,
        connection_info: ConnectionInfo | None = None,
        *,
        connection_file: str | Path | None = None,
        session: Session | None = None,
        kernel_name: str = "",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._async = KernelClient(
            connection_info, connection_file=connection_file, session=session,
            kernel_name=kernel_name, context=context,
        )
        self.shell_channel = _BlockingChannel(self._async.shell_channel)
        self.iopub_channel = _BlockingChannel(self._async.iopub_channel)
        self.stdin_channel = _BlockingChannel(self._async.stdin_channel)
        self.control_channel = _BlockingChannel(self._async.control_channel)
        self.hb_channel = _BlockingHeartbeat(self._async.hb_channel)

    @property
    def async_client(self) -> KernelClient:
        """The wrapped asyncio client (it lives on the background loop)."""
        return self._async

    @property
    def session(self) -> Session:
        """The Session signing and verifying messages."""
        return self._async.session

    @property
    def connection_info(self) -> ConnectionInfo | None:
        """The kernel's connection info."""
        return self._async.connection_info

    @property
    def kernel_name(self) -> str:
        """The kernel's name, when known."""
        return self._async.kernel_name

    @property
    def dropped(self) -> Counter[str]:
        """Messages dropped, by reason (frame, signature, replay)."""
        return self._async.dropped

    @property
    def allow_stdin(self) -> bool:
        """Default ``allow_stdin`` for execute requests."""
        return self._async.allow_stdin

    @allow_stdin.setter
    def allow_stdin(self, value: bool) -> None:
        self._async.allow_stdin = value

    @property
    def channels_running(self) -> bool:
        """True while any channel runs."""
        return self._async.channels_running

    def __enter__(self) -> BlockingKernelClient:
        self.start_channels()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_channels()

    load_connection_file = _on_loop(KernelClient.load_connection_file)
    start_channels = _on_loop(KernelClient.start_channels)
    stop_channels = _on_loop(KernelClient.stop_channels)
    is_alive = _on_loop(KernelClient.is_alive)
    get_shell_msg = _blocking(KernelClient.get_shell_msg)
    get_iopub_msg = _blocking(KernelClient.get_iopub_msg)
    get_stdin_msg = _blocking(KernelClient.get_stdin_msg)
    get_control_msg = _blocking(KernelClient.get_control_msg)
    wait_for_ready = _blocking(KernelClient.wait_for_ready)
    execute_interactive = _blocking(KernelClient.execute_interactive)
    execute = _on_loop(KernelClient.execute)
    complete = _on_loop(KernelClient.complete)
    inspect = _on_loop(KernelClient.inspect)
    history = _on_loop(KernelClient.history)
    kernel_info = _on_loop(KernelClient.kernel_info)
    comm_info = _on_loop(KernelClient.comm_info)
    is_complete = _on_loop(KernelClient.is_complete)
    shutdown = _on_loop(KernelClient.shutdown)
    input = _on_loop(KernelClient.input)

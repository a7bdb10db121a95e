"""The asyncio kernel client: talk to one running kernel over its five ZeroMQ channels.

:class:`KernelClient` binds to the loop that is running when
:meth:`KernelClient.start_channels` is called, and from then on every method must
be called on that loop's thread. Each channel has a reader task that verifies
every message with the :class:`~supervisor.wire.Session`; a message that fails
(bad frames, bad signature, replay) is dropped, counted in
:attr:`KernelClient.dropped` by reason and logged at debug level. Good messages
wait in the channel's inbox as jupyter_client-shaped dicts.

Every wait that can expire raises :class:`~supervisor.errors.ChannelTimeout`,
which is a :class:`queue.Empty` (what nbclient catches around ``get_msg``).
That includes ``wait_for_ready`` (jupyter_client raises a RuntimeError there;
nbclient catches any ``Exception`` around it) and ``reply=True`` requests
(jupyter_client raises TimeoutError there).
"""

from __future__ import annotations

import asyncio
import getpass
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from inspect import isawaitable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from supervisor._log import get_logger
from supervisor.client.channels import (
    CHANNELS,
    Channel,
    HeartbeatChannel,
    Msg,
    OutputHook,
    connect_channel,
    drop_reason,
    next_message,
)
from supervisor.connection import ConnectionInfo, read_connection_file
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    KernelStateError,
    WireError,
)
from supervisor.wire import Session

__all__ = ["KernelClient"]

log = get_logger("supervisor.client")
_ASK_AGAIN = 0.25  # s after a kernel_info_reply without IOPub traffic: ask again
_ASK_AGAIN_UNANSWERED = 1.0  # s after an unanswered kernel_info_request: ask again


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
        self._channels = {name: Channel(self, name) for name in CHANNELS if name != "hb"}
        self._hb = HeartbeatChannel(self)
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
        reason = drop_reason(exc)
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
            got = await next_message((chan,), remaining)
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
                got = await next_message((shell, iopub), max(0.0, wake - now))
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
            while pending and (got := await next_message((shell,), grace - loop.time())):
                if got[1]["parent_header"].get("msg_id") in pending:
                    pending.discard(got[1]["parent_header"].get("msg_id"))
                else:
                    kept.append(got[1])
            return reply
        finally:
            shell._unpop(kept)

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
            got = await next_message(channels, remaining)
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

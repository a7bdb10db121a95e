"""The WebSocket endpoints: a kernel's channels, and the supervision event stream.

``/api/kernels/{id}/channels`` speaks the legacy JSON protocol, or
``v1.kernel.websocket.jupyter.org`` when the client offers it. A frame that
cannot be decoded (bad JSON, wrong channel, bad offsets) is dropped and
counted; the connection, the kernel and the other clients carry on. Frames
above ``max_message_size`` close the connection with 1009 (tornado's rule).

``/api/events`` sends every :class:`~supervisor.events.KernelEvent` as JSON,
over a WebSocket when the request asks for an upgrade and as server-sent
events (``text/event-stream``) otherwise.

Handlers and their peers live on the gateway's IOLoop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import tornado.iostream
import tornado.web
import tornado.websocket

from supervisor.errors import FrameError, KernelStateError
from supervisor.events import KernelEvent
from supervisor.gateway.app import Gateway, _wall, iso_utc
from supervisor.gateway.bridge import KernelBridge, Peer
from supervisor.gateway.handlers import authorized, cors_headers
from supervisor.gateway.wsproto import V1_PROTOCOL, decode_legacy, decode_v1

__all__ = ["ChannelsHandler", "EventsHandler", "event_json"]

_EVENT_QUEUE = 1000


def _origin_ok(gateway: Gateway, origin: str, host_check: bool) -> bool:
    allowed = gateway.settings.allow_origin
    if allowed == "*":
        return True
    if allowed:
        return origin in [o.strip() for o in allowed.split(",")]
    return host_check


class _Base(tornado.websocket.WebSocketHandler):
    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.application.settings["gateway"]
        return gateway

    def set_default_headers(self) -> None:
        cors_headers(self.gateway, self)

    def prepare(self) -> None:
        if not authorized(self.gateway, self):
            self.gateway.metrics.count("http_requests", method="GET", code="401")
            raise tornado.web.HTTPError(401, "missing or wrong token", reason="Unauthorized")

    def check_origin(self, origin: str) -> bool:
        return _origin_ok(self.gateway, origin, super().check_origin(origin))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        if isinstance(exc, tornado.web.HTTPError) and exc.args and exc.log_message:
            message = exc.log_message % exc.args
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"reason": self._reason, "message": message}))


class ChannelsHandler(_Base):
    """One client's WebSocket onto a kernel's channels."""

    peer: Peer | None = None
    kernel_bridge: KernelBridge | None = None

    def prepare(self) -> None:
        super().prepare()
        kernel_id = self.path_kwargs["kernel_id"]
        if not self.gateway.has_kernel(kernel_id):
            raise tornado.web.HTTPError(404, "no kernel %s", kernel_id, reason="Not Found")

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return V1_PROTOCOL if V1_PROTOCOL in subprotocols else None

    def open(self, *args: str, **kwargs: str) -> None:
        kernel_id = kwargs["kernel_id"]
        gateway = self.gateway
        # Replies follow small IOPub frames: with Nagle on, each would wait for the
        # client's delayed ACK (40 ms on Linux) before leaving.
        self.set_nodelay(True)
        try:
            bridge = gateway.bridge(kernel_id)
        except KernelStateError as exc:
            self.close(1011, str(exc)[:100])
            return
        session_id = self.get_query_argument("session_id", "") or str(uuid.uuid4())
        self.peer = Peer(session_id, v1=self.selected_subprotocol == V1_PROTOCOL,
                         write=self._write, close=self.close,
                         budget=gateway.settings.client_buffer, metrics=gateway.metrics)
        self.kernel_bridge = bridge
        bridge.add_peer(self.peer)
        gateway.touch(kernel_id)

    def _write(self, frame: str | bytes) -> Any:
        return self.write_message(frame, binary=isinstance(frame, bytes))

    def on_message(self, message: str | bytes) -> None:
        peer, bridge = self.peer, self.kernel_bridge
        if peer is None or bridge is None:
            return
        try:
            msg = decode_v1(message) if peer.v1 else decode_legacy(message)
        except FrameError:
            peer.garbage += 1
            self.gateway.metrics.count("ws_dropped", reason="garbage")
            return
        if not bridge.send(peer, msg):
            self.gateway.metrics.count("ws_dropped", reason="kernel_unavailable")
            return
        self.gateway.touch(bridge.kernel_id)

    def on_close(self) -> None:
        if self.peer is not None and self.kernel_bridge is not None:
            self.kernel_bridge.remove_peer(self.peer)
            self.peer.shut(self.close_code or 1000, "closed")


def event_json(event: KernelEvent) -> str:
    """One event as a JSON object (``time`` is its wall-clock time)."""
    data = dataclasses.asdict(event)
    data["time"] = iso_utc(_wall(event.at)) if event.at else None
    return json.dumps(data)


class EventsHandler(_Base):
    """Supervision events as WebSocket messages, or as server-sent events."""

    _queue: asyncio.Queue[KernelEvent | None] | None = None
    _task: asyncio.Task[None] | None = None

    def _listen(self) -> asyncio.Queue[KernelEvent | None]:
        queue: asyncio.Queue[KernelEvent | None] = asyncio.Queue(_EVENT_QUEUE)

        def listener(event: KernelEvent | None) -> None:
            if queue.full():
                self.gateway.metrics.count("ws_dropped", reason="events_slow_client")
                return
            queue.put_nowait(event)

        self._listener = listener
        self.gateway.event_listeners.add(listener)
        self._queue = queue
        return queue

    def _unlisten(self) -> None:
        listener = getattr(self, "_listener", None)
        if listener is not None:
            self.gateway.event_listeners.discard(listener)
        if self._queue is not None and not self._queue.full():
            self._queue.put_nowait(None)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() == "websocket":
            await super().get(*args, **kwargs)
            return
        queue = self._listen()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.write(": kernel-supervisor events\n\n")
        await self.flush()
        while True:
            event = await queue.get()
            if event is None:
                break
            self.write(f"event: {event.kind}\ndata: {event_json(event)}\n\n")
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                break
        self._unlisten()
        if not self._finished:
            self.finish()

    def on_connection_close(self) -> None:
        self._unlisten()
        super().on_connection_close()

    def open(self, *args: str, **kwargs: str) -> None:
        queue = self._listen()
        self._task = asyncio.ensure_future(self._pump(queue))

    async def _pump(self, queue: asyncio.Queue[KernelEvent | None]) -> None:
        while True:
            event = await queue.get()
            if event is None:
                break
            try:
                await self.write_message(event_json(event))
            except tornado.websocket.WebSocketClosedError:
                break
        self._unlisten()
        self.close(1001, "gateway shutting down")

    def on_message(self, message: str | bytes) -> None:
        pass  # the stream is one-way

    def on_close(self) -> None:
        self._unlisten()

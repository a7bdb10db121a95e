"""The gateway's state over one Supervisor, and the tornado application factory.

:class:`Gateway` is what the handlers talk to: it starts kernels (from the
warm pool when the request allows it), builds the kernel models
jupyter_server expects, keeps one :class:`~supervisor.gateway.bridge.KernelBridge`
per kernel with WebSocket clients, turns supervision events into ``status``
messages for those clients, remembers why recently dead kernels died, and
counts everything for ``/metrics``. :func:`make_app` wraps it in a
``tornado.web.Application`` you can ``listen()`` on or embed.

Everything belongs to the IOLoop the Supervisor runs on; build the app and
call its coroutines there.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import tornado.web
import zmq.asyncio

from supervisor._log import get_logger
from supervisor.errors import KernelStateError
from supervisor.events import KernelEvent
from supervisor.gateway.bridge import KernelBridge
from supervisor.gateway.metrics import Metrics, death_cause
from supervisor.gateway.settings import POOL_NEUTRAL_ENV, GatewaySettings
from supervisor.kernel import KernelActor
from supervisor.supervisor import Supervisor

__all__ = ["Gateway", "GatewayApp", "make_app"]

log = get_logger("supervisor.gateway")

_DEAD_KEPT = 100
_STATE_OF_STATUS = {"starting": "starting", "restarting": "restarting", "backoff": "restarting",
                    "exited": "restarting", "stopping": "stopping", "stopped": "dead",
                    "failed": "dead"}


def iso_utc(wall: float) -> str:
    """``%Y-%m-%dT%H:%M:%S.%fZ`` of a Unix time."""
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wall(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


class Gateway:
    """State shared by every handler of one gateway (see the module docstring)."""

    def __init__(self, supervisor: Supervisor, settings: GatewaySettings) -> None:
        self.supervisor = supervisor
        self.settings = settings
        self.metrics = Metrics()
        self.ctx = zmq.asyncio.Context()
        self.bridges: dict[str, KernelBridge] = {}
        self.dead: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.event_listeners: set[Any] = set()
        self.started_at = time.time()
        self.closed = False
        self._names: dict[str, str] = {}
        self._last_seen: dict[str, float] = {}
        supervisor.subscribe(self._on_event)

    # -- kernels -------------------------------------------------------------------------
    def has_kernel(self, kernel_id: str) -> bool:
        """True for a live kernel handed out by the supervisor."""
        return kernel_id in self.supervisor

    def kernel_ids(self) -> list[str]:
        """Live kernels (warm-pool kernels excluded)."""
        return self.supervisor.list_kernel_ids()

    async def start_kernel(self, name: str, env: Mapping[str, str]) -> str:
        """A ready kernel of ``name``: from the pool if ``env`` allows it, else a new one."""
        if self.supervisor.warm.get(name) and set(env) <= POOL_NEUTRAL_ENV:
            kernel_id = await self.supervisor.acquire(name)
        else:
            kernel_id = await self.supervisor.start_kernel(name, env=dict(env))
        self._names[kernel_id] = name
        return kernel_id

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """jupyter_server's kernel model; raises KernelStateError if unknown."""
        if kernel_id in self.dead and kernel_id not in self.supervisor:
            return dict(self.dead[kernel_id])
        actor = self.supervisor.actor_of(kernel_id)
        _, status = self.supervisor.child_record(kernel_id)
        state = actor.execution_state if status == "ready" else _STATE_OF_STATUS.get(
            status, status)
        bridge = self.bridges.get(kernel_id)
        last = _wall(actor.last_activity)
        last = max(last, self._last_seen.get(kernel_id, 0.0))
        return {
            "id": kernel_id,
            "name": actor.options.kernel_name,
            "last_activity": iso_utc(last),
            "execution_state": state,
            "connections": len(bridge.peers) if bridge is not None else 0,
        }

    def models(self) -> list[dict[str, Any]]:
        """Every live kernel's model, then the recently dead ones."""
        out = []
        for kernel_id in self.kernel_ids():
            with contextlib.suppress(KernelStateError):
                out.append(self.kernel_model(kernel_id))
        live = {m["id"] for m in out}
        out.extend(dict(m) for k, m in self.dead.items() if k not in live)
        return out

    def touch(self, kernel_id: str) -> None:
        """Record client activity on a kernel (a WebSocket message)."""
        self._last_seen[kernel_id] = time.time()

    def forget(self, kernel_id: str) -> bool:
        """Drop a dead kernel's record; True if there was one."""
        self._last_seen.pop(kernel_id, None)
        return self.dead.pop(kernel_id, None) is not None

    def bridge(self, kernel_id: str) -> KernelBridge:
        """The kernel's relay, created on first use (raises KernelStateError if unknown)."""
        existing = self.bridges.get(kernel_id)
        if existing is not None and not existing.closed:
            return existing
        actor: KernelActor = self.supervisor.actor_of(kernel_id)
        info = actor.connection_info
        if info is None:
            raise KernelStateError(f"kernel {kernel_id} has no connection yet")
        made = KernelBridge(kernel_id, info, ctx=self.ctx, metrics=self.metrics,
                            replay_messages=self.settings.replay_messages,
                            replay_bytes=self.settings.client_buffer,
                            replay_window=self.settings.replay_window)
        self.bridges[kernel_id] = made
        return made

    def close_bridge(self, kernel_id: str, code: int = 1000, reason: str = "") -> None:
        """Close a kernel's relay and its clients."""
        bridge = self.bridges.pop(kernel_id, None)
        if bridge is not None:
            bridge.close(code, reason or "kernel shut down")

    def connected(self, kernel_id: str) -> bool:
        """True when a WebSocket client is attached (for cull_connected=False)."""
        bridge = self.bridges.get(kernel_id)
        return bridge is not None and bool(bridge.peers)

    # -- events --------------------------------------------------------------------------
    async def _on_event(self, event: KernelEvent) -> None:
        self.metrics.count("kernel_events", kind=event.kind)
        for listener in list(self.event_listeners):
            listener(event)
        kid = event.kernel_id
        bridge = self.bridges.get(kid)
        if event.kind in ("exited", "restarting") and bridge is not None:
            bridge.kernel_gone()
            if event.kind == "restarting" and not event.manual:
                bridge.publish_status("restarting")
        elif event.kind == "restarted" and bridge is not None:
            with contextlib.suppress(KernelStateError):
                info = self.supervisor.actor_of(kid).connection_info
                if info is not None:
                    bridge.attach(info)
                bridge.kernel_back()
        elif event.kind == "dead":
            self.metrics.count("kernel_deaths", cause=death_cause(event))
            if kid in self._names or bridge is not None:
                self._record_dead(event)
            if bridge is not None:
                bridge.publish_status("dead")
                bridge.detach()
        elif event.kind == "shutdown" and kid not in self.supervisor:
            self._names.pop(kid, None)
            self._last_seen.pop(kid, None)
            self.close_bridge(kid)

    def _record_dead(self, event: KernelEvent) -> None:
        kid = event.kernel_id
        bridge = self.bridges.get(kid)
        reason = event.reason or "died"
        if event.signal is not None and f"{event.signal}" not in reason:
            reason = f"{reason} (signal {event.signal})"
        elif event.exit_code is not None and f"{event.exit_code}" not in reason:
            reason = f"{reason} (exit code {event.exit_code})"
        self.dead[kid] = {
            "id": kid, "name": event.kernel_name or self._names.get(kid, ""),
            "last_activity": iso_utc(self._last_seen.get(kid, time.time())),
            "execution_state": "dead",
            "connections": len(bridge.peers) if bridge is not None else 0,
            "reason": reason,
        }
        self._names.pop(kid, None)
        while len(self.dead) > _DEAD_KEPT:
            self.dead.popitem(last=False)

    # -- metrics -------------------------------------------------------------------------
    def render_metrics(self) -> str:
        """The Prometheus exposition of this gateway."""
        stats = self.supervisor.statistics()
        conns = sum(len(b.peers) for b in self.bridges.values())
        by_state: dict[tuple[tuple[str, str], ...], float] = {
            (("state", s),): float(n) for s, n in stats.by_state.items()}
        by_state[(("state", "dead"),)] = float(len(self.dead))
        gauges: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {
            "kernels": ("Kernels handed out (warm pool excluded).", {(): float(stats.kernels)}),
            "kernels_by_state": ("Supervised kernels by state (pool included).", by_state),
            "pool_ready": ("Warm kernels ready, by kernelspec.",
                           {(("kernel_name", k),): float(v) for k, v in stats.pool.items()}),
            "pool_target": ("Warm kernels wanted, by kernelspec.",
                            {(("kernel_name", k),): float(v)
                             for k, v in stats.pool_target.items()}),
            "pending_starts": ("Kernel starts waiting for a slot.",
                               {(): float(stats.pending_starts)}),
            "restarts": ("Automatic and manual restarts so far.", {(): float(stats.restarts)}),
            "gave_up": ("Kernels the restart policy gave up on.", {(): float(stats.gave_up)}),
            "websocket_connections": ("Open kernel WebSocket connections.", {(): float(conns)}),
            "uptime_seconds": ("Seconds since the gateway started.",
                               {(): time.time() - self.started_at}),
        }
        return self.metrics.render(gauges)

    # -- closing -------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every client and relay (the supervisor is the caller's to close)."""
        if self.closed:
            return
        self.closed = True
        self.supervisor.unsubscribe(self._on_event)
        tasks = [t for b in self.bridges.values() for t in b.tasks()]
        for kid in list(self.bridges):
            self.close_bridge(kid, 1001, "gateway shutting down")
        for listener in list(self.event_listeners):
            listener(None)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)


class GatewayApp(tornado.web.Application):
    """A tornado Application with its :class:`Gateway` at :attr:`gateway`."""

    gateway: Gateway


def make_app(supervisor: Supervisor, settings: GatewaySettings | None = None) -> GatewayApp:
    """The gateway as a tornado application over a running ``supervisor``.

    Listen on it yourself (``app.listen(port)``) or use
    :func:`supervisor.gateway.serve`; call ``await app.gateway.close()``
    before closing the supervisor.
    """
    from supervisor.gateway.handlers import routes  # noqa: PLC0415 - handlers import us

    settings = settings or GatewaySettings()
    gateway = Gateway(supervisor, settings)
    app = GatewayApp(routes(settings.base_url), gateway=gateway,
                     websocket_max_message_size=settings.max_message_size,
                     websocket_ping_interval=30, compress_response=False)
    app.gateway = gateway
    return app

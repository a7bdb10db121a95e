"""Run the gateway as a server: a Supervisor, the app, an HTTP(S) listener, signals.

:func:`serve` is one coroutine for the whole life of a gateway process: it
starts a :class:`~supervisor.supervisor.Supervisor` configured from the
settings (pools, limit, culling), listens, reports the URL, and on SIGTERM or
SIGINT (or when ``stop`` is set) closes the clients, shuts every kernel down
and returns 0. Everything runs on the loop that awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from supervisor._log import get_logger
from supervisor.gateway.app import GatewayApp, make_app
from supervisor.gateway.settings import GatewaySettings
from supervisor.kernel import LaunchOptions
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor

__all__ = ["Server", "serve"]

log = get_logger("supervisor.gateway")


class Server:
    """A started gateway: its supervisor, app, HTTP server and bound port.

    ``async with Server(settings) as server:`` listens on entry and stops
    everything on exit; :func:`serve` adds signal handling around it.
    """

    def __init__(self, settings: GatewaySettings, *, policy: RestartPolicy | None = None,
                 supervisor: Supervisor | None = None,
                 launch: LaunchOptions | None = None) -> None:
        self.settings = settings
        self._launch = launch
        self._own_supervisor = supervisor is None
        self.supervisor = supervisor
        self._policy = policy
        self.app: GatewayApp | None = None
        self.http: HTTPServer | None = None
        self.port = settings.port

    async def start(self) -> Server:
        """Start the supervisor (if ours) and listen."""
        s = self.settings
        if self.supervisor is None:
            self.supervisor = Supervisor(
                policy=self._policy or RestartPolicy(), max_kernels=s.max_kernels,
                warm=s.prespawn, cull_idle_timeout=s.cull_idle_timeout,
                cull_interval=s.cull_interval, cull_busy=s.cull_busy, launch=self._launch,
                name="gateway")
        if self.supervisor.actor_state == "new":
            self.supervisor.start()
        self.app = make_app(self.supervisor, s)
        gateway = self.app.gateway
        if not s.cull_connected:
            self.supervisor.cull_spare = gateway.connected
        ssl_ctx: ssl.SSLContext | None = None
        if s.certfile and s.keyfile:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(s.certfile, s.keyfile)
        self.http = HTTPServer(self.app, ssl_options=ssl_ctx, xheaders=True,
                               max_body_size=s.max_message_size)
        sockets = bind_sockets(s.port, s.ip)
        self.port = sockets[0].getsockname()[1]
        self.http.add_sockets(sockets)
        log.info("gateway.listening", url=s.url(self.port))
        return self

    @property
    def url(self) -> str:
        """The base URL (with the bound port)."""
        return self.settings.url(self.port)

    async def stop(self) -> None:
        """Stop listening, close clients and relays, shut every kernel down."""
        if self.http is not None:
            self.http.stop()
        if self.app is not None:
            await self.app.gateway.close()
        if self.http is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.http.close_all_connections(), 5)
            self.http = None
        if self.supervisor is not None and self._own_supervisor:
            await self.supervisor.close()
        log.info("gateway.stopped")

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(settings: GatewaySettings, *, on_ready: Callable[[Server], Any] | None = None,
                stop: asyncio.Event | None = None, policy: RestartPolicy | None = None,
                launch: LaunchOptions | None = None) -> int:
    """Run a gateway until SIGTERM/SIGINT (or ``stop``); every kernel is shut down; 0.

    ``launch`` are the kernels' default launch options (launcher, containment,
    limits), e.g. ``LaunchOptions(launcher="slurm", slurm_options={...})``.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        async with Server(settings, policy=policy, launch=launch) as server:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
            log.info("gateway.stopping")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        sys.stdout.flush()
    return 0

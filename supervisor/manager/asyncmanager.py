"""AsyncKernelManager: the seed's manager API (async) over one Supervisor.

:class:`AsyncKernelManager` manages one kernel through a private
:class:`~supervisor.supervisor.Supervisor` (or a shared one you pass), so a
single-kernel manager and a pool use the same actors, the same restart
policies and the same events. It binds to the loop on which
:meth:`AsyncKernelManager.start_kernel` is first awaited. From another loop it
works while that loop runs (in another thread); once that loop is closed or
stopped, ``shutdown_kernel`` kills the kernel's process group and removes its
files from the caller's thread, ``restart_kernel`` does that and starts afresh
on the caller's loop, and other requests raise a typed error at once
(:meth:`supervisor.actor.Actor.call`).

:class:`KernelManager` is the blocking face: it owns an AsyncKernelManager that
lives on the process-wide background loop (:func:`supervisor.actor.background_loop`)
and each of its methods is the async one run there through
:func:`supervisor.actor.run_blocking`, the only thread crossing it does. Its
restart callbacks run on worker threads.

Like jupyter_client's plain managers, these never restart a kernel on their
own: a kernel that dies stays dead (``is_alive()`` turns False, a ``'dead'``
restart callback fires) until the host restarts it. ``autorestart=True``
applies :meth:`RestartPolicy.jupyter_client_compatible` (what
jupyter_client's ``IOLoopKernelManager`` restarter does); ``policy=`` another.
``shutdown_kernel``, ``finish_shutdown`` and ``cleanup_resources`` are quiet
and idempotent on a kernel that is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq.asyncio

from supervisor.client import KernelClient
from supervisor.connection import ConnectionInfo, new_connection_info, remove_connection_files
from supervisor.errors import KernelStateError
from supervisor.kernel import KernelActor, LaunchOptions
from supervisor.kernelspec import KernelSpec, format_kernel_cmd
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor
from supervisor.wire import Session

__all__ = ["AsyncKernelManager"]


class AsyncKernelManager:
    """Manages one kernel in a subprocess on this host (async)."""

    def __init__(
        self,
        kernel_name: str | None = None,
        *,
        kernel_id: str | None = None,
        autorestart: bool = False,
        policy: RestartPolicy | None = None,
        connection_file: str | None = None,
        supervisor: Supervisor | None = None,
        **launch_options: Any,
    ) -> None:
        launch_options.pop("config", None)  # jupyter-style config objects have no meaning here
        # jupyter_client's shared-context hosts (MultiKernelManager) pass their zmq Context:
        # the manager's own sockets use it, and it is never closed here.
        self._context: zmq.asyncio.Context | None = launch_options.pop("context", None)
        self.kernel_id = kernel_id or str(uuid.uuid4())
        self.autorestart = autorestart
        self.policy = policy or (
            RestartPolicy.jupyter_client_compatible() if autorestart else RestartPolicy.never()
        )
        spec = launch_options.get("spec")
        if kernel_name is None:
            kernel_name = spec.name if spec is not None else "python3"
        self._options = LaunchOptions(kernel_name=kernel_name).replace(
            **_launch_keywords(launch_options))
        self._connection_file = connection_file
        self._supervisor = supervisor
        self._owns_supervisor = supervisor is None
        self._callbacks: list[tuple[Callable[[], object], str]] = []
        self._last_info: ConnectionInfo | None = None
        self._pending_info: ConnectionInfo | None = None
        self._clients: weakref.WeakSet[KernelClient] = weakref.WeakSet()
        self._last_file: str | None = None
        self._started = False

    # -- identity and state --------------------------------------------------------
    @property
    def kernel_name(self) -> str:
        return self._options.kernel_name

    @property
    def kernel_spec(self) -> KernelSpec:
        """The kernelspec this manager launches (looked up on first use)."""
        actor = self._actor()
        if actor is not None and actor.spec is not None:
            return actor.spec
        return self._options.resolve_spec()

    @property
    def ipykernel(self) -> bool:
        """True when the kernel is IPython's (nbclient asks)."""
        return any("ipykernel" in arg for arg in self.kernel_spec.argv)

    @property
    def context(self) -> zmq.asyncio.Context:
        """The zmq Context of the manager's own sockets: the one given as ``context=``, else
        the process-wide one. Never closed by the manager."""
        return self._context or zmq.asyncio.Context.instance()

    @property
    def supervisor(self) -> Supervisor | None:
        """The supervisor that owns the kernel (None before the first start)."""
        return self._supervisor

    def _actor(self) -> KernelActor | None:
        sup = self._supervisor
        if sup is None or sup.actor_state not in ("running", "stopping"):
            return None
        try:
            return sup.actor_of(self.kernel_id)
        except KernelStateError:
            return None

    def _kernel_running(self) -> bool:
        actor = self._actor()
        return actor is not None and actor.is_alive()

    @property
    def has_kernel(self) -> bool:
        """Has a kernel been started that we are still managing?"""
        actor = self._actor()
        return actor is not None and actor.state not in ("shutdown", "new")

    @property
    def connection_info(self) -> ConnectionInfo | None:
        actor = self._actor()
        if actor is not None and actor.connection_info is not None:
            return actor.connection_info
        return self._last_info or self._pending_info

    @property
    def connection_file(self) -> str:
        actor = self._actor()
        if actor is not None:
            return str(actor.connection_file)
        return self._last_file or self._connection_file or ""

    def get_connection_info(self, session: bool = False) -> dict[str, Any]:
        """Transport, ip and ports, plus ``key`` (bytes) and ``signature_scheme``, or with
        ``session`` a :class:`~supervisor.wire.Session` instead, as jupyter_client returns.

        Before the first start, the ports and key are chosen now and the start uses them.
        """
        info = self._info_or_reserve()
        data: dict[str, Any] = {"transport": info.transport, "ip": info.ip}
        for channel in ("shell", "iopub", "stdin", "hb", "control"):
            data[f"{channel}_port"] = info.port(channel)
        if session:
            data["session"] = Session(info.key, info.signature_scheme)
        else:
            data["signature_scheme"] = info.signature_scheme
            data["key"] = info.key
        if info.curve_publickey is not None and info.curve_secretkey is not None:
            data["curve_publickey"] = info.curve_publickey.decode("ascii")
            data["curve_secretkey"] = info.curve_secretkey.decode("ascii")
        return data

    def _info_or_reserve(self) -> ConnectionInfo:
        """The kernel's connection info; before the first start, one chosen now that
        the start will use (so a client made early connects to the kernel started later)."""
        info = self.connection_info
        if info is None:
            opts = self._options
            info = new_connection_info(ip=opts.ip, transport=opts.transport,
                                       kernel_name=self.kernel_name)
            self._pending_info = info
        return info

    @property
    def pid(self) -> int | None:
        actor = self._actor()
        return actor.pid if actor is not None else None

    @property
    def restart_count(self) -> int:
        sup = self._supervisor
        if sup is None or self.kernel_id not in sup:
            return 0
        return sup.child_record(self.kernel_id)[0]

    def format_kernel_cmd(self, extra_arguments: Sequence[str] | None = None) -> list[str]:
        """The argv that launches the kernel, templates filled in."""
        extra = (tuple(extra_arguments) if extra_arguments is not None
                 else self._options.extra_arguments)
        if self._options.kernel_cmd:
            return [a.replace("{connection_file}", self.connection_file)
                    for a in self._options.kernel_cmd] + list(extra)
        return format_kernel_cmd(self.kernel_spec, self.connection_file, extra_arguments=extra)

    # -- lifecycle -------------------------------------------------------------------
    def _require(self, what: str) -> Supervisor:
        sup = self._supervisor
        if sup is None or self.kernel_id not in sup:
            raise KernelStateError(f"cannot {what}: no kernel is running (call start_kernel first)")
        return sup

    async def start_kernel(self, **kw: Any) -> None:
        """Start the kernel and wait until it is ready; ``kw`` override launch options
        (jupyter_client's keywords included: ``env`` replaces the environment)."""
        kernel_id = kw.pop("kernel_id", None)
        if kernel_id is not None and kernel_id != self.kernel_id:
            if self.has_kernel:
                raise KernelStateError(
                    f"cannot start kernel {kernel_id}: this manager runs {self.kernel_id}")
            self.kernel_id = str(kernel_id)
        if kw:
            self._options = self._options.replace(**_launch_keywords(kw))
        await self._start(self._pending_info)
        self._pending_info = None

    async def _start(self, info: ConnectionInfo | None) -> None:
        if self._supervisor is None or not self._supervisor.alive:
            sup = Supervisor(policy=self.policy, launch=self._options,
                             name=f"manager-{self.kernel_id[:8]}", context=self._context)
            sup.start()
            self._supervisor = sup
            self._owns_supervisor = True
            for callback, event in self._callbacks:
                sup.add_restart_callback(callback, event, self.kernel_id)
            sup.subscribe(self._on_gone, lambda ev: ev.kind == "dead"
                          and ev.kernel_id == self.kernel_id)
        launch = {f.name: getattr(self._options, f.name) for f in dataclasses.fields(self._options)
                  if f.name != "kernel_name"}
        if self._connection_file is not None:
            launch["connection_file"] = self._connection_file
        if info is not None and self._options.transport_encryption == "disabled":
            launch["connection_info"] = info
        sup = self._supervisor
        self._started = True
        try:
            await sup.start_kernel(self.kernel_name, kernel_id=self.kernel_id,
                                   policy=self.policy, **launch)
        except BaseException:
            if self._owns_supervisor and self.kernel_id not in sup:
                await sup.close(now=True)  # nothing left to supervise
            raise
        self._remember()

    async def _on_gone(self, event: object) -> None:
        """The kernel is lost for good (not restarted): a private supervisor has
        nothing left to do, so it stops now rather than stay pending forever."""
        sup = self._supervisor
        if self._owns_supervisor and sup is not None and self.kernel_id not in sup:
            sup.stop("its only kernel is gone")

    def _remember(self) -> None:
        actor = self._actor()
        if actor is not None:
            self._last_info = actor.connection_info
            self._last_file = str(actor.connection_file)

    async def _forget(self) -> None:
        """After the kernel is gone: close clients, remove leftover files, stop our supervisor."""
        self._close_clients()
        self._remove_files()
        sup = self._supervisor
        if self._owns_supervisor and sup is not None:
            await sup.close()

    def _remove_files(self) -> None:
        path = self.connection_file
        remove_connection_files(Path(path) if path else None, self.connection_info)

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        """Stop the kernel: ``shutdown_request``, then SIGTERM, then SIGKILL (``now``: at once).

        Quiet and idempotent: a kernel that already died, was given up on or was
        shut down is cleaned up (files, clients) and nothing is raised.
        """
        sup = self._supervisor
        self._remember()
        if sup is not None and self.kernel_id in sup:
            await sup.shutdown_kernel(self.kernel_id, now=now, restart=restart)
            if restart:
                return
        elif restart:
            return
        await self._forget()

    def _close_clients(self) -> None:
        """Clients of a kernel that is gone have nothing left to say: close their sockets."""
        for client in list(self._clients):
            if client.channels_running:
                client.stop_channels()

    async def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any) -> None:
        """Restart with the same ports and connection file (unless ``newports``);
        ``kw`` replace launch options. A kernel that died is started again."""
        if kw:
            kw = _launch_keywords(kw)
            self._options = self._options.replace(**kw)
        sup = self._supervisor
        if sup is not None and self.kernel_id in sup:
            if sup.unreachable() is None:
                await sup.restart_kernel(self.kernel_id, now=now, newports=newports, **kw)
                self._remember()
                return
            # Its loop is gone: stop it from here, then start afresh on this loop.
            await self.shutdown_kernel(now=True)
        if not self._started:
            raise KernelStateError("cannot restart the kernel: it was never started")
        await self._start(None if newports else self._last_info)

    async def interrupt_kernel(self) -> None:
        """Interrupt the kernel (signal or message, as its kernelspec says)."""
        await self._require("interrupt the kernel").interrupt_kernel(self.kernel_id)

    async def signal_kernel(self, signum: int) -> None:
        """Send ``signum`` to the kernel's process group."""
        await self._require("signal the kernel").signal_kernel(self.kernel_id, signum)

    async def is_alive(self) -> bool:
        """Is the kernel process still running?"""
        return self._kernel_running()

    async def request_shutdown(self, restart: bool = False) -> None:
        """Send ``shutdown_request`` on the control channel, nothing more."""
        await self._require("request shutdown").request_shutdown(self.kernel_id, restart=restart)

    async def finish_shutdown(self, waittime: float | None = None,
                              pollinterval: float = 0.1, restart: bool = False) -> None:
        """Wait for the exit (an event; ``pollinterval`` is accepted and unused),
        then SIGTERM/SIGKILL if it has not come; clean up. Quiet on a kernel that is gone."""
        sup = self._supervisor
        self._remember()
        if sup is not None and self.kernel_id in sup:
            await sup.finish_shutdown(self.kernel_id, waittime=waittime)
        if sup is None or self.kernel_id not in sup:
            await self._forget()

    def cleanup_resources(self, restart: bool = False) -> None:
        """Remove the connection file and ipc sockets of a stopped kernel (idempotent)."""
        if self._kernel_running() or restart:
            return
        self._remove_files()
        sup = self._supervisor
        if self._owns_supervisor and sup is not None and self.kernel_id not in sup:
            self._close_clients()
            sup.stop("its only kernel is gone")

    def cleanup(self, connection_file: bool = True) -> None:
        """Seed name for :meth:`cleanup_resources`."""
        self.cleanup_resources(restart=not connection_file)

    def client(self, **kwargs: Any) -> KernelClient:
        """An async client for this kernel (channels not started); its ``is_alive()``
        asks this manager whether the kernel process runs, as jupyter_client's does.
        Made before the first start, it is bound to the ports that start will use."""
        client = KernelClient(self._info_or_reserve(), **kwargs)
        if self.connection_file:
            client.connection_file = Path(self.connection_file)
        client.liveness = self._kernel_running
        self._clients.add(client)
        return client

    def add_restart_callback(self, callback: Callable[[], object], event: str = "restart") -> None:
        """Call ``callback()`` on automatic restarts (``'restart'``, only when restarts are
        enabled by ``autorestart=True`` or ``policy=``) or when the kernel is lost for good
        (``'dead'``)."""
        self._callbacks.append((callback, event))
        if self._supervisor is not None:
            self._supervisor.add_restart_callback(callback, event, self.kernel_id)

    def remove_restart_callback(self, callback: Callable[[], object],
                                event: str = "restart") -> None:
        """Undo :meth:`add_restart_callback`."""
        with contextlib.suppress(ValueError):
            self._callbacks.remove((callback, event))
        if self._supervisor is not None:
            self._supervisor.remove_restart_callback(callback, event, self.kernel_id)


def _launch_keywords(kw: dict[str, Any]) -> dict[str, Any]:
    """jupyter_client's launch keywords in :class:`LaunchOptions` terms.

    ``env`` is the kernel's whole environment (jupyter_client uses it instead of
    ``os.environ``), unless ``inherit_env=True`` is passed with it. Unknown names
    raise :class:`~supervisor.errors.ConfigurationError` (in ``replace``).
    """
    out = dict(kw)
    if "env" in out and out["env"] is not None and "inherit_env" not in out:
        out["inherit_env"] = False
    if out.get("env", ()) is None:
        del out["env"]
    if "extra_arguments" in out and out["extra_arguments"] is not None:
        out["extra_arguments"] = tuple(out["extra_arguments"])
    return out

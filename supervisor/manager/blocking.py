"""KernelManager: the blocking face of :class:`AsyncKernelManager`.

It owns an AsyncKernelManager that lives on the process-wide background loop
(:func:`supervisor.actor.background_loop`); each of its methods is the async one
run there through :func:`supervisor.actor.run_blocking`, the only thread crossing
it does. Its restart callbacks run on worker threads. Safe to call from any
thread but the background loop's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from supervisor.actor import run_blocking
from supervisor.client import BlockingKernelClient
from supervisor.manager.asyncmanager import AsyncKernelManager

__all__ = ["KernelManager"]

T = TypeVar("T")


def _blocking(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Turn an AsyncKernelManager coroutine method into a blocking one."""

    @functools.wraps(method)
    def call(self: KernelManager, *args: Any, **kwargs: Any) -> T:
        return run_blocking(lambda: method(self._async, *args, **kwargs))

    return call


def _delegate(name: str) -> property:
    return property(lambda self: getattr(self._async, name),
                    doc=f"Same as :attr:`AsyncKernelManager.{name}`.")


class KernelManager:
    """The seed's blocking KernelManager: an AsyncKernelManager on the background loop."""

    def __init__(self, kernel_name: str | None = None, **kwargs: Any) -> None:
        self._async = AsyncKernelManager(kernel_name, **kwargs)

    start_kernel = _blocking(AsyncKernelManager.start_kernel)
    shutdown_kernel = _blocking(AsyncKernelManager.shutdown_kernel)
    restart_kernel = _blocking(AsyncKernelManager.restart_kernel)
    interrupt_kernel = _blocking(AsyncKernelManager.interrupt_kernel)
    signal_kernel = _blocking(AsyncKernelManager.signal_kernel)
    is_alive = _blocking(AsyncKernelManager.is_alive)
    request_shutdown = _blocking(AsyncKernelManager.request_shutdown)
    finish_shutdown = _blocking(AsyncKernelManager.finish_shutdown)

    kernel_id = _delegate("kernel_id")
    kernel_name = _delegate("kernel_name")
    kernel_spec = _delegate("kernel_spec")
    ipykernel = _delegate("ipykernel")
    has_kernel = _delegate("has_kernel")
    connection_info = _delegate("connection_info")
    connection_file = _delegate("connection_file")
    pid = _delegate("pid")
    restart_count = _delegate("restart_count")
    supervisor = _delegate("supervisor")
    context = _delegate("context")

    def get_connection_info(self, session: bool = False) -> dict[str, Any]:
        return self._async.get_connection_info(session)

    def format_kernel_cmd(self, extra_arguments: Sequence[str] | None = None) -> list[str]:
        return self._async.format_kernel_cmd(extra_arguments)

    def cleanup_resources(self, restart: bool = False) -> None:
        self._async.cleanup_resources(restart)

    def cleanup(self, connection_file: bool = True) -> None:
        self._async.cleanup(connection_file)

    def add_restart_callback(self, callback: Callable[[], object], event: str = "restart") -> None:
        run_blocking(_call_soon(self._async.add_restart_callback, callback, event))

    def remove_restart_callback(self, callback: Callable[[], object],
                                event: str = "restart") -> None:
        run_blocking(_call_soon(self._async.remove_restart_callback, callback, event))

    def client(self, **kwargs: Any) -> BlockingKernelClient:
        """A blocking client for this kernel (channels not started)."""
        client = BlockingKernelClient(self._async._info_or_reserve(), **kwargs)
        client.async_client.liveness = self._async._kernel_running
        run_blocking(_call_soon(self._async._clients.add, client.async_client))
        return client


def _call_soon(fn: Callable[..., None], *args: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    async def run() -> None:
        fn(*args)
    return run

"""One-call helpers: a started kernel and a ready client, and context managers that
shut the kernel down on exit. The blocking ones run on the background loop, the
async ones on the caller's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from supervisor.client import BlockingKernelClient, KernelClient
from supervisor.manager.asyncmanager import AsyncKernelManager
from supervisor.manager.blocking import KernelManager

__all__ = ["run_async_kernel", "run_kernel", "start_new_async_kernel", "start_new_kernel"]


def start_new_kernel(startup_timeout: float = 60, kernel_name: str = "python",
                     **kwargs: Any) -> tuple[KernelManager, BlockingKernelClient]:
    """Start a kernel; return its manager and a ready blocking client."""
    km = KernelManager(kernel_name, startup_timeout=startup_timeout, **kwargs)
    km.start_kernel()
    kc: BlockingKernelClient | None = None
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=startup_timeout)
    except BaseException:
        if kc is not None:
            kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return km, kc


@contextlib.contextmanager
def run_kernel(**kwargs: Any) -> Iterator[BlockingKernelClient]:
    """A ready blocking client; the kernel is shut down on exit, also on error."""
    km, kc = start_new_kernel(**kwargs)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


async def start_new_async_kernel(startup_timeout: float = 60, kernel_name: str = "python",
                                 **kwargs: Any) -> tuple[AsyncKernelManager, KernelClient]:
    """Async twin of :func:`start_new_kernel`."""
    km = AsyncKernelManager(kernel_name, startup_timeout=startup_timeout, **kwargs)
    await km.start_kernel()
    kc: KernelClient | None = None
    try:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=startup_timeout)
    except BaseException:
        if kc is not None:
            kc.stop_channels()
        await km.shutdown_kernel(now=True)
        raise
    return km, kc


@contextlib.asynccontextmanager
async def run_async_kernel(**kwargs: Any) -> AsyncIterator[KernelClient]:
    """Async twin of :func:`run_kernel`."""
    km, kc = await start_new_async_kernel(**kwargs)
    try:
        yield kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)

"""The seed's KernelManager API, async and blocking, over one Supervisor.

The room has three modules: :mod:`~supervisor.manager.asyncmanager`,
:mod:`~supervisor.manager.blocking` and :mod:`~supervisor.manager.helpers`.

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

from supervisor.manager.asyncmanager import AsyncKernelManager
from supervisor.manager.blocking import KernelManager
from supervisor.manager.helpers import (
    run_async_kernel,
    run_kernel,
    start_new_async_kernel,
    start_new_kernel,
)

__all__ = [
    "AsyncKernelManager",
    "KernelManager",
    "run_async_kernel",
    "run_kernel",
    "start_new_async_kernel",
    "start_new_kernel",
]

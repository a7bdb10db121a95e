"""The seed's KernelManager API, async and blocking, over one Supervisor.

Three modules: :mod:`~supervisor.manager.asyncmanager` (:class:`AsyncKernelManager`,
which binds to the loop of its first start; its docstring says how it behaves
from other loops and how it matches jupyter_client's plain managers),
:mod:`~supervisor.manager.blocking` (:class:`KernelManager`, the blocking face on
the process-wide background loop) and :mod:`~supervisor.manager.helpers`
(``start_new_kernel``, ``run_kernel`` and their async twins).
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

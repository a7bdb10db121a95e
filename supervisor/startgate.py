"""StartGate: at most N kernel starts at once, foreground before background.

Part of the supervisor layer; a gate belongs to its supervisor's loop.
Priority 0 is a start somebody waits for (``start_kernel``, ``acquire`` on an
empty pool); priority 1 is a warm-pool refill. A refill waits while any
foreground start runs or waits, so refilling never slows a start a caller is
waiting on, and with a limit the gate never lets more than ``limit`` starts
run together.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["StartGate"]


class StartGate:
    """Admission control for kernel starts (see the module docstring)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.running = [0, 0]  # by priority
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(), deque())

    @property
    def pending(self) -> int:
        """Starts running or waiting for a slot."""
        return sum(self.running) + len(self._waiting[0]) + len(self._waiting[1])

    def _may_run(self, priority: int) -> bool:
        total = sum(self.running)
        if self.limit is not None and total >= self.limit:
            return False
        if priority == 1:
            return self.running[0] == 0 and not self._waiting[0]
        return True

    def _wake(self) -> None:
        for priority in (0, 1):
            queue = self._waiting[priority]
            while queue and self._may_run(priority):
                waiter = queue.popleft()
                if not waiter.done():
                    self.running[priority] += 1
                    waiter.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        """Hold one start slot for the body of the ``async with``."""
        if self._may_run(priority) and not self._waiting[priority]:
            self.running[priority] += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[priority].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.running[priority] -= 1
                    self._wake()
                else:
                    self._waiting[priority].remove(waiter)
                raise
        try:
            yield
        finally:
            self.running[priority] -= 1
            self._wake()

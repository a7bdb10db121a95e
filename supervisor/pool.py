"""The warm pool and culling of a supervisor.

:class:`Pooled` adds them to :class:`~supervisor.supervision.Supervision`: kernels
started ahead of demand (``warm={name: count}``) and handed out by
:meth:`Pooled.acquire`, refilled behind each hand-out at a lower priority than
starts somebody waits for; and idle kernels shut down by a periodic tick
(``cull_idle_timeout``, ``cull_interval``, ``cull_busy``; a kernelspec's
``metadata.cull_idle_timeout`` overrides the timeout). A kernel handed out is
never returned to the pool. Everything runs on the supervisor's loop, in its
actor coroutine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from tornado.ioloop import PeriodicCallback

from supervisor.children import ACTIVE, Acquire, CullTick, Op, StartChild
from supervisor.kernel import (
    KernelActor,
)
from supervisor.supervision import Supervision

__all__ = ["Pooled"]


class Pooled(Supervision):
    """A supervision core with a warm pool and culling; see the module docstring."""

    async def on_start(self) -> None:
        for kname in self.warm:
            self._refill(kname)
        if self.cull_idle_timeout > 0:
            self._culler = PeriodicCallback(lambda: self.tell(CullTick()),
                                            self.cull_interval * 1000)
            self._culler.start()

    async def acquire(self, kernel_name: str = "python3") -> str:
        """A ready kernel from the warm pool at once, or a new one if it is empty."""
        async def acquire() -> str:
            ready: asyncio.Future[str] = await self.ask(Acquire(kernel_name))
            return await ready

        return await self.call(acquire)

    async def receive(self, msg: object) -> Any:
        if isinstance(msg, Acquire):
            return self._on_acquire(msg)
        if isinstance(msg, CullTick):
            return self._on_cull()
        return await super().receive(msg)

    async def on_stop(self) -> None:
        if self._culler is not None:
            self._culler.stop()
        await super().on_stop()

    def _on_acquire(self, msg: Acquire) -> asyncio.Future[str]:
        for child in sorted(self._children.values(), key=lambda c: c.order):
            if child.pooled and child.status == "ready" and child.kernel_name == msg.kernel_name:
                child.pooled = False
                self._emit("acquired", child, reason="warm pool")
                self._refill(msg.kernel_name)
                ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                ready.set_result(child.kernel_id)
                return ready
        options = self.launch.replace(kernel_name=msg.kernel_name, spec=None)
        waiter = self._on_start_child(StartChild(str(uuid.uuid4()), options, self.policy))
        self._refill(msg.kernel_name)
        return waiter

    def _refill(self, kernel_name: str) -> None:
        target = self.warm.get(kernel_name, 0)
        have = sum(1 for c in self._children.values()
                   if c.pooled and c.kernel_name == kernel_name and c.status in ACTIVE)
        options = self.launch.replace(kernel_name=kernel_name, spec=None)
        for _ in range(target - have):
            if self.max_kernels is not None and self._active_count() >= self.max_kernels:
                return
            waiter = self._on_start_child(StartChild(str(uuid.uuid4()), options, self.policy,
                                                      pooled=True))
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _on_cull(self) -> None:
        now = time.monotonic()
        for child in list(self._children.values()):
            actor = child.actor
            if child.pooled or child.status != "ready" or not isinstance(actor, KernelActor):
                continue
            timeout = self.cull_idle_timeout
            spec = actor.spec
            if spec is not None:
                override = spec.metadata.get("cull_idle_timeout")
                if isinstance(override, (int, float)) and not isinstance(override, bool):
                    timeout = float(override)
            if timeout <= 0:
                continue
            if actor.execution_state == "busy" and not self.cull_busy:
                continue
            if self.cull_spare is not None and self.cull_spare(child.kernel_id):
                continue
            idle = now - actor.last_activity
            if idle < timeout:
                continue
            self._emit("culled", child, reason=f"idle for {idle:.1f} s (timeout {timeout} s)")
            self._on_op(Op(child.kernel_id, "shutdown",
                            {"now": False, "restart": False, "reason": "culled"}))

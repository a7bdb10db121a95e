"""Typed lifecycle events and their isolated delivery to listeners.

Part of the supervisor layer. A :class:`Dispatcher` belongs to the IOLoop of
the supervisor that owns it; :meth:`Dispatcher.emit` is called there and never
blocks or raises.

Every subscriber has its own ordered queue, so a slow listener delays only
itself:

* a coroutine function is awaited by its own task on the loop;
* a plain callable runs on its own worker thread, so even a listener that
  blocks for a long time cannot stall supervision.

A listener that raises is logged with structlog and keeps receiving later
events.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from supervisor._log import get_logger

__all__ = ["EVENT_KINDS", "Dispatcher", "EventKind", "KernelEvent", "Listener"]

log = get_logger("supervisor.events")

EventKind = Literal[
    "starting", "ready", "exited", "restarting", "restarted", "gave_up", "dead",
    "interrupted", "signalled", "shutdown", "culled", "acquired",
]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KernelEvent:
    """One thing that happened to a kernel (or to a nested supervisor).

    ``manual`` tells a restart or shutdown you asked for from one the
    supervisor decided; ``cause`` is the launcher's word on a death ("out of
    memory (limit 300 MiB, peak 300 MiB)", "killed by the supervisor
    (culled)"), ``oom`` True when memory ended it; ``at`` is the supervisor's
    clock (monotonic seconds).
    """

    kind: str
    kernel_id: str
    supervisor: str
    kernel_name: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    cause: str = ""
    oom: bool = False
    restart_count: int = 0
    delay: float | None = None
    manual: bool = False
    at: float = 0.0


Listener = Callable[[KernelEvent], Awaitable[None] | None]


class _Subscriber:
    """One listener and its private queue."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.is_async = inspect.iscoroutinefunction(listener) or inspect.iscoroutinefunction(
            getattr(listener, "__call__", None)  # noqa: B004 - an object with async __call__
        )
        self._aqueue: asyncio.Queue[KernelEvent | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._tqueue: queue.SimpleQueue[KernelEvent | None] | None = None
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()
        self.idle.set()
        self._pending = 0
        self._lock = threading.Lock()

    def deliver(self, event: KernelEvent) -> None:
        with self._lock:
            self._pending += 1
            self.idle.clear()
        if self.is_async:
            if self._aqueue is None:
                self._aqueue = asyncio.Queue()
                self._task = asyncio.ensure_future(self._run_async())
            self._aqueue.put_nowait(event)
        else:
            if self._tqueue is None:
                self._tqueue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run_thread, name="kernel-supervisor-listener", daemon=True
                )
                self._thread.start()
            self._tqueue.put(event)

    def _done_one(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self.idle.set()

    def _call(self, event: KernelEvent) -> Any:
        return self.listener(event)

    async def _run_async(self) -> None:
        assert self._aqueue is not None
        while True:
            event = await self._aqueue.get()
            if event is None:
                return
            try:
                result = self._call(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.error("listener.failed", listener=repr(self.listener), kind=event.kind,
                          kernel_id=event.kernel_id, exc_info=exc)
            finally:
                self._done_one()

    def _run_thread(self) -> None:
        assert self._tqueue is not None
        while True:
            event = self._tqueue.get()
            if event is None:
                return
            t0 = time.monotonic()
            try:
                self._call(event)
            except Exception as exc:
                log.error("listener.failed", listener=repr(self.listener), kind=event.kind,
                          kernel_id=event.kernel_id, exc_info=exc)
            finally:
                elapsed = time.monotonic() - t0
                if elapsed > 1.0:
                    log.warning("listener.slow", listener=repr(self.listener),
                                seconds=round(elapsed, 3), kind=event.kind)
                self._done_one()

    def close(self) -> None:
        if self._aqueue is not None:
            self._aqueue.put_nowait(None)
        if self._tqueue is not None:
            self._tqueue.put(None)


class Dispatcher:
    """Fans events out to subscribers, each isolated from the others."""

    def __init__(self) -> None:
        self._subs: dict[int, _Subscriber] = {}
        self._filters: dict[int, Callable[[KernelEvent], bool]] = {}
        self.delivered = 0

    def subscribe(
        self, listener: Listener, predicate: Callable[[KernelEvent], bool] | None = None
    ) -> None:
        """Add ``listener``; with ``predicate``, only events it accepts."""
        key = id(listener)
        if key in self._subs:
            return
        self._subs[key] = _Subscriber(listener)
        if predicate is not None:
            self._filters[key] = predicate

    def unsubscribe(self, listener: Listener) -> None:
        """Remove ``listener`` (no error if it was not subscribed)."""
        sub = self._subs.pop(id(listener), None)
        self._filters.pop(id(listener), None)
        if sub is not None:
            sub.close()

    def __contains__(self, listener: object) -> bool:
        return id(listener) in self._subs

    def emit(self, event: KernelEvent) -> None:
        """Queue ``event`` for every subscriber; never blocks, never raises."""
        for key, sub in list(self._subs.items()):
            predicate = self._filters.get(key)
            if predicate is not None:
                try:
                    if not predicate(event):
                        continue
                except Exception as exc:
                    log.error("listener.filter_failed", exc_info=exc)
                    continue
            sub.deliver(event)
            self.delivered += 1

    def close(self) -> None:
        """Stop every subscriber's worker once its queue is empty."""
        for sub in self._subs.values():
            sub.close()
        self._subs.clear()
        self._filters.clear()

"""Actors: a mailbox and one coroutine that takes one message at a time.

An :class:`Actor` binds to ``IOLoop.current()`` when :meth:`Actor.start` is
called and from then on belongs to that loop: its state is touched only by its
own coroutine, so a restart and a shutdown can never interleave; they run in
the order they arrived.

* ``tell(msg)`` is fire-and-forget; ``ask(msg)`` returns an awaitable for the
  reply (or the exception the handler raised). Both must be called on the
  actor's loop.
* :meth:`Actor.tell_threadsafe` / :meth:`Actor.ask_threadsafe` are the one
  documented thread-safe door: they cross threads through
  ``IOLoop.add_callback`` only.
* Stopping runs ``on_stop`` and then answers every message still in the
  mailbox with :class:`~supervisor.errors.KernelClosedError`, so no caller
  hangs; asks made after the stop fail the same way at once.
* An asker that goes away (its future is cancelled: ``asyncio.wait_for``
  expired, the task was cancelled) is reported to :meth:`Actor.on_ask_cancelled`;
  a queued message whose asker went away is skipped when
  :meth:`Actor.skip_cancelled` says so. Subclasses decide what a cancel means
  for each message (a kernel cancels a start; a shutdown goes on).
* :meth:`Actor.call` runs a coroutine on the actor's loop from any loop or
  thread: in place on its own loop, through ``run_coroutine_threadsafe`` when
  that loop runs in another thread. An actor whose loop is closed (or whose
  task was cancelled with it) is dead, and one whose loop is not running
  cannot be reached: ``call`` says so at once with a typed error instead of
  waiting on a loop that may never run again. :meth:`Actor.abandon` is the
  way out for such an actor: it releases what the actor holds (its
  ``on_abandon`` hook: a kernel actor kills its process group and removes its
  files) from the calling thread, without the loop.

The module also owns the process-wide *background loop*: one daemon thread
running a Tornado IOLoop, on which the blocking faces (``KernelManager``,
``BlockingKernelClient``) run their actors. :func:`run_blocking` submits a
coroutine there and waits on a concurrent future; it is the only bridge the
blocking API uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from tornado.ioloop import IOLoop
from tornado.queues import Queue

from supervisor._log import get_logger
from supervisor.errors import KernelClosedError, KernelDeadError, KernelStateError

__all__ = ["Actor", "Stop", "background_loop", "run_blocking", "settle_loop"]

T = TypeVar("T")

log = get_logger("supervisor.actor")
_ids = itertools.count(1)


@dataclass(frozen=True)
class Stop:
    """Ask an actor to stop after the messages already queued before it."""

    reason: str = "stop requested"


class _Envelope:
    __slots__ = ("future", "msg")

    def __init__(self, msg: object, future: asyncio.Future[Any] | None) -> None:
        self.msg = msg
        self.future = future


class Actor:
    """Base class: override :meth:`receive`, and optionally the hooks.

    Hooks run on the actor's coroutine: ``on_start`` before the first message,
    ``on_stop`` when a :class:`Stop` is taken (or :meth:`stop` is called),
    ``on_failure`` when a *told* message's handler raised (an asked message's
    exception goes to the asker instead).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"{type(self).__name__}-{next(_ids)}"
        self._loop: IOLoop | None = None
        self._mailbox: Queue[_Envelope] = Queue()
        self._runner: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "new"  # new -> running -> stopping -> stopped
        self._stop_reason = ""

    # -- lifecycle ---------------------------------------------------------
    @property
    def loop(self) -> IOLoop:
        """The IOLoop this actor is bound to (set by :meth:`start`)."""
        if self._loop is None:
            raise KernelStateError(f"{self.name} has not been started")
        return self._loop

    @property
    def actor_state(self) -> str:
        """One of ``new``, ``running``, ``stopping``, ``stopped``."""
        return self._state

    @property
    def alive(self) -> bool:
        """True while the actor accepts messages (its loop open, its task not ended)."""
        return self._state == "running" and self._loop_dead() is None

    def _loop_dead(self) -> str | None:
        """Why the actor can never take a message again, or None."""
        if self._loop is None:
            return None
        if self._loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
            return "the loop it started on is closed"
        if self._runner is not None and self._runner.done() and self._state == "running":
            return "its task ended with the loop it started on (cancelled)"
        return None

    def unreachable(self) -> str | None:
        """Why a caller here (this thread, this loop) cannot reach the actor now, or None.

        Reachable: the caller runs on the actor's loop, or that loop is running
        (in another thread). Not: the loop is closed, the actor's task was
        cancelled with it, or the loop is not running.
        """
        dead = self._loop_dead()
        if dead is not None or self._loop is None:
            return dead
        loop = self._loop.asyncio_loop  # type: ignore[attr-defined]
        if _running_loop() is loop or loop.is_running():
            return None
        return "the loop it started on is not running"

    async def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``factory()`` on the actor's loop and return its result, from any loop.

        Raises :class:`KernelDeadError` at once when the actor's loop is closed
        (or its task was cancelled with it), :class:`KernelStateError` when that
        loop is not running, rather than wait for a loop that may never run.
        """
        if self._loop is None:  # never started: the ask inside says so
            return await factory()
        loop = self._loop.asyncio_loop  # type: ignore[attr-defined]
        if _running_loop() is loop:
            return await factory()
        why = self.unreachable()
        if why is not None:
            if self._loop_dead() is not None:
                raise KernelDeadError(f"{self.name} is dead: {why}")
            raise KernelStateError(
                f"{self.name} cannot be reached: {why}; call it from that loop, or run it")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), loop))

    def abandon(self, reason: str) -> None:
        """Stop an actor whose loop is closed or not running, from the calling thread.

        Runs :meth:`on_abandon` (release OS resources without the loop), marks
        the actor stopped, cancels its tasks and, if the loop is still open, runs
        it briefly so that they finish (no "Task was destroyed but it is
        pending" later). Never call it while the actor's loop is running.
        """
        if self._state in ("new", "stopped"):
            return
        self._state = "stopped"
        self._stop_reason = reason
        try:
            self.on_abandon()
        except Exception as exc:
            log.error("actor.abandon_failed", actor=self.name, exc_info=exc)
        tasks = [t for t in (self._runner, *self._tasks) if t is not None and not t.done()]
        with contextlib.suppress(RuntimeError):  # a closed loop cannot schedule callbacks
            for task in tasks:
                task.cancel()
            while not self._mailbox.empty():
                envelope = self._mailbox.get_nowait()
                if envelope.future is not None and not envelope.future.done():
                    envelope.future.set_exception(self._dead_error(envelope.msg))
            self._done.set()
        if self._loop is not None:
            settle_loop(self._loop.asyncio_loop)  # type: ignore[attr-defined]

    def on_abandon(self) -> None:
        """Release what the actor holds without its loop (see :meth:`abandon`)."""

    def start(self) -> None:
        """Bind to the current IOLoop and start taking messages."""
        if self._state != "new":
            raise KernelStateError(f"{self.name} was already started")
        self._loop = IOLoop.current()
        self._state = "running"
        self._runner = asyncio.ensure_future(self._run())

    def stop(self, reason: str = "stop requested") -> None:
        """Queue a :class:`Stop`: messages already queued are handled first."""
        if self._state == "running":
            self.tell(Stop(reason))

    async def join(self) -> None:
        """Wait until the actor has stopped."""
        if self._state in ("new", "stopped") or self._loop_dead() is not None:
            return
        if _running_loop() is not self.loop.asyncio_loop:  # type: ignore[attr-defined]
            await self.call(self.join)
            return
        await self._done.wait()

    async def on_start(self) -> None:
        """Run once before the first message."""

    async def on_stop(self) -> None:
        """Run once when the actor stops, before the mailbox is drained."""

    async def on_failure(self, exc: BaseException, msg: object) -> None:
        """A told message's handler raised ``exc``; the default logs it."""
        log.error("actor.message_failed", actor=self.name, msg=type(msg).__name__, exc_info=exc)

    async def receive(self, msg: object) -> Any:
        """Handle one message; the return value answers an ``ask``."""
        raise NotImplementedError

    def on_ask_cancelled(self, msg: object) -> None:
        """The asker of ``msg`` went away (its future was cancelled); on the loop.

        Called whether ``msg`` is still queued, running, or (rarely) done; it must
        not block or raise. The default does nothing: the message runs anyway.
        """

    def skip_cancelled(self, msg: object) -> bool:
        """Whether a queued ``msg`` whose asker went away is dropped unhandled."""
        return False

    def on_tell(self, msg: object) -> None:
        """Called synchronously when a message is queued (on the loop).

        Subclasses use it to let an urgent message (a shutdown) cut short a
        long handler that is running now; it must not block or raise.
        """

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the actor keeps a reference to until it ends.

        For work a handler starts but must not wait for (its result comes back
        as a message), so that the mailbox stays free.
        """
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- messaging ---------------------------------------------------------
    def tell(self, msg: object) -> None:
        """Queue ``msg`` without waiting for an answer (loop thread only)."""
        if self._state in ("running",):
            self._mailbox.put_nowait(_Envelope(msg, None))
            self.on_tell(msg)
        else:
            log.debug("actor.dropped", actor=self.name, msg=type(msg).__name__, state=self._state)

    def ask(self, msg: object) -> asyncio.Future[Any]:
        """Queue ``msg`` and return a future for the handler's answer."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.alive:
            future.set_exception(self._dead_error(msg))
            return future
        self._mailbox.put_nowait(_Envelope(msg, future))
        future.add_done_callback(lambda f: self._asker_gone(f, msg))
        self.on_tell(msg)
        return future

    def _asker_gone(self, future: asyncio.Future[Any], msg: object) -> None:
        if future.cancelled() and self._state == "running":
            try:
                self.on_ask_cancelled(msg)
            except Exception as exc:
                log.error("actor.cancel_hook_failed", actor=self.name, exc_info=exc)

    def tell_threadsafe(self, msg: object) -> None:
        """Queue ``msg`` from any thread (through ``IOLoop.add_callback``); dropped if the
        actor's loop is closed."""
        if self._loop_dead() is not None:
            log.debug("actor.dropped", actor=self.name, msg=type(msg).__name__,
                      reason=self._loop_dead())
            return
        self.loop.add_callback(self.tell, msg)

    def ask_threadsafe(self, msg: object) -> concurrent.futures.Future[Any]:
        """Ask from any thread; returns a :class:`concurrent.futures.Future` (failed at once
        with :class:`KernelDeadError` if the actor's loop is closed)."""
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        dead = self._loop_dead()
        if dead is not None:
            result.set_exception(KernelDeadError(f"{self.name} is dead: {dead}"))
            return result

        def _on_loop() -> None:
            inner = self.ask(msg)

            def _copy(done: asyncio.Future[Any]) -> None:
                if result.done():  # cancelled by the waiter
                    return
                if done.cancelled():
                    result.cancel()
                elif (exc := done.exception()) is not None:
                    result.set_exception(exc)
                else:
                    result.set_result(done.result())

            inner.add_done_callback(_copy)
            def _gone(r: concurrent.futures.Future[Any]) -> None:
                if r.cancelled():  # the waiter cancelled: the asker went away
                    self.loop.add_callback(inner.cancel)

            result.add_done_callback(_gone)

        self.loop.add_callback(_on_loop)
        return result

    # -- internals ---------------------------------------------------------
    def _dead_error(self, msg: object) -> KernelClosedError:
        what = type(msg).__name__.lstrip("_")
        if self._state == "new":
            return KernelClosedError(
                f"{self.name} was never started: call its start() (or use it as "
                f"'async with ...') before asking it anything ({what})")
        reason = self._stop_reason or self._loop_dead() or "it is not running"
        return KernelClosedError(f"{self.name} cannot take {what}: {reason}")

    async def _run(self) -> None:
        try:
            await self.on_start()
        except BaseException as exc:
            log.error("actor.start_failed", actor=self.name, exc_info=exc)
            await self._finish("on_start failed")
            return
        while True:
            envelope = await self._mailbox.get()
            msg = envelope.msg
            if (envelope.future is not None and envelope.future.cancelled()
                    and self.skip_cancelled(msg)):
                continue
            if isinstance(msg, Stop):
                if envelope.future is not None and not envelope.future.done():
                    envelope.future.set_result(None)
                await self._finish(msg.reason)
                return
            try:
                reply = await self.receive(msg)
            except asyncio.CancelledError:
                if envelope.future is not None and not envelope.future.done():
                    envelope.future.cancel()
                await self._finish("cancelled")
                raise
            except BaseException as exc:
                if envelope.future is None:
                    await self.on_failure(exc, msg)
                elif not envelope.future.done():
                    envelope.future.set_exception(exc)
            else:
                if envelope.future is not None and not envelope.future.done():
                    envelope.future.set_result(reply)

    async def _finish(self, reason: str) -> None:
        self._state = "stopping"
        self._stop_reason = reason
        try:
            await self.on_stop()
        except Exception as exc:
            log.error("actor.stop_failed", actor=self.name, exc_info=exc)
        finally:
            self._state = "stopped"
            while not self._mailbox.empty():
                envelope = self._mailbox.get_nowait()
                if envelope.future is not None and not envelope.future.done():
                    envelope.future.set_exception(self._dead_error(envelope.msg))
            self._done.set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def settle_loop(loop: asyncio.AbstractEventLoop, timeout: float = 1.0) -> None:
    """Let the cancelled tasks of an open loop that is not running finish.

    Runs ``loop`` until they are done (at most ``timeout``): in place when no
    loop runs in this thread, else on a short-lived helper thread (asyncio runs
    one loop per thread). Does nothing for a closed or running loop.
    """
    if loop.is_closed() or loop.is_running():
        return
    cancelling = [t for t in asyncio.all_tasks(loop)
                  if not t.done() and getattr(t, "cancelling", lambda: 1)()]
    if not cancelling:
        return

    async def finish() -> None:
        await asyncio.wait(cancelling, timeout=timeout)

    def run() -> None:
        with contextlib.suppress(RuntimeError):  # started running elsewhere meanwhile
            loop.run_until_complete(finish())

    if _running_loop() is None:
        run()
        return
    helper = threading.Thread(target=run, name="kernel-supervisor-settle", daemon=True)
    helper.start()
    helper.join(timeout + 1.0)


# -- the background loop ------------------------------------------------------
_bg_lock = threading.Lock()
_bg: tuple[IOLoop, threading.Thread, int] | None = None


def background_loop() -> IOLoop:
    """The process-wide IOLoop on a daemon thread, started on first use.

    A forked child gets a fresh one (the parent's thread does not survive a
    fork).
    """
    global _bg
    with _bg_lock:
        if _bg is not None and _bg[2] == os.getpid() and _bg[1].is_alive():
            return _bg[0]
        ready = threading.Event()
        box: list[IOLoop] = []

        def _main() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            loop = IOLoop.current()
            box.append(loop)
            loop.add_callback(ready.set)
            loop.start()

        thread = threading.Thread(target=_main, name="kernel-supervisor-loop", daemon=True)
        thread.start()
        ready.wait()
        _bg = (box[0], thread, os.getpid())
        return box[0]


def in_background_thread() -> bool:
    """True when called on the background loop's own thread."""
    return _bg is not None and _bg[1] is threading.current_thread()


def run_blocking(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
    """Run ``factory()`` on the background loop and wait for its result.

    Raises :class:`KernelStateError` when called from the background loop's
    own thread (it would wait on itself forever); a ``timeout`` that expires
    cancels the coroutine and raises :class:`TimeoutError`.
    """
    loop = background_loop()
    if in_background_thread():
        raise KernelStateError(
            "a blocking kernel-supervisor call was made on its own background loop; "
            "use the async API there"
        )
    finished = threading.Event()

    async def run() -> T:
        try:
            return await factory()
        finally:
            finished.set()

    future = asyncio.run_coroutine_threadsafe(run(), loop.asyncio_loop)  # type: ignore[attr-defined]
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no result within {timeout} s") from None
    except KeyboardInterrupt:
        # Ctrl-C while waiting: the work is cancelled, and we wait for it to end so
        # that it leaves a defined state (a start stops the kernel it began). A
        # second Ctrl-C stops this wait.
        future.cancel()
        finished.wait()
        raise

"""The actor base: ordering, ask/tell, stopping, failures, the thread-safe door."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from supervisor.actor import Actor, background_loop, run_blocking
from supervisor.errors import KernelClosedError, KernelStateError


class Recorder(Actor):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []
        self.failures: list[BaseException] = []
        self.gate = asyncio.Event()
        self.stopped = False

    async def receive(self, msg: object) -> Any:
        if msg == "block":
            await self.gate.wait()
        if msg == "boom":
            raise KeyError("boom")
        self.seen.append(msg)
        return f"got {msg}"

    async def on_failure(self, exc: BaseException, msg: object) -> None:
        self.failures.append(exc)

    async def on_stop(self) -> None:
        self.stopped = True


async def test_messages_are_handled_in_arrival_order() -> None:
    """Tells and asks interleave in exactly the order they were queued."""
    actor = Recorder()
    actor.start()
    for i in range(5):
        actor.tell(i)
    assert await actor.ask("last") == "got last"
    assert actor.seen == [0, 1, 2, 3, 4, "last"]
    actor.stop()
    await actor.join()


async def test_ask_carries_the_handler_exception_and_tell_failures_go_to_on_failure() -> None:
    """An asked message's exception reaches the asker; a told one's reaches on_failure."""
    actor = Recorder()
    actor.start()
    with pytest.raises(KeyError):
        await actor.ask("boom")
    actor.tell("boom")
    assert await actor.ask("after") == "got after"
    assert len(actor.failures) == 1
    actor.stop()
    await actor.join()


async def test_stop_fails_queued_asks_with_kernel_closed_error() -> None:
    """Messages behind a Stop, and asks after it, fail with KernelClosedError; none hang."""
    actor = Recorder()
    actor.start()
    blocked = actor.ask("block")
    actor.stop("test over")
    queued = actor.ask("never")
    actor.gate.set()
    assert await blocked == "got block"
    with pytest.raises(KernelClosedError, match="test over"):
        await queued
    await actor.join()
    assert actor.stopped and not actor.alive
    with pytest.raises(KernelClosedError):
        await actor.ask("late")


async def test_ask_threadsafe_from_another_thread() -> None:
    """The one thread-safe door answers a thread through a concurrent future."""
    actor = Recorder()
    actor.start()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(actor.ask_threadsafe("x").result(5)))
    thread.start()
    await asyncio.to_thread(thread.join)
    assert result == ["got x"]
    actor.stop()
    await actor.join()


def test_run_blocking_runs_on_the_background_loop() -> None:
    """run_blocking executes on the single background loop thread and returns the value."""

    async def where() -> str:
        return threading.current_thread().name

    assert run_blocking(where) == "kernel-supervisor-loop"
    assert background_loop() is background_loop()


def test_run_blocking_refuses_to_deadlock_on_its_own_thread() -> None:
    """Calling a blocking API from the background loop raises instead of hanging."""

    async def nested() -> None:
        run_blocking(lambda: asyncio.sleep(0))

    with pytest.raises(KernelStateError):
        run_blocking(nested)


async def test_start_twice_is_a_state_error() -> None:
    """An actor binds to one loop once."""
    actor = Recorder()
    actor.start()
    with pytest.raises(KernelStateError):
        actor.start()
    actor.stop()
    await actor.join()

"""The blocking kernel client: :class:`KernelClient`'s API, each call blocking its caller.

:class:`BlockingKernelClient` owns a :class:`~supervisor.client.KernelClient` that
lives on the process-wide background loop
(:func:`supervisor.actor.background_loop`); each of its methods is the async one
run there through :func:`supervisor.actor.run_blocking`, the one door between
threads. Hooks given to its ``execute_interactive`` run on that loop's thread:
from there, calls that only send (``kc.input(...)``) work, calls that must wait
raise :class:`~supervisor.errors.KernelStateError`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from inspect import isawaitable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import zmq
import zmq.asyncio

from supervisor.actor import in_background_thread, run_blocking
from supervisor.client.channels import Channel, HeartbeatChannel
from supervisor.client.kernelclient import KernelClient
from supervisor.connection import ConnectionInfo
from supervisor.errors import (
    KernelStateError,
)
from supervisor.wire import Session

__all__ = ["BlockingKernelClient"]

P = ParamSpec("P")
T = TypeVar("T")


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _blocking(
    func: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[Any, P], T]:
    """The blocking form of an async method of the wrapped object (``self._async``)."""

    @functools.wraps(func)
    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_blocking(lambda: _await(func(self._async, *args, **kwargs)))

    return method


def _on_loop(func: Callable[Concatenate[Any, P], T]) -> Callable[Concatenate[Any, P], Any]:
    """A plain method of the wrapped object run on the background loop.

    An awaitable result (``reply=True``) is awaited there. Called on the loop's
    own thread (from a hook) it runs in place; a result that must be awaited
    then raises KernelStateError.
    """

    @functools.wraps(func)
    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        if in_background_thread():
            if kwargs.get("reply"):
                raise KernelStateError("cannot wait for a reply on the background loop's thread")
            result = func(self._async, *args, **kwargs)
            if isawaitable(result):
                if isinstance(result, Coroutine):
                    result.close()
                raise KernelStateError("cannot wait for a reply on the background loop's thread")
            return result

        async def call() -> Any:
            result = func(self._async, *args, **kwargs)
            return await result if isawaitable(result) else result

        return run_blocking(call)

    return method


class _BlockingChannel:
    """A channel of a :class:`BlockingKernelClient`; methods block the caller."""

    def __init__(self, channel: Channel) -> None:
        self._async = channel

    get_msg = _blocking(Channel.get_msg)
    msg_ready = _on_loop(Channel.msg_ready)
    get_msgs = _on_loop(Channel.get_msgs)
    is_alive = _on_loop(Channel.is_alive)
    send = _on_loop(Channel.send)


class _BlockingHeartbeat:
    """The heartbeat of a :class:`BlockingKernelClient`."""

    def __init__(self, hb: HeartbeatChannel) -> None:
        self._async = hb

    @property
    def time_to_dead(self) -> float:
        """Seconds a ping may go unanswered (also the ping interval)."""
        return self._async.time_to_dead

    @time_to_dead.setter
    def time_to_dead(self, value: float) -> None:
        self._async.time_to_dead = value

    @property
    def beats(self) -> int:
        """Echoes received since the channel started."""
        return self._async.beats

    is_alive = _on_loop(HeartbeatChannel.is_alive)
    is_beating = _on_loop(HeartbeatChannel.is_beating)
    pause = _on_loop(HeartbeatChannel.pause)
    unpause = _on_loop(HeartbeatChannel.unpause)


class BlockingKernelClient:
    """The blocking client: a :class:`KernelClient` on the background loop.

    Same constructor and methods as :class:`KernelClient`; every method blocks
    until done and returns what the async one returns (``execute(...,
    reply=True)`` returns the reply dict). Safe to call from any thread but
    the background loop's own.
    """

    def __init__(
        self,
        connection_info: ConnectionInfo | None = None,
        *,
        connection_file: str | Path | None = None,
        session: Session | None = None,
        kernel_name: str = "",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._async = KernelClient(
            connection_info, connection_file=connection_file, session=session,
            kernel_name=kernel_name, context=context,
        )
        self.shell_channel = _BlockingChannel(self._async.shell_channel)
        self.iopub_channel = _BlockingChannel(self._async.iopub_channel)
        self.stdin_channel = _BlockingChannel(self._async.stdin_channel)
        self.control_channel = _BlockingChannel(self._async.control_channel)
        self.hb_channel = _BlockingHeartbeat(self._async.hb_channel)

    @property
    def async_client(self) -> KernelClient:
        """The wrapped asyncio client (it lives on the background loop)."""
        return self._async

    @property
    def session(self) -> Session:
        """The Session signing and verifying messages."""
        return self._async.session

    @property
    def connection_info(self) -> ConnectionInfo | None:
        """The kernel's connection info."""
        return self._async.connection_info

    @property
    def kernel_name(self) -> str:
        """The kernel's name, when known."""
        return self._async.kernel_name

    @property
    def dropped(self) -> Counter[str]:
        """Messages dropped, by reason (frame, signature, replay)."""
        return self._async.dropped

    @property
    def allow_stdin(self) -> bool:
        """Default ``allow_stdin`` for execute requests."""
        return self._async.allow_stdin

    @allow_stdin.setter
    def allow_stdin(self, value: bool) -> None:
        self._async.allow_stdin = value

    @property
    def channels_running(self) -> bool:
        """True while any channel runs."""
        return self._async.channels_running

    def __enter__(self) -> BlockingKernelClient:
        self.start_channels()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_channels()

    load_connection_file = _on_loop(KernelClient.load_connection_file)
    start_channels = _on_loop(KernelClient.start_channels)
    stop_channels = _on_loop(KernelClient.stop_channels)
    is_alive = _on_loop(KernelClient.is_alive)
    get_shell_msg = _blocking(KernelClient.get_shell_msg)
    get_iopub_msg = _blocking(KernelClient.get_iopub_msg)
    get_stdin_msg = _blocking(KernelClient.get_stdin_msg)
    get_control_msg = _blocking(KernelClient.get_control_msg)
    wait_for_ready = _blocking(KernelClient.wait_for_ready)
    execute_interactive = _blocking(KernelClient.execute_interactive)
    execute = _on_loop(KernelClient.execute)
    complete = _on_loop(KernelClient.complete)
    inspect = _on_loop(KernelClient.inspect)
    history = _on_loop(KernelClient.history)
    kernel_info = _on_loop(KernelClient.kernel_info)
    comm_info = _on_loop(KernelClient.comm_info)
    is_complete = _on_loop(KernelClient.is_complete)
    shutdown = _on_loop(KernelClient.shutdown)
    input = _on_loop(KernelClient.input)

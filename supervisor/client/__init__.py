"""Kernel clients: talk to one running kernel over its five ZeroMQ channels.

The package has three modules: :mod:`~supervisor.client.channels` (sockets,
inboxes, heartbeat), :mod:`~supervisor.client.kernelclient` (the asyncio client)
and :mod:`~supervisor.client.blocking` (the blocking face).

* :func:`connect_channel` makes one connected ``zmq.asyncio`` socket of the
  right type for a channel (the kernel actor reuses it).
* :class:`KernelClient` is the asyncio client. It binds to the loop that is
  running when :meth:`KernelClient.start_channels` is called, and from then on
  every method must be called on that loop's thread. Each channel has a reader
  task that verifies every message with the :class:`~supervisor.wire.Session`;
  a message that fails (bad frames, bad signature, replay) is dropped, counted
  in :attr:`KernelClient.dropped` by reason and logged at debug level. Good
  messages wait in the channel's inbox as jupyter_client-shaped dicts.
* :class:`BlockingKernelClient` has the same API, blocking. It owns a
  :class:`KernelClient` that lives on the process-wide background loop
  (:func:`supervisor.actor.background_loop`); each of its methods is the async
  one run there through :func:`supervisor.actor.run_blocking`. Hooks given to
  its ``execute_interactive`` run on that loop's thread: from there, calls that
  only send (``kc.input(...)``) work, calls that must wait raise
  :class:`~supervisor.errors.KernelStateError`.

Every wait that can expire raises :class:`~supervisor.errors.ChannelTimeout`,
which is a :class:`queue.Empty` (what nbclient catches around ``get_msg``).
That includes ``wait_for_ready`` (jupyter_client raises a RuntimeError there;
nbclient catches any ``Exception`` around it) and ``reply=True`` requests
(jupyter_client raises TimeoutError there).
"""

from __future__ import annotations

from supervisor.client.blocking import BlockingKernelClient
from supervisor.client.channels import CHANNELS, connect_channel
from supervisor.client.kernelclient import KernelClient

__all__ = ["CHANNELS", "BlockingKernelClient", "KernelClient", "connect_channel"]

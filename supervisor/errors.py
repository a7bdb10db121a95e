"""The exceptions of kernel-supervisor, in one place.

Taxonomy (every class derives from :class:`SupervisorError`):

* A kernel that is gone: :class:`KernelDeadError`. Every ``ask`` still pending
  on an actor that stops fails with it, so no caller hangs.

  - :class:`KernelClosedError`: you closed it (shutdown, or the owner stopped).
  - :class:`KernelDiedError`: it broke (the process exited on its own); the
    exit code or signal is on the exception and ``__cause__`` is set when
    another exception explains the death.

* A kernel that could not be started: :class:`KernelStartupError` (timeout,
  died while starting, missing executable), with the exit code and the last
  lines the process wrote to stderr when there are any.

  - :class:`PortInUseError`: a channel's port was taken by another process
    on every attempt; names the channel and the port.
  - :class:`ResourceExhaustedError`: the system ran out of something a start
    needs (file descriptors, processes, disk space, memory); names it.
* A request that makes no sense in the current state:
  :class:`KernelStateError` (interrupting a kernel that was never started).
* Bad wire data: :class:`WireError`, with :class:`FrameError` (frame list
  malformed: no delimiter, too few frames, bad JSON), :class:`SignatureError`
  (missing or wrong HMAC) and its subclass :class:`ReplayError` (a signature
  seen before).
* Bad connection file: :class:`ConnectionFileError`, naming the field.
* Bad kernelspec: :class:`KernelSpecError` naming the file and the field;
  :class:`NoSuchKernel` when no spec has that name.
* Bad configuration passed to a constructor: :class:`ConfigurationError`.
* Policy exhausted: :class:`RestartLimitExceeded`.
* Too many kernels: :class:`KernelLimitError`.
* Nothing arrived in time on a channel: :class:`ChannelTimeout` (also a
  :class:`queue.Empty`, as jupyter_client and nbclient expect).

Nothing here is raised as a bare ``RuntimeError`` or ``ValueError``.
"""

from __future__ import annotations

import queue

__all__ = [
    "ChannelTimeout",
    "ConfigurationError",
    "ConnectionFileError",
    "FrameError",
    "KernelClosedError",
    "KernelDeadError",
    "KernelDiedError",
    "KernelLimitError",
    "KernelSpecError",
    "KernelStartupError",
    "KernelStateError",
    "NoSuchKernel",
    "PortInUseError",
    "ReplayError",
    "ResourceExhaustedError",
    "RestartLimitExceeded",
    "SignatureError",
    "SupervisorError",
    "WireError",
]


class SupervisorError(Exception):
    """Base class of every error this library raises on purpose."""


class KernelDeadError(SupervisorError):
    """The kernel (or the actor that owned it) is gone."""


class KernelClosedError(KernelDeadError):
    """The kernel was shut down on request; nothing went wrong."""


class KernelDiedError(KernelDeadError):
    """The kernel process exited without being asked to."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal


class KernelStartupError(SupervisorError):
    """A kernel did not become ready: it died, timed out, or could not launch."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        stderr_tail: str = "",
        timed_out: bool = False,
    ) -> None:
        if stderr_tail:
            message = f"{message}\n--- last lines of the kernel's stderr ---\n{stderr_tail}"
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out


class PortInUseError(KernelStartupError):
    """A kernel could not bind ``channel`` on ``port``: another process holds it.

    Raised once the start's port retries ran out; ``attempts`` counts them.
    """

    def __init__(
        self, message: str, *, channel: str | None, port: int | None, attempts: int = 1,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message, stderr_tail=stderr_tail)
        self.channel = channel
        self.port = port
        self.attempts = attempts


class ResourceExhaustedError(KernelStartupError):
    """A start failed for want of a system resource, named in ``resource``.

    ``resource`` is one of ``"file descriptors"``, ``"processes"``,
    ``"disk space"``, ``"memory"``; ``errno`` is the error number seen.
    """

    def __init__(self, message: str, *, resource: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.resource = resource
        self.errno = errno


class KernelStateError(SupervisorError):
    """The request is not valid in the kernel's current state."""


class WireError(SupervisorError):
    """A message on the wire could not be accepted."""


class FrameError(WireError):
    """The frames do not form a Jupyter message (delimiter, count, JSON)."""


class SignatureError(WireError):
    """The HMAC signature is missing or does not match."""


class ReplayError(SignatureError):
    """The signature was already seen: a replayed message."""


class ConnectionFileError(SupervisorError):
    """A connection file (or dict) is missing a field or has a wrong type."""

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.path = path


class KernelSpecError(SupervisorError):
    """A kernel.json is unreadable or invalid."""

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.path = path


class NoSuchKernel(KernelSpecError, KeyError):
    """No kernelspec has the requested name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no kernelspec named {name!r}", field=None, path=None)
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class ConfigurationError(SupervisorError):
    """A constructor was given an invalid value."""


class RestartLimitExceeded(SupervisorError):
    """A restart policy's intensity was exceeded: supervision gave up."""


class KernelLimitError(SupervisorError):
    """Starting another kernel would exceed ``max_kernels``."""


class ChannelTimeout(SupervisorError, queue.Empty):
    """No message arrived on a channel before the timeout."""

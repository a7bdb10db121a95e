"""kernel-supervisor: start, supervise and stop Jupyter kernels.

The public names are re-exported here; see README.md for a tour.
"""

from __future__ import annotations

from supervisor.client import BlockingKernelClient, KernelClient
from supervisor.connection import ConnectionInfo, read_connection_file, write_connection_file
from supervisor.errors import (
    ChannelTimeout,
    ConfigurationError,
    ConnectionFileError,
    FrameError,
    KernelClosedError,
    KernelDeadError,
    KernelDiedError,
    KernelLimitError,
    KernelSpecError,
    KernelStartupError,
    KernelStateError,
    NoSuchKernel,
    PortInUseError,
    ReplayError,
    ResourceExhaustedError,
    RestartLimitExceeded,
    SignatureError,
    SupervisorError,
    WireError,
)
from supervisor.events import KernelEvent
from supervisor.kernel import KernelActor, LaunchOptions
from supervisor.kernelspec import KernelSpec, find_kernel_specs, get_all_specs, get_kernel_spec
from supervisor.launchers import ExitStatus, LocalLauncher, Resources
from supervisor.manager import (
    AsyncKernelManager,
    KernelManager,
    run_async_kernel,
    run_kernel,
    start_new_async_kernel,
    start_new_kernel,
)
from supervisor.policy import Backoff, FakeClock, RestartPolicy
from supervisor.supervisor import KernelHandle, Supervisor, SupervisorStatistics
from supervisor.wire import Message, Session

__version__ = "0.1.0"

__all__ = [
    "AsyncKernelManager",
    "Backoff",
    "BlockingKernelClient",
    "ChannelTimeout",
    "ConfigurationError",
    "ConnectionFileError",
    "ConnectionInfo",
    "ExitStatus",
    "FakeClock",
    "FrameError",
    "KernelActor",
    "KernelClient",
    "KernelClosedError",
    "KernelDeadError",
    "KernelDiedError",
    "KernelEvent",
    "KernelHandle",
    "KernelLimitError",
    "KernelManager",
    "KernelSpec",
    "KernelSpecError",
    "KernelStartupError",
    "KernelStateError",
    "LaunchOptions",
    "LocalLauncher",
    "Message",
    "NoSuchKernel",
    "PortInUseError",
    "ReplayError",
    "ResourceExhaustedError",
    "Resources",
    "RestartLimitExceeded",
    "RestartPolicy",
    "Session",
    "SignatureError",
    "Supervisor",
    "SupervisorError",
    "SupervisorStatistics",
    "WireError",
    "__version__",
    "find_kernel_specs",
    "get_all_specs",
    "get_kernel_spec",
    "read_connection_file",
    "run_async_kernel",
    "run_kernel",
    "start_new_async_kernel",
    "start_new_kernel",
    "write_connection_file",
]

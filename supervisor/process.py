"""The former process layer, kept for imports: see :mod:`supervisor.launchers`.

:class:`KernelProcess` is a :class:`~supervisor.launchers.LocalProcess` made
the old way (``KernelProcess.launch(argv, ...)``) with containment ``"off"``
(the kernel's process group only); ``cleanup()`` ends that group.
Objects belong to the loop that launched them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from supervisor.launchers import ExitStatus, LaunchRequest, LocalLauncher, LocalProcess, reaper_pid

__all__ = ["ExitStatus", "KernelProcess", "reaper_pid"]


class KernelProcess:
    """Where the old constructor lives: ``KernelProcess.launch(argv, ...)``."""

    @staticmethod
    def launch(
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        forward_stderr: bool = True,
        capture_stderr: bool = True,
        stdout: int | None = None,
        on_exit: Callable[[ExitStatus], None] | None = None,
        owned_files: Sequence[str] = (),
    ) -> LocalProcess:
        """Start ``argv`` in a new session; must be called on the owning loop."""
        request = LaunchRequest(
            argv=list(argv), env=env, cwd=None if cwd is None else os.fspath(cwd),
            forward_stderr=forward_stderr, capture_stderr=capture_stderr, stdout=stdout,
            owned_files=owned_files, contain="off")
        return LocalLauncher().launch(request, on_exit)

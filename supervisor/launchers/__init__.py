"""Launchers: how a kernel process comes to exist, is watched, contained and ended.

Layer: below ``actor``/``kernel``, above ``kernelspec``. The
:class:`~supervisor.kernel.KernelActor` talks to this protocol only; nothing
above it knows which launcher ran a kernel except through ``statistics()``
and events. Handles belong to the loop that launched them.

The protocol
============

``Launcher.launch(request, on_exit) -> ProcessHandle`` is a plain call on the
owning loop that either returns a handle to a running process or raises
:class:`~supervisor.errors.KernelStartupError` leaving nothing behind. The
:class:`LaunchRequest` carries argv, env, cwd, stderr handling, the files the
reaper deletes with the kernel, the containment mode and the :class:`Limits`.

A :class:`ProcessHandle` offers:

==========================  ==================================================
``pid``, ``method``         the kernel's pid; how its tree is contained
``exited``                  a future resolved with the raw :class:`ExitStatus`
                            the moment the kernel is reaped (an event, never a
                            poll); ``on_exit`` is called at the same time
``signal(n)``               the kernel process only
``signal_group(n)``         its process group (interrupts, like a terminal)
``signal_tree(n)``          every process of the tree, escaped ones included
``kill_tree()``             SIGKILL the whole tree now; never blocks
``pids()``                  the live processes of the tree
``resources()``             :class:`Resources`: memory (current, peak, limit),
                            CPU seconds, process count, and the methods in force
``cleanup(cause)``          after (or instead of) the exit: end what is left,
                            wait for it, release cgroups and the reaper entry,
                            and return the final :class:`ExitStatus` with its
                            ``cause`` ("out of memory (limit 300 MiB, peak
                            300 MiB)", or the caller's "killed by the
                            supervisor (culled)") and ``tree_ended``;
                            idempotent; ``final`` holds it afterwards
``stderr_tail()``           the last lines the kernel wrote to stderr
``stderr_listener``         None, or a callable the handle calls on the loop
                            with each chunk of stderr it reads (a start
                            watches for bind errors through it)
``wait(timeout)``, ``close()``
==========================  ==================================================

Every launcher keeps three guarantees: nothing the kernel starts outlives
``cleanup``; nothing outlives the supervising process, even when it is
SIGKILLed (the reaper sidecar, :mod:`supervisor.launchers.reaper`); and
limits are enforced by the best method the machine offers, named in
``resources()``. A fork server and a Slurm launcher plug in here later.

Containment, and why this way
=============================

``contain`` is ``"auto"`` (default), ``"cgroup"`` (required), ``"session"`` or
``"off"`` (the process group only: daemons a kernel starts may outlive it).

* **A cgroup per kernel** where the machine lets us make one (cgroup v2 with a
  writable or delegated parent; cgroup v1 hierarchies as root or delegated).
  It is the only mechanism that sees every descendant whatever it does
  (``setsid``, double fork, a cleared environment), ends them all in one
  write (``cgroup.kill``), counts them, and carries the memory limit, the CPU
  quota and the out-of-memory record. Making one is a few ``mkdir`` and
  ``write`` calls (well under a millisecond), with no process of our own in
  the path. The kernel joins it right after ``exec``; a process forked in
  that window (microseconds, before any kernel code runs) is still found by
  the marker below at cleanup.
* **Otherwise a session and an environment marker**: the kernel leads its own
  process group, and carries ``KERNEL_SUPERVISOR_TREE=<token>`` in its
  environment, which every descendant inherits through ``setsid`` and double
  forks; the tree is the set of processes whose ``/proc/<pid>/environ`` holds
  it. No root, no extra process, nothing on the start path; a ``/proc`` scan
  (about a millisecond per hundred processes) only when a tree is ended or
  measured. It misses processes that drop their environment.
* **Not a per-kernel child subreaper** (``PR_SET_CHILD_SUBREAPER``): it needs
  either a shim process per kernel (an interpreter start, or a compiled
  helper we cannot ship as pure Python) or code run between ``fork`` and
  ``exec`` (unsafe with threads, and it disables ``vfork``), and orphans
  still escape to init when the kernel itself dies first.

Memory limits: cgroup ``memory.max`` / ``memory.limit_in_bytes`` (the OOM
killer ends the tree's largest process and the cgroup records it), else
``RLIMIT_DATA`` on the kernel, inherited by its children (allocations fail with
``MemoryError``). ``RLIMIT_DATA`` counts private writable memory: heap, and
thread stacks, so an idle ipykernel already uses about 135 MB of it (its
address space, which ``RLIMIT_AS`` would count, is about 800 MB). CPU: the
cgroup CPU quota, else not enforced (a warning).
"""

from __future__ import annotations

from supervisor.launchers.base import (
    CONTAIN_MODES,
    Endpoint,
    ExitStatus,
    Launcher,
    LaunchRequest,
    Limits,
    ProcessHandle,
    RemoteHandle,
    Resources,
    format_bytes,
    parse_cpu_limit,
    parse_memory_limit,
)
from supervisor.launchers.local import LocalLauncher, LocalProcess
from supervisor.launchers.reaper import reaper_pid

__all__ = [
    "CONTAIN_MODES",
    "Endpoint",
    "ExitStatus",
    "LaunchRequest",
    "Launcher",
    "Limits",
    "LocalLauncher",
    "LocalProcess",
    "ProcessHandle",
    "RemoteHandle",
    "Resources",
    "format_bytes",
    "parse_cpu_limit",
    "parse_memory_limit",
    "reaper_pid",
]

"""One cgroup per kernel: find where we may make them, make them, read and end them.

Plain synchronous file operations on ``/sys/fs/cgroup``; a :class:`KernelCgroup`
belongs to the handle that made it (one loop). :func:`detect` is cached per
process and thread-safe.

Where the groups go. We never move ourselves and never touch a cgroup we did
not make: each kernel's group is a child of the cgroup the supervising
process is in, in each hierarchy, named ``kernel-supervisor-<our pid>-<n>``:

* cgroup v2 (``/sys/fs/cgroup`` on a pure v2 machine, ``/sys/fs/cgroup/unified``
  on a hybrid one): the containment group. ``cgroup.kill`` ends every process
  in it at once (Linux >= 5.14; older kernels get a kill-until-empty loop),
  ``cgroup.procs`` lists the tree, ``cpu.stat`` gives its CPU time. Limits
  need the ``memory``/``cpu``/``pids`` controllers enabled for our children
  (``cgroup.subtree_control``), which v2 allows only where the parent has no
  processes of its own: a delegated, empty cgroup passed as ``cgroup_parent``
  (systemd ``Delegate=yes``), or the root as root.
* cgroup v1 (``memory``, ``cpu``/``cpuacct``, ``pids``), used as root or where
  delegated: the memory limit and its figures (``memory.limit_in_bytes``,
  ``max_usage_in_bytes``, ``oom_control``), the CPU quota, the process count;
  and the containment group when there is no v2 hierarchy.

Anything that fails (read-only mount, no permission, not a cgroup) raises
:class:`OSError` from :meth:`KernelCgroup.create`, which removes what it made;
the launcher then falls back to sessions and rlimits and says so.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CgroupSetup", "KernelCgroup", "detect", "leftover_groups", "setup_from"]

_PREFIX = "kernel-supervisor-"
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
_counter = itertools.count(1)
_detect_lock = threading.Lock()
_detected: CgroupSetup | None = None


@dataclass(frozen=True)
class CgroupSetup:
    """Where kernel cgroups may be made: the v2 parent and the v1 parents by controller."""

    unified: Path | None = None
    unified_controllers: frozenset[str] = frozenset()
    v1: Mapping[str, Path] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """True when some hierarchy can hold a kernel's tree."""
        return self.unified is not None or bool(self.v1)

    @property
    def version(self) -> str:
        """``cgroup-v2`` when the containment group is a v2 one, else ``cgroup-v1``."""
        return "cgroup-v2" if self.unified is not None else "cgroup-v1"


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of each cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((fields[3], fields[4].replace("\\040", " "), tail[0],
                      set(tail[2].split(","))))
    return found


def _relative(path: str, root: str) -> str:
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return path.lstrip("/")


def setup_from(mountinfo: str, self_cgroup: str, cgroup_parent: str | None = None) -> CgroupSetup:
    """Work out a :class:`CgroupSetup` from ``/proc/self/mountinfo`` and ``/proc/self/cgroup``.

    ``cgroup_parent`` (a v2 directory) replaces our own v2 cgroup as the parent.
    """
    paths: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        num, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if num == "0" and not names:
            paths["<v2>"] = path
        for name in names.split(","):
            if name:
                paths[name] = path
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for root, point, fstype, options in _mounts(mountinfo):
        if fstype == "cgroup2":
            if cgroup_parent is not None:
                unified = Path(cgroup_parent)
            elif "<v2>" in paths and unified is None:
                unified = Path(point) / _relative(paths["<v2>"], root)
            continue
        for name in _V1_CONTROLLERS:
            if name in options and name in paths and name not in v1:
                v1[name] = Path(point) / _relative(paths[name], root)
    if unified is None and cgroup_parent is not None:
        unified = Path(cgroup_parent)
    writable = {k: p for k, p in v1.items() if os.access(p / "cgroup.procs", os.W_OK)}
    if unified is not None and not os.access(unified, os.W_OK):
        unified = None
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset(
                (unified / "cgroup.subtree_control").read_text().split())
    return CgroupSetup(unified=unified, unified_controllers=controllers, v1=writable)


def detect() -> CgroupSetup:
    """This process's :class:`CgroupSetup` (read once; empty where there are no cgroups)."""
    global _detected
    with _detect_lock:
        if _detected is None:
            try:
                _detected = setup_from(Path("/proc/self/mountinfo").read_text(),
                                       Path("/proc/self/cgroup").read_text())
            except OSError:
                _detected = CgroupSetup()
        return _detected


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _keyed(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat keyed file (``memory.events``, ``cpu.stat``)."""
    text = _read(path) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


class KernelCgroup:
    """The cgroups of one kernel: containment group, plus limit/figure groups."""

    def __init__(self, setup: CgroupSetup, memory: int | None, cpu: float | None) -> None:
        self.setup = setup
        self.name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        self.dirs: list[Path] = []
        self.unified: Path | None = None
        self.v1: dict[str, Path] = {}
        self.memory_limit = memory
        self.cpu_limit = cpu
        self.memory_method = "none"
        self.cpu_method = "none"

    @classmethod
    def create(cls, setup: CgroupSetup, memory: int | None = None,
               cpu: float | None = None) -> KernelCgroup:
        """Make the groups and apply the limits it can; OSError (nothing left) if it cannot."""
        group = cls(setup, memory, cpu)
        try:
            group._make()
        except OSError:
            group.remove()
            raise
        return group

    def _mkdir(self, parent: Path) -> Path:
        path = parent / self.name
        path.mkdir()
        self.dirs.append(path)
        if not (path / "cgroup.procs").exists():
            raise OSError(errno.ENOTDIR, "not a cgroup directory", str(parent))
        return path

    def _make(self) -> None:
        setup = self.setup
        want: set[str] = {"memory"}
        if self.cpu_limit is not None:
            want |= {"cpu"}
        if setup.unified is not None:
            self.unified = self._mkdir(setup.unified)
            ctl = setup.unified_controllers
            if self.memory_limit is not None and "memory" in ctl:
                (self.unified / "memory.max").write_text(str(self.memory_limit))
                with contextlib.suppress(OSError):
                    (self.unified / "memory.swap.max").write_text("0")
                self.memory_method = "cgroup-v2"
            if self.cpu_limit is not None and "cpu" in ctl:
                (self.unified / "cpu.max").write_text(f"{int(self.cpu_limit * 100000)} 100000")
                self.cpu_method = "cgroup-v2"
            want -= ctl
        else:
            want |= {"pids", "cpuacct"}
        made: dict[Path, Path] = {}  # cpu and cpuacct may share one mount
        for name in sorted(want & set(setup.v1)):
            parent = setup.v1[name]
            if parent not in made:
                made[parent] = self._mkdir(parent)
            self.v1[name] = made[parent]
        mem = self.v1.get("memory")
        if self.memory_limit is not None and mem is not None and self.memory_method == "none":
            (mem / "memory.limit_in_bytes").write_text(str(self.memory_limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (mem / "memory.memsw.limit_in_bytes").write_text(str(self.memory_limit))
            self.memory_method = "cgroup-v1"
        cpu = self.v1.get("cpu")
        if self.cpu_limit is not None and cpu is not None and self.cpu_method == "none":
            (cpu / "cpu.cfs_period_us").write_text("100000")
            (cpu / "cpu.cfs_quota_us").write_text(str(int(self.cpu_limit * 100000)))
            self.cpu_method = "cgroup-v1"

    @property
    def method(self) -> str:
        """How the tree is contained: ``cgroup-v2`` or ``cgroup-v1``."""
        return "cgroup-v2" if self.unified is not None else "cgroup-v1"

    @property
    def main(self) -> Path | None:
        """The group that holds the tree (v2, else the v1 memory or any v1 group)."""
        if self.unified is not None:
            return self.unified
        return self.v1.get("memory") or next(iter(self.v1.values()), None)

    def attach(self, pid: int) -> None:
        """Move ``pid`` (the kernel, just launched) into every group."""
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        """Every process in the tree now."""
        main = self.main
        text = _read(main / "cgroup.procs") if main is not None else None
        return [int(p) for p in (text or "").split()]

    def populated(self) -> bool:
        """True while any process is in the tree."""
        if self.unified is not None:
            value = _keyed(self.unified / "cgroup.events", "populated")
            if value is not None:
                return value != 0
        return bool(self.pids())

    def kill(self) -> list[int]:
        """SIGKILL every process in the tree; returns the pids seen in it."""
        seen = self.pids()
        if self.unified is not None:
            try:
                (self.unified / "cgroup.kill").write_text("1")
                return seen
            except OSError:  # Linux < 5.14: no cgroup.kill
                pass
        _kill_all(seen)
        # Kill until no new pid appears: a forking process is stopped by its own
        # SIGKILL, so each round can only find children born before it.
        for _ in range(100):
            more = [p for p in self.pids() if p not in seen]
            if not more:
                break
            _kill_all(more)
            seen += more
        return seen

    # -- figures ------------------------------------------------------------------
    def memory(self) -> tuple[int | None, int | None]:
        """(current, peak) bytes of the tree, where a memory controller is on."""
        if self.unified is not None and "memory" in self.setup.unified_controllers:
            return (_read_int(self.unified / "memory.current"),
                    _read_int(self.unified / "memory.peak"))
        mem = self.v1.get("memory")
        if mem is not None:
            return (_read_int(mem / "memory.usage_in_bytes"),
                    _read_int(mem / "memory.max_usage_in_bytes"))
        return None, None

    def oom_kills(self) -> int:
        """How many processes of the tree the OOM killer ended (0 if unknown)."""
        if self.unified is not None and "memory" in self.setup.unified_controllers:
            return _keyed(self.unified / "memory.events", "oom_kill") or 0
        mem = self.v1.get("memory")
        if mem is not None:
            return _keyed(mem / "memory.oom_control", "oom_kill") or 0
        return 0

    def cpu_seconds(self) -> float | None:
        """User+system CPU seconds of the whole tree (exited processes included)."""
        if self.unified is not None:
            usec = _keyed(self.unified / "cpu.stat", "usage_usec")
            if usec is not None:
                return usec / 1e6
        acct = self.v1.get("cpuacct")
        if acct is not None:
            nsec = _read_int(acct / "cpuacct.usage")
            if nsec is not None:
                return nsec / 1e9
        return None

    def count(self) -> int:
        """Processes in the tree (``pids.current`` where kept, else the group's list)."""
        pids = self.v1.get("pids")
        if pids is not None:
            value = _read_int(pids / "pids.current")
            if value is not None:
                return value
        return len(self.pids())

    # -- removal ------------------------------------------------------------------
    def remove(self) -> bool:
        """rmdir every group; False (kept for a later try) while one is busy."""
        left = []
        for path in reversed(self.dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
        self.dirs = list(reversed(left))
        return not left


def _kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def leftover_groups(setup: CgroupSetup | None = None) -> list[Path]:
    """Kernel groups this process made that still exist (for tests and shutdown checks)."""
    setup = setup or detect()
    mine = f"{_PREFIX}{os.getpid()}-"
    found = []
    for parent in ([setup.unified] if setup.unified else []) + list(setup.v1.values()):
        with contextlib.suppress(OSError):
            found += [p for p in parent.iterdir() if p.name.startswith(mine)]
    return found

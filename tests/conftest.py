"""Shared fixtures: isolated Jupyter dirs, and an orphan check after the suite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from supervisor.events import KernelEvent
    from supervisor.kernelspec import KernelSpec

HERE = Path(__file__).resolve().parent
FAKE_KERNEL = HERE / "kernels" / "fakekernel.py"


@pytest.fixture(autouse=True, scope="session")
def _isolated_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Give the whole suite its own Jupyter runtime dir, and prove it is left empty."""
    runtime = tmp_path_factory.mktemp("runtime")
    old = os.environ.get("JUPYTER_RUNTIME_DIR")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    yield runtime
    leftovers = [p.name for p in runtime.iterdir()]
    alive = kernel_descendants()
    for proc in alive:
        proc.kill()
    assert not alive, f"kernel processes outlived the suite: {alive}"
    groups = leftover_cgroups()
    for group in groups:
        with contextlib.suppress(OSError):
            group.rmdir()
    assert not groups, f"kernel cgroups left behind: {groups}"
    assert not leftovers, f"connection files left in the runtime dir: {leftovers}"
    if old is None:
        os.environ.pop("JUPYTER_RUNTIME_DIR", None)
    else:
        os.environ["JUPYTER_RUNTIME_DIR"] = old


def leftover_cgroups() -> list[Path]:
    """Kernel cgroups made by this process, or by a supervising process that is gone."""
    from supervisor.launchers.cgroups import detect

    setup = detect()
    found = []
    for parent in ([setup.unified] if setup.unified else []) + list(setup.v1.values()):
        for path in parent.glob("kernel-supervisor-*"):
            owner = int(path.name.split("-")[2])
            if owner == os.getpid() or not psutil.pid_exists(owner):
                found.append(path)
    return found


def kernel_descendants() -> list[psutil.Process]:
    """Processes started under this test process that look like kernels."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ipykernel" in cmd or "fakekernel" in cmd or "sleep" in cmd:
            found.append(child)
    return found


def fake_kernel_spec_dir(root: Path, name: str, *flags: str, **extra: object) -> Path:
    """Write a kernelspec that runs tests/kernels/fakekernel.py with ``flags``."""
    import json

    d = root / "kernels" / name
    d.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, str(FAKE_KERNEL), "-f", "{connection_file}", *flags],
        "display_name": f"fake {name}",
        "language": "python",
    }
    spec.update(extra)
    (d / "kernel.json").write_text(json.dumps(spec))
    return d


def fake_spec(*flags: str, interrupt_mode: str = "signal", name: str = "fake",
              metadata: dict[str, object] | None = None) -> KernelSpec:
    """A KernelSpec that runs tests/kernels/fakekernel.py with ``flags``."""
    from supervisor.kernelspec import KernelSpec

    return KernelSpec(
        name=name,
        argv=(sys.executable, str(FAKE_KERNEL), "-f", "{connection_file}", *flags),
        display_name=f"fake {' '.join(flags)}",
        language="python",
        interrupt_mode=interrupt_mode,
        metadata=metadata or {},
        resource_dir=FAKE_KERNEL.parent,
    )


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait on a pidfd (no polling) until ``pid`` exits; True if it did in time."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, FileNotFoundError):  # gone (or the id is now a thread's)
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


class Events:
    """An async listener that records events and lets a test wait for the ones it expects."""

    def __init__(self) -> None:
        self.seen: list[KernelEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: KernelEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[KernelEvent], bool], timeout: float = 20,
                       count: int = 1) -> list[KernelEvent]:
        async def matching() -> list[KernelEvent]:
            while True:
                found = [e for e in self.seen if predicate(e)]
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(matching(), timeout)

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 20) -> None:
        """Re-check ``condition`` after every event until it holds."""
        async def loop() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def kinds(self, kernel_id: str | None = None) -> list[str]:
        return [e.kind for e in self.seen if kernel_id is None or e.kernel_id == kernel_id]

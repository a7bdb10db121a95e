"""The process layer: launch, event-driven exit, group signals, the reaper sidecar."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor.errors import KernelStartupError
from supervisor.process import ExitStatus, KernelProcess, reaper_pid

REPO = Path(__file__).resolve().parents[1]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until every pid has exited; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def script(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def test_exit_code_and_stderr_tail_are_reported() -> None:
    """A process that writes to stderr and exits 3 is reaped with its code and last lines."""
    proc = KernelProcess.launch(
        script("import sys; sys.stderr.write('line one\\nfatal: boom\\n'); sys.exit(3)"),
        forward_stderr=False,
    )
    status = await proc.wait(10)
    assert status == ExitStatus(exit_code=3, signal=None)
    assert status.abnormal and status.describe() == "exit code 3"
    assert proc.stderr_tail().splitlines()[-1] == "fatal: boom"
    assert proc.returncode == 3 and not proc.running
    await proc.cleanup()
    proc.close()


async def test_kill_reports_the_signal() -> None:
    """SIGKILL of the group is seen as an exit by signal, as soon as it happens."""
    proc = KernelProcess.launch(script("import time; time.sleep(60)"), forward_stderr=False)
    proc.kill()
    status = await proc.wait(10)
    assert status is not None and status.signal == signal.SIGKILL and status.exit_code is None
    assert status.describe() == "signal SIGKILL"
    await proc.cleanup()
    proc.close()


async def test_missing_executable_is_a_typed_error() -> None:
    """A kernel argv naming a program that does not exist raises KernelStartupError."""
    with pytest.raises(KernelStartupError, match="not found"):
        KernelProcess.launch(["/nonexistent/kernel-binary", "-f", "x"])
    with pytest.raises(KernelStartupError, match="empty"):
        KernelProcess.launch([])


async def test_cleanup_kills_grandchildren() -> None:
    """After the kernel is gone, what it spawned in its group is killed too."""
    proc = KernelProcess.launch(
        script("""
            import subprocess, sys
            child = subprocess.Popen(['sleep', '600'])
            print(child.pid, flush=True)
            import time; time.sleep(60)
        """),
        forward_stderr=False, stdout=subprocess.PIPE,
    )
    assert proc._popen.stdout is not None
    line = await asyncio.to_thread(proc._popen.stdout.readline)
    grandchild = int(line)
    proc.signal(signal.SIGKILL)  # only the kernel: the grandchild survives it
    await proc.wait(10)
    assert wait_gone([grandchild], 0.05) == [grandchild]
    await proc.cleanup()
    assert wait_gone([grandchild], 5) == []
    proc._popen.stdout.close()
    proc.close()


def test_kernels_die_with_a_sigkilled_supervisor(tmp_path: Path) -> None:
    """SIGKILL of the supervising process takes its kernels and their children down within 2 s."""
    owner_script = tmp_path / "owner.py"
    owner_script.write_text(textwrap.dedent(f"""
        import asyncio, subprocess, sys
        sys.path.insert(0, {str(REPO)!r})
        from supervisor.process import KernelProcess, reaper_pid
        KERNEL = "import subprocess, time; c = subprocess.Popen(['sleep', '600']); print(c.pid, flush=True); time.sleep(600)"
        async def main():
            proc = KernelProcess.launch([sys.executable, "-c", KERNEL], stdout=subprocess.PIPE)
            grandchild = await asyncio.to_thread(proc._popen.stdout.readline)
            print(proc.pid, int(grandchild), reaper_pid(), flush=True)
            await asyncio.Event().wait()
        asyncio.run(main())
    """))
    owner = subprocess.Popen([sys.executable, str(owner_script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        kernel, grandchild, reaper = (int(x) for x in owner.stdout.readline().split())
        owner.kill()
        owner.wait(10)
        assert wait_gone([kernel, grandchild, reaper], 2.0) == []
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout:
            owner.stdout.close()


def test_reaper_is_shared_and_alive() -> None:
    """One reaper sidecar serves the whole process."""
    first = reaper_pid()
    assert first is not None and first == reaper_pid()
    os.kill(first, 0)

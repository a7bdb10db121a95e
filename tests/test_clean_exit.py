"""Host programs exit cleanly: nothing on stderr under ``python -X dev``.

Each flow runs in a fresh interpreter with ``-X dev -W error::ResourceWarning``
(unclosed sockets, files, pipes and still-running subprocesses are reported at
exit) and must leave stderr without a ResourceWarning, a "Task was destroyed
but it is pending!", an "Exception ignored" or a traceback, and leave no
connection file behind. The README's own examples get the same check in
tests/test_readme.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIRTY = ("ResourceWarning", "Task was destroyed", "Exception ignored", "Traceback",
         "was never awaited")

NOTEBOOK = """
import nbformat
def notebook(*sources):
    return nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(s) for s in sources],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}})
"""

FLOWS = {
    "nbclient_sync_execute": NOTEBOOK + """
from nbclient import NotebookClient
from supervisor import AsyncKernelManager
nb = notebook("print(6 * 7)")
NotebookClient(nb, km=AsyncKernelManager("python3")).execute()
assert nb.cells[0].outputs[0]["text"] == "42\\n"
""",
    "nbclient_async_execute": NOTEBOOK + """
import asyncio
from nbclient import NotebookClient
from supervisor import AsyncKernelManager
async def main():
    nb = notebook("print(6 * 7)")
    km = AsyncKernelManager("python3")
    await NotebookClient(nb, km=km).async_execute()
    assert nb.cells[0].outputs[0]["text"] == "42\\n"
    await km.shutdown_kernel()
asyncio.run(main())
""",
    "nbclient_kernel_dies_mid_cell": NOTEBOOK + """
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from supervisor import AsyncKernelManager
nb = notebook("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
client = NotebookClient(nb, km=AsyncKernelManager("python3"), timeout=60)
with pytest.raises(DeadKernelError):
    client.execute()
""",
    "manager_whose_kernel_died_is_left_alone": """
import asyncio, os, signal
from supervisor import AsyncKernelManager
async def main():
    km = AsyncKernelManager("python3", forward_stderr=False)
    await km.start_kernel()
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()  # restart callbacks run on a worker thread
    km.add_restart_callback(lambda: loop.call_soon_threadsafe(gone.set), "dead")
    os.kill(km.pid, signal.SIGKILL)
    await asyncio.wait_for(gone.wait(), 30)
    assert not await km.is_alive() and not km.has_kernel
asyncio.run(main())
""",
    "manager_whose_kernel_died_is_shut_down_twice": """
import asyncio, os, signal
from supervisor import AsyncKernelManager
async def main():
    km = AsyncKernelManager("python3", forward_stderr=False)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()  # restart callbacks run on a worker thread
    km.add_restart_callback(lambda: loop.call_soon_threadsafe(gone.set), "dead")
    os.kill(km.pid, signal.SIGKILL)
    await asyncio.wait_for(gone.wait(), 30)
    assert not await kc.is_alive()
    await km.shutdown_kernel()
    await km.shutdown_kernel(now=True)
    await km.finish_shutdown()
    km.cleanup_resources()
asyncio.run(main())
""",
    "shutdown_from_another_loop_after_sync_execute": NOTEBOOK + """
import asyncio, os
from nbclient import NotebookClient
from supervisor import AsyncKernelManager
km = AsyncKernelManager("python3")
NotebookClient(notebook("1"), km=km).execute()
pid = km.pid
asyncio.run(asyncio.wait_for(km.shutdown_kernel(), 20))
try:
    os.kill(pid, 0)
except ProcessLookupError:
    pass
else:
    raise SystemExit("the kernel outlived shutdown_kernel")
""",
    "blocking_manager_kernel_died": """
import os, signal, threading
from supervisor import KernelManager
km = KernelManager("python3", forward_stderr=False)
km.start_kernel()
gone = threading.Event()
km.add_restart_callback(gone.set, "dead")
os.kill(km.pid, signal.SIGKILL)
assert gone.wait(30)
assert not km.is_alive()
km.shutdown_kernel()
""",
}


def run_flow(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh ``-X dev`` interpreter with its own runtime dir."""
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c",
         textwrap.dedent(code)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


def assert_clean(done: subprocess.CompletedProcess[str], runtime: Path) -> None:
    """Exit 0, nothing dirty on stderr, no connection file left."""
    assert done.returncode == 0, done.stderr[-3000:]
    dirty = [line for line in done.stderr.splitlines() if any(d in line for d in DIRTY)]
    assert not dirty, done.stderr[-3000:]
    assert list(runtime.glob("kernel-*.json")) == []


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flow_exits_cleanly(flow: str, tmp_path: Path) -> None:
    """The flow runs to completion and exits with a clean stderr and no files left."""
    assert_clean(run_flow(FLOWS[flow], tmp_path), tmp_path)


def test_the_check_can_fail(tmp_path: Path) -> None:
    """A flow that leaks an open file is caught by the same check (the check is not blind)."""
    done = run_flow("f = open(__import__('os').devnull)\ndel f\n", tmp_path)
    with pytest.raises(AssertionError):
        assert_clean(done, tmp_path)

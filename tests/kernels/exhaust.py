#!/usr/bin/env python3
"""A supervising process that runs out of something while a kernel is up; prints JSON.

``exhaust.py fds HEADROOM``: start kernel A, lower RLIMIT_NOFILE to the fds in use
plus HEADROOM, try to start kernel B, restore the limit.
``exhaust.py procs CGROUP``: start kernel A, move this process into the pids cgroup
CGROUP, set its pids.max to what this process already uses, try to
start kernel B, move back to the root pids cgroup.

Either way it prints the error B got (type, resource, seconds), whether A still
answers kernel_info on the same pid afterwards, and the files left in the runtime
dir once everything is shut down. Run by tests/test_exhaustion.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from conftest import fake_spec  # noqa: E402

from supervisor.client import KernelClient  # noqa: E402
from supervisor.connection import runtime_dir  # noqa: E402
from supervisor.supervisor import Supervisor  # noqa: E402


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


async def main(mode: str, arg: str) -> dict[str, object]:
    out: dict[str, object] = {}
    async with Supervisor() as sup:
        a = await sup.start_kernel(spec=fake_spec(), forward_stderr=False)
        pid_a = sup.get_kernel(a).actor.pid
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if mode == "fds":
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + int(arg), hard))
        else:  # no more processes: the cgroup holds just what we already use
            group = Path(arg)
            (group / "cgroup.procs").write_text(str(os.getpid()))
            (group / "pids.max").write_text((group / "pids.current").read_text())
        t0 = time.monotonic()
        try:
            await sup.start_kernel(spec=fake_spec(), forward_stderr=False, startup_timeout=30)
            out["error"] = None
        except Exception as exc:
            out["error"] = type(exc).__name__
            out["resource"] = getattr(exc, "resource", None)
            out["message"] = str(exc)
        out["seconds"] = time.monotonic() - t0
        if mode == "fds":
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        else:
            _write("/sys/fs/cgroup/pids/cgroup.procs", str(os.getpid()))
        kc = KernelClient(sup.get_kernel(a).connection_info)
        kc.start_channels(hb=False)
        try:
            reply = await kc.kernel_info(reply=True, timeout=10)
            out["a_answers"] = reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
        out["a_same_pid"] = sup.get_kernel(a).actor.pid == pid_a
        out["kernels"] = len(sup.list_kernel_ids())
        await sup.shutdown_all(now=True)
    out["left"] = sorted(p.name for p in runtime_dir().iterdir())
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))

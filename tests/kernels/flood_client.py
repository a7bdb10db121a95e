#!/usr/bin/env python3
"""A supervising process whose kernel floods IOPub; prints its memory figures as JSON.

``flood_client.py MODE MEGABYTES``: start the fake kernel in a Supervisor, connect a
KernelClient, have the kernel print MEGABYTES lines of 1 MiB, and read IOPub not at
all until the reply arrives (``unread``) or one message every 10 ms (``slow``).
Prints RSS growth at the peak and after ``stop_channels`` (bytes), and the channel's
counters. Run by tests/test_buffers.py in a fresh process so the figures are ours.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
from conftest import fake_spec  # noqa: E402

from supervisor.client import KernelClient  # noqa: E402
from supervisor.supervisor import Supervisor  # noqa: E402


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def main(mode: str, megabytes: int) -> dict[str, object]:
    async with Supervisor() as sup:
        kid = await sup.start_kernel(spec=fake_spec(), forward_stderr=False)
        kc = KernelClient(sup.get_kernel(kid).connection_info)
        kc.start_channels(hb=False)
        await kc.wait_for_ready(30)
        kc.iopub_channel.get_msgs()
        base = rss()
        code = f"import sys\nfor i in range({megabytes}):\n    sys.stdout.write('x' * (1 << 20) + '\\n')\n"
        msg_id = kc.execute(code)
        got_idle = False
        if mode == "unread":
            reply = await kc.get_shell_msg(timeout=180)
            assert reply["parent_header"]["msg_id"] == msg_id
        while not got_idle:
            msg = await kc.get_iopub_msg(timeout=180)
            got_idle = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle")
            if mode == "slow":
                await asyncio.sleep(0.01)  # a slow reader, by design
        if mode == "slow":
            await kc.get_shell_msg(timeout=180)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        chan = kc.iopub_channel
        figures: dict[str, object] = {
            "received": chan.received, "overflowed": chan.overflowed,
            "buffered_bytes": chan.buffered[1], "got_idle": got_idle,
            "peak_growth": peak - base,
        }
        kc.stop_channels()
        figures["after_stop"] = rss() - base
        await sup.shutdown_all(now=True)
    return figures


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))

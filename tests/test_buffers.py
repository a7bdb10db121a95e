"""Bounded buffers: a flooding kernel cannot grow the supervising process without limit.

The flood runs in a fresh subprocess (tests/kernels/flood_client.py) so its RSS and
peak RSS measure our client alone, not the test session's history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake_spec

from supervisor.client import KernelClient
from supervisor.client.channels import IOPUB_LIMITS, REPLY_LIMITS
from supervisor.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def _flood(mode: str, megabytes: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(HERE / "kernels" / "flood_client.py"), mode, str(megabytes)],
        capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("mode", ["unread", "slow"])
def test_a_flood_on_iopub_keeps_the_client_bounded_and_stop_channels_frees_it(mode: str) -> None:
    """A kernel printing 300 MB to a client that reads slowly or not at all grows the
    supervising process by far less than the flood, and stop_channels gives it back."""
    r = _flood(mode, 300)
    assert r["received"] >= 300  # the whole flood (1 MiB a message) went through our reader
    assert r["overflowed"] > 0 and r["got_idle"]
    assert r["peak_growth"] < 150 * MiB, r  # unbounded, this was about 340 MiB
    assert r["buffered_bytes"] <= IOPUB_LIMITS[1]
    assert r["after_stop"] < 40 * MiB, r


async def test_a_shell_reader_stops_at_its_bound_and_loses_nothing() -> None:
    """Replies nobody reads stop at the shell inbox's bound (ZeroMQ holds the rest);
    read later, every one of them arrives."""
    count = REPLY_LIMITS[0] + 500
    async with Supervisor() as sup:
        kid = await sup.start_kernel(spec=fake_spec(), forward_stderr=False)
        kc = KernelClient(sup.get_kernel(kid).connection_info)
        kc.start_channels(hb=False)
        try:
            await kc.wait_for_ready(20)
            ids = [kc.kernel_info() for _ in range(count)]
            last = ids[-1]
            while True:  # the kernel has answered everything once its last idle is out
                msg = await kc.get_iopub_msg(timeout=30)
                if (msg["parent_header"].get("msg_id") == last
                        and msg["content"].get("execution_state") == "idle"):
                    break
            held, _ = kc.shell_channel.buffered
            assert held <= REPLY_LIMITS[0]
            got = [(await kc.get_shell_msg(timeout=30))["parent_header"]["msg_id"]
                   for _ in range(count)]
            assert got == ids
        finally:
            kc.stop_channels()
            await sup.shutdown_all(now=True)

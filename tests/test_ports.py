"""Ports under pressure: reservation across concurrent starts, and a clash on every channel.

A real socket squats on one channel's port at a time; the kernel (ipykernel,
which keeps running when its IOPub or heartbeat bind fails, and the fake
kernel, which exits) must either be restarted on fresh ports or fail at once
with a :class:`PortInUseError` naming the channel and the port. Nothing is
left behind either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_spec, kernel_descendants, pid_gone

from supervisor._log import capture_logs
from supervisor.connection import (
    CHANNELS,
    allocate_ports,
    new_connection_info,
    reserve_ports,
    reserved_ports,
    runtime_dir,
)
from supervisor.errors import PortInUseError
from supervisor.kernel import KernelActor, LaunchOptions, Start
from supervisor.supervisor import Supervisor

IPY = LaunchOptions(forward_stderr=False, startup_timeout=60,
                    extra_arguments=("--HistoryManager.hist_file=:memory:",))
FAKE = LaunchOptions(spec=fake_spec(), forward_stderr=False, startup_timeout=60)
KERNELS = {"ipykernel": IPY, "fake": FAKE}


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    """A plain listening TCP socket on a free port (another process's, as far as we know)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def _runtime_files() -> set[str]:
    return {p.name for p in runtime_dir().iterdir()} if runtime_dir().exists() else set()


def test_reserved_ports_are_never_handed_out_twice() -> None:
    """Threads reserving ports at once always get disjoint sets, and allocate skips them."""
    held: list[tuple[int, ...]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        for _ in range(25):
            res = reserve_ports(5)
            with lock:
                held.append(res.ports)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [p for ports in held for p in ports]
    try:
        assert len(flat) == 8 * 25 * 5 and len(set(flat)) == len(flat)
        assert set(flat) <= reserved_ports()
        assert not set(allocate_ports(50)) & set(flat)
    finally:
        from supervisor.connection import PortReservation

        for ports in held:  # hand them back the way their owners would
            res = PortReservation(ports)
            res.release()
    assert not set(flat) & reserved_ports()


async def test_concurrent_starts_hold_disjoint_ports_until_shutdown() -> None:
    """Ten kernels started at once in one Supervisor get 50 distinct reserved ports,
    released when they are shut down."""
    async with Supervisor(launch=FAKE) as sup:
        ids = await asyncio.gather(*(sup.start_kernel() for _ in range(10)))
        ports = [sup.get_kernel(k).connection_info.port(c) for k in ids for c in CHANNELS]
        assert len(set(ports)) == 50
        assert set(ports) <= reserved_ports()
        await sup.shutdown_all()
    assert not set(ports) & reserved_ports()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("channel", CHANNELS)
async def test_a_taken_port_on_any_channel_fails_fast_naming_it(
        channel: str, kernel: str, squatter: socket.socket) -> None:
    """With no retries left, a squatted port on any channel is a PortInUseError naming
    the channel and port (not a startup timeout), and nothing is left behind."""
    port = squatter.getsockname()[1]
    info = dataclasses.replace(new_connection_info(), **{f"{channel}_port": port})
    before = _runtime_files()
    actor = KernelActor(KERNELS[kernel].replace(port_retries=0), connection_info=info)
    actor.start()
    try:
        with pytest.raises(PortInUseError) as caught:
            await actor.ask(Start())
        err = caught.value
        assert (err.channel, err.port, err.timed_out) == (channel, port, False)
        assert f"{channel} channel on port {port}" in str(err)
        assert actor.pid is None or pid_gone(actor.pid, 5)
    finally:
        actor.stop()
        await actor.join()
    assert _runtime_files() == before
    assert not kernel_descendants()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("channel", CHANNELS)
async def test_a_taken_port_on_any_channel_is_retried_on_fresh_ports(
        channel: str, kernel: str, squatter: socket.socket) -> None:
    """A squatted port on any channel is seen at once and the kernel is started again on
    fresh ports, where every channel answers (the heartbeat echoes ours)."""
    port = squatter.getsockname()[1]
    info = dataclasses.replace(new_connection_info(), **{f"{channel}_port": port})
    actor = KernelActor(KERNELS[kernel], connection_info=info)
    actor.start()
    try:
        with capture_logs() as logs:
            await actor.ask(Start())
        clashes = [e for e in logs if e["event"] == "kernel.port_clash"]
        assert [(e["channel"], e["port"]) for e in clashes] == [(channel, port)]
        new = actor.connection_info
        assert new is not None and port not in [new.port(c) for c in CHANNELS]
        assert actor.state == "running"
    finally:
        actor.stop()
        await actor.join()


async def test_reservations_are_released_when_a_start_fails(tmp_path: Path) -> None:
    """A start that fails (the kernel crashes) gives its ports back."""
    actor = KernelActor(LaunchOptions(spec=fake_spec("--crash-on-start"), forward_stderr=False))
    actor.start()
    with pytest.raises(Exception, match="died while starting"):
        await actor.ask(Start())
    info = actor.connection_info
    assert info is not None
    actor.stop()
    await actor.join()
    assert not {info.port(c) for c in CHANNELS} & reserved_ports()

"""Security: private connection files, strong per-kernel keys, loopback-only ports, ipc
sockets in a private dir, CurveZMQ end to end, and secrets kept out of the logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
import zmq.asyncio
from conftest import fake_spec, kernel_descendants, pid_gone

from supervisor._log import capture_logs
from supervisor.client import KernelClient
from supervisor.connection import ipc_paths, new_key, read_connection_file, runtime_dir
from supervisor.errors import ChannelTimeout, ConfigurationError
from supervisor.kernel import KernelActor, LaunchOptions, Start
from supervisor.kernelspec import get_kernel_spec, native_python_spec
from supervisor.manager import AsyncKernelManager, KernelManager
from supervisor.supervisor import Supervisor

QUIET = LaunchOptions(forward_stderr=False, startup_timeout=30, shutdown_wait=2, terminate_wait=1)
IPY: dict[str, Any] = {"forward_stderr": False, "shutdown_wait": 2, "terminate_wait": 1,
                       "extra_arguments": ("--HistoryManager.hist_file=:memory:",)}
HEX_256 = re.compile(r"^[0-9a-f]{64}$")


def runtime_files() -> set[str]:
    path = runtime_dir()
    return set(os.listdir(path)) if path.exists() else set()


@pytest.fixture
def private_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime dir that does not exist yet, under a permissive umask (0o000)."""
    path = tmp_path / "data" / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    old = os.umask(0)
    try:
        yield path
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def stdout_of(kc: KernelClient, code: str) -> str:
    """Run ``code`` and return what it printed."""
    out: list[str] = []
    reply = await kc.execute_interactive(
        code, timeout=30, allow_stdin=False,
        output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream"
        else None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


# -- connection files and keys ---------------------------------------------------------------
async def test_connection_file_is_0600_in_a_0700_runtime_dir(private_runtime: Path) -> None:
    """Even under umask 0, the runtime dir is created 0700 and the connection file is 0600,
    owned by us, with no temporary file left beside it."""
    async with Supervisor(launch=QUIET) as s:
        kid = await s.start_kernel(spec=fake_spec())
        conn = s.actor_of(kid).connection_file
        assert conn.parent == private_runtime
        assert mode(private_runtime) == 0o700 and mode(conn) == 0o600
        assert conn.stat().st_uid == os.geteuid()
        assert os.listdir(private_runtime) == [conn.name]
        await s.shutdown_kernel(kid)
    assert os.listdir(private_runtime) == []


async def test_keys_are_256_bit_hex_and_differ_per_kernel() -> None:
    """Each kernel gets its own HMAC-SHA256 key of 64 hex characters (256 random bits)."""
    async with Supervisor(launch=QUIET) as s:
        kids = await asyncio.gather(*(s.start_kernel(spec=fake_spec()) for _ in range(3)))
        files = [json.loads(s.actor_of(k).connection_file.read_text()) for k in kids]
    keys = [f["key"] for f in files]
    assert all(HEX_256.fullmatch(k) for k in keys), keys
    assert len(set(keys)) == 3
    assert {f["signature_scheme"] for f in files} == {"hmac-sha256"}
    sample = {new_key() for _ in range(1000)}
    assert len(sample) == 1000 and all(HEX_256.fullmatch(k.decode()) for k in sample)


@pytest.mark.parametrize("kernel", ["ipykernel", "fake"])
async def test_kernel_ports_listen_on_loopback_only(kernel: str) -> None:
    """The kernel's five ports listen on 127.0.0.1 and nothing of it listens anywhere else;
    the supervising process itself listens on nothing."""
    async with Supervisor(launch=QUIET) as s:
        if kernel == "ipykernel":
            kid = await s.start_kernel("python3", extra_arguments=IPY["extra_arguments"])
        else:
            kid = await s.start_kernel(spec=fake_spec())
        actor = s.actor_of(kid)
        info = actor.connection_info
        assert info is not None and actor.pid is not None
        proc = psutil.Process(actor.pid)
        listening = [c for p in [proc, *proc.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        ports = {info.port(ch) for ch in ("shell", "iopub", "stdin", "control", "hb")}
        assert ports <= {c.laddr.port for c in listening}, listening
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
        mine = [c for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
        assert not mine, mine


async def test_secrets_never_reach_the_logs() -> None:
    """A start, an execution and a shutdown log neither the HMAC key nor the Curve secret."""
    with capture_logs() as logs:
        km = AsyncKernelManager("python3", transport_encryption="required", **IPY)
        await km.start_kernel()
        info = km.connection_info
        assert info is not None and info.curve_secretkey is not None
        kc = km.client()
        kc.start_channels(hb=False)
        try:
            await kc.wait_for_ready(timeout=30)  # IOPub subscribed before the print
            assert await stdout_of(kc, "print('logged?')") == "logged?\n"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    text = "\n".join(repr(entry) for entry in logs)
    assert logs and info.key.decode() not in text
    assert info.curve_secretkey.decode() not in text


# -- ipc ---------------------------------------------------------------------------------------
async def test_ipc_transport_end_to_end(private_runtime: Path) -> None:
    """transport='ipc': ipykernel runs code through socket files that live in the runtime dir
    we create 0700 (even under umask 0), and shutdown removes them with the connection file."""
    km = AsyncKernelManager("python3", transport="ipc", **IPY)
    await km.start_kernel()
    try:
        info = km.connection_info
        assert info is not None and info.transport == "ipc"
        sockets = ipc_paths(info)
        assert len(sockets) == 5
        for path in sockets:
            assert stat.S_ISSOCK(path.stat().st_mode) and path.parent == private_runtime
        assert mode(private_runtime) == 0o700
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=30)
            assert await stdout_of(kc, "print('over ipc')") == "over ipc\n"
        finally:
            kc.stop_channels()
        pid = km.pid
    finally:
        await km.shutdown_kernel()
    assert pid is not None and pid_gone(pid, 5)
    assert not any(path.exists() for path in sockets)
    assert os.listdir(private_runtime) == []


# -- CurveZMQ ----------------------------------------------------------------------------------
def test_native_spec_and_ipykernel_advertise_curve() -> None:
    """Our built-in python3 spec, the installed one and ipykernel's own kernel.json all list
    'curve' in metadata.supported_encryption (ipykernel >= 7.4)."""
    from ipykernel.kernelspec import get_kernel_dict

    native = native_python_spec()
    assert native is not None
    assert list(native.metadata["supported_encryption"]) == ["curve"]
    assert list(get_kernel_spec("python3").metadata["supported_encryption"]) == ["curve"]
    assert get_kernel_dict()["metadata"]["supported_encryption"] == ["curve"]
    assert zmq.has("curve")


async def _silent_for(sock: zmq.asyncio.Socket, client: KernelClient, seconds: float) -> None:
    """Assert neither keyless receiver gets anything within ``seconds`` (a bounded wait for
    an absence)."""
    got = await sock.poll(int(seconds * 1000))
    assert got == 0, "a plain SUB socket without the Curve keys received IOPub traffic"
    with pytest.raises(ChannelTimeout):
        await client.get_iopub_msg(timeout=0.1)


async def test_curve_encryption_end_to_end() -> None:
    """transport_encryption='required' starts ipykernel with Curve keys in its connection file;
    our client runs code through it, while a SUB socket and a client without the keys receive
    nothing from IOPub as the kernel prints."""
    km = AsyncKernelManager("python3", transport_encryption="required", **IPY)
    await km.start_kernel()
    ctx = zmq.asyncio.Context()
    try:
        on_disk = json.loads(await asyncio.to_thread(Path(km.connection_file).read_text))
        assert len(on_disk["curve_publickey"]) == 40 and len(on_disk["curve_secretkey"]) == 40
        info = read_connection_file(km.connection_file)
        assert info.encrypted and info == km.connection_info

        kc = km.client()
        kc.start_channels()
        plain = ctx.socket(zmq.SUB)
        plain.setsockopt(zmq.LINGER, 0)
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(info.url("iopub"))
        keyless = KernelClient(replace(info, curve_publickey=None, curve_secretkey=None))
        keyless.start_channels(shell=False, stdin=False, control=False, hb=False)
        try:
            await kc.wait_for_ready(timeout=30)
            code = "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.15)"
            printed, _ = await asyncio.gather(stdout_of(kc, code),
                                              _silent_for(plain, keyless, 1.5))
            assert printed == "".join(f"{i}\n" for i in range(8))
            assert not keyless.dropped  # nothing even reached it to be rejected
        finally:
            keyless.stop_channels()
            plain.close(linger=0)
            kc.stop_channels()

    finally:
        ctx.destroy(linger=0)
        await km.shutdown_kernel()
    assert not kernel_descendants()


def test_jupyter_client_runs_code_over_curve() -> None:
    """jupyter_client's BlockingKernelClient, loaded from the connection file of a kernel we
    started with transport_encryption='required', runs code (jupyter_client 8.10 does Curve)."""
    from jupyter_client.blocking.client import BlockingKernelClient as JupyterClient

    km = KernelManager("python3", transport_encryption="required", **IPY)
    km.start_kernel()
    try:
        assert km.connection_info is not None and km.connection_info.encrypted
        jc = JupyterClient()
        jc.load_connection_file(km.connection_file)
        assert jc.curve_publickey == km.connection_info.curve_publickey
        jc.start_channels()
        try:
            jc.wait_for_ready(timeout=30)
            reply = jc.execute("6 * 7", reply=True, timeout=30)
            assert reply["content"]["status"] == "ok"
            assert jc.is_alive()  # its heartbeat gets through Curve as well
        finally:
            jc.stop_channels()
    finally:
        km.shutdown_kernel()
    assert not kernel_descendants()


async def test_required_encryption_without_kernel_support_is_a_configuration_error() -> None:
    """transport_encryption='required' with a kernelspec lacking supported_encryption fails
    with ConfigurationError and launches nothing; 'auto' falls back to no Curve."""
    before = runtime_files()
    actor = KernelActor(LaunchOptions(spec=fake_spec(), transport_encryption="required",
                                      forward_stderr=False))
    actor.start()
    try:
        with pytest.raises(ConfigurationError, match="supported_encryption"):
            await actor.ask(Start())
        assert actor.pid is None
    finally:
        actor.stop()
        await actor.join()
    km = AsyncKernelManager(spec=fake_spec(), transport_encryption="required",
                            forward_stderr=False)
    try:
        with pytest.raises(ConfigurationError, match="supported_encryption"):
            await km.start_kernel()
    finally:
        if km.supervisor is not None:
            await km.supervisor.close()
    async with Supervisor(launch=QUIET.replace(transport_encryption="auto")) as s:
        kid = await s.start_kernel(spec=fake_spec())
        info = s.actor_of(kid).connection_info
        assert info is not None and not info.encrypted
    assert runtime_files() == before and not kernel_descendants()


async def test_a_failed_start_leaves_no_private_supervisor_running() -> None:
    """After start_kernel fails, the manager's own supervisor is stopped too."""
    km = AsyncKernelManager(spec=fake_spec(), transport_encryption="required",
                            forward_stderr=False)
    try:
        with pytest.raises(ConfigurationError):
            await km.start_kernel()
        assert km.supervisor is None or not km.supervisor.alive
    finally:
        if km.supervisor is not None:
            await km.supervisor.close()

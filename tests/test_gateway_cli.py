"""`kernel-supervisor gateway` as a process, /api/events, and culling through the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import pid_gone
from gateway_util import TOKEN, close_all, execute, gateway, stdout_of, write_specs
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    share = write_specs(tmp_path / "share")
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    return share


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """One line of the child's stdout, waiting on the pipe until ``deadline``."""
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no output in time (so far {line!r})"
        chunk = os.read(proc.stdout.fileno(), 1)
        assert chunk, f"stdout closed (so far {line!r}); exit {proc.poll()}"
        line += chunk
    return line.decode().rstrip("\n")


def start_gateway(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m supervisor gateway ARGS`` with stdout a pipe and stderr in ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "supervisor", "gateway", *args],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)


async def test_cli_serves_kg_env_and_sigterm_stops_everything(specs: Path, tmp_path: Path) -> None:
    """The command honours KG_* variables, kernels never see the token, and SIGTERM shuts every kernel down and exits 0."""
    env = {**os.environ, "KG_PORT": "0", "KG_AUTH_TOKEN": TOKEN, "KG_DEFAULT_KERNEL_NAME": "fake",
           "KG_MAX_KERNELS": "2", "JUPYTER_PATH": str(specs),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    proc = start_gateway(env, tmp_path / "stderr.log")
    http = AsyncHTTPClient(force_instance=True)
    try:
        deadline = time.monotonic() + 20
        first = read_line(proc, deadline)
        assert first.startswith("Kernel gateway listening at http://127.0.0.1:"), first
        url = first.rsplit(" ", 1)[1]
        assert read_line(proc, deadline) == f"Token: {TOKEN}"
        auth = {"Authorization": f"token {TOKEN}"}
        resp = await http.fetch(HTTPRequest(url + "api/kernels", method="POST", body="{}",
                                            headers=auth))
        kid = json.loads(resp.body)["id"]
        ws = await websocket_connect(HTTPRequest(
            f"ws{url[4:]}api/kernels/{kid}/channels", headers=auth))
        _, seen = await execute(ws, "import os; print(os.environ.get('KG_AUTH_TOKEN'))")
        assert stdout_of(seen) == "None\n"
        await close_all(ws)
        kernels = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                   if "fakekernel" in " ".join(p.cmdline())]
        assert len(kernels) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert all(pid_gone(pid) for pid in kernels)
        assert not list((tmp_path / "runtime").glob("kernel-*.json"))
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_cli_refuses_no_auth_off_loopback(tmp_path: Path) -> None:
    """--no-auth on a non-loopback address is refused (exit 2) unless --no-auth-force."""
    done = subprocess.run([sys.executable, "-m", "supervisor", "gateway", "--ip", "0.0.0.0",
                           "--no-auth"], cwd=ROOT, capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "no-auth" in done.stderr or "auth" in done.stderr


async def test_events_over_websocket_and_sse(specs: Path) -> None:
    """/api/events streams KernelEvents as JSON over a WebSocket and as server-sent events."""
    async with gateway() as gw:
        ws = await websocket_connect(HTTPRequest(f"{gw.ws_url}api/events?token={TOKEN}"))
        chunks: list[bytes] = []
        got_ready = asyncio.Event()
        subscribed = asyncio.Event()

        def on_chunk(chunk: bytes) -> None:
            chunks.append(chunk)
            subscribed.set()  # the stream's opening comment came: we are subscribed
            if b"event: ready" in b"".join(chunks):
                got_ready.set()
        sse_client = AsyncHTTPClient(force_instance=True)
        sse = asyncio.ensure_future(sse_client.fetch(HTTPRequest(
            f"{gw.url}api/events", headers={"Authorization": f"token {TOKEN}"},
            streaming_callback=on_chunk, request_timeout=60)))
        await asyncio.wait_for(subscribed.wait(), 10)
        kid = await gw.new_kernel()
        kinds = []
        while "ready" not in kinds:
            raw = await asyncio.wait_for(ws.read_message(), 20)
            assert isinstance(raw, str)
            event = json.loads(raw)
            assert event["kernel_id"] == kid
            assert event["time"].endswith("Z")
            kinds.append(event["kind"])
        assert kinds == ["starting", "ready"]
        await asyncio.wait_for(got_ready.wait(), 20)
        text = b"".join(chunks).decode()
        data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert [d["kind"] for d in data][:2] == ["starting", "ready"]
        await close_all(ws)
    resp = await sse  # the gateway ended the stream when it stopped
    assert resp.code == 200 and resp.headers["Content-Type"] == "text/event-stream"
    sse_client.close()


async def test_culling_spares_connected_kernels(specs: Path) -> None:
    """With an idle timeout, an idle kernel without clients is culled while one with a client is spared."""
    async with gateway(cull_idle_timeout=0.3, cull_interval=0.2) as gw:
        lonely = await gw.new_kernel()
        watched = await gw.new_kernel()
        ws = await gw.ws(watched)
        events: list[str] = []
        culled = asyncio.Event()

        async def on_event(ev: object) -> None:
            kind = getattr(ev, "kind", "")
            if kind == "culled":
                events.append(getattr(ev, "kernel_id", ""))
            elif kind == "shutdown" and events:
                culled.set()
        gw.server.supervisor.subscribe(on_event)
        await asyncio.wait_for(culled.wait(), 20)
        assert events == [lonely]
        models = await gw.json("GET", "api/kernels")
        assert [m["id"] for m in models] == [watched]
        gw.server.supervisor.unsubscribe(on_event)
        await close_all(ws)

"""A real jupyter_server started with --gateway-url pointing at our gateway: a notebook session's round trip."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import pid_gone
from gateway_util import TOKEN, close_all, execute, gateway, request, stdout_of, until
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

pytest.importorskip("jupyter_server")

JS_TOKEN = "jupyter-server-token-42"
READY = "ks-ready-probe: accepting connections"
# jupyter_server prints its URL before it binds its port (on its loop's first turn);
# this server extension's start hook runs after that, so its line means "listening".
PROBE = f"""
def _jupyter_server_extension_points():
    return [{{"module": "ks_ready_probe"}}]

def _load_jupyter_server_extension(serverapp):
    pass

async def _start_jupyter_server_extension(serverapp):
    serverapp.log.info("{READY}")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def jupyter_server(gateway_url: str, tmp: Path) -> AsyncIterator[str]:
    """jupyter_server on 127.0.0.1 with isolated dirs, using our gateway; stopped after."""
    port = free_port()
    for d in ("config", "data", "runtime", "root", "probe"):
        (tmp / d).mkdir(exist_ok=True)
    (tmp / "probe" / "ks_ready_probe.py").write_text(PROBE)
    (tmp / "config" / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"ks_ready_probe": True}}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_DATA_DIR": str(tmp / "data"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTER_PLATFORM_DIRS": "1", "JUPYTER_CONFIG_PATH": str(tmp / "config"),
           "PYTHONPATH": str(tmp / "probe")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={JS_TOKEN}", f"--ServerApp.root_dir={tmp / 'root'}",
        f"--gateway-url={gateway_url}", f"--GatewayClient.auth_token={TOKEN}",
        "--GatewayClient.request_timeout=60", "--GatewayClient.connect_timeout=20",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    running = asyncio.Event()

    async def drain() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if READY in line:
                running.set()
    reader = asyncio.ensure_future(drain())
    try:
        waiter = asyncio.ensure_future(running.wait())
        await asyncio.wait({waiter, reader}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not running.is_set():
            raise AssertionError("jupyter_server did not start:\n" + "\n".join(lines[-40:]))
        try:
            yield f"http://127.0.0.1:{port}/"
        except BaseException:
            print("jupyter_server said:", *lines[-60:], sep="\n")
            raise
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        await reader


async def js_fetch(http: AsyncHTTPClient, base: str, method: str, path: str,
                   body: Any = None) -> Any:
    req = HTTPRequest(base + path, method=method,
                      body=None if method in ("GET", "DELETE") else json.dumps(body or {}),
                      headers={"Authorization": f"token {JS_TOKEN}"}, request_timeout=60)
    resp = await http.fetch(req)
    return json.loads(resp.body) if resp.body else resp.code


async def test_jupyter_server_session_round_trip_through_our_gateway(tmp_path: Path) -> None:
    """jupyter_server with --gateway-url creates a session whose kernel lives in our gateway, executes over its WebSocket, interrupts, restarts and deletes it."""
    async with gateway(default_kernel_name="python3") as gw:
        sup = gw.server.supervisor
        async with jupyter_server(gw.url, tmp_path) as base:
            http = AsyncHTTPClient(force_instance=True)
            try:
                specs = await js_fetch(http, base, "GET", "api/kernelspecs")
                assert "python3" in specs["kernelspecs"]
                session = await js_fetch(http, base, "POST", "api/sessions", {
                    "path": "gw.ipynb", "type": "notebook", "name": "gw.ipynb",
                    "kernel": {"name": "python3"}})
                kid = session["kernel"]["id"]
                assert sup.list_kernel_ids() == [kid]  # the kernel lives in our gateway
                pid = sup.actor_of(kid).pid
                ws = await websocket_connect(HTTPRequest(
                    f"ws{base[4:]}api/kernels/{kid}/channels?session_id={uuid.uuid4()}",
                    headers={"Authorization": f"token {JS_TOKEN}"}))
                reply, seen = await execute(ws, "print(6 * 7)", session="js-test")
                assert reply["content"]["status"] == "ok" and stdout_of(seen) == "42\n"
                # Interrupt a long cell through jupyter_server's REST API.
                sleeper = request("execute_request", {"code": "import time; time.sleep(60)",
                                                      "silent": False}, session="js-test")
                await ws.write_message(json.dumps(sleeper))
                await until(ws, lambda m: m["msg_type"] == "status"
                            and m["parent_header"].get("msg_id") == sleeper["header"]["msg_id"]
                            and m["content"]["execution_state"] == "busy", timeout=30)
                assert await js_fetch(http, base, "POST", f"api/kernels/{kid}/interrupt") == 204
                msgs = await until(ws, lambda m: m["msg_type"] == "execute_reply"
                                   and m["parent_header"]["msg_id"] == sleeper["header"]["msg_id"],
                                   timeout=30)
                assert msgs[-1]["content"]["status"] == "error"
                assert msgs[-1]["content"]["ename"] == "KeyboardInterrupt"
                # Restart through jupyter_server: a new process in our gateway, same id.
                model = await js_fetch(http, base, "POST", f"api/kernels/{kid}/restart")
                assert model["id"] == kid
                assert sup.actor_of(kid).pid != pid
                assert pid_gone(pid)
                new_pid = sup.actor_of(kid).pid
                await close_all(ws)
                ws = await websocket_connect(HTTPRequest(
                    f"ws{base[4:]}api/kernels/{kid}/channels?session_id={uuid.uuid4()}",
                    headers={"Authorization": f"token {JS_TOKEN}"}))
                _, seen = await execute(ws, "print('after restart')", session="js-test")
                assert stdout_of(seen) == "after restart\n"
                await close_all(ws)
                # Deleting the session shuts the kernel down in our gateway.
                assert await js_fetch(http, base, "DELETE",
                                      f"api/sessions/{session['id']}") == 204
                assert sup.list_kernel_ids() == []
                assert new_pid is not None and pid_gone(new_pid)
                assert await gw.json("GET", "api/kernels") == []
            finally:
                http.close()

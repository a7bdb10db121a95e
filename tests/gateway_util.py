"""Helpers for the gateway tests: a real gateway on 127.0.0.1:0 and clients for it."""

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

from conftest import FAKE_KERNEL
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from supervisor.gateway import GatewaySettings, Server
from supervisor.policy import RestartPolicy

TOKEN = "test-token-0123456789"
V1 = "v1.kernel.websocket.jupyter.org"


def write_specs(root: Path) -> Path:
    """Kernelspecs under ``root``/kernels: ``fake`` (with a logo) and ``fake2``."""
    for name in ("fake", "fake2"):
        d = root / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, str(FAKE_KERNEL), "-f", "{connection_file}"],
            "display_name": f"Fake {name}", "language": "python",
            "metadata": {"purpose": "tests"}}))
        if name == "fake":
            (d / "logo-64x64.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return root


class Gw:
    """A running gateway and an HTTP client for it."""

    def __init__(self, server: Server, http: AsyncHTTPClient) -> None:
        self.server = server
        self.http = http
        self.token = server.settings.token or ""

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]

    async def fetch(self, method: str, path: str, body: Any = None, *,
                    token: str | None = None, raw: bytes | None = None,
                    headers: dict[str, str] | None = None) -> HTTPResponse:
        """A request; returns the response whatever its status."""
        hdrs = dict(headers or {})
        tok = self.token if token is None else token
        if tok:
            hdrs["Authorization"] = f"token {tok}"
        data: bytes | None = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is None and method == "POST":
            data = b""
        req = HTTPRequest(self.url + path.lstrip("/"), method=method, body=data,
                          headers=hdrs, request_timeout=30,
                          allow_nonstandard_methods=True)
        try:
            return await self.http.fetch(req)
        except HTTPClientError as exc:
            assert exc.response is not None
            return exc.response

    async def json(self, method: str, path: str, body: Any = None,
                   expect: int = 200) -> Any:
        resp = await self.fetch(method, path, body)
        assert resp.code == expect, (resp.code, resp.body)
        return json.loads(resp.body) if resp.body else None

    async def new_kernel(self, name: str = "fake") -> str:
        model = await self.json("POST", "api/kernels", {"name": name}, expect=201)
        return str(model["id"])

    async def ws(self, kernel_id: str, *, session_id: str | None = None, v1: bool = False,
                 token: str | None = None) -> WebSocketClientConnection:
        tok = self.token if token is None else token
        url = f"{self.ws_url}api/kernels/{kernel_id}/channels"
        if session_id:
            url += f"?session_id={session_id}"
        req = HTTPRequest(url, headers={"Authorization": f"token {tok}"} if tok else {})
        return await websocket_connect(req, subprotocols=[V1] if v1 else None)


@asynccontextmanager
async def gateway(**kw: Any) -> AsyncIterator[Gw]:
    """A started gateway (token TOKEN, fake kernels by default); everything stopped after."""
    kw.setdefault("token", TOKEN)
    kw.setdefault("default_kernel_name", "fake")
    policy = kw.pop("policy", None) or RestartPolicy(max_restarts=3, within_seconds=60)
    launch = kw.pop("launch", None)
    settings = GatewaySettings(ip="127.0.0.1", port=0, **kw)
    http = AsyncHTTPClient(force_instance=True)
    server = Server(settings, policy=policy, launch=launch)
    await server.start()
    try:
        yield Gw(server, http)
    finally:
        http.close()
        await server.stop()


def request(msg_type: str, content: dict[str, Any] | None = None, *,
            session: str = "test-session", channel: str = "shell") -> dict[str, Any]:
    """A client message in the legacy JSON shape."""
    return {
        "header": {"msg_id": str(uuid.uuid4()), "msg_type": msg_type, "session": session,
                   "username": "test", "date": "2026-01-01T00:00:00.000000Z",
                   "version": "5.4"},
        "parent_header": {}, "metadata": {}, "content": content or {},
        "channel": channel, "buffers": [],
    }


async def recv_json(ws: WebSocketClientConnection, timeout: float = 20) -> dict[str, Any]:
    """The next legacy text message."""
    raw = await asyncio.wait_for(ws.read_message(), timeout)
    assert raw is not None, "websocket closed"
    assert isinstance(raw, str), raw[:100]
    msg: dict[str, Any] = json.loads(raw)
    return msg


async def until(ws: WebSocketClientConnection, predicate: Any, timeout: float = 20,
                decode: Any = None) -> list[dict[str, Any]]:
    """Read messages until one matches ``predicate``; all read, the match last."""
    seen: list[dict[str, Any]] = []

    async def loop() -> list[dict[str, Any]]:
        while True:
            raw = await ws.read_message()
            assert raw is not None, f"websocket closed; seen {[m.get('msg_type') for m in seen]}"
            msg = decode(raw) if decode else json.loads(raw)
            seen.append(msg)
            if predicate(msg):
                return seen
    try:
        return await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out; seen {[(m.get('channel'), m.get('msg_type'), m.get('content', {}).get('execution_state')) for m in seen]}") from None


async def execute(ws: WebSocketClientConnection, code: str,
                  session: str = "test-session") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``code``; (execute_reply, every message read up to the idle status)."""
    req = request("execute_request", {"code": code, "silent": False, "store_history": True,
                                      "user_expressions": {}, "allow_stdin": False},
                  session=session)
    await ws.write_message(json.dumps(req))
    msg_id = req["header"]["msg_id"]
    reply: dict[str, Any] = {}
    idle = False

    def done(m: dict[str, Any]) -> bool:
        nonlocal reply, idle
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            return False
        if m["msg_type"] == "execute_reply":
            reply = m
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
        return bool(reply) and idle
    seen = await until(ws, done)
    return reply, seen


def stdout_of(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


async def close_all(*sockets: WebSocketClientConnection) -> None:
    """Close client WebSockets and wait until each connection is really gone."""
    open_ones = []
    for ws in sockets:
        stream = getattr(ws.protocol, "stream", None)
        if stream is not None and not stream.closed():
            open_ones.append(ws)
        ws.close()
    for ws in open_ones:
        async def drain(ws: WebSocketClientConnection = ws) -> None:
            while await ws.read_message() is not None:
                pass
        await asyncio.wait_for(drain(), 10)


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
async def notebook_server(gateway_url: str, tmp: Path, module: str = "jupyter_server"
                          ) -> AsyncIterator[str]:
    """jupyter_server (or ``module``, e.g. jupyterlab) on 127.0.0.1 with isolated dirs,
    using our gateway; stopped (SIGTERM, then waited for) after."""
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
        sys.executable, "-m", module, "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
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

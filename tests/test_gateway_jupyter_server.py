"""A real jupyter_server started with --gateway-url pointing at our gateway: a notebook session's round trip."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import pid_gone
from gateway_util import (
    JS_TOKEN,
    close_all,
    execute,
    gateway,
    notebook_server,
    request,
    stdout_of,
    until,
)
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

pytest.importorskip("jupyter_server")


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
        async with notebook_server(gw.url, tmp_path) as base:
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

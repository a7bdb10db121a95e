"""The kernel WebSocket of the gateway: both protocols, several clients, replay, restarts, bad clients."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from gateway_util import (
    TOKEN,
    V1,
    Gw,
    close_all,
    execute,
    gateway,
    recv_json,
    request,
    stdout_of,
    until,
    write_specs,
)
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from supervisor.gateway.wsproto import decode_legacy, decode_v1, encode_legacy, encode_v1
from supervisor.policy import RestartPolicy


@pytest.fixture(autouse=True)
def _specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(write_specs(tmp_path / "share")))


async def peers(gw: Gw, kid: str, count: int) -> None:
    """Wait until the gateway sees ``count`` clients on kernel ``kid``."""
    bridge = gw.server.app.gateway.bridges[kid]  # type: ignore[union-attr]
    while len(bridge.peers) != count:
        bridge.peers_changed.clear()
        await asyncio.wait_for(bridge.peers_changed.wait(), 10)


def test_framings_match_jupyter_servers() -> None:
    """Our legacy (text and binary) and v1 frames decode with jupyter_server's functions, and theirs with ours."""
    header = {"msg_id": "m1", "msg_type": "comm_msg", "session": "s", "date": "2026-01-01T00:00:00Z"}
    parts = [json.dumps(header).encode(), b"{}", b'{"k":1}', b'{"data":"x"}', b"\x00buf1", b"b2"]
    text = encode_legacy("iopub", parts[:4], "m1", "comm_msg")
    assert isinstance(text, str)
    loaded = json.loads(text)
    assert loaded["channel"] == "iopub" and loaded["content"] == {"data": "x"}
    assert loaded["msg_id"] == "m1" and loaded["metadata"] == {"k": 1}
    binary = encode_legacy("iopub", parts, "m1", "comm_msg")
    assert isinstance(binary, bytes)
    theirs = deserialize_binary_message(binary)
    assert theirs["buffers"] == [b"\x00buf1", b"b2"] and theirs["content"] == {"data": "x"}
    channel, msg_list = deserialize_msg_from_ws_v1(encode_v1("shell", parts))
    assert channel == "shell" and msg_list == parts
    msg = {"header": header, "parent_header": {}, "metadata": {}, "content": {"a": 1},
           "buffers": [b"xyz"], "channel": "shell"}
    ours = decode_legacy(serialize_binary_message(msg))
    assert ours.channel == "shell" and ours.parts[4:] == [b"xyz"]
    assert json.loads(ours.parts[3]) == {"a": 1}
    v1 = decode_v1(serialize_msg_to_ws_v1(parts, "control"))
    assert v1.channel == "control" and v1.parts == parts and v1.header["msg_id"] == "m1"


async def test_legacy_protocol_executes_and_streams() -> None:
    """Over the legacy JSON protocol a client gets kernel_info_reply, stream output, execute_reply and status."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        ws = await gw.ws(kid)
        assert ws.selected_subprotocol is None
        info = request("kernel_info_request")
        await ws.write_message(json.dumps(info))
        msgs = await until(ws, lambda m: m["msg_type"] == "kernel_info_reply")
        assert msgs[-1]["channel"] == "shell"
        assert msgs[-1]["parent_header"]["msg_id"] == info["header"]["msg_id"]
        reply, seen = await execute(ws, "print('hello gateway')")
        assert reply["content"]["status"] == "ok"
        assert stdout_of(seen) == "hello gateway\n"
        assert {m["channel"] for m in seen} == {"shell", "iopub"}
        model = await gw.json("GET", f"api/kernels/{kid}")
        assert model["connections"] == 1
        await close_all(ws)


async def test_v1_protocol_when_asked() -> None:
    """A client offering v1.kernel.websocket.jupyter.org gets it, and binary v1 frames both ways."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        ws = await gw.ws(kid, v1=True)
        assert ws.selected_subprotocol == V1
        req = request("execute_request", {"code": "print(6 * 7)", "silent": False})
        parts = [json.dumps(req[k]).encode() for k in ("header", "parent_header", "metadata",
                                                        "content")]
        await ws.write_message(serialize_msg_to_ws_v1(parts, "shell"), binary=True)

        def decode(raw: Any) -> dict[str, Any]:
            assert isinstance(raw, bytes)
            channel, msg_list = deserialize_msg_from_ws_v1(raw)
            header = json.loads(msg_list[0])
            return {"channel": channel, "msg_type": header["msg_type"],
                    "parent_header": json.loads(msg_list[1]),
                    "content": json.loads(msg_list[3])}
        seen = await until(ws, lambda m: m["msg_type"] == "execute_reply", decode=decode)
        assert seen[-1]["channel"] == "shell"
        assert "42\n" in [m["content"].get("text") for m in seen if m["msg_type"] == "stream"] \
            or any(m["msg_type"] == "stream" for m in await until(
                ws, lambda m: m["msg_type"] == "stream", decode=decode))
        await close_all(ws)


async def test_replies_go_to_the_asker_and_iopub_to_all() -> None:
    """With two clients, only the one that asked gets the execute_reply; both get the output."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        a = await gw.ws(kid, session_id="sess-a")
        b = await gw.ws(kid, session_id="sess-b")
        await peers(gw, kid, 2)
        reply, seen_a = await execute(a, "print('shared')", session="sess-a")
        parent = reply["parent_header"]["msg_id"]
        seen_b = await until(b, lambda m: m["msg_type"] == "status"
                             and m["parent_header"].get("msg_id") == parent
                             and m["content"]["execution_state"] == "idle")
        assert stdout_of(seen_a) == stdout_of(seen_b) == "shared\n"
        assert all(m["channel"] == "iopub" for m in seen_b), [m["msg_type"] for m in seen_b]
        # b asks something; a must not see b's reply.
        reply_b, _ = await execute(b, "x = 1", session="sess-b")
        late = await until(a, lambda m: m["msg_type"] == "status"
                           and m["parent_header"].get("msg_id") == reply_b["parent_header"]["msg_id"]
                           and m["content"]["execution_state"] == "idle")
        assert not [m for m in late if m["channel"] == "shell"]
        assert (await gw.json("GET", f"api/kernels/{kid}"))["connections"] == 2
        await close_all(a, b)


async def test_reconnect_with_same_session_replays_missed_iopub() -> None:
    """A client that reconnects with its session_id gets the IOPub it missed; a new session does not."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        first = await gw.ws(kid, session_id="roaming")
        other = await gw.ws(kid, session_id="stayer")
        await peers(gw, kid, 2)
        await close_all(first)
        await peers(gw, kid, 1)
        _, seen = await execute(other, "print('while you were away')", session="stayer")
        assert stdout_of(seen) == "while you were away\n"
        back = await gw.ws(kid, session_id="roaming")
        replayed = await until(back, lambda m: m["msg_type"] == "stream")
        assert replayed[-1]["content"]["text"] == "while you were away\n"
        stranger = await gw.ws(kid, session_id="someone-new")
        _, fresh = await execute(stranger, "print('now')", session="someone-new")
        assert "while you were away" not in stdout_of(fresh)
        metrics = (await gw.fetch("GET", "metrics")).body.decode()
        assert "kernel_gateway_ws_replayed_total" in metrics
        await close_all(other, back, stranger)


async def test_automatic_restart_shows_restarting_then_kernel_back() -> None:
    """When the kernel dies, clients see status restarting, and the same socket then works on the new kernel."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        ws = await gw.ws(kid)
        old_pid = gw.server.supervisor.actor_of(kid).pid
        await ws.write_message(json.dumps(request("execute_request", {"code": "import os; os._exit(1)"})))
        await until(ws, lambda m: m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "restarting")
        # Sent while the kernel restarts: held until the new kernel's IOPub is live.
        _, seen = await execute(ws, "print('back')")
        assert stdout_of(seen) == "back\n"
        assert gw.server.supervisor.actor_of(kid).pid != old_pid
        await close_all(ws)


async def test_given_up_kernel_is_dead_with_a_reason() -> None:
    """When the policy gives up, clients get status dead and the model says dead with the exit code."""
    async with gateway(policy=RestartPolicy(max_restarts=0)) as gw:
        kid = await gw.new_kernel()
        ws = await gw.ws(kid)
        await ws.write_message(json.dumps(request("execute_request", {"code": "import os; os._exit(7)"})))
        await until(ws, lambda m: m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "dead")
        model = await gw.json("GET", f"api/kernels/{kid}")
        assert model["execution_state"] == "dead"
        assert "7" in model["reason"], model
        assert kid in [m["id"] for m in await gw.json("GET", "api/kernels")]
        metrics = (await gw.fetch("GET", "metrics")).body.decode()
        assert 'kernel_gateway_kernel_deaths_total{cause="exit_7"} 1' in metrics
        assert (await gw.fetch("DELETE", f"api/kernels/{kid}")).code == 204
        assert (await gw.fetch("GET", f"api/kernels/{kid}")).code == 404
        assert await ws.read_message() is None  # closed by the DELETE
        await close_all(ws)


async def test_garbage_frames_are_dropped_and_counted() -> None:
    """Undecodable frames are dropped and counted; the same connection then still executes."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        ws = await gw.ws(kid)
        bad: list[str | bytes] = ["not json", "[1,2]", json.dumps({"channel": "shell"}),
                                  json.dumps({**request("execute_request"), "channel": "iopub"}),
                                  json.dumps({**request("execute_request"), "channel": "nope"}),
                                  b"\x00\x00\x00\x09garbage", struct.pack("!II", 1, 2)]
        for frame in bad:
            await ws.write_message(frame, binary=isinstance(frame, bytes))
        _, seen = await execute(ws, "print('still fine')")
        assert stdout_of(seen) == "still fine\n"
        assert gw.server.app.gateway.metrics.value("ws_dropped", reason="garbage") == len(bad)  # type: ignore[union-attr]
        await close_all(ws)


async def test_oversized_frame_closes_only_that_connection() -> None:
    """A frame above max_message_size closes that socket with 1009; another client keeps working."""
    async with gateway(max_message_size=4096) as gw:
        kid = await gw.new_kernel()
        big = await gw.ws(kid)
        small = await gw.ws(kid)
        await big.write_message(json.dumps(request("execute_request", {"code": "#" + "x" * 8000})))
        while await big.read_message() is not None:
            pass
        assert big.close_code == 1009
        _, seen = await execute(small, "print('ok')")
        assert stdout_of(seen) == "ok\n"
        await close_all(small, big)


async def test_slow_client_is_bounded_and_does_not_slow_others() -> None:
    """A client that never reads gets IOPub dropped past its budget (memory stays bounded) while another client and the kernel carry on."""
    budget = 1024 * 1024
    async with gateway(client_buffer=budget) as gw:
        kid = await gw.new_kernel()
        slow = await gw.ws(kid, session_id="slow")
        fast = await gw.ws(kid, session_id="fast")
        await peers(gw, kid, 2)
        bridge = gw.server.app.gateway.bridges[kid]  # type: ignore[union-attr]
        slow_peer = next(p for p in bridge.peers.values() if p.session_id == "slow")
        high = 0
        code = "for i in range(400):\n    print(str(i).rjust(20000, '.'))"
        req = request("execute_request", {"code": code, "silent": False}, session="fast")
        await fast.write_message(json.dumps(req))
        lines = 0
        while True:
            msg = await recv_json(fast, timeout=60)
            high = max(high, slow_peer.queued_bytes)
            if msg["msg_type"] == "stream":
                lines += msg["content"]["text"].count("\n")
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                    and msg["parent_header"].get("msg_id") == req["header"]["msg_id"]:
                break
        assert lines > 0
        assert slow_peer.dropped > 0
        assert high <= 2 * budget
        assert not slow_peer.closed  # only droppable output was over budget
        assert gw.server.app.gateway.metrics.value("ws_dropped", reason="slow_client") > 0  # type: ignore[union-attr]
        # The slow client, reading at last, still gets the final idle status (never dropped).
        await until(slow, lambda m: m["msg_type"] == "status"
                    and m["parent_header"].get("msg_id") == req["header"]["msg_id"]
                    and m["content"]["execution_state"] == "idle", timeout=60)
        await close_all(fast, slow)


async def test_websocket_refuses_bad_token_and_foreign_origin() -> None:
    """The channels socket refuses a missing or wrong token (401) and, with allow_origin, another origin (403)."""
    async with gateway(allow_origin="https://ok.example") as gw:
        kid = await gw.new_kernel()
        for token in ("", "nope"):
            with pytest.raises(HTTPClientError) as err:
                await gw.ws(kid, token=token)
            assert err.value.code == 401
        url = f"{gw.ws_url}api/kernels/{kid}/channels?token={TOKEN}"
        with pytest.raises(HTTPClientError) as err:
            await websocket_connect(HTTPRequest(url, headers={"Origin": "https://evil.example"}))
        assert err.value.code == 403
        ok = await websocket_connect(HTTPRequest(url, headers={"Origin": "https://ok.example"}))
        await close_all(ok)
        with pytest.raises(HTTPClientError) as err:
            await gw.ws("00000000-0000-0000-0000-000000000000")
        assert err.value.code == 404


async def test_input_request_goes_to_the_asking_client_only() -> None:
    """ipykernel's input() reaches only the client that ran the cell (stdin channel), and its input_reply is answered."""
    async with gateway(default_kernel_name="python3") as gw:
        kid = await gw.new_kernel("python3")
        asker = await gw.ws(kid, session_id="asker")
        other = await gw.ws(kid, session_id="other")
        await peers(gw, kid, 2)
        req = request("execute_request", {"code": "print('hello', input('name? '))",
                                          "silent": False, "allow_stdin": True},
                      session="asker")
        await asker.write_message(json.dumps(req))
        prompt = (await until(asker, lambda m: m["msg_type"] == "input_request"))[-1]
        assert prompt["channel"] == "stdin" and prompt["content"]["prompt"] == "name? "
        answer = request("input_reply", {"value": "gateway"}, session="asker", channel="stdin")
        answer["parent_header"] = prompt["header"]
        await asker.write_message(json.dumps(answer))
        seen = await until(asker, lambda m: m["msg_type"] == "stream")
        assert seen[-1]["content"]["text"] == "hello gateway\n"
        others = await until(other, lambda m: m["msg_type"] == "status"
                             and m["parent_header"].get("msg_id") == req["header"]["msg_id"]
                             and m["content"]["execution_state"] == "idle")
        assert not [m for m in others if m["channel"] != "iopub"]
        await close_all(asker, other)


async def test_client_vanishing_mid_frame_harms_nobody() -> None:
    """A client that sends half a WebSocket frame and drops the TCP connection is forgotten; another client keeps working."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        good = await gw.ws(kid)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
        writer.write((f"GET /api/kernels/{kid}/channels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      f"Sec-WebSocket-Version: 13\r\nAuthorization: token {TOKEN}\r\n\r\n"
                      ).encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        assert b"101" in status
        await peers(gw, kid, 2)
        # A masked text frame announcing 1000 bytes, with only 10 of them sent.
        writer.write(bytes([0x81, 0x80 | 126]) + (1000).to_bytes(2, "big") + b"mask" + b"x" * 10)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await peers(gw, kid, 1)
        _, seen = await execute(good, "print('unharmed')")
        assert stdout_of(seen) == "unharmed\n"
        await close_all(good)


async def test_client_that_never_reads_is_closed_when_even_replies_pile_up() -> None:
    """Once a stalled client's must-deliver messages pass twice its budget the gateway closes it (1013); the kernel and the other client go on."""
    budget = 64 * 1024
    async with gateway(client_buffer=budget) as gw:
        kid = await gw.new_kernel()
        stalled = await gw.ws(kid, session_id="stalled")
        worker = await gw.ws(kid, session_id="worker")
        await peers(gw, kid, 2)
        bridge = gw.server.app.gateway.bridges[kid]  # type: ignore[union-attr]
        stalled_peer = next(p for p in bridge.peers.values() if p.session_id == "stalled")
        # execute_input echoes each cell's code to every client and is never dropped:
        # big cells fill the stalled client's TCP buffers, then its queue.
        big = "pass  # " + "x" * 200_000
        while not stalled_peer.closed:
            await execute(worker, big, session="worker")
        await peers(gw, kid, 1)
        assert gw.server.app.gateway.metrics.value("ws_closed", reason="slow_client") == 1  # type: ignore[union-attr]
        _, seen = await execute(worker, "print('still here')", session="worker")
        assert stdout_of(seen) == "still here\n"
        stalled.protocol.stream.close()  # type: ignore[union-attr]  # never read: just hang up
        await close_all(worker, stalled)

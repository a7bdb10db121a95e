"""``python -m benchmarks.gateway``: our gateway beside Jupyter Kernel Gateway 3.x.

    python -m benchmarks.gateway [--runs N] [--round-trips N] [--lines N] [--flushed N] [--hold N]
                                 [--prespawn N] [--kernel NAME] [--out DIR]

Both gateways run as separate processes on 127.0.0.1 (ours: ``python -m
supervisor gateway``; Kernel Gateway: ``python -m kernel_gateway``), each with
the same kernelspec and a token, and this process is the client of both, over
HTTP and WebSocket exactly as jupyter_server's gateway client is. Samples are
interleaved (ours, then Kernel Gateway). Rows:

* ``create_first_output_cold``: ``POST /api/kernels`` -> WebSocket open ->
  ``execute_request`` -> the first ``stream`` output, no prespawned kernels;
* ``create_first_output_warm``: the same with ``--prespawn`` kernels (ours:
  ``--prespawn NAME=N``; Kernel Gateway: ``prespawn_count=N``), each sample
  waiting for the pool to be full again first;
* ``ws_round_trip_p50`` / ``_p99``: ``execute_request`` (``pass``) ->
  ``execute_reply`` over the WebSocket, and the same over a direct ZMQ client
  (our ``KernelClient``) as the floor;
* ``iopub_lines_per_s``: a cell printing ``--lines`` lines, lines/s from the
  request to the idle status, and the stream messages that carried them
  (ipykernel batches prints, so this is mostly the kernel's speed);
* ``iopub_flushed``: a cell flushing each of ``--flushed`` lines, so each is
  its own message: messages/s through the gateway;
* ``hold_rss_mb`` / ``hold_idle_cpu``: the gateway process's RSS and CPU (%
  of one core over 5 s) while holding ``--hold`` idle kernels.

Results: ``DIR/gateway.json`` (every sample) and ``DIR/gateway.md`` (the table,
also printed). Gateway logs go to ``DIR/gateway-*.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

TOKEN = "bench-token"
CONTENDERS = ("ours", "kernel_gateway")
AUTH = {"Authorization": f"token {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Gateway:
    """One gateway process and a client for it."""

    def __init__(self, kind: str, kernel: str, prespawn: int, out: Path) -> None:
        self.kind, self.kernel, self.prespawn = kind, kernel, prespawn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.ws_url = f"ws://127.0.0.1:{self.port}/"
        self.log = out / f"gateway-{kind}{'-warm' if prespawn else ''}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = AsyncHTTPClient(force_instance=True)

    def argv(self) -> list[str]:
        if self.kind == "ours":
            argv = [sys.executable, "-m", "supervisor", "--log-level", "warning", "gateway",
                    "--ip", "127.0.0.1", "--port", str(self.port), "--token", TOKEN,
                    "--default-kernel-name", self.kernel]
            if self.prespawn:
                argv += ["--prespawn", f"{self.kernel}={self.prespawn}"]
            return argv
        return [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}", f"--KernelGatewayApp.auth_token={TOKEN}",
                f"--KernelGatewayApp.default_kernel_name={self.kernel}",
                f"--KernelGatewayApp.prespawn_count={self.prespawn or 0}"]

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "KG_LIST_KERNELS": "True"}
        with open(self.log, "wb") as log:
            return subprocess.Popen(self.argv(), env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.proc = self.spawn()
        deadline = time.monotonic() + 60
        while True:  # the harness polls: neither gateway announces readiness otherwise
            try:
                await self.get("api")
                break
            except (ConnectionError, HTTPClientError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} did not start; see {self.log}") from None
                await asyncio.sleep(0.05)
        await self.pool_full()

    async def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def get(self, path: str) -> Any:
        resp = await self.http.fetch(HTTPRequest(self.url + path, headers=AUTH,
                                                 request_timeout=120))
        body = resp.body.decode()
        return json.loads(body) if body.startswith(("{", "[")) else body

    async def send(self, method: str, path: str, body: Any = None) -> Any:
        resp = await self.http.fetch(HTTPRequest(
            self.url + path, method=method, headers=AUTH, request_timeout=120,
            body=None if method == "DELETE" else json.dumps(body or {})))
        return json.loads(resp.body) if resp.body else None

    async def pool_full(self) -> None:
        """Wait (polling) until the prespawned kernels are all ready."""
        if not self.prespawn:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.kind == "ours":
                text = await self.get("metrics")
                m = re.search(r'kernel_gateway_pool_ready\{kernel_name="[^"]+"\} (\d+)', text)
                if m and int(m.group(1)) >= self.prespawn:
                    return
            else:
                try:
                    if len(await self.get("api/kernels")) >= self.prespawn:
                        return
                except HTTPClientError:  # Kernel Gateway 3.0.1 answers 500 while they start
                    pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind}: the pool never filled")

    async def ws(self, kernel_id: str) -> WebSocketClientConnection:
        ws = await websocket_connect(HTTPRequest(
            f"{self.ws_url}api/kernels/{kernel_id}/channels?session_id={uuid.uuid4()}",
            headers=AUTH, request_timeout=120), max_message_size=256 * 1024 * 1024)
        # A browser sends each frame at once; without this the client's Nagle
        # and the server's delayed ACK add 40 ms to every round trip, for both.
        stream = getattr(ws.protocol, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)
        return ws


def execute_msg(code: str) -> tuple[str, str]:
    msg_id = str(uuid.uuid4())
    msg = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "bench",
                      "username": "bench", "version": "5.3",
                      "date": "2026-01-01T00:00:00.000000Z"},
           "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
           "content": {"code": code, "silent": False, "store_history": False,
                       "user_expressions": {}, "allow_stdin": False}}
    return msg_id, json.dumps(msg)


async def until(ws: WebSocketClientConnection, msg_id: str, kinds: set[str],
                timeout: float = 120) -> tuple[dict[str, Any], int, int]:
    """Read until a message of ``kinds`` answering ``msg_id``; (it, streams, lines seen)."""
    streams = lines = 0

    async def loop() -> dict[str, Any]:
        nonlocal streams, lines
        while True:
            raw = await ws.read_message()
            if raw is None:
                raise RuntimeError("websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                streams += 1
                lines += msg["content"]["text"].count("\n")
            if kind in kinds or (kind == "status" and msg["content"]["execution_state"]
                                 in kinds):
                return msg
    msg = await asyncio.wait_for(loop(), timeout)
    return msg, streams, lines


async def create_first_output(gw: Gateway) -> float:
    t0 = time.perf_counter()
    model = await gw.send("POST", "api/kernels", {"name": gw.kernel})
    ws = await gw.ws(model["id"])
    msg_id, text = execute_msg("print('first')")
    await ws.write_message(text)
    await until(ws, msg_id, {"stream"})
    elapsed = time.perf_counter() - t0
    ws.close()
    await gw.send("DELETE", f"api/kernels/{model['id']}")
    return elapsed


async def round_trips(gw: Gateway, n: int) -> list[float]:
    model = await gw.send("POST", "api/kernels", {"name": gw.kernel})
    ws = await gw.ws(model["id"])
    out = []
    for i in range(n + 5):
        msg_id, text = execute_msg("pass")
        t0 = time.perf_counter()
        await ws.write_message(text)
        await until(ws, msg_id, {"execute_reply"})
        if i >= 5:  # the first few warm the kernel and the path up
            out.append(time.perf_counter() - t0)
    ws.close()
    await gw.send("DELETE", f"api/kernels/{model['id']}")
    return out


async def direct_round_trips(kernel: str, n: int) -> list[float]:
    from supervisor.supervisor import Supervisor

    out = []
    async with Supervisor() as sup:
        kid = await sup.start_kernel(kernel)
        kc = sup.get_kernel(kid).client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            for i in range(n + 5):
                t0 = time.perf_counter()
                await kc.execute("pass", reply=True, timeout=60)
                if i >= 5:
                    out.append(time.perf_counter() - t0)
        finally:
            kc.stop_channels()
    return out


async def iopub(gw: Gateway, lines: int, flush: bool = False) -> dict[str, float]:
    model = await gw.send("POST", "api/kernels", {"name": gw.kernel})
    ws = await gw.ws(model["id"])
    body = "print(i); sys.stdout.flush()" if flush else "print(i)"
    msg_id, text = execute_msg(f"import sys\nfor i in range({lines}):\n    {body}")
    t0 = time.perf_counter()
    await ws.write_message(text)
    _, streams, got = await until(ws, msg_id, {"idle"}, timeout=120)
    elapsed = time.perf_counter() - t0
    ws.close()
    await gw.send("DELETE", f"api/kernels/{model['id']}")
    return {"seconds": elapsed, "lines": got, "messages": streams,
            "lines_per_s": got / elapsed, "messages_per_s": streams / elapsed}


async def hold(gw: Gateway, count: int) -> dict[str, float]:
    assert gw.proc is not None
    proc = psutil.Process(gw.proc.pid)
    rss0 = proc.memory_info().rss
    ids: list[str] = []
    sem = asyncio.Semaphore(4)

    async def one() -> None:
        async with sem:
            ids.append((await gw.send("POST", "api/kernels", {"name": gw.kernel}))["id"])
    await asyncio.gather(*(one() for _ in range(count)))
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
    await asyncio.sleep(5.0)  # the idle window being measured
    cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0) * 100
    rss = proc.memory_info().rss
    for kid in ids:
        await gw.send("DELETE", f"api/kernels/{kid}")
    return {"rss_mb": rss / 2**20, "rss_growth_mb": (rss - rss0) / 2**20, "idle_cpu": cpu,
            "kernels": len(ids)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def gateways(kernel: str, prespawn: int, out: Path) -> AsyncIterator[list[Gateway]]:
    gws = [Gateway(kind, kernel, prespawn, out) for kind in CONTENDERS]
    try:
        for gw in gws:
            await gw.start()
        yield gws
    finally:
        for gw in gws:
            await gw.stop()


async def sample(into: dict[str, Any], row: str, work: Any) -> None:
    """Record one timed sample, or its failure (counted beside the row, never hidden)."""
    try:
        into.setdefault(row, []).append(await work)
    except Exception as exc:
        into.setdefault(f"{row}_failed", []).append(f"{type(exc).__name__}: {exc}")


async def measure(into: dict[str, Any], row: str, work: Any) -> None:
    """Run one measurement; a failure (e.g. a timeout) is recorded as the row's result."""
    try:
        into[row] = await work
    except Exception as exc:
        into[row] = {"failed": f"{type(exc).__name__}: {exc}"}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    samples: dict[str, dict[str, Any]] = {c: {} for c in (*CONTENDERS, "direct_zmq")}
    async with gateways(args.kernel, 0, out) as gws:
        for gw in gws:  # one discarded warm-up each
            await create_first_output(gw)
        for _ in range(args.runs):
            for gw in gws:
                await sample(samples[gw.kind], "cold", create_first_output(gw))
        for gw in gws:
            await measure(samples[gw.kind], "round_trips", round_trips(gw, args.round_trips))
            await measure(samples[gw.kind], "iopub", iopub(gw, args.lines))
            await measure(samples[gw.kind], "iopub_flushed", iopub(gw, args.flushed, flush=True))
        for gw in gws:
            await measure(samples[gw.kind], "hold", hold(gw, args.hold))
    samples["direct_zmq"]["round_trips"] = await direct_round_trips(args.kernel,
                                                                    args.round_trips)
    async with gateways(args.kernel, args.prespawn, out) as gws:
        for _ in range(args.runs):
            for gw in gws:
                await gw.pool_full()
                await sample(samples[gw.kind], "warm", create_first_output(gw))
    return samples


def table(samples: dict[str, Any], args: argparse.Namespace) -> str:
    def ms(v: float) -> str:
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    ours, kg, direct = samples["ours"], samples["kernel_gateway"], samples["direct_zmq"]

    def get(c: dict[str, Any], row: str, key: str, fmt: str) -> str:
        value = c.get(row)
        if isinstance(value, dict) and "failed" in value:
            return f"FAILED: {value['failed'][:60]}"
        if isinstance(value, list):
            return fmt.format(pct(value, float(key)) * 1000)
        return fmt.format(value[key]) if value else "-"

    def med(c: dict[str, Any], row: str) -> str:
        failed = len(c.get(f"{row}_failed", []))
        text = ms(statistics.median(c[row])) if c.get(row) else "-"
        return f"{text} ({failed} of {failed + len(c.get(row, []))} failed)" if failed else text
    rows = [
        ("create + first output, cold (median)", med(ours, "cold"), med(kg, "cold"), ""),
        (f"create + first output, warm pool of {args.prespawn} (median)",
         med(ours, "warm"), med(kg, "warm"), ""),
        *((f"WebSocket execute round trip p{q}", *(get(c, "round_trips", f"0.{q}", "{:.1f} ms")
                                                    for c in (ours, kg, direct)))
          for q in (50, 99)),
        (f"IOPub: {args.lines} printed lines, lines/s",
         *(get(c, "iopub", "lines_per_s", "{:,.0f}") for c in (ours, kg)), ""),
        ("IOPub: stream messages/s (the kernel batches prints)",
         *(get(c, "iopub", "messages_per_s", "{:,.0f}") for c in (ours, kg)), ""),
        (f"IOPub: {args.flushed} lines flushed one by one, messages/s",
         *(get(c, "iopub_flushed", "messages_per_s", "{:,.0f}") for c in (ours, kg)), ""),
        (f"gateway RSS holding {args.hold} idle kernels",
         *(get(c, "hold", "rss_mb", "{:.0f} MB") for c in (ours, kg)), ""),
        (f"gateway idle CPU with {args.hold} kernels (% of a core)",
         *(get(c, "hold", "idle_cpu", "{:.2f} %") for c in (ours, kg)), ""),
    ]
    lines = ["| row | ours | Kernel Gateway 3.x | direct ZMQ client |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--round-trips", type=int, default=200)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--flushed", type=int, default=5_000)
    p.add_argument("--hold", type=int, default=50)
    p.add_argument("--prespawn", type=int, default=2)
    p.add_argument("--kernel", default="python3")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = asyncio.run(main_async(args))
    text = table(samples, args)
    from importlib.metadata import version

    meta = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "kernel_gateway": version("jupyter-kernel-gateway"), "args": vars(args) | {
                "out": str(args.out)}}
    (args.out / "gateway.json").write_text(json.dumps({"meta": meta, "samples": samples},
                                                      indent=1))
    (args.out / "gateway.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests of tests/kernels/fakekernel.py: a real kernel process that misbehaves on request.

Each test starts the script by hand with a connection file written here and talks
to it with supervisor.wire and pyzmq directly (no supervisor code involved).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from supervisor.errors import FrameError, SignatureError, WireError
from supervisor.wire import Message, Session

FAKEKERNEL = Path(__file__).resolve().parent / "kernels" / "fakekernel.py"
TIMEOUT = 10.0  # generous deadline for anything that should happen at once
QUIET = 0.5  # how long to listen when proving that nothing arrives
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Kernel:
    """One fakekernel process plus client sockets connected to it."""

    def __init__(self, tmp_path: Path, flags: tuple[str, ...], transport: str = "tcp") -> None:
        self.key = secrets.token_hex(16).encode()
        ports = _free_ports(5) if transport == "tcp" else [1, 2, 3, 4, 5]
        self.conn: dict[str, Any] = dict(zip([f"{c}_port" for c in CHANNELS], ports, strict=True))
        ip = "127.0.0.1" if transport == "tcp" else str(tmp_path / f"ipc-{secrets.token_hex(4)}")
        self.conn.update(ip=ip, transport=transport, key=self.key.decode(),
                         signature_scheme="hmac-sha256", kernel_name="fake")
        self.conn_file = tmp_path / f"kernel-{secrets.token_hex(4)}.json"
        self.conn_file.write_text(json.dumps(self.conn))
        self.session = Session(key=self.key)
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []
        self.shell = self._connect(zmq.DEALER, "shell")
        self.control = self._connect(zmq.DEALER, "control")
        self.iopub = self._connect(zmq.SUB, "iopub")
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.hb = self._connect(zmq.REQ, "hb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKEKERNEL), "-f", str(self.conn_file), *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _connect(self, kind: int, channel: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.linger = 0
        port = self.conn[f"{channel}_port"]
        if self.conn["transport"] == "ipc":
            sock.connect(f"ipc://{self.conn['ip']}-{port}")
        else:
            sock.connect(f"tcp://127.0.0.1:{port}")
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        """Kill the process if it still runs, reap it, close every socket and file."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        for sock in self.sockets:
            sock.close()
        self.ctx.term()
        self.conn_file.unlink(missing_ok=True)
        if self.conn["transport"] == "ipc":
            for channel in CHANNELS:
                Path(f"{self.conn['ip']}-{self.conn[f'{channel}_port']}").unlink(missing_ok=True)

    def stderr(self) -> str:
        """Everything the (exited) process wrote to stderr."""
        assert self.proc.stderr is not None and self.proc.poll() is not None
        return self.proc.stderr.read().decode()

    def send(self, sock: zmq.Socket[bytes], msg_type: str, content: dict[str, Any] | None = None
             ) -> Message:
        """Send a request; return it (its msg_id is the parent of what follows)."""
        msg = self.session.msg(msg_type, content or {})
        self.session.send(sock, msg)
        return msg

    def recv(self, sock: zmq.Socket[bytes], timeout: float = TIMEOUT) -> Message | None:
        """The next valid message on ``sock``, or None when none arrives in time."""
        return self.session.recv(sock, timeout=timeout)

    def reply(self, sock: zmq.Socket[bytes], request: Message, timeout: float = TIMEOUT
              ) -> Message:
        """The reply to ``request`` (other replies are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(sock, left)
            if msg is not None and msg.parent_id == request.msg_id:
                return msg
        raise AssertionError(f"no reply to {request.msg_type} within {timeout}s")

    def iopub_until(self, done: Callable[[Message], bool], timeout: float = TIMEOUT
                    ) -> list[Message]:
        """iopub messages up to and including the first one for which ``done`` is true."""
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(self.iopub, left)
            if msg is not None:
                seen.append(msg)
                if done(msg):
                    return seen
        raise AssertionError(f"iopub condition not met within {timeout}s: {seen}")

    def wait_welcome(self) -> Message:
        """Wait until our iopub subscription is confirmed by an iopub_welcome."""
        return self.iopub_until(lambda m: m.msg_type == "iopub_welcome")[-1]

    def execute(self, code: str) -> Message:
        """Send an execute_request for ``code``."""
        return self.send(self.shell, "execute_request", {
            "code": code, "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
        })

    def idle_after(self, request: Message) -> list[Message]:
        """iopub messages up to the idle status that ends ``request``."""
        return self.iopub_until(lambda m: m.msg_type == "status"
                                and m.parent_id == request.msg_id
                                and m.content["execution_state"] == "idle")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    """Start fakekernels with the given flags; all are killed and closed afterwards."""
    kernels: list[Kernel] = []

    def _start(*flags: str, transport: str = "tcp") -> Kernel:
        kernels.append(Kernel(tmp_path, flags, transport))
        return kernels[-1]

    try:
        yield _start
    finally:
        for k in kernels:
            k.close()


SLEEPER = "print('started')\nimport time\ntime.sleep(30)\nprint('not reached')"


def _cmdline(pid: int) -> list[bytes]:
    """The argv of ``pid``, once its exec has finished (it is empty for a moment during exec)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if argv != [b""]:
            return argv
    raise AssertionError(f"pid {pid} has no command line")


def _wait_started(k: Kernel) -> Message:
    """Execute SLEEPER and wait until its 'started' line is on iopub."""
    k.wait_welcome()
    req = k.execute(SLEEPER)
    k.iopub_until(lambda m: m.msg_type == "stream" and m.content["text"] == "started\n")
    return req


# -- a kernel that behaves -----------------------------------------------------


def test_kernel_info_reply(start: Callable[..., Kernel]) -> None:
    """kernel_info_request gets a 5.4 reply from "fakekernel", framed by busy/idle."""
    k = start()
    welcome = k.wait_welcome()
    assert welcome.content == {"subscription": ""}
    req = k.send(k.shell, "kernel_info_request")
    reply = k.reply(k.shell, req)
    assert reply.msg_type == "kernel_info_reply"
    assert reply.content["protocol_version"] == "5.4"
    assert reply.content["implementation"] == "fakekernel"
    assert reply.content["language_info"]["name"] == "python"
    states = [m.content["execution_state"] for m in k.idle_after(req) if m.msg_type == "status"]
    assert states == ["busy", "idle"]


def test_execute_print_streams_stdout(start: Callable[..., Kernel]) -> None:
    """Executing print(1) publishes a stdout stream "1\\n" and replies ok with count 1."""
    k = start()
    k.wait_welcome()
    req = k.execute("print(1)")
    reply = k.reply(k.shell, req)
    assert reply.content["status"] == "ok"
    assert reply.content["execution_count"] == 1
    seen = k.idle_after(req)
    assert [m.msg_type for m in seen] == ["status", "execute_input", "stream", "status"]
    assert seen[2].content == {"name": "stdout", "text": "1\n"}
    assert seen[2].parent_id == req.msg_id


def test_execute_error_reply(start: Callable[..., Kernel]) -> None:
    """Code that raises gets an error reply and an iopub error with ename/evalue/traceback."""
    k = start()
    k.wait_welcome()
    req = k.execute("x = 1\n1 / 0")
    reply = k.reply(k.shell, req)
    assert reply.content["status"] == "error"
    assert reply.content["ename"] == "ZeroDivisionError"
    assert reply.content["evalue"] == "division by zero"
    assert reply.content["traceback"][-1] == "ZeroDivisionError: division by zero"
    errors = [m for m in k.idle_after(req) if m.msg_type == "error"]
    assert errors[0].content["ename"] == "ZeroDivisionError"


def test_heartbeat_echoes(start: Callable[..., Kernel]) -> None:
    """The hb channel echoes what it is sent."""
    k = start()
    k.hb.send(b"ping")
    assert k.hb.poll(int(TIMEOUT * 1000))
    assert k.hb.recv() == b"ping"


def test_shutdown_request_exits_zero(start: Callable[..., Kernel]) -> None:
    """shutdown_request on control gets a shutdown_reply, then the process exits 0."""
    k = start()
    req = k.send(k.control, "shutdown_request", {"restart": False})
    reply = k.reply(k.control, req)
    assert reply.content == {"status": "ok", "restart": False}
    assert k.proc.wait(timeout=TIMEOUT) == 0


def test_shutdown_with_exit_code(start: Callable[..., Kernel]) -> None:
    """With --exit-code 5 a shutdown_request makes the process exit 5."""
    k = start("--exit-code", "5")
    k.reply(k.control, k.send(k.control, "shutdown_request", {"restart": False}))
    assert k.proc.wait(timeout=TIMEOUT) == 5


def test_shutdown_during_execution(start: Callable[..., Kernel]) -> None:
    """A shutdown_request stops running code and the process exits 0 at once."""
    k = start()
    req = _wait_started(k)
    k.reply(k.control, k.send(k.control, "shutdown_request", {"restart": False}))
    assert k.reply(k.shell, req).content["ename"] == "KeyboardInterrupt"
    assert k.proc.wait(timeout=TIMEOUT) == 0


def test_interrupt_request_interrupts_code(start: Callable[..., Kernel]) -> None:
    """interrupt_request on control ends running code with a KeyboardInterrupt error reply."""
    k = start()
    req = _wait_started(k)
    interrupt = k.send(k.control, "interrupt_request")
    assert k.reply(k.control, interrupt).msg_type == "interrupt_reply"
    reply = k.reply(k.shell, req)
    assert reply.content["status"] == "error"
    assert reply.content["ename"] == "KeyboardInterrupt"
    assert k.reply(k.shell, k.execute("print(2)")).content["status"] == "ok"


def test_sigint_interrupts_code(start: Callable[..., Kernel]) -> None:
    """SIGINT ends running code with a KeyboardInterrupt error reply; the kernel lives on."""
    k = start()
    req = _wait_started(k)
    k.proc.send_signal(signal.SIGINT)
    assert k.reply(k.shell, req).content["ename"] == "KeyboardInterrupt"
    k.proc.send_signal(signal.SIGINT)  # idle: ignored
    assert k.reply(k.shell, k.execute("print(2)")).content["status"] == "ok"


def test_sigterm_kills(start: Callable[..., Kernel]) -> None:
    """By default SIGTERM kills the kernel."""
    k = start()
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    k.proc.send_signal(signal.SIGTERM)
    assert k.proc.wait(timeout=TIMEOUT) == -signal.SIGTERM


def test_pid_file(start: Callable[..., Kernel], tmp_path: Path) -> None:
    """--pid-file holds the kernel's own pid."""
    pid_file = tmp_path / "kernel.pid"
    k = start("--pid-file", str(pid_file))
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    assert pid_file.read_text() == f"{k.proc.pid}\n"


# -- a kernel that misbehaves --------------------------------------------------


def test_crash_on_start(start: Callable[..., Kernel]) -> None:
    """--crash-on-start exits 3 with a line on stderr."""
    k = start("--crash-on-start")
    assert k.proc.wait(timeout=TIMEOUT) == 3
    assert "fakekernel: crashing on start" in k.stderr()


def test_exit_after(start: Callable[..., Kernel]) -> None:
    """--exit-after 0.2 --exit-code 7 exits 7 by itself, not before 0.2 s."""
    k = start("--exit-after", "0.2", "--exit-code", "7")
    assert k.proc.wait(timeout=TIMEOUT) == 7
    assert time.monotonic() - k.started >= 0.2


def test_spawn_grandchild(start: Callable[..., Kernel], tmp_path: Path) -> None:
    """--spawn-grandchild starts a sleep in the kernel's process group and reports its pid."""
    pid_file = tmp_path / "pids"
    k = start("--spawn-grandchild", "--pid-file", str(pid_file))
    grandchild = 0
    try:
        assert k.proc.stderr is not None
        line = k.proc.stderr.readline().decode()
        assert line.startswith("grandchild pid ")
        grandchild = int(line.split()[-1])
        assert pid_file.read_text() == f"{k.proc.pid}\n{grandchild}\n"
        assert os.getpgid(grandchild) == os.getpgid(k.proc.pid) == k.proc.pid
        assert _cmdline(grandchild)[:2] == [b"sleep", b"600"]
    finally:
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)


def test_ignore_shutdown(start: Callable[..., Kernel]) -> None:
    """--ignore-shutdown: no shutdown_reply, and the kernel keeps answering."""
    k = start("--ignore-shutdown")
    k.send(k.control, "shutdown_request", {"restart": False})
    assert k.recv(k.control, QUIET) is None
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    assert k.proc.poll() is None


def test_ignore_sigterm(start: Callable[..., Kernel]) -> None:
    """--ignore-sigterm survives SIGTERM and still answers."""
    k = start("--ignore-sigterm")
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    k.proc.send_signal(signal.SIGTERM)  # discarded when sent: the disposition is SIG_IGN
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    assert k.proc.poll() is None


def test_ignore_sigint(start: Callable[..., Kernel]) -> None:
    """--ignore-sigint: SIGINT does not interrupt code, but interrupt_request still does."""
    k = start("--ignore-sigint")
    req = _wait_started(k)
    k.proc.send_signal(signal.SIGINT)
    assert k.recv(k.shell, QUIET) is None
    k.reply(k.control, k.send(k.control, "interrupt_request"))
    assert k.reply(k.shell, req).content["ename"] == "KeyboardInterrupt"


def test_never_ready(start: Callable[..., Kernel]) -> None:
    """--never-ready binds (welcome, heartbeat) but never answers shell; control still works."""
    k = start("--never-ready")
    k.wait_welcome()
    k.hb.send(b"ping")
    assert k.hb.poll(int(TIMEOUT * 1000))
    assert k.hb.recv() == b"ping"
    k.send(k.shell, "kernel_info_request")
    assert k.recv(k.shell, QUIET) is None
    k.reply(k.control, k.send(k.control, "shutdown_request", {"restart": False}))
    assert k.proc.wait(timeout=TIMEOUT) == 0


def test_slow_start(start: Callable[..., Kernel]) -> None:
    """--slow-start 0.3 answers, but only after 0.3 s."""
    k = start("--slow-start", "0.3")
    k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
    assert time.monotonic() - k.started >= 0.3


def test_bind_fail(start: Callable[..., Kernel]) -> None:
    """--bind-fail exits 1 with zmq's "Address already in use" on stderr."""
    k = start("--bind-fail")
    assert k.proc.wait(timeout=TIMEOUT) == 1
    assert "Address already in use" in k.stderr()


def test_bad_signature(start: Callable[..., Kernel]) -> None:
    """--bad-signature replies fail HMAC verification."""
    k = start("--bad-signature")
    k.send(k.shell, "kernel_info_request")
    with pytest.raises(SignatureError):
        k.recv(k.shell)


def test_truncated_frames(start: Callable[..., Kernel]) -> None:
    """--truncated-frames replies are too short to parse."""
    k = start("--truncated-frames")
    k.send(k.shell, "kernel_info_request")
    with pytest.raises(FrameError):
        k.recv(k.shell)


def test_garbage_iopub(start: Callable[..., Kernel]) -> None:
    """--garbage-iopub 3 publishes 3 unparseable messages before each status."""
    k = start("--garbage-iopub", "3")
    k.wait_welcome()
    req = k.send(k.shell, "kernel_info_request")
    parsed: list[Message | None] = []
    while not parsed or parsed[-1] is None or parsed[-1].msg_type != "status":
        assert k.iopub.poll(int(TIMEOUT * 1000))
        try:
            parsed.append(k.session.deserialize(k.iopub.recv_multipart()))
        except WireError:
            parsed.append(None)
    assert parsed[:3] == [None, None, None]
    busy = parsed[3]
    assert busy is not None and busy.parent_id == req.msg_id
    assert busy.content == {"execution_state": "busy"}
    k.reply(k.shell, req)


def test_flood_iopub(start: Callable[..., Kernel]) -> None:
    """--flood-iopub 200 publishes 200 stream messages on each execute."""
    k = start("--flood-iopub", "200")
    k.wait_welcome()
    req = k.execute("pass")
    streams = [m for m in k.idle_after(req) if m.msg_type == "stream"]
    assert [m.content["text"] for m in streams] == [f"flood {i}\n" for i in range(200)]
    assert k.reply(k.shell, req).content["status"] == "ok"


def test_no_welcome(start: Callable[..., Kernel]) -> None:
    """--no-welcome never sends iopub_welcome; retried kernel_info shows iopub is up."""
    k = start("--no-welcome")
    seen: list[Message] = []
    deadline = time.monotonic() + TIMEOUT
    while not any(m.msg_type == "status" for m in seen):
        assert time.monotonic() < deadline, "no status on iopub"
        k.reply(k.shell, k.send(k.shell, "kernel_info_request"))
        while (msg := k.recv(k.iopub, 0.05)) is not None:
            seen.append(msg)
    req = k.execute("print(1)")
    seen += k.idle_after(req)
    assert "iopub_welcome" not in {m.msg_type for m in seen}
    assert any(m.msg_type == "stream" and m.content["text"] == "1\n" for m in seen)


def test_ipc_transport(start: Callable[..., Kernel], tmp_path: Path) -> None:
    """Over ipc the kernel answers, and a clean shutdown removes its socket files."""
    k = start(transport="ipc")
    k.wait_welcome()
    assert k.reply(k.shell, k.execute("print(1)")).content["status"] == "ok"
    k.reply(k.control, k.send(k.control, "shutdown_request", {"restart": False}))
    assert k.proc.wait(timeout=TIMEOUT) == 0
    assert not list(tmp_path.glob("ipc-*"))


def test_bind_fail_ipc(start: Callable[..., Kernel]) -> None:
    """--bind-fail over ipc (where rebinding would succeed) still exits 1 with EADDRINUSE."""
    k = start("--bind-fail", transport="ipc")
    assert k.proc.wait(timeout=TIMEOUT) == 1
    assert "Address already in use" in k.stderr()


def test_jupyter_client_talks_to_it(start: Callable[..., Kernel]) -> None:
    """jupyter_client's BlockingKernelClient finds it ready and runs code on it."""
    from jupyter_client.blocking.client import BlockingKernelClient

    k = start()
    client = BlockingKernelClient()
    client.load_connection_info(k.conn)  # type: ignore[arg-type]
    client.start_channels()
    try:
        client.wait_for_ready(timeout=TIMEOUT)
        outputs: list[dict[str, Any]] = []
        reply = client.execute_interactive("print('hi')", timeout=TIMEOUT,
                                           output_hook=outputs.append)
        assert reply["content"]["status"] == "ok"
        streams = [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]
        assert streams == ["hi\n"]
    finally:
        client.stop_channels()

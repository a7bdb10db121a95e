#!/usr/bin/env python3
"""A small but real Jupyter kernel (protocol 5.4) that misbehaves on request, for tests.

Run as ``python fakekernel.py -f CONNECTION_FILE [flags]`` (``--help`` lists the
flags). It binds the five channels named in the connection file, answers
``kernel_info_request``, runs ``execute_request`` code with ``exec`` (stdout and
stderr go to iopub as ``stream`` messages), and obeys ``interrupt_request`` and
``shutdown_request`` on control, and SIGINT during execution. The flags make it
crash, hang, exit by itself, ignore signals or requests, or send bad frames.

Threads: the main thread owns the shell and stdin sockets and runs the code; the
control thread owns the control socket; the heartbeat thread owns the hb socket;
the iopub thread owns the iopub socket, and every other thread hands it frame
lists through its own inproc PUSH socket. Nothing is shared but the Session
(thread-safe) and a few flags.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import zmq  # noqa: E402

from supervisor.errors import WireError  # noqa: E402
from supervisor.wire import DELIMITER, Message, Session  # noqa: E402

_IOPUB_INPROC = "inproc://fakekernel-iopub"
_WAKE_INPROC = "inproc://fakekernel-wake"
_STOP = b"\x00fakekernel-stop"
_LINGER_MS = 1000


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fakekernel", description=__doc__.splitlines()[0])
    p.add_argument("-f", "--connection-file", required=True)
    p.add_argument("--crash-on-start", action="store_true", help="exit 3 before binding")
    p.add_argument("--exit-after", type=float, metavar="SECONDS", help="die by itself then")
    p.add_argument("--exit-code", type=int, default=0, help="code for shutdown / --exit-after")
    p.add_argument("--ignore-shutdown", action="store_true", help="no reply, stay alive")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--ignore-sigint", action="store_true", help="interrupt by message only")
    p.add_argument("--never-ready", action="store_true", help="bind, but never answer shell")
    p.add_argument("--slow-start", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--spawn-grandchild", action="store_true", help="spawn `sleep 600`")
    p.add_argument("--pid-file", metavar="PATH", help="write our pid (and the grandchild's)")
    p.add_argument("--bad-signature", action="store_true", help="sign replies with a wrong key")
    p.add_argument("--truncated-frames", action="store_true", help="cut replies short")
    p.add_argument("--garbage-iopub", type=int, default=0, metavar="N",
                   help="N garbage messages on iopub before each status")
    p.add_argument("--flood-iopub", type=int, default=0, metavar="N",
                   help="N stream messages on each execute")
    p.add_argument("--no-welcome", action="store_true", help="PUB iopub, no iopub_welcome")
    p.add_argument("--bind-fail", action="store_true", help="EADDRINUSE binding shell, exit 1")
    return p.parse_args(argv)


def _say(text: str) -> None:
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def _spawn_grandchild() -> int:
    """Start `sleep 600` in our process group, default signals, stdio on /dev/null."""
    devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    return os.posix_spawnp(
        "sleep", ["sleep", "600"], dict(os.environ), file_actions=devnull,
        setsigdef=(signal.SIGINT, signal.SIGTERM),
    )


def _write_pid_file(path: str, pids: list[int]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(f"{pid}\n" for pid in pids))
    os.replace(tmp, path)


def _exit_later(seconds: float, code: int) -> None:
    def die() -> None:
        _say(f"fakekernel: exiting by itself after {seconds}s with code {code}")
        os._exit(code)

    timer = threading.Timer(seconds, die)
    timer.daemon = True
    timer.start()


class _Capture:
    """A text stream (stdout or stderr while code runs) that publishes each line."""

    encoding = "utf-8"

    def __init__(self, kernel: FakeKernel, name: str, parent: Message) -> None:
        self._kernel, self._name, self._parent = kernel, name, parent
        self._buf: list[str] = []

    def write(self, text: str) -> int:
        self._buf.append(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._buf:
            text, self._buf = "".join(self._buf), []
            self._kernel.publish("stream", {"name": self._name, "text": text}, self._parent)

    def isatty(self) -> bool:
        return False


class FakeKernel:
    """The kernel: sockets, threads, and the handlers of each channel."""

    def __init__(self, args: argparse.Namespace, conn: dict[str, Any]) -> None:
        self.args = args
        self.conn = conn
        key = str(conn.get("key", "")).encode()
        scheme = str(conn.get("signature_scheme", "hmac-sha256"))
        self.session = Session(key=key, signature_scheme=scheme, username="fakekernel")
        bad_key = b"fakekernel-wrong-key-" + key
        self.reply_session = (
            Session(key=bad_key, signature_scheme=scheme, session_id=self.session.session_id)
            if args.bad_signature else self.session
        )
        self.ctx = zmq.Context()
        self.execution_count = 0
        self.namespace: dict[str, Any] = {"__name__": "__main__"}
        self.executing = False
        self.forced_interrupt = False
        self.main_ident = threading.get_ident()
        self.local = threading.local()
        self.threads: list[threading.Thread] = []

    # -- sockets --------------------------------------------------------------

    def _endpoint(self, port: int) -> str:
        ip, transport = self.conn.get("ip", "127.0.0.1"), self.conn.get("transport", "tcp")
        return f"ipc://{ip}-{port}" if transport == "ipc" else f"tcp://{ip}:{port}"

    def _socket(self, kind: int, channel: str) -> zmq.Socket[bytes]:
        """A socket of ``kind`` bound to ``channel``'s port; exit 1 if the bind fails."""
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.linger = _LINGER_MS
        port = int(self.conn[f"{channel}_port"])
        try:
            if self.args.bind_fail and channel == "shell":
                port = int(self.conn["control_port"])  # bound just before: EADDRINUSE
                if self.conn.get("transport", "tcp") == "ipc":  # rebinding ipc succeeds
                    raise zmq.ZMQError(zmq.EADDRINUSE)
            sock.bind(self._endpoint(port))
        except zmq.ZMQError as exc:
            _say(f"fakekernel: zmq.error.ZMQError: {exc}")
            self.ctx.destroy(linger=0)
            sys.exit(1)
        return sock

    def bind(self) -> None:
        """Bind the five channels (control first) and the inproc plumbing."""
        self.control = self._socket(zmq.ROUTER, "control")
        self.shell = self._socket(zmq.ROUTER, "shell")
        self.stdin = self._socket(zmq.ROUTER, "stdin")
        self.iopub = self._socket(zmq.PUB if self.args.no_welcome else zmq.XPUB, "iopub")
        if not self.args.no_welcome:
            self.iopub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.hb = self._socket(zmq.REP, "hb")
        self.iopub_in: zmq.Socket[bytes] = self.ctx.socket(zmq.PULL)
        self.iopub_in.bind(_IOPUB_INPROC)
        self.wake: zmq.Socket[bytes] = self.ctx.socket(zmq.PAIR)
        self.wake.bind(_WAKE_INPROC)

    def _pusher(self) -> zmq.Socket[bytes]:
        """This thread's inproc PUSH socket to the iopub thread."""
        push: zmq.Socket[bytes] | None = getattr(self.local, "push", None)
        if push is None:
            push = self.ctx.socket(zmq.PUSH)
            push.linger = _LINGER_MS
            push.connect(_IOPUB_INPROC)
            self.local.push = push
        return push

    def _close_pusher(self) -> None:
        push = getattr(self.local, "push", None)
        if push is not None:
            push.close()
            self.local.push = None

    # -- sending --------------------------------------------------------------

    def publish(self, msg_type: str, content: dict[str, Any], parent: Message | None) -> None:
        """Publish one message on iopub (from any thread)."""
        frames: list[list[bytes]] = []
        if msg_type == "status":
            for i in range(self.args.garbage_iopub):
                frames.append([
                    [b"garbage %d" % i],
                    [DELIMITER, b"bad-signature", b"{not json"],
                    [b"kernel.garbage", DELIMITER, b"", b"[]", b"{}", b"{}", b"{}"],
                ][i % 3])
        msg = self.session.msg(msg_type, content, parent=parent)
        frames.append(self.session.serialize(msg, [f"kernel.fake.{msg_type}".encode()]))
        in_main = threading.get_ident() == self.main_ident
        if in_main:  # a SIGINT must not cut a multipart send in two
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            push = self._pusher()
            for parts in frames:
                push.send_multipart(parts)
        finally:
            if in_main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def reply(self, sock: zmq.Socket[bytes], req: Message, msg_type: str,
              content: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        """Send a reply to ``req`` on shell or control (spoilt if the flags say so)."""
        msg = self.session.msg(msg_type, content, parent=req, metadata=metadata)
        frames = self.reply_session.serialize(msg, req.identities)
        if self.args.truncated_frames:
            frames = frames[: len(req.identities) + 3]  # identities, delimiter, signature, header
        sock.send_multipart(frames)

    # -- threads --------------------------------------------------------------

    def _start(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _iopub_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.iopub_in, zmq.POLLIN)
        if not self.args.no_welcome:
            poller.register(self.iopub, zmq.POLLIN)
        stopping = False
        while not stopping:
            for sock, _ in poller.poll():
                if sock is self.iopub:
                    event = self.iopub.recv()
                    if event[:1] == b"\x01":
                        self._welcome(event[1:])
                    continue
                frames = self.iopub_in.recv_multipart()
                if frames == [_STOP]:
                    stopping = True
                    while self.iopub_in.poll(0):  # the other threads' last messages
                        self.iopub.send_multipart(self.iopub_in.recv_multipart())
                else:
                    self.iopub.send_multipart(frames)
        self.iopub.close()
        self.iopub_in.close()

    def _welcome(self, topic: bytes) -> None:
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:
            return
        msg = self.session.msg("iopub_welcome", {"subscription": text})
        self.iopub.send_multipart(self.session.serialize(msg, [topic] if topic else []))

    def _hb_loop(self) -> None:
        try:
            while True:
                self.hb.send_multipart(self.hb.recv_multipart())
        except zmq.ContextTerminated:
            self.hb.close(linger=0)

    def _control_loop(self) -> None:
        wake: zmq.Socket[bytes] = self.ctx.socket(zmq.PAIR)
        wake.connect(_WAKE_INPROC)
        try:
            while True:
                try:
                    req = self.session.deserialize(self.control.recv_multipart())
                except WireError as exc:
                    _say(f"fakekernel: bad control message: {exc}")
                    continue
                if self._handle(self.control, req) == "shutdown":
                    wake.send(b"shutdown")
                    break
        except zmq.ContextTerminated:
            pass
        finally:
            self.control.close()
            wake.close()
            self._close_pusher()

    # -- requests -------------------------------------------------------------

    def _handle(self, sock: zmq.Socket[bytes], req: Message) -> str | None:
        """Answer one shell or control request; return "shutdown" to stop."""
        kind = req.msg_type
        if kind == "shutdown_request" and self.args.ignore_shutdown:
            _say("fakekernel: ignoring shutdown_request")
            return None
        self.publish("status", {"execution_state": "busy"}, req)
        try:
            if kind == "kernel_info_request":
                self.reply(sock, req, "kernel_info_reply", _kernel_info())
            elif kind == "execute_request" and sock is self.shell:
                self._execute(req)
            elif kind == "interrupt_request":
                if self.executing:
                    self.forced_interrupt = True
                    signal.pthread_kill(self.main_ident, signal.SIGINT)
                self.reply(sock, req, "interrupt_reply", {"status": "ok"})
            elif kind == "shutdown_request":
                content = {"status": "ok", "restart": bool(req.content.get("restart", False))}
                self.publish("shutdown_reply", content, req)
                self.reply(sock, req, "shutdown_reply", content)
                if self.executing:  # stop the running code, then the main loop
                    self.forced_interrupt = True
                    signal.pthread_kill(self.main_ident, signal.SIGINT)
                return "shutdown"
            elif kind in _SIMPLE_REPLIES:
                reply_type, content = _SIMPLE_REPLIES[kind]
                self.reply(sock, req, reply_type, content)
            else:
                _say(f"fakekernel: no handler for {kind}")
        finally:
            self.publish("status", {"execution_state": "idle"}, req)
        return None

    def _execute(self, req: Message) -> None:
        code = str(req.content.get("code", ""))
        silent = bool(req.content.get("silent", False))
        if not silent and req.content.get("store_history", True):
            self.execution_count += 1
        count = self.execution_count
        if not silent:
            self.publish("execute_input", {"code": code, "execution_count": count}, req)
        for i in range(self.args.flood_iopub):
            self.publish("stream", {"name": "stdout", "text": f"flood {i}\n"}, req)
        error = self._run(code, req, count)
        content: dict[str, Any] = {"status": "ok", "execution_count": count}
        if error is None:
            content.update(user_expressions={}, payload=[])
        else:
            content.update(status="error", **error)
            self.publish("error", error, req)
        self.reply(self.shell, req, "execute_reply", content, {"status": content["status"]})

    def _run(self, code: str, req: Message, count: int) -> dict[str, Any] | None:
        """Exec ``code`` with stdout/stderr captured; the error content, or None."""
        out, err = _Capture(self, "stdout", req), _Capture(self, "stderr", req)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            self.executing = True
            exec(compile(code, f"<cell-{count}>", "exec"), self.namespace)
            self.executing = False
        except (Exception, KeyboardInterrupt, SystemExit) as exc:
            self.executing = False
            return _error_content(exc)
        finally:
            self.executing = self.forced_interrupt = False
            sys.stdout, sys.stderr = saved
            out.flush()
            err.flush()
        return None

    def _on_sigint(self, signum: int, frame: object) -> None:
        forced, self.forced_interrupt = self.forced_interrupt, False
        if self.executing and (forced or not self.args.ignore_sigint):
            self.executing = False  # a second SIGINT must not hit the error handling
            raise KeyboardInterrupt

    # -- main -----------------------------------------------------------------

    def run(self) -> int:
        """Serve until shutdown; return the exit code."""
        self._start(self._iopub_loop, "iopub")
        self._start(self._hb_loop, "heartbeat")
        self._start(self._control_loop, "control")
        poller = zmq.Poller()
        for sock in (self.shell, self.stdin, self.wake):
            poller.register(sock, zmq.POLLIN)
        stop = False
        while not stop:
            for sock, _ in poller.poll():
                frames = sock.recv_multipart()
                if sock is self.wake:
                    stop = True
                elif sock is self.shell and not self.args.never_ready:
                    try:
                        req = self.session.deserialize(frames)
                    except WireError as exc:
                        _say(f"fakekernel: bad shell message: {exc}")
                        continue
                    stop = self._handle(self.shell, req) == "shutdown" or stop
        self._pusher().send(_STOP)
        self._close_pusher()
        for sock in (self.shell, self.stdin, self.wake):
            sock.close()
        self.threads[0].join()  # iopub flushed and closed
        self.ctx.term()  # ends the heartbeat and control threads
        if self.conn.get("transport", "tcp") == "ipc":
            for channel in ("shell", "iopub", "stdin", "control", "hb"):
                try:
                    os.unlink(f"{self.conn['ip']}-{self.conn[f'{channel}_port']}")
                except OSError:
                    pass
        return int(self.args.exit_code)


def _kernel_info() -> dict[str, Any]:
    v = sys.version_info
    return {
        "status": "ok",
        "protocol_version": "5.4",
        "implementation": "fakekernel",
        "implementation_version": "1.0",
        "language_info": {
            "name": "python",
            "version": f"{v.major}.{v.minor}.{v.micro}",
            "mimetype": "text/x-python",
            "file_extension": ".py",
        },
        "banner": "fakekernel: a misbehaving test kernel",
        "help_links": [],
    }


_SIMPLE_REPLIES: dict[str, tuple[str, dict[str, Any]]] = {
    "is_complete_request": ("is_complete_reply", {"status": "complete"}),
    "comm_info_request": ("comm_info_reply", {"status": "ok", "comms": {}}),
    "history_request": ("history_reply", {"status": "ok", "history": []}),
    "complete_request": ("complete_reply", {
        "status": "ok", "matches": [], "cursor_start": 0, "cursor_end": 0, "metadata": {}}),
    "inspect_request": ("inspect_reply", {"status": "ok", "found": False, "data": {},
                                          "metadata": {}}),
}


def _error_content(exc: BaseException) -> dict[str, Any]:
    """ename/evalue/traceback of an exception raised by cell code."""
    lines = ["Traceback (most recent call last):"]
    tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # skip our exec frame
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        tb = tb.tb_next
    ename, evalue = type(exc).__name__, str(exc)
    lines.append(f"{ename}: {evalue}" if evalue else ename)
    return {"ename": ename, "evalue": evalue, "traceback": lines}


def main(argv: list[str] | None = None) -> int:
    """Start the kernel as the flags say; return the process exit code."""
    args = _parse(argv)
    pids = [os.getpid()]
    if args.spawn_grandchild:
        pids.append(_spawn_grandchild())
    if args.pid_file:
        _write_pid_file(args.pid_file, pids)
    if args.spawn_grandchild:
        _say(f"grandchild pid {pids[1]}")
    if args.exit_after is not None:
        _exit_later(args.exit_after, args.exit_code)
    if args.crash_on_start:
        _say("fakekernel: crashing on start")
        return 3
    with open(args.connection_file) as f:
        conn = json.load(f)
    kernel = FakeKernel(args, conn)
    signal.signal(signal.SIGINT, kernel._on_sigint)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.slow_start > 0:
        time.sleep(args.slow_start)
    kernel.bind()
    return kernel.run()


if __name__ == "__main__":
    sys.exit(main())

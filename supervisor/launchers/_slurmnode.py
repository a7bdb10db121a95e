"""The node side of the Slurm launcher: runs on the compute node as the job step's task.

``srun`` starts it there as ``python -I -S _slurmnode.py KERNEL_ARGV...`` (the
kernel's argv with ``{connection_file}`` still in it). It imports nothing of the
package (only the standard library), so it starts in milliseconds and needs no
installation on the node beyond an interpreter. One process, one thread; it
owns the kernel child it starts.

What it does, in order:

1. Reads its orders from the environment, where the supervisor put them (never
   the command line: other users of the node can read command lines):
   ``KS_SLURM_REPORT`` (host:port of the supervisor's report server),
   ``KS_SLURM_LAUNCH`` (this launch's id), ``KS_SLURM_SECRET`` (a one-time
   secret, hex), ``KS_SLURM_CONNECTION`` (JSON: the kernel's message key,
   signature scheme, kernel name) and optionally ``KS_SLURM_IP`` (the address
   to bind; default: the one this node uses to reach the supervisor) and
   ``KS_SLURM_RUNTIME_DIR``, ``KS_SLURM_DETACH`` (an independent kernel: no
   lifeline). It removes them all before the kernel starts.
2. Chooses the node's address and five free ports there, and writes the
   connection file on the node (mode 0600).
3. Reports ``{launch, ip, ports, node, host, job, step, pid}`` to the supervisor
   over TCP, signed with HMAC-SHA256 under the one-time secret, and waits for
   ``ok``. Anything else (a late report, a wrong secret) ends the task without
   starting a kernel.
4. Starts the kernel (``JPY_PARENT_PID`` is this process), tells the
   supervisor its pid, and keeps the connection open as a link: if it closes
   (the supervising process is gone, however it died) the kernel is killed.
5. Exits as the kernel did (same code, or the same signal), after removing the
   connection file (a file left by a node side that was SIGKILLed, as Slurm
   does to a step over its memory, is swept by the next one on the node).
   Interrupts reach the kernel from Slurm directly (Slurm signals every
   process of the step), so this process ignores SIGINT.
"""

import contextlib
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

PREFIX = "KS_SLURM_"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
REPORT_TIMEOUT = 30.0


def sign(secret: bytes, body: str) -> str:
    """The report's MAC: HMAC-SHA256 of the body text under the one-time secret."""
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def address_towards(host: str, port: int) -> str:
    """The local address the kernel routes through to reach ``host`` (no packet sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        address: str = probe.getsockname()[0]
        return address


def free_ports(ip: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``ip`` now (held together while chosen)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((ip, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def write_connection_file(directory: str, launch: str, info: dict[str, object]) -> str:
    """``kernel-<launch>-<our pid>.json`` in ``directory`` (0700), mode 0600."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"kernel-{launch[:16]}-{os.getpid()}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    return path


def sweep(directory: str) -> None:
    """Remove files left by node sides that were SIGKILLed (their pid is gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        pid = name[: -len(".json")].rpartition("-")[2]
        if not (name.startswith("kernel-") and name.endswith(".json") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.strip()


def exit_like(returncode: int) -> None:
    """Leave the way the kernel left: its exit code, or killed by its signal."""
    if returncode < 0:
        sig = -returncode
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(returncode if returncode >= 0 else 128 - returncode)


def main(argv: list[str]) -> int:
    env = os.environ
    try:
        host, _, port = env[PREFIX + "REPORT"].rpartition(":")
        launch = env[PREFIX + "LAUNCH"]
        secret = bytes.fromhex(env[PREFIX + "SECRET"])
        conn = json.loads(env[PREFIX + "CONNECTION"])
    except (KeyError, ValueError) as exc:
        print(f"kernel-supervisor node launcher: missing or bad orders: {exc}", file=sys.stderr)
        return 2
    ip = env.get(PREFIX + "IP") or address_towards(host, int(port))
    detach = env.get(PREFIX + "DETACH") == "1"  # an independent kernel may outlive us
    runtime = env.get(PREFIX + "RUNTIME_DIR") or os.path.join(
        env.get("TMPDIR") or tempfile.gettempdir(), "kernel-supervisor")
    for name in [n for n in env if n.startswith(PREFIX)]:
        del env[name]

    ports = dict(zip(CHANNELS, free_ports(ip, len(CHANNELS)), strict=True))
    info: dict[str, object] = {f"{c}_port": p for c, p in ports.items()}
    info.update(ip=ip, transport="tcp", key=conn["key"],
                signature_scheme=conn.get("signature_scheme", "hmac-sha256"),
                kernel_name=conn.get("kernel_name", ""))
    sweep(runtime)
    path = write_connection_file(runtime, launch, info)
    try:
        body = json.dumps({
            "launch": launch, "ip": ip, "ports": ports,
            "node": env.get("SLURMD_NODENAME", ""), "host": socket.gethostname(),
            "job": env.get("SLURM_JOB_ID", ""), "step": env.get("SLURM_STEP_ID", ""),
            "pid": os.getpid(), "time": time.time(), "connection_file": path,
        })
        link = socket.create_connection((host, int(port)), timeout=REPORT_TIMEOUT)
        link.sendall(json.dumps({"launch": launch, "body": body,
                                 "mac": sign(secret, body)}).encode() + b"\n")
        reply = read_line(link)
    except OSError as exc:
        os.unlink(path)
        print(f"kernel-supervisor node launcher: cannot report to {host}:{port}: {exc}",
              file=sys.stderr)
        return 3
    if reply != b"ok":
        os.unlink(path)
        link.close()
        print(f"kernel-supervisor node launcher: the supervisor refused launch {launch}",
              file=sys.stderr)
        return 3

    env["JPY_PARENT_PID"] = str(os.getpid())
    kernel_argv = [a.replace("{connection_file}", path) for a in argv]
    try:
        child = subprocess.Popen(kernel_argv)
    except OSError as exc:
        os.unlink(path)
        print(f"kernel-supervisor node launcher: cannot start {kernel_argv[0]!r}: {exc}",
              file=sys.stderr)
        return 127
    # Slurm signals every process of the step: the kernel gets SIGINT itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    try:
        link.sendall(json.dumps({"started": child.pid}).encode() + b"\n")
    except OSError:
        if not detach:
            child.kill()
    if detach:
        link.close()
        try:
            child.wait()
        finally:
            os.unlink(path)
        exit_like(child.returncode)
    link.setblocking(False)
    pidfd = os.pidfd_open(child.pid)
    try:
        while child.poll() is None:
            try:
                ready, _, _ = select.select([pidfd, link.fileno()], [], [])
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if link.fileno() in ready:
                try:
                    gone = link.recv(4096) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:  # the supervisor is gone: nothing may outlive it
                    print("kernel-supervisor node launcher: the supervisor is gone; "
                          "killing the kernel", file=sys.stderr)
                    child.kill()
                    child.wait()
                    break
    finally:
        os.close(pidfd)
        link.close()
        os.unlink(path)
    exit_like(child.returncode)
    return 0  # pragma: no cover - exit_like does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

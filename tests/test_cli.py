"""The kernel-supervisor command line, run as a subprocess against real kernels."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from conftest import pid_gone

from supervisor.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 20.0  # seconds any one CLI invocation may take here
COMMANDS = ["kernelspecs", "run", "supervise", "connect", "gateway", "bench"]


def runtime(tmp_path: Path) -> Path:
    return tmp_path / "runtime"


def env_for(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime(tmp_path))}


def cli(tmp_path: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m supervisor ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], cwd=cwd, env=env_for(tmp_path),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=LIMIT,
    )


@contextlib.contextmanager
def spawn(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m supervisor ARGS`` with stdout a pipe and stderr in tmp_path/stderr.log;
    killed on the way out if a failed test left it running."""
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", *args], cwd=ROOT, env=env_for(tmp_path),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )
    with proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


class Lines:
    """A child's stdout, line by line; every read waits on the pipe (select) up to a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: float = LIMIT) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.deadline = time.monotonic() + limit
        self.buf = b""
        self.seen: list[str] = []

    def next(self) -> str | None:
        """The next line, or None at end of file."""
        while b"\n" not in self.buf:
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            assert ready, f"no output in time; so far: {self.seen[-20:]}"
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if not self.buf:
                    return None
                self.buf += b"\n"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.seen.append(line.decode())
        return self.seen[-1]

    def until(self, wanted: Callable[[str], bool]) -> str:
        while (line := self.next()) is not None:
            if wanted(line):
                return line
        raise AssertionError(f"end of output before the line we wanted: {self.seen[-20:]}")

    def rest(self) -> list[str]:
        while self.next() is not None:
            pass
        return self.seen


def kernel_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The kernel processes the CLI runs now (its reaper sidecar excluded)."""
    pids = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "ipykernel" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return pids


def assert_nothing_left(tmp_path: Path, pids: Sequence[int] = ()) -> None:
    """No kernel process and no connection file outlived the CLI."""
    for pid in pids:
        assert pid_gone(pid, timeout=5), f"kernel {pid} outlived the CLI"
    where = str(runtime(tmp_path))
    for proc in psutil.process_iter(["cmdline"]):
        assert where not in " ".join(proc.info["cmdline"] or ()), f"left running: {proc}"
    rt = runtime(tmp_path)
    assert not rt.exists() or not list(rt.iterdir()), list(rt.iterdir())


def kernel_stderr(stderr: str) -> str:
    """Our stderr without our own log lines (a loaded machine may add a library warning)."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line))


def summary(lines: list[str]) -> dict[str, str]:
    """key=value pairs of the final 'summary:' and 'events:' lines."""
    pairs: dict[str, str] = {}
    for line in lines:
        if line.startswith(("summary: ", "events: ")):
            pairs.update(re.findall(r"(\w+)=(\S+)", line))
    return pairs


# -- usage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["top", *COMMANDS])
def test_help_exits_0(tmp_path: Path, command: list[str]) -> None:
    """--help works for the program and every command, and exits 0."""
    done = cli(tmp_path, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m supervisor")


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["run"], ["run", "-c", "1", "also.py"], ["run", "--timeout", "0", "-c", "1"],
    ["supervise", "--kernel", "python3"], ["supervise", "--kernel", "python3", "--count", "-1"],
    ["supervise", "--kernel", "python3", "--count", "0"], ["--log-level", "loud", "kernelspecs"],
    ["supervise", "--kernel", "python3", "--count", "1", "--backoff-initial", "9",
     "--backoff-max", "1"],
    ["run", "does-not-exist.py"], ["connect"],
])
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    """Bad usage prints the usage and a clear error on stderr and exits 2, starting nothing."""
    done = cli(tmp_path, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage:" in done.stderr and "error:" in done.stderr
    assert done.stdout == ""
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("args", [["run", "--kernel", "nope", "-c", "1"],
                                  ["supervise", "--kernel", "nope", "--count", "1"]])
def test_unknown_kernel_is_a_one_line_error(tmp_path: Path, args: list[str]) -> None:
    """A typed library error becomes one 'error: ...' line on stderr and exit status 1."""
    done = cli(tmp_path, *args)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: no kernelspec named 'nope'")
    assert "Traceback" not in done.stderr
    assert_nothing_left(tmp_path)


# -- kernelspecs ----------------------------------------------------------------------------------
def test_kernelspecs_lists_python3(tmp_path: Path) -> None:
    """kernelspecs --json has jupyter's shape and lists python3; the table does too."""
    done = cli(tmp_path, "kernelspecs", "--json")
    assert done.returncode == 0, done.stderr
    python3 = json.loads(done.stdout)["kernelspecs"]["python3"]
    assert python3["spec"]["language"] == "python"
    assert Path(python3["resource_dir"]).is_absolute()
    table = cli(tmp_path, "kernelspecs").stdout.splitlines()
    assert table[0].split() == ["NAME", "DISPLAY", "NAME", "RESOURCE", "DIR"]
    assert any(line.startswith("python3 ") for line in table[1:])


# -- run ------------------------------------------------------------------------------------------
def test_run_code_prints_its_output(tmp_path: Path) -> None:
    """run -c prints the kernel's stdout, nothing else, exits 0 and leaves nothing behind."""
    done = cli(tmp_path, "run", "-c", "print(6*7)")
    assert (done.returncode, done.stdout, kernel_stderr(done.stderr)) == (0, "42\n", "")
    assert_nothing_left(tmp_path)


def test_run_code_that_raises_exits_1(tmp_path: Path) -> None:
    """Code that raises: exit 1, the traceback on stderr (no colour codes off a terminal)."""
    done = cli(tmp_path, "run", "-c", "1/0")
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr and "\x1b[" not in done.stderr
    assert done.stdout == ""
    assert_nothing_left(tmp_path)


def test_run_file_streams_stdout_stderr_and_results(tmp_path: Path) -> None:
    """run FILE: stream output goes to the matching stream, a last expression's text/plain too."""
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7\n")
    done = cli(tmp_path, "run", str(script))
    assert (done.returncode, done.stdout, kernel_stderr(done.stderr)) == (0, "out\n42\n", "err\n")
    assert_nothing_left(tmp_path)


def test_run_ctrl_c_interrupts_then_kills(tmp_path: Path) -> None:
    """The first SIGINT interrupts the kernel; code that ignores it dies at the second: exit 130."""
    # 'go' is printed inside the try, so an interrupt that follows it is always caught there.
    code = ("import time\ntry:\n    print('go', flush=True)\n    while True:\n        time.sleep(60)\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
            "while True:\n    time.sleep(60)\n")
    with spawn(tmp_path, "run", "-c", code) as proc:
        lines = Lines(proc)
        lines.until(lambda line: line == "go")
        pids = kernel_pids(proc)
        proc.send_signal(signal.SIGINT)
        lines.until(lambda line: line == "interrupted")
        proc.send_signal(signal.SIGINT)
        lines.rest()
        assert proc.wait(timeout=LIMIT) == 130
    assert_nothing_left(tmp_path, pids)


# -- logging --------------------------------------------------------------------------------------
def test_json_log_lines_on_stderr(tmp_path: Path) -> None:
    """--log-format json: every stderr line is a JSON object with an event; stdout stays clean."""
    done = cli(tmp_path, "--log-format", "json", "run", "--log-level", "info", "-c", "print(1)")
    assert (done.returncode, done.stdout) == (0, "1\n")
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all("event" in r and "timestamp" in r for r in records)
    assert {"kernel.ready", "kernel.shutdown"} <= {r["event"] for r in records}
    assert_nothing_left(tmp_path)


# -- connect --------------------------------------------------------------------------------------
def test_connect_talks_to_a_kernel_we_did_not_start(tmp_path: Path) -> None:
    """connect FILE runs code in (and reads kernel_info from) a kernel started by this test."""
    km = KernelManager("python3", forward_stderr=False)
    km.start_kernel()
    try:
        done = cli(tmp_path, "connect", km.connection_file, "-c", "print(1)")
        assert (done.returncode, done.stdout, kernel_stderr(done.stderr)) == (0, "1\n", "")
        info = cli(tmp_path, "connect", km.connection_file)
        assert info.returncode == 0, info.stderr
        assert re.search(r"^language +python 3\.", info.stdout, re.M), info.stdout
        assert re.search(r"^protocol version +5\.\d", info.stdout, re.M), info.stdout
        assert km.is_alive()  # connect never stops a kernel it does not own
    finally:
        km.shutdown_kernel(now=True)


# -- supervise ------------------------------------------------------------------------------------
def test_supervise_with_chaos_restarts_and_ends_by_itself(tmp_path: Path) -> None:
    """supervise --duration with chaos: kernels are killed and restarted, the run ends
    on its own with exit 0, and no kernel process or connection file remains."""
    with spawn(tmp_path, "supervise", "--kernel", "python3", "--count", "2", "--duration", "6",
               "--chaos-kill-every", "2", "--seed", "7") as proc:
        lines = Lines(proc, limit=LIMIT + 6)  # 6 s of them is --duration
        lines.until(lambda line: line.startswith("status: 2/2 ready"))
        pids = kernel_pids(proc)
        assert len(pids) == 2
        out = lines.rest()
        assert proc.wait(timeout=LIMIT) == 0, (tmp_path / "stderr.log").read_text()
    result = summary(out)
    assert result["stopped_by"] == "duration"
    assert int(result["restarts"]) >= 1 and int(result["exited"]) >= 1
    assert result["kernels"] == "2" and result["gave_up"] == "0"
    assert_nothing_left(tmp_path, pids)


def test_supervise_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM shuts every kernel down, prints the summary, exits 0; the JSON event log
    has one line per KernelEvent."""
    with spawn(tmp_path, "--log-format", "json", "supervise", "--kernel", "python3",
               "--count", "2") as proc:
        lines = Lines(proc)
        lines.until(lambda line: line.startswith("status: 2/2 ready"))
        pids = kernel_pids(proc)
        proc.send_signal(signal.SIGTERM)
        out = lines.rest()
        assert proc.wait(timeout=LIMIT) == 0
    result = summary(out)
    assert (result["stopped_by"], result["starting"], result["ready"], result["shutdown"]) == (
        "SIGTERM", "2", "2", "2")
    events = [json.loads(line)["event"] for line in
              (tmp_path / "stderr.log").read_text().splitlines()]
    assert events.count("kernel.starting") == 2 and events.count("kernel.ready") == 2
    assert events.count("kernel.shutdown") == 2
    assert_nothing_left(tmp_path, pids)


def test_supervise_redraws_the_table_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the status table is redrawn in place (cursor moves) and logs scroll above."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "supervise", "--kernel", "python3", "--count", "1",
         "--duration", "1", "--status-interval", "0.2"],
        cwd=ROOT, env=env_for(tmp_path), stdin=subprocess.DEVNULL, stdout=follower,
        stderr=follower)
    os.close(follower)
    data, deadline = b"", time.monotonic() + LIMIT
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, data[-2000:]
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(leader)
    assert proc.wait(timeout=LIMIT) == 0
    text = data.decode(errors="replace")
    assert re.search(r"\x1b\[\d+F\x1b\[J", text)
    assert "kernel.ready" in text and "summary: kernels=1" in text
    assert_nothing_left(tmp_path)


# -- bench ----------------------------------------------------------------------------------------
def test_bench_delegates_to_the_benchmark_suite(tmp_path: Path) -> None:
    """bench passes its arguments to python -m benchmarks, run in-process."""
    done = cli(tmp_path, "bench", "--list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the suite listed no rows"


def test_bench_without_the_suite_is_a_clear_error(tmp_path: Path) -> None:
    """Installed without the source checkout, bench says so in one line and exits 1."""
    shutil.copytree(ROOT / "supervisor", tmp_path / "supervisor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = cli(tmp_path, "bench", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: no benchmark suite here")
    assert len(done.stderr.splitlines()) == 1

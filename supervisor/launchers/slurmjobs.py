"""Slurm's side of things: its commands, its job records, and the job reaper.

* :func:`run` runs a Slurm command (``squeue``, ``scontrol``, ``scancel``)
  asynchronously on the current loop, bounded by a timeout;
  :func:`run_nowait` starts one without waiting (for :meth:`kill_tree`,
  which must not block) and :func:`run_blocking` is for code with no loop
  (interpreter exit).
* :func:`parse_job` reads ``scontrol show job -o`` output; :func:`job_cause`
  turns a finished job's record into words and flags for the exit event:
  cancelled, time limit, node failure, out of memory.
* :data:`job_reaper` talks to the sidecar (:mod:`._slurmreaper`) that cancels
  every job of ours when the supervising process dies, even by SIGKILL. Any
  thread may use it (a lock orders the writes).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor._log import get_logger

__all__ = ["JobInfo", "JobReaper", "job_cause", "job_reaper", "parse_job", "run",
           "run_blocking", "run_nowait", "state_from_stderr"]

log = get_logger("supervisor.launchers.slurm")

_TOKEN = re.compile(r"(\w+)=(\S*)")


async def run(argv: Sequence[str], env: Mapping[str, str] | None = None,
              timeout: float = 15.0) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of a Slurm command; a hung one is killed at ``timeout``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        return 127, "", str(exc)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.communicate()
        return -9, "", f"{argv[0]} did not answer within {timeout} s"
    return proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


_background: set[asyncio.Task[tuple[int, str, str]]] = set()


def run_nowait(argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Start a Slurm command and return at once; reaped on the loop (or, without one, now)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        run_blocking(argv, env)
        return
    task = asyncio.ensure_future(run(argv, env))
    _background.add(task)
    task.add_done_callback(_background.discard)


def run_blocking(argv: Sequence[str], env: Mapping[str, str] | None = None,
                 timeout: float = 15.0) -> int:
    """Run a Slurm command to its end (for callers without a loop)."""
    try:
        return subprocess.run(list(argv), env=None if env is None else dict(env),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False).returncode
    except (OSError, subprocess.TimeoutExpired):
        return -1


async def settle() -> None:
    """Wait for the commands :func:`run_nowait` started on this loop."""
    loop = asyncio.get_running_loop()
    mine = [t for t in _background if t.get_loop() is loop]
    if mine:
        await asyncio.gather(*mine, return_exceptions=True)


@dataclass(frozen=True)
class JobInfo:
    """What ``scontrol show job`` says of one job (the fields we use)."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    nodes: str = ""
    time_limit: str = ""
    run_time: str = ""

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"

    @property
    def finished(self) -> bool:
        return self.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                  "SUSPENDED", "RESIZING", "REQUEUED", "")


def parse_job(text: str) -> JobInfo | None:
    """The first job of ``scontrol -o show job`` output, or None."""
    for line in text.splitlines():
        fields = dict(_TOKEN.findall(line))
        if "JobId" not in fields:
            continue
        code = sig = None
        exit_text = fields.get("ExitCode", "")
        if ":" in exit_text:
            first, _, second = exit_text.partition(":")
            with contextlib.suppress(ValueError):
                code, sig = int(first), int(second)
        nodes = fields.get("NodeList", "")
        return JobInfo(job_id=fields["JobId"], state=fields.get("JobState", ""),
                       reason=fields.get("Reason", ""), exit_code=code,
                       signal=sig or None, nodes="" if nodes == "(null)" else nodes,
                       time_limit=fields.get("TimeLimit", ""),
                       run_time=fields.get("RunTime", ""))
    return None


_STEP_OOM = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)|oom[- ]kill|Out Of Memory",
                       re.IGNORECASE)


_STEP_END = re.compile(r"\*\*\* (?:STEP|JOB) \S+ ON \S+ CANCELLED AT \S+(?: DUE TO ([A-Z ]+?))?"
                       r"(?:,| \*\*\*)")
_TASK_END = re.compile(r"srun: error: \S+: task \d+: (?!Exited with exit code 0)")
_BY_WORDS = {"TIME LIMIT": "TIMEOUT", "NODE FAILURE": "NODE_FAIL", "PREEMPTION": "PREEMPTED"}


def state_from_stderr(text: str) -> str | None:
    """The job's end as slurmstepd told it through srun ("*** STEP 12.0 ON node2
    CANCELLED AT ... DUE TO TIME LIMIT ***"): known before slurmctld's record is final."""
    if _STEP_OOM.search(text):  # then slurmstepd also says the step was CANCELLED
        return "OUT_OF_MEMORY"
    found = None
    for match in _STEP_END.finditer(text):
        found = _BY_WORDS.get(match.group(1) or "", "CANCELLED")
    if found is None and _TASK_END.search(text):  # the task died on its own
        found = "FAILED"
    return found


_BY_REASON = {"TimeLimit": "TIMEOUT", "NodeDown": "NODE_FAIL", "NodeFail": "NODE_FAIL",
              "OutOfMemory": "OUT_OF_MEMORY"}


def job_cause(job: JobInfo, stderr: str = "") -> tuple[str, bool]:
    """(words, out of memory?) for a job that ended: Slurm's state and reason.

    ``stderr`` is what srun relayed: slurmstepd's "exceeded memory limit"
    there marks a step Slurm killed for memory even when the job's state
    only says FAILED (memory enforced by job accounting, not a cgroup).
    """
    where = f" on {job.nodes}" if job.nodes else ""
    head = f"Slurm job {job.job_id}{where}"
    reason = "" if job.reason in ("", "None") else f", reason {job.reason}"
    state = job.state
    if not job.finished:  # still completing: its reason and exit code tell what it became
        state = _BY_REASON.get(job.reason, "")
        if not state:
            state = "FAILED" if job.signal or job.exit_code else "COMPLETED"
    oom = _STEP_OOM.search(stderr) if stderr else None
    if state == "OUT_OF_MEMORY" or oom is not None:
        detail = "the job exceeded its memory"
        if oom is not None and oom.group(1):
            used, limit = int(oom.group(1)) >> 20, int(oom.group(2)) >> 20
            detail = f"used {used} MiB of its {limit} MiB"
        return f"{head}: out of memory ({detail}){reason}", True
    if state == "TIMEOUT":
        return f"{head}: time limit reached (TimeLimit={job.time_limit}){reason}", False
    if state == "NODE_FAIL":
        return f"{head}: node failure{reason}", False
    if state == "CANCELLED":
        return f"{head}: cancelled{reason}", False
    if state == "PREEMPTED":
        return f"{head}: preempted{reason}", False
    if state == "COMPLETED":
        return f"{head}: completed", False
    if state == "FAILED":
        what = (f"kernel killed by signal {job.signal}" if job.signal
                else f"exit code {job.exit_code}")
        return f"{head}: failed ({what}){reason}", False
    return f"{head}: {state.lower() or 'state unknown'}{reason}", False


class JobReaper:
    """This process's Slurm reaper sidecar, talked to over its stdin pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0
        self._live: dict[str, str] = {}  # key -> its registration line, told again to a new sidecar

    def _ensure(self) -> subprocess.Popen[bytes] | None:
        if self._proc is not None and self._owner == os.getpid():
            return self._proc
        script = str(Path(__file__).with_name("_slurmreaper.py"))
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", script],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True,
                                    close_fds=True)
        except OSError as exc:  # pragma: no cover - no interpreter to run
            log.warning("slurm.reaper_unavailable", error=str(exc))
            return None
        if self._owner != os.getpid():
            self._live.clear()  # a forked child: its parent's jobs are not ours to cancel
        self._proc, self._owner = proc, os.getpid()
        atexit.register(self._close, proc)
        if self._live and proc.stdin is not None:  # the last sidecar was lost: tell it all
            with contextlib.suppress(OSError):
                proc.stdin.write("".join(self._live.values()).encode())
                proc.stdin.flush()
        return proc

    def _close(self, proc: subprocess.Popen[bytes]) -> None:
        """At interpreter exit: close our end (it cancels what is left) and reap it."""
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        if self._owner == os.getpid():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=25)

    def _write(self, line: str) -> None:
        data = line.encode()
        with self._lock:
            key = line[1:].split("\t", 1)[0].rstrip("\n")
            if line.startswith("+"):
                self._live[key] = line
            else:
                self._live.pop(key, None)
            proc = self._ensure()
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except OSError as exc:
                log.warning("slurm.reaper_lost", error=str(exc))
                self._proc = None

    def register(self, key: str, *, name: str, job_id: str | None, pgid: int | None,
                 conf: str | None, files: Sequence[str] = ()) -> None:
        """Remember a launch (again, with what we know now)."""
        fields = [f"+{key}", f"n{name}", *(f"f{path}" for path in files)]
        if job_id:
            fields.append(f"j{job_id}")
        if pgid is not None:
            fields.append(f"g{pgid}")
        if conf:
            fields.append(f"c{conf}")
        if any("\t" in f or "\n" in f for f in fields):
            return
        self._write("\t".join(fields) + "\n")

    def unregister(self, key: str) -> None:
        """Forget a launch whose job is over."""
        self._write(f"-{key}\n")

    def pid(self) -> int | None:
        """The sidecar's pid, starting it if needed."""
        with self._lock:
            proc = self._ensure()
            return None if proc is None else proc.pid


job_reaper = JobReaper()

"""Slurm kernels on the three-node test cluster (tests/slurm/cluster.sh start).

Every test here is marked ``slurm`` and needs the cluster: without it they are
skipped, unless ``KS_REQUIRE_SLURM=1`` (CI) makes a missing cluster a failure.
The nodes live in network namespaces (node1..3 at 10.233.77.11..13), so a
kernel bound to its node's address is only reachable through the bridge.
Waits on Slurm's own state (squeue) poll it under a deadline: slurmctld offers
no event to wait on; everything of ours is awaited by event.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Events, pid_gone

from supervisor.errors import KernelStartupError
from supervisor.kernel import LaunchOptions
from supervisor.launchers.slurm import SlurmLauncher, SlurmProcess, slurm_launcher
from supervisor.policy import Backoff, RestartPolicy
from supervisor.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "slurm" / "cluster.sh"
CONF = Path(os.environ.get("KS_SLURM_DIR", "/run/kernel-supervisor-slurm")) / "slurm.conf"
NODES = {"node1": "10.233.77.11", "node2": "10.233.77.12", "node3": "10.233.77.13"}
QUIET = LaunchOptions(forward_stderr=False, startup_timeout=30, shutdown_wait=2,
                      terminate_wait=2, launcher="slurm")
NO_WAIT = Backoff(initial=0.01, maximum=0.05, jitter=0.0)

pytestmark = pytest.mark.slurm


def _cluster_up() -> bool:
    env = dict(os.environ, SLURM_CONF=str(CONF))
    try:
        return subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True,
                              timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """The running test cluster, found through its slurm.conf (SLURM_CONF for us and srun)."""
    if not _cluster_up():
        if os.environ.get("KS_REQUIRE_SLURM") == "1":
            pytest.fail("KS_REQUIRE_SLURM=1 but the Slurm test cluster is not running "
                        "(tests/slurm/cluster.sh start)")
        pytest.skip("no Slurm test cluster (tests/slurm/cluster.sh start)")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(CONF)
    yield
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(autouse=True)
def nothing_left(cluster: None) -> Iterator[None]:
    """After each test: no job of ours in the queue and no process left on the nodes."""
    yield
    assert wait_until(lambda: not our_jobs(), 20), f"jobs left: {our_jobs()}"
    assert wait_until(lambda: not node_processes(), 20), f"left: {node_processes()}"


def slurm(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20,
                          check=False).stdout


def our_jobs() -> list[str]:
    """Jobs in the queue (pending, running or completing) started by our launcher."""
    out = slurm("squeue", "-h", "-o", "%i %j %T")
    return [line for line in out.splitlines() if " kernel-" in line]


def node_processes() -> list[str]:
    """Processes in the node namespaces other than the slurmd daemons."""
    found = []
    for node in NODES:
        pids = slurm("ip", "netns", "pids", f"ks-{node}").split()
        for pid in pids:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name != "slurmd":
                found.append(f"{node}:{pid}:{name}")
    return found


def wait_until(check: Any, timeout: float) -> bool:
    """Poll Slurm's state under a deadline (slurmctld gives no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def job_state(job_id: str) -> str:
    return slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def handle_of(s: Supervisor, kid: str) -> SlurmProcess:
    proc = s.actor_of(kid).process
    assert isinstance(proc, SlurmProcess)
    return proc


async def evaluate(s: Supervisor, kid: str, expression: str, code: str = "",
                   timeout: float = 20) -> str:
    """Run ``code`` in the kernel and return ``repr(expression)`` from the execute_reply."""
    kc = s.get_kernel(kid).client()
    kc.start_channels()
    try:
        reply = await kc.execute(code, user_expressions={"x": expression}, reply=True,
                                 timeout=timeout)
    finally:
        kc.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    result = reply["content"]["user_expressions"]["x"]
    assert result["status"] == "ok", result
    value: str = result["data"]["text/plain"]
    return value


# -- on a chosen node ---------------------------------------------------------------
async def test_kernel_runs_on_the_chosen_node_and_is_reached_at_its_address() -> None:
    """nodelist=node2 puts the kernel in node2's namespace, bound to and reached at its address."""
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"})) as s:
        kid = await s.start_kernel("python3")
        info = s.get_kernel(kid).connection_info
        assert info is not None and info.ip == NODES["node2"]
        proc = handle_of(s, kid)
        assert proc.node == "node2" and proc.describe_state().startswith("running on node2")
        with open(s.get_kernel(kid).connection_file) as f:  # noqa: ASYNC230 (a small local file)
            assert json.load(f)["ip"] == NODES["node2"]
        seen = await evaluate(s, kid, "(os.environ['SLURMD_NODENAME'], "
                                      "os.environ['SLURM_JOB_ID'], 'KS_SLURM_SECRET' in os.environ)",
                              "import os")
        # On node2, in its job; the one-time secret stayed with us.
        assert seen == repr(("node2", proc.job_id, False))
        # The kernel's namespace is node2's: our own namespace has no such address.
        assert os.readlink(f"/proc/{proc.remote_pid}/ns/net") != os.readlink("/proc/self/ns/net")


async def test_kernelspec_metadata_chooses_slurm_and_its_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metadata.launcher and metadata.slurm_options send a kernelspec's kernels to Slurm."""
    d = tmp_path / "kernels" / "py-slurm"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python on node3", "language": "python",
        "metadata": {"launcher": "slurm", "slurm_options": {"nodelist": "node3"}}}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    async with Supervisor(launch=LaunchOptions(forward_stderr=False, startup_timeout=30)) as s:
        kid = await s.start_kernel("py-slurm")
        info = s.get_kernel(kid).connection_info
        assert info is not None and info.ip == NODES["node3"]
        await s.shutdown_kernel(kid)


# -- execute, interrupt, restart, crash -------------------------------------------------
async def test_interrupt_reaches_the_kernel_on_its_node() -> None:
    """An interrupt (SIGINT through srun --disable-status) stops running code on the node."""
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node1"})) as s:
        kid = await s.start_kernel("python3")
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)",
                                stop_on_error=False)
            while True:  # wait until the code runs: its output is on IOPub
                msg = await kc.get_iopub_msg(timeout=20)
                if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                    break
            t0 = time.monotonic()
            await s.interrupt_kernel(kid)
            while True:
                reply = await kc.get_shell_msg(timeout=20)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert time.monotonic() - t0 < 10
            again = await kc.execute("1 + 1", stop_on_error=False, reply=True, timeout=20)
            assert again["content"]["status"] == "ok"
        finally:
            kc.stop_channels()


async def test_restart_is_a_new_job_and_the_old_one_is_gone() -> None:
    """A manual restart ends the old job and runs the kernel in a new job that answers."""
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node3"})) as s:
        kid = await s.start_kernel("python3")
        first = handle_of(s, kid)
        await s.restart_kernel(kid)
        second = handle_of(s, kid)
        assert second is not first and second.job_id != first.job_id
        assert first.final is not None and "completed" in first.final.cause
        assert job_state(str(first.job_id)) in ("", "COMPLETING")
        assert await evaluate(s, kid, "6 * 7") == "42"


async def test_kernel_killed_on_its_node_is_restarted_with_slurms_reason() -> None:
    """SIGKILL of the kernel on its node: an exit event naming the job, then a restart."""
    events = Events()
    policy = RestartPolicy(restart="permanent", backoff=NO_WAIT)
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node1"}),
                          policy=policy) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        assert proc.remote_pid is not None
        os.kill(proc.remote_pid, signal.SIGKILL)
        exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        assert exited.signal == signal.SIGKILL
        assert re.search(rf"Slurm job {proc.job_id} on node1: failed \(kernel killed by "
                         r"signal 9\)", exited.cause), exited.cause
        await events.wait_for(lambda e: e.kind == "restarted")
        assert handle_of(s, kid).job_id != proc.job_id
        assert await evaluate(s, kid, "'back'") == "'back'"


async def test_job_cancelled_from_outside_is_reported_as_cancelled() -> None:
    """scancel of a kernel's job by someone else: the exit event says Slurm cancelled it."""
    events = Events()
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"}),
                          policy=RestartPolicy(restart="temporary")) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        await asyncio.to_thread(subprocess.run, ["scancel", str(proc.job_id)], check=True,
                                timeout=20)
        exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        assert f"Slurm job {proc.job_id} on node2: cancelled" in exited.cause, exited.cause


async def test_out_of_memory_is_a_death_cause() -> None:
    """memory_limit becomes the job's --mem; a kernel over it dies "out of memory"."""
    events = Events()
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node3"},
                                               memory_limit="150M"),
                          policy=RestartPolicy(restart="temporary")) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            kc.execute("hog = bytearray(600 * 2**20)\nimport time\ntime.sleep(60)")
            exited = (await events.wait_for(lambda e: e.kind == "exited", timeout=30))[0]
        finally:
            kc.stop_channels()
        assert exited.oom and "out of memory" in exited.cause, exited.cause


async def test_node_failure_is_a_death_cause() -> None:
    """A kernel's node going down ends its job as NODE_FAIL, and the event says node failure."""
    events = Events()
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"}),
                          policy=RestartPolicy(restart="temporary")) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        try:
            await asyncio.to_thread(subprocess.run, [
                "scontrol", "update", "nodename=node2", "state=down", "reason=kstest"],
                check=True, timeout=20)
            exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        finally:
            await asyncio.to_thread(node_back, "node2")
        assert f"Slurm job {proc.job_id} on node2: node failure" in exited.cause, exited.cause


def node_back(node: str) -> None:
    """Return a node we set down to service, and wait (bounded) until it is idle again."""
    def idle() -> bool:
        return slurm("sinfo", "-h", "-N", "-n", node, "-o", "%t").strip() == "idle"
    if not wait_until(idle, 5):
        slurm("scontrol", "update", f"nodename={node}", "state=resume")
    assert wait_until(idle, 30), slurm("sinfo", "-N")


# -- ending -------------------------------------------------------------------------
async def test_shutdown_leaves_no_job_and_no_process() -> None:
    """shutdown_request ends the kernel; no job stays queued and nothing runs on the node."""
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"})) as s:
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        remote, srun = proc.remote_pid, proc.pid
        assert remote is not None
        await s.shutdown_kernel(kid)
        assert proc.final is not None and "shut down by the supervisor" in proc.final.cause
        assert pid_gone(remote, 0) and pid_gone(srun, 0)
    assert wait_until(lambda: not our_jobs(), 10), our_jobs()
    assert wait_until(lambda: not node_processes(), 10), node_processes()


@pytest.mark.parametrize("lose_reaper", [False, True], ids=["reaper", "reaper-lost-once"])
def test_sigkill_of_the_supervising_process_leaves_no_job(tmp_path: Path,
                                                         lose_reaper: bool) -> None:
    """SIGKILL of a process supervising Slurm kernels: every job ends, every file goes.

    With ``reaper-lost-once`` the job reaper sidecar is SIGKILLed between two
    starts: the next one is told the first kernel again, so its connection
    file (which only the sidecar deletes) goes too.
    """
    script = tmp_path / "hold.py"
    script.write_text(
        "import asyncio, json, os, select, signal, sys\n"
        "from supervisor import Supervisor\n"
        "from supervisor.kernel import LaunchOptions\n"
        "from supervisor.launchers.slurmjobs import job_reaper\n"
        "async def main():\n"
        "    opts = LaunchOptions(forward_stderr=False, launcher='slurm',\n"
        "                         slurm_options={'nodelist': 'node3'}, startup_timeout=30)\n"
        "    facts = []\n"
        "    async with Supervisor(launch=opts) as s:\n"
        "        for n in range(2):\n"
        "            if n and sys.argv[1] == 'lose':\n"
        "                fd = os.pidfd_open(job_reaper.pid())\n"
        "                os.kill(job_reaper.pid(), signal.SIGKILL)\n"
        "                select.select([fd], [], [], 10)\n"
        "                os.close(fd)\n"
        "            kid = await s.start_kernel('python3')\n"
        "            p = s.actor_of(kid).process\n"
        "            facts.append({'job': p.job_id, 'pid': p.remote_pid,\n"
        "                          'file': str(s.get_kernel(kid).connection_file)})\n"
        "        print(json.dumps({'kernels': facts, 'reaper': job_reaper.pid()}), flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n")
    child = subprocess.Popen([sys.executable, str(script), "lose" if lose_reaper else "keep"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        facts = json.loads(child.stdout.readline())
        assert [job_state(k["job"]) for k in facts["kernels"]] == ["RUNNING", "RUNNING"]
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    for kernel in facts["kernels"]:
        assert pid_gone(kernel["pid"], 20), "a kernel outlived its supervisor"
    assert pid_gone(facts["reaper"], 25), "the job reaper did not finish"
    for kernel in facts["kernels"]:
        assert not Path(kernel["file"]).exists()  # the reaper removed our connection file
        assert wait_until(lambda k=kernel: job_state(k["job"]) == "", 20), kernel


def test_close_after_the_start_loop_closed_cancels_the_job() -> None:
    """A supervisor closed from a new loop after its own loop closed still cancels the job."""
    s = Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"}))

    async def start() -> tuple[str | None, int | None, int]:
        s.start()
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        return proc.job_id, proc.remote_pid, proc.pid

    job, remote, srun = asyncio.run(start())
    assert job is not None and remote is not None and job_state(job) == "RUNNING"
    asyncio.run(asyncio.wait_for(s.close(), 20))
    assert pid_gone(srun, 10) and pid_gone(remote, 20)
    assert wait_until(lambda: job_state(job) == "", 20), job_state(job)


# -- starting -----------------------------------------------------------------------
async def test_job_pending_past_the_startup_timeout_is_cancelled_with_its_reason() -> None:
    """A job that cannot start (node full) fails the start with Slurm's reason; it is cancelled."""
    blocker = slurm("sbatch", "--parsable", "-w", "node1", "--cpus-per-task=8",
                    "--job-name=blocker", "--output=/dev/null", "--wrap", "exec sleep 300").strip()
    assert blocker.isdigit()
    try:
        assert wait_until(lambda: job_state(blocker) == "RUNNING", 20)
        async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node1"},
                                                   startup_timeout=3)) as s:
            t0 = time.monotonic()
            with pytest.raises(KernelStartupError) as info:
                await s.start_kernel("python3")
            assert time.monotonic() - t0 < 15
        text = str(info.value)
        assert info.value.timed_out
        assert "pending: Resources" in text and "the job was cancelled" in text, text
    finally:
        await asyncio.to_thread(subprocess.run, ["scancel", blocker], timeout=20, check=False)
    assert wait_until(lambda: not our_jobs(), 10), our_jobs()


async def test_pending_is_a_state_with_a_reason_then_the_kernel_starts() -> None:
    """A job waiting for a full node is pending with Slurm's reason, and starts once it frees."""
    blocker = slurm("sbatch", "--parsable", "-w", "node1", "--cpus-per-task=8",
                    "--job-name=blocker", "--output=/dev/null", "--wrap", "exec sleep 300").strip()
    assert blocker.isdigit()
    launched: asyncio.Future[SlurmProcess] = asyncio.get_running_loop().create_future()
    launcher = SlurmLauncher({"nodelist": "node1"}, on_launch=launched.set_result)
    try:
        assert wait_until(lambda: job_state(blocker) == "RUNNING", 20)
        async with Supervisor(launch=QUIET.replace(launcher=launcher)) as s:
            start = asyncio.ensure_future(s.start_kernel("python3", kernel_id="pending-1"))
            proc = await asyncio.wait_for(launched, 20)
            await asyncio.wait_for(proc.wait_state("pending"), 20)
            while proc.reason != "Resources":  # Slurm's first word may be "None"
                await asyncio.wait_for(proc.wait_state("pending", "allocated", "running"), 20)
                if proc.state != "pending":
                    break
            assert proc.describe_state() == "pending: Resources"
            assert not start.done() and s.child_status("pending-1") == "starting"
            await asyncio.to_thread(subprocess.run, ["scancel", blocker], timeout=20)
            assert await asyncio.wait_for(start, 30) == "pending-1"
            assert proc.state == "running" and proc.node == "node1"
    finally:
        await asyncio.to_thread(subprocess.run, ["scancel", blocker], timeout=20, check=False)


async def test_warm_pool_of_slurm_kernels() -> None:
    """A warm pool fills with Slurm kernels; acquire hands one over ready, on a node."""
    events = Events()
    async with Supervisor(launch=QUIET, warm={"python3": 2}) as s:
        s.subscribe(events)
        await events.wait_for(lambda e: e.kind == "ready", count=2, timeout=40)
        assert s.statistics().pool["python3"] == 2
        kid = await s.acquire("python3")
        info = s.get_kernel(kid).connection_info
        assert info is not None and info.ip in NODES.values()
        assert await evaluate(s, kid, "'warm'") == "'warm'"
        await events.wait_for(lambda e: e.kind == "ready", count=3, timeout=40)


# -- the report channel ---------------------------------------------------------------
def _send(address: str, payload: bytes) -> bytes:
    import socket

    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        return sock.recv(100)


async def test_forged_and_late_reports_are_dropped_and_counted() -> None:
    """A report with a bad MAC, an unknown launch or a spent launch is refused and counted."""
    launcher = slurm_launcher({"nodelist": "node2"})
    async with Supervisor(launch=QUIET.replace(slurm_options={"nodelist": "node2"})) as s:
        kid = await s.start_kernel("python3")
        proc = handle_of(s, kid)
        address = proc.report_address
        assert address is not None
        before = launcher.statistics()
        body = json.dumps({"launch": proc.launch_id, "ip": "10.233.77.99", "ports": {}})
        forged = json.dumps({"launch": "0123456789abcdef", "body": body, "mac": "00" * 32})
        replayed = json.dumps({"launch": proc.launch_id, "body": body, "mac": "00" * 32})
        loop = asyncio.get_running_loop()
        answers = [await loop.run_in_executor(None, _send, address, line.encode() + b"\n")
                   for line in (forged, replayed, "not json")]
        assert answers == [b"no\n"] * 3
        after = launcher.statistics()
        assert after["reports_unauthenticated"] - before["reports_unauthenticated"] == 2
        assert after["reports_late"] - before["reports_late"] == 1  # its launch already reported
        assert s.get_kernel(kid).connection_info.ip == NODES["node2"]  # type: ignore[union-attr]
        assert await evaluate(s, kid, "'still mine'") == "'still mine'"


# -- the command line -----------------------------------------------------------------
def test_cli_supervises_slurm_kernels() -> None:
    """`supervise --launcher slurm --slurm-option nodelist=node3` runs kernels there and ends clean."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "supervise", "--kernel", "python3", "--count", "2",
         "--launcher", "slurm", "--slurm-option", "nodelist=node3", "--duration", "0.5",
         "--log-format", "json"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "events: starting=2 ready=2 shutdown=2" in done.stdout, done.stdout
    assert done.stderr.count("Slurm job ") >= 2 and "on node3: completed" in done.stderr


def test_cli_run_executes_code_on_the_chosen_node() -> None:
    """`run --launcher slurm --slurm-option nodelist=node1 -c CODE` runs the code on node1."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--kernel", "python3", "--launcher", "slurm",
         "--slurm-option", "nodelist=node1", "-c",
         "import os; print(os.environ['SLURMD_NODENAME'])"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "node1"


async def test_the_gateway_serves_slurm_kernels() -> None:
    """A gateway whose kernels are Slurm job steps on node2: POST /api/kernels starts one there,
    its WebSocket runs code on node2, DELETE ends the job (the autouse check: nothing left)."""
    from gateway_util import close_all, execute, gateway, stdout_of

    launch = QUIET.replace(launcher="slurm", slurm_options={"nodelist": "node2"})
    async with gateway(default_kernel_name="python3", launch=launch) as gw:
        kid = await gw.new_kernel("python3")
        assert len(our_jobs()) == 1
        ws = await gw.ws(kid)
        try:
            reply, seen = await execute(ws, "import os; print(os.environ['SLURMD_NODENAME'])")
            assert reply["content"]["status"] == "ok"
            assert stdout_of(seen) == "node2\n"
        finally:
            await close_all(ws)
        await gw.json("DELETE", f"api/kernels/{kid}", expect=204)
        assert wait_until(lambda: not our_jobs(), 20)

"""The Slurm launcher's parts that need no cluster: node side, report channel, job records.

The node side (supervisor/launchers/_slurmnode.py) runs here as a plain
process against a report server on loopback, exactly as srun would run it on
a compute node; a tiny script stands in for the kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import pytest

from supervisor.errors import ConfigurationError, KernelSpecError
from supervisor.kernel import LaunchOptions
from supervisor.launchers.choose import choose_launcher
from supervisor.launchers.slurm import NODE_SCRIPT, SlurmLauncher
from supervisor.launchers.slurmjobs import job_cause, parse_job, state_from_stderr
from supervisor.launchers.slurmreport import ReportCounts, ReportServer, sign

KERNEL = (
    "import json, os, signal, sys\n"
    "info = json.load(open(sys.argv[1]))\n"
    "leaked = sorted(k for k in os.environ if k.startswith('KS_SLURM_'))\n"
    "print(json.dumps({'info': info, 'leaked': leaked, 'parent': os.environ['JPY_PARENT_PID'],"
    " 'path': sys.argv[1]}), flush=True)\n"
    "signal.pause()\n"
)


async def node_side(server: ReportServer, launch: str, secret: bytes,
                    ) -> asyncio.subprocess.Process:
    env = dict(os.environ, KS_SLURM_REPORT=server.address, KS_SLURM_LAUNCH=launch,
               KS_SLURM_SECRET=secret.hex(), KS_SLURM_IP="127.0.0.1",
               KS_SLURM_CONNECTION=json.dumps({"key": "k" * 8, "kernel_name": "fake"}))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", NODE_SCRIPT, sys.executable, "-c", KERNEL,
        "{connection_file}", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def test_node_side_reports_starts_the_kernel_and_dies_with_the_link() -> None:
    """A signed report is accepted; the kernel starts with its file; closing the link kills it."""
    counts = ReportCounts()
    server = ReportServer("127.0.0.1", counts)
    try:
        entry = server.expect("a1b2c3d4e5f60718")
        started = asyncio.Event()
        entry.on_started = lambda pid: started.set()
        node = await node_side(server, entry.launch, entry.secret)
        report: dict[str, Any] = await asyncio.wait_for(entry.report, 20)
        assert node.stdout is not None and node.stderr is not None
        said = json.loads(await asyncio.wait_for(node.stdout.readline(), 20))
        await asyncio.wait_for(started.wait(), 20)
        assert said["leaked"] == []  # the secret and the key never reach the kernel
        assert said["parent"] == str(report["pid"]) == str(node.pid)
        assert said["info"]["ip"] == report["ip"] == "127.0.0.1"
        assert said["info"]["key"] == "k" * 8 and said["info"]["transport"] == "tcp"
        assert {f"{c}_port": p for c, p in report["ports"].items()} == {
            k: v for k, v in said["info"].items() if k.endswith("_port")}
        assert len(set(report["ports"].values())) == 5
        assert entry.kernel_pid is not None and counts.accepted == 1
        entry.close_link()  # as when the supervising process dies
        assert await asyncio.wait_for(node.wait(), 20) == -signal.SIGKILL
        await node.stderr.read()
        assert not await asyncio.to_thread(os.path.exists, said["path"])  # removed on the node
    finally:
        server.close()


async def test_node_side_with_a_wrong_secret_is_refused_and_starts_nothing() -> None:
    """A report signed with another secret is dropped, counted, and no kernel starts."""
    counts = ReportCounts()
    server = ReportServer("127.0.0.1", counts)
    try:
        entry = server.expect("00112233445566ff")
        node = await node_side(server, entry.launch, b"not the secret")
        out, err = await asyncio.wait_for(node.communicate(), 20)
        assert node.returncode == 3 and out == b""
        assert b"refused" in err
        assert counts.unauthenticated == 1 and counts.accepted == 0
        assert not entry.report.done()
    finally:
        server.close()


async def test_a_report_for_a_launch_that_gave_up_is_late() -> None:
    """After a launch is retired (its start gave up), even a correctly signed report is late."""
    counts = ReportCounts()
    server = ReportServer("127.0.0.1", counts)
    try:
        entry = server.expect("feedfacecafe0001")
        server.retire(entry.launch)
        node = await node_side(server, entry.launch, entry.secret)
        await asyncio.wait_for(node.communicate(), 20)
        assert node.returncode == 3 and counts.late == 1 and counts.accepted == 0
    finally:
        server.close()


def test_report_mac_is_hmac_sha256_of_the_body() -> None:
    """The node side and the server agree on the MAC (the node imports none of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurmnode", NODE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.sign(b"s", '{"a": 1}') == sign(b"s", '{"a": 1}')


# -- Slurm's job records ------------------------------------------------------------
def _record(state: str, reason: str = "None", exit_code: str = "0:0") -> str:
    return (f"JobId=42 JobName=kernel-x UserId=root(0) JobState={state} Reason={reason} "
            f"Dependency=(null) ExitCode={exit_code} RunTime=00:01:00 TimeLimit=00:01:00 "
            f"NodeList=node2 BatchHost=node2")


@pytest.mark.parametrize(("state", "reason", "code", "words", "oom"), [
    ("TIMEOUT", "TimeLimit", "0:15", "time limit reached (TimeLimit=00:01:00)", False),
    ("NODE_FAIL", "NodeDown", "0:0", "node failure, reason NodeDown", False),
    ("CANCELLED", "None", "0:15", "cancelled", False),
    ("OUT_OF_MEMORY", "OutOfMemory", "0:125", "out of memory", True),
    ("FAILED", "NonZeroExitCode", "3:0", "failed (exit code 3)", False),
    ("FAILED", "JobLaunchFailure", "0:9", "failed (kernel killed by signal 9)", False),
    ("COMPLETED", "None", "0:0", "completed", False),
])
def test_job_records_name_the_death(state: str, reason: str, code: str, words: str,
                                    oom: bool) -> None:
    """Slurm's final job state becomes the exit event's words: time limit, node failure..."""
    job = parse_job(_record(state, reason, code))
    assert job is not None and job.finished and job.nodes == "node2"
    text, is_oom = job_cause(job)
    assert text.startswith("Slurm job 42 on node2: ") and words in text
    assert is_oom is oom


def test_a_step_killed_for_memory_is_out_of_memory_even_if_the_job_says_failed() -> None:
    """slurmstepd's "exceeded memory limit" on srun's stderr marks an out-of-memory death."""
    job = parse_job(_record("FAILED", "JobLaunchFailure", "0:9"))
    assert job is not None
    text, oom = job_cause(job, "slurmstepd-node3: error: StepId=21.0 exceeded memory limit "
                               "(233631744 > 157286400), being killed")
    assert oom and "out of memory (used 222 MiB of its 150 MiB)" in text


@pytest.mark.parametrize(("reason", "code", "words"), [
    ("JobLaunchFailure", "0:9", "failed (kernel killed by signal 9)"),
    ("TimeLimit", "0:15", "time limit reached"),
    ("NodeDown", "0:15", "node failure"),
    ("None", "0:0", "completed"),
])
def test_a_job_still_completing_is_named_by_its_reason_and_exit(reason: str, code: str,
                                                                words: str) -> None:
    """A record read while the job still completes is named from its reason and exit code."""
    job = parse_job(_record("COMPLETING", reason, code))
    assert job is not None and not job.finished
    assert words in job_cause(job)[0]


@pytest.mark.parametrize(("text", "state"), [
    ("slurmstepd-node2: error: *** STEP 254.0 ON node2 CANCELLED AT 2026-12-01T00:19:47 DUE "
     "TO NODE FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***", "NODE_FAIL"),
    ("slurmstepd-node1: error: *** STEP 9.0 ON node1 CANCELLED AT 2026-12-01T00:01:02 DUE TO "
     "TIME LIMIT ***", "TIMEOUT"),
    ("slurmstepd-node2: error: *** STEP 2.0 ON node2 CANCELLED AT 2026-11-30T23:57:45 ***",
     "CANCELLED"),
    ("slurmstepd-node3: error: StepId=21.0 exceeded memory limit (233631744 > 157286400), "
     "being killed", "OUT_OF_MEMORY"),
    ("slurmstepd-node3: error: StepId=21.0 exceeded memory limit (233631744 > 157286400), "
     "being killed\nslurmstepd-node3: error: *** STEP 21.0 ON node3 CANCELLED AT "
     "2026-11-30T23:45:20 ***", "OUT_OF_MEMORY"),
    ("srun: error: node3: task 0: Killed", "FAILED"),
    ("srun: error: node3: task 0: Exited with exit code 3", "FAILED"),
    ("srun: job 12 has been allocated resources", None),
])
def test_slurmstepd_words_on_sruns_stderr_name_the_end(text: str, state: str | None) -> None:
    """slurmstepd's last words, relayed by srun, say how the step ended before the record."""
    assert state_from_stderr(text) == state


def test_pending_record_is_not_finished() -> None:
    """A pending job's record says so, with Slurm's reason."""
    job = parse_job(_record("PENDING", "Resources"))
    assert job is not None and job.pending and not job.finished and job.reason == "Resources"


# -- configuration --------------------------------------------------------------------
def test_slurm_options_are_validated() -> None:
    """Options the launcher sets itself, or that are not option names, are refused at once."""
    with pytest.raises(ConfigurationError, match="set by the launcher"):
        LaunchOptions(launcher="slurm", slurm_options={"ntasks": 4})
    with pytest.raises(ConfigurationError, match="not a long option"):
        SlurmLauncher({"node list": "x"})
    with pytest.raises(ConfigurationError, match="launcher must be one of"):
        LaunchOptions(launcher="kubernetes")
    assert SlurmLauncher({"--time": "1:00", "exclusive": True, "mem": 300}).options == {
        "time": "1:00", "exclusive": None, "mem": "300"}


def test_kernelspec_metadata_with_a_bad_launcher_is_a_kernelspec_error() -> None:
    """metadata.launcher naming no launcher fails as a bad kernelspec, naming the field."""
    with pytest.raises(KernelSpecError, match=r"metadata\.launcher"):
        choose_launcher(None, None, {"launcher": "yarn"}, "odd")
    with pytest.raises(KernelSpecError, match=r"metadata\.slurm_options"):
        choose_launcher(None, None, {"launcher": "slurm", "slurm_options": {"pty": True}}, "odd")
    assert choose_launcher(None, None, {}, "plain").name == "local"

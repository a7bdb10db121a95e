"""Containment: nothing a kernel starts outlives it; limits; deaths explained; figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KERNEL, Events, pid_gone

from supervisor.errors import ConfigurationError, KernelSpecError
from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import KernelSpec
from supervisor.launchers import LocalLauncher, parse_memory_limit
from supervisor.launchers.cgroups import CgroupSetup, detect
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
ESCAPER = HERE / "kernels" / "escaper.py"
REPO = HERE.parent
QUIET = LaunchOptions(forward_stderr=False, startup_timeout=30, shutdown_wait=2,
                      terminate_wait=1)
CGROUPS = detect().usable
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason="no writable cgroup hierarchy here")
NEVER = RestartPolicy(restart="temporary")


def escaper_spec(mode: str, pid_file: Path, *flags: str,
                 metadata: dict[str, object] | None = None) -> KernelSpec:
    """A fake kernel that first starts MODE's would-be escapees and lists them in pid_file."""
    return KernelSpec(
        name="escaper", argv=(sys.executable, str(ESCAPER), mode, str(pid_file), "--",
                              sys.executable, str(FAKE_KERNEL), "-f", "{connection_file}",
                              *flags),
        display_name=f"escaper {mode}", language="python", interrupt_mode="signal",
        metadata=metadata or {}, resource_dir=HERE / "kernels",
    )


def read_pids(pid_file: Path) -> list[int]:
    return [int(line) for line in pid_file.read_text().split()]


def all_alive(pids: list[int]) -> bool:
    return all(not pid_gone(pid, 0) for pid in pids)


def none_left(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait on pidfds for each pid; return those still alive at the deadline."""
    return [pid for pid in pids if not pid_gone(pid, timeout)]


def sup(**kw: Any) -> Supervisor:
    kw.setdefault("launch", QUIET)
    kw.setdefault("policy", NEVER)
    return Supervisor(**kw)


# -- escapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["setsid", "doublefork"])
async def test_escaped_processes_end_with_shutdown(mode: str, tmp_path: Path) -> None:
    """A process started by setsid or a double fork is ended by shutdown_kernel, with a count."""
    pid_file = tmp_path / "pids"
    events = Events()
    async with sup() as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=escaper_spec(mode, pid_file))
        escaped = read_pids(pid_file)
        assert escaped and all_alive(escaped)
        await s.shutdown_kernel(kid)
        assert none_left(escaped, 0.5) == []
        event = await events.wait_for(lambda e: e.kind == "shutdown")
        assert "its process tree was ended: 1 process" in event[0].reason


@pytest.mark.parametrize("mode", ["setsid", "doublefork"])
async def test_escaped_processes_end_with_restart(mode: str, tmp_path: Path) -> None:
    """A restart ends the escapees of the old kernel; the new kernel's own are then ended too."""
    pid_file = tmp_path / "pids"
    async with sup() as s:
        kid = await s.start_kernel(spec=escaper_spec(mode, pid_file))
        first = read_pids(pid_file)
        pid_file.unlink()
        await s.restart_kernel(kid)
        assert none_left(first, 0.5) == []
        second = read_pids(pid_file)
        assert all_alive(second)
        await s.shutdown_kernel(kid, now=True)
        assert none_left(second, 0.5) == []


OWNER = """
import asyncio, json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from test_containment import escaper_spec, QUIET
from pathlib import Path
from supervisor.supervisor import Supervisor
from supervisor.launchers import LocalLauncher, reaper_pid
from supervisor.launchers.cgroups import CgroupSetup, detect
launch = QUIET
if {v1_only!r}:
    launch = QUIET.replace(launcher=LocalLauncher(cgroups=CgroupSetup(v1=detect().v1)))
async def main():
    async with Supervisor(launch=launch) as s:
        kid = await s.start_kernel(spec=escaper_spec({mode!r}, Path({pid_file!r})))
        actor = s.actor_of(kid)
        dirs = [str(d) for d in actor.process._cgroup.dirs] if actor.process._cgroup else []
        print("INFO", json.dumps({{"kernel": actor.pid, "reaper": reaper_pid(), "cgroups": dirs}}),
              flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.mark.parametrize(("mode", "v1_only"), [
    ("setsid", False), ("doublefork", False),
    pytest.param("doublefork", True, marks=needs_cgroups, id="doublefork-cgroup-v1-only")])
def test_escaped_processes_end_when_the_supervisor_is_sigkilled(mode: str, v1_only: bool,
                                                                tmp_path: Path) -> None:
    """SIGKILL of the supervising process: the reaper ends kernel and escapees, removes cgroups."""
    import json

    pid_file = tmp_path / "pids"
    code = textwrap.dedent(OWNER.format(repo=str(REPO), tests=str(HERE), mode=mode,
                                        pid_file=str(pid_file), v1_only=v1_only))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout is not None
        line = ""
        while not line.startswith("INFO "):  # structlog's default output comes first
            line = owner.stdout.readline()
            assert line, "the owner died before reporting"
        info = json.loads(line[5:])
        escaped = read_pids(pid_file)
        assert all_alive([info["kernel"], *escaped])
        assert all(Path(d).is_dir() for d in info["cgroups"])
        owner.kill()
        owner.wait(10)
        assert none_left([info["reaper"]], 10) == []  # it exits once everything is gone
        assert none_left([info["kernel"], *escaped], 0) == []
        assert [d for d in info["cgroups"] if Path(d).exists()] == []
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout:
            owner.stdout.close()


async def test_a_forking_kernel_is_ended_whole(tmp_path: Path) -> None:
    """A kernel whose child forked 500 processes, each in its own session, is ended whole."""
    pid_file = tmp_path / "pids"
    async with sup() as s:
        kid = await s.start_kernel(spec=escaper_spec("forks:500", pid_file))
        pids = read_pids(pid_file)
        assert len(pids) == 501
        figures = s.statistics().resources[kid]
        assert figures.processes is not None and figures.processes >= 502
        await s.shutdown_kernel(kid)
        assert none_left(pids, 2) == []


async def test_a_child_ignoring_sigterm_is_ended(tmp_path: Path) -> None:
    """A child that ignores SIGTERM, under a kernel that ignores shutdown and SIGTERM, still ends."""
    pid_file = tmp_path / "pids"
    events = Events()
    async with sup(launch=QUIET.replace(shutdown_wait=0.2, terminate_wait=0.2)) as s:
        s.subscribe(events)
        spec = escaper_spec("sigterm", pid_file, "--ignore-shutdown", "--ignore-sigterm")
        kid = await s.start_kernel(spec=spec)
        child = read_pids(pid_file)
        await s.shutdown_kernel(kid)
        assert none_left(child, 0.5) == []
        event = (await events.wait_for(lambda e: e.kind == "shutdown"))[0]
        assert "killed (SIGKILL) by the supervisor (shut down)" in event.reason
        assert event.signal == signal.SIGKILL


async def test_contain_off_lets_daemons_outlive_the_kernel(tmp_path: Path) -> None:
    """With contain='off' a setsid daemon survives the shutdown (the opt-out)."""
    pid_file = tmp_path / "pids"
    async with sup(launch=QUIET.replace(contain="off")) as s:
        kid = await s.start_kernel(spec=escaper_spec("setsid", pid_file))
        daemon = read_pids(pid_file)
        assert s.statistics().resources[kid].method == "off"
        await s.shutdown_kernel(kid)
    try:
        assert all_alive(daemon)
    finally:
        for pid in daemon:
            os.kill(pid, signal.SIGKILL)
        assert none_left(daemon) == []


@pytest.mark.parametrize("where", ["not-a-cgroup", "read-only"])
async def test_without_usable_cgroups_the_session_method_contains(where: str,
                                                                  tmp_path: Path) -> None:
    """A cgroup path that is not one, or is read-only, falls back to 'session' and still contains."""
    parent = tmp_path if where == "not-a-cgroup" else Path("/proc/sys/kernel")
    launcher = LocalLauncher(cgroups=CgroupSetup(unified=parent))
    pid_file = tmp_path / "pids"
    async with sup(launch=QUIET.replace(launcher=launcher, memory_limit="2G")) as s:
        kid = await s.start_kernel(spec=escaper_spec("doublefork", pid_file))
        figures = s.statistics().resources[kid]
        assert (figures.method, figures.memory_method) == ("session", "rlimit")
        assert figures.processes == 2 and figures.memory and figures.cpu_seconds is not None
        escaped = read_pids(pid_file)
        await s.shutdown_kernel(kid)
        assert none_left(escaped, 0.5) == []
    assert [p for p in os.listdir(tmp_path) if p.startswith("kernel-supervisor")] == []


@needs_cgroups
async def test_contain_cgroup_fails_typed_where_there_are_none(tmp_path: Path) -> None:
    """contain='cgroup' (required) on an unusable path is a KernelStartupError, nothing left."""
    from supervisor.errors import KernelStartupError

    launcher = LocalLauncher(cgroups=CgroupSetup())
    async with sup(launch=QUIET.replace(launcher=launcher, contain="cgroup")) as s:
        with pytest.raises(KernelStartupError, match="contain='cgroup'"):
            await s.start_kernel(spec=escaper_spec("none", tmp_path / "pids"))


@needs_cgroups
@pytest.mark.parametrize("mode", ["setsid", "doublefork"])
async def test_cgroup_v1_alone_contains_too(mode: str, tmp_path: Path) -> None:
    """On a machine with only cgroup v1 (no cgroup.kill) the tree is still ended and removed."""
    v1 = detect().v1
    if "memory" not in v1:
        pytest.skip("no writable v1 memory hierarchy")
    launcher = LocalLauncher(cgroups=CgroupSetup(v1=v1))
    pid_file = tmp_path / "pids"
    async with sup(launch=QUIET.replace(launcher=launcher)) as s:
        kid = await s.start_kernel(spec=escaper_spec(mode, pid_file))
        assert s.statistics().resources[kid].method == "cgroup-v1"
        dirs = list(s.actor_of(kid).process._cgroup.dirs)  # type: ignore[union-attr]
        escaped = read_pids(pid_file)
        await s.shutdown_kernel(kid)
        assert none_left(escaped, 0.5) == []
        assert [d for d in dirs if d.name in os.listdir(d.parent)] == []


async def test_a_kernel_that_dies_on_its_own_takes_its_tree_along(tmp_path: Path) -> None:
    """A kernel that exits by itself: its setsid child is ended and the exited event counts it."""
    pid_file = tmp_path / "pids"
    events = Events()
    async with sup() as s:
        s.subscribe(events)
        await s.start_kernel(spec=escaper_spec("setsid", pid_file, "--exit-after", "0.3",
                                               "--exit-code", "3"))
        escaped = read_pids(pid_file)
        exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        assert none_left(escaped, 0.5) == []
        assert exited.exit_code == 3
        assert exited.reason == "exit code 3; its process tree was ended: 1 process"


def test_cgroup_setup_is_read_from_mountinfo(tmp_path: Path) -> None:
    """Pure v2, hybrid and namespaced mount tables resolve to the right parent directories."""
    from supervisor.launchers.cgroups import setup_from

    for sub in ("user.slice/app.scope", "memory/job", "v2/job"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "cgroup.procs").write_text("")
    pure = setup_from(f"30 1 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n",
                      "0::/user.slice/app.scope\n")
    assert pure.unified == tmp_path / "user.slice/app.scope" and pure.v1 == {}
    hybrid = setup_from(
        f"31 1 0:27 / {tmp_path / 'memory'} rw - cgroup cgroup rw,memory\n"
        f"32 1 0:28 / {tmp_path / 'v2'} rw - cgroup2 cgroup2 rw\n",
        "4:memory:/job\n0::/job\n")
    assert hybrid.v1 == {"memory": tmp_path / "memory/job"}
    assert hybrid.unified == tmp_path / "v2/job"
    namespaced = setup_from(f"40 1 0:26 /user.slice {tmp_path / 'user.slice'} rw - cgroup2 x rw\n",
                            "0::/user.slice/app.scope\n")
    assert namespaced.unified == tmp_path / "user.slice/app.scope"


def test_the_manager_takes_limits_and_rejects_bad_ones() -> None:
    """AsyncKernelManager(memory_limit=...) validates at construction, naming the value."""
    from supervisor.manager import AsyncKernelManager

    with pytest.raises(ConfigurationError, match="'9 lives'"):
        AsyncKernelManager("python3", memory_limit="9 lives")
    with pytest.raises(ConfigurationError, match="contain"):
        AsyncKernelManager("python3", contain="sometimes")


# -- limits --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["lots", "2X", "-1G", "", "0.1K", True])
def test_a_memory_limit_that_does_not_parse_is_a_typed_error(value: object) -> None:
    """A bad memory_limit is a ConfigurationError that names the value."""
    with pytest.raises(ConfigurationError, match="memory_limit"):
        LaunchOptions(memory_limit=value)  # type: ignore[arg-type]


def test_memory_limits_parse_in_binary_units() -> None:
    """'300M' is 300 MiB, '2G' 2 GiB, '1.5g' and '512MiB' too; ints are bytes."""
    assert parse_memory_limit("300M") == 300 << 20
    assert parse_memory_limit("2G") == 2 << 30
    assert parse_memory_limit("1.5g") == 3 << 29
    assert parse_memory_limit("512MiB") == 512 << 20
    assert parse_memory_limit(1 << 30) == 1 << 30
    with pytest.raises(ConfigurationError, match="cpu_limit"):
        LaunchOptions(cpu_limit="half")


async def test_a_bad_limit_in_kernelspec_metadata_is_a_spec_error(tmp_path: Path) -> None:
    """metadata.memory_limit that does not parse fails the start with KernelSpecError."""
    spec = escaper_spec("none", tmp_path / "pids", metadata={"memory_limit": "many"})
    async with sup() as s:
        with pytest.raises(KernelSpecError, match="many"):
            await s.start_kernel(spec=spec)


@needs_cgroups
async def test_limits_and_figures_from_kernelspec_metadata(tmp_path: Path) -> None:
    """metadata limits are applied by cgroup and shown with live figures in statistics()."""
    spec = escaper_spec("setsid", tmp_path / "pids",
                        metadata={"memory_limit": "1G", "cpu_limit": 0.5})
    async with sup() as s:
        kid = await s.start_kernel(spec=spec)
        figures = s.statistics().resources[kid]
        assert figures.method.startswith("cgroup")
        assert figures.memory_method.startswith("cgroup")
        assert figures.memory_limit == 1 << 30 and figures.cpu_limit == 0.5
        assert figures.memory and figures.memory > 1 << 20
        assert figures.processes == 2 and figures.cpu_seconds and figures.cpu_seconds > 0
        await s.shutdown_kernel(kid)


MEMORY_HOG = "hog = b'x' * (700 << 20)"


@needs_cgroups
async def test_a_memory_hog_is_killed_out_of_memory_and_says_so(tmp_path: Path) -> None:
    """ipykernel over a 300 MB cgroup limit dies with an out-of-memory cause; the rest goes on."""
    events = Events()
    async with sup(launch=QUIET.replace(memory_limit="300M")) as s:
        s.subscribe(events)
        kid = await s.start_kernel("python3")
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            kc.execute(MEMORY_HOG)  # no reply will come: wait for the exit instead
            exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        finally:
            kc.stop_channels()
        assert exited.oom and exited.signal == signal.SIGKILL
        assert "out of memory (limit 300 MiB, peak 300 MiB)" in exited.reason
        dead = (await events.wait_for(lambda e: e.kind == "dead"))[0]
        assert "out of memory" in dead.reason
        other = await s.start_kernel(spec=escaper_spec("none", tmp_path / "pids"))
        await s.shutdown_kernel(other)


async def test_a_memory_hog_under_rlimit_gets_memory_error(tmp_path: Path) -> None:
    """Without cgroups the limit is RLIMIT_DATA: the cell raises MemoryError, the kernel lives."""
    launcher = LocalLauncher(cgroups=CgroupSetup())
    async with sup(launch=QUIET.replace(launcher=launcher, memory_limit="1G")) as s:
        kid = await s.start_kernel("python3")
        assert s.statistics().resources[kid].memory_method == "rlimit"
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            # stop_on_error=False: ipykernel would otherwise abort the next request if it
            # arrives while it is still handling the error.
            reply = await kc.execute("hog = b'x' * (2 << 30)", stop_on_error=False, reply=True,
                                     timeout=30)
            assert reply["content"]["ename"] == "MemoryError"
            reply = await kc.execute("1 + 1", reply=True, timeout=30)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
        await s.shutdown_kernel(kid)


# -- deaths explained ------------------------------------------------------------------------
async def test_culling_says_the_supervisor_did_it(tmp_path: Path) -> None:
    """A culled kernel's shutdown event says it was shut down by the supervisor (culled)."""
    events = Events()
    async with sup(cull_idle_timeout=0.2, cull_interval=0.05) as s:
        s.subscribe(events)
        await s.start_kernel(spec=escaper_spec("setsid", tmp_path / "pids"))
        event = (await events.wait_for(lambda e: e.kind == "shutdown"))[0]
        assert "by the supervisor (culled)" in event.reason
        assert "its process tree was ended: 1 process" in event.reason


# -- the command line ---------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_the_cli_rejects_a_limit_that_does_not_parse() -> None:
    """`run --memory-limit lots` is a usage error naming the value."""
    result = cli("run", "--memory-limit", "lots", "-c", "1")
    assert result.returncode == 2 and "memory_limit 'lots' does not parse" in result.stderr


@needs_cgroups
def test_the_cli_says_a_kernel_died_out_of_memory() -> None:
    """`run --memory-limit 300M` with a hog exits 1 saying out of memory, limit and peak."""
    result = cli("run", "--memory-limit", "300M", "-c", MEMORY_HOG)
    assert result.returncode == 1
    assert "the kernel died while running the code (signal SIGKILL: out of memory " \
           "(limit 300 MiB, peak 300 MiB))" in result.stderr



LOSES_ITS_REAPER = """
import asyncio, json, os, select, signal, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
from test_containment import escaper_spec, QUIET
from supervisor.supervisor import Supervisor
from supervisor.launchers import reaper_pid
async def main():
    async with Supervisor(launch=QUIET) as s:
        a = await s.start_kernel(spec=escaper_spec("setsid", Path({tmp!r}) / "a"))
        first = reaper_pid()
        fd = os.pidfd_open(first)
        os.kill(first, signal.SIGKILL)
        select.select([fd], [], [], 10)
        os.close(fd)
        b = await s.start_kernel(spec=escaper_spec("setsid", Path({tmp!r}) / "b"))
        second = reaper_pid()  # the write for b found the pipe broken: a new sidecar now
        print("INFO", json.dumps({{"kernels": [s.actor_of(a).pid, s.actor_of(b).pid],
                                   "reapers": [first, second]}}), flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def test_a_lost_reaper_is_replaced_and_told_every_live_kernel(tmp_path: Path) -> None:
    """If the sidecar is killed, the next one learns every live kernel and ends them all."""
    import json

    code = textwrap.dedent(LOSES_ITS_REAPER.format(repo=str(REPO), tests=str(HERE),
                                                   tmp=str(tmp_path)))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout is not None
        line = ""
        while not line.startswith("INFO "):
            line = owner.stdout.readline()
            assert line, "the owner died before reporting"
        info = json.loads(line[5:])
        first, second = info["reapers"]
        assert second != first
        escaped = read_pids(tmp_path / "a") + read_pids(tmp_path / "b")
        assert all_alive(info["kernels"] + escaped)
        owner.kill()
        owner.wait(10)
        assert none_left([second], 10) == []
        assert none_left(info["kernels"] + escaped, 0) == []
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout:
            owner.stdout.close()

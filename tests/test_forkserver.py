"""The fork-server launcher: isolated kernels forked from a template, exits relayed, no orphans."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KERNEL, Events, pid_gone

from supervisor._log import capture_logs
from supervisor.errors import KernelStartupError
from supervisor.kernel import LaunchOptions
from supervisor.kernelspec import KernelSpec
from supervisor.launchers import ForkServerLauncher, LocalLauncher, LocalProcess, launcher_named
from supervisor.launchers.cgroups import detect
from supervisor.launchers.forkserver import ForkedProcess, plan_fork
from supervisor.policy import RestartPolicy
from supervisor.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QUIET = LaunchOptions(forward_stderr=False, startup_timeout=30, shutdown_wait=2,
                      terminate_wait=1)
NEVER = RestartPolicy(restart="temporary")
pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")


def ipy_spec(name: str = "forked", *flags: str, env: dict[str, str] | None = None,
             metadata: dict[str, object] | None = None) -> KernelSpec:
    """An ipykernel kernelspec on this interpreter."""
    return KernelSpec(
        name=name, argv=(sys.executable, *flags, "-m", "ipykernel_launcher", "-f",
                         "{connection_file}"),
        display_name=name, language="python", interrupt_mode="signal",
        env=env or {}, metadata=metadata or {}, resource_dir=HERE / "kernels")


@pytest.fixture
def fork() -> Iterator[ForkServerLauncher]:
    """A fork launcher of the test's own; its templates are gone when the test ends."""
    launcher = ForkServerLauncher(fallback=LocalLauncher())
    yield launcher
    assert launcher.close(10), "a fork-server template outlived the test"


@pytest.fixture
async def sup(fork: ForkServerLauncher) -> AsyncIterator[Supervisor]:
    """A started supervisor whose kernels are forked by ``fork`` and never restarted."""
    async with Supervisor(launch=QUIET.replace(launcher=fork), policy=NEVER) as s:
        yield s


async def evaluate(s: Supervisor, kid: str, code: str, expression: str) -> Any:
    """Run ``code`` in the kernel, then return the value of ``expression`` (a literal)."""
    kc = s.get_kernel(kid).client()
    kc.start_channels()
    try:
        reply = await kc.execute(code, reply=True, timeout=20,
                                 user_expressions={"v": expression})
    finally:
        kc.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return ast.literal_eval(reply["content"]["user_expressions"]["v"]["data"]["text/plain"])


IDENTITY = ("import os, random, sys\n"
            "x = os.getpid()\n")
IDENTITY_EXPR = ("(os.getpid(), os.getsid(0), os.getpgid(0), os.getcwd(), "
                 "os.environ.get('FORK_TEST'), random.getrandbits(64), os.urandom(8).hex(), "
                 "'y' in globals(), len([p for p in os.listdir('/proc/self/fd')]))")


async def test_two_forked_kernels_are_isolated(sup: Supervisor, fork: ForkServerLauncher,
                                               tmp_path: Path) -> None:
    """Two forked kernels have their own pid, session, group, cwd, env, random streams and
    namespace, and share the one template."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await sup.start_kernel(spec=ipy_spec(env={"FORK_TEST": "A"}), cwd=str(tmp_path / "a"))
    b = await sup.start_kernel(spec=ipy_spec(env={"FORK_TEST": "B"}), cwd=str(tmp_path / "b"))
    procs = [sup.actor_of(k).process for k in (a, b)]
    assert all(p is not None and p.launch_note.startswith("forked by the fork server")  # type: ignore[attr-defined]
               for p in procs)
    assert all(isinstance(p, ForkedProcess) for p in procs)
    assert fork.forks == 2 and fork.fallbacks == 0 and len(fork.templates()) == 1
    ra = await evaluate(sup, a, IDENTITY + "y = 1\n", IDENTITY_EXPR)
    rb = await evaluate(sup, b, IDENTITY, IDENTITY_EXPR)
    for result, kid, label in ((ra, a, "a"), (rb, b, "b")):
        pid, sid, pgid, cwd, env, *_ = result
        assert pid == sid == pgid == sup.actor_of(kid).pid
        assert cwd == str(tmp_path / label) and env == label.upper()
    assert ra[5] != rb[5] and ra[6] != rb[6]  # random streams differ
    assert ra[7] is True and rb[7] is False  # namespaces are their own


async def test_interrupt_reaches_a_forked_kernel(sup: Supervisor) -> None:
    """SIGINT from interrupt_kernel ends a running cell with KeyboardInterrupt."""
    kid = await sup.start_kernel(spec=ipy_spec())
    kc = sup.get_kernel(kid).client()
    kc.start_channels()
    try:
        msg_id = kc.execute("import time\nprint('go', flush=True)\ntime.sleep(60)")
        while True:
            msg = await kc.get_iopub_msg(timeout=20)
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                break
        await sup.interrupt_kernel(kid)
        while True:
            reply = await kc.get_shell_msg(timeout=20)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()


async def test_restart_forks_a_fresh_kernel(sup: Supervisor, fork: ForkServerLauncher) -> None:
    """A restart ends the forked kernel and forks a new one from the same template."""
    kid = await sup.start_kernel(spec=ipy_spec())
    old = sup.actor_of(kid).pid
    assert old is not None
    await sup.restart_kernel(kid)
    assert pid_gone(old, 0)
    assert isinstance(sup.actor_of(kid).process, ForkedProcess) and sup.actor_of(kid).pid != old
    assert await evaluate(sup, kid, "z = 2", "z * 21") == 42
    assert fork.forks == 2 and len(fork.templates()) == 1


@pytest.mark.parametrize(("code", "exit_code", "signum"), [
    ("import os; os._exit(7)", 7, None),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, signal.SIGKILL),
])
async def test_a_crash_is_reported_with_its_exact_status(sup: Supervisor, code: str,
                                                         exit_code: int | None,
                                                         signum: int | None) -> None:
    """A forked kernel's exit code or killing signal reaches the exited event, as exec's does."""
    events = Events()
    sup.subscribe(events)
    kid = await sup.start_kernel(spec=ipy_spec())
    kc = sup.get_kernel(kid).client()
    kc.start_channels()
    try:
        kc.execute(code)
        exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
    finally:
        kc.stop_channels()
    assert (exited.exit_code, exited.signal) == (exit_code, signum)


async def test_a_kernel_that_forks_reaps_its_own_child_and_its_tree_ends(
        sup: Supervisor) -> None:
    """os.fork() in a forked kernel works (the kernel reaps its child's status); a forked
    grandchild left running is ended with the kernel."""
    kid = await sup.start_kernel(spec=ipy_spec())
    code = textwrap.dedent("""
        import os, time
        pid = os.fork()
        if pid == 0:
            os._exit(5)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        sleeper = os.fork()
        if sleeper == 0:
            time.sleep(600)
            os._exit(0)
    """)
    status, sleeper = await evaluate(sup, kid, code, "(status, sleeper)")
    assert status == 5 and not pid_gone(sleeper, 0)
    await sup.shutdown_kernel(kid)
    assert pid_gone(sleeper, 5)


async def test_a_template_sigkilled_ends_its_kernels_and_the_next_start_gets_a_fresh_one(
        sup: Supervisor, fork: ForkServerLauncher) -> None:
    """Killing the template kills its kernels (exited: SIGKILL, cause named); the next start
    forks from a new template."""
    events = Events()
    sup.subscribe(events)
    kid = await sup.start_kernel(spec=ipy_spec())
    (template,) = fork.templates()
    os.kill(template.pid, signal.SIGKILL)
    exited = (await events.wait_for(lambda e: e.kind in ("exited", "dead")))[0]
    assert exited.signal == signal.SIGKILL
    dead = (await events.wait_for(lambda e: e.kind == "dead"))[0]
    assert "fork server died" in dead.reason
    again = await sup.start_kernel(spec=ipy_spec())
    (fresh,) = fork.templates()
    assert fresh.pid != template.pid and isinstance(sup.actor_of(again).process, ForkedProcess)
    assert kid not in sup


async def test_a_stuck_template_fails_the_start_without_hanging(
        sup: Supervisor, fork: ForkServerLauncher) -> None:
    """A template that does not answer a fork request fails that start within spawn_timeout;
    it is killed and the next start uses a fresh one."""
    await sup.start_kernel(spec=ipy_spec())
    (template,) = fork.templates()
    fork.spawn_timeout = template.spawn_timeout = 0.5
    os.kill(template.pid, signal.SIGSTOP)
    with pytest.raises(KernelStartupError, match="fork server died while starting"):
        await sup.start_kernel(spec=ipy_spec())
    assert pid_gone(template.pid, 5)
    kid = await sup.start_kernel(spec=ipy_spec())
    assert isinstance(sup.actor_of(kid).process, ForkedProcess)
    assert fork.templates()[0].pid != template.pid


async def test_a_spec_that_is_not_ipykernel_falls_back_to_exec(
        sup: Supervisor, fork: ForkServerLauncher) -> None:
    """A kernelspec the template cannot run is exec'd, with a warning and a ready event that
    say why."""
    spec = KernelSpec(name="fake", argv=(sys.executable, str(FAKE_KERNEL), "-f",
                                         "{connection_file}"),
                      display_name="fake", language="python", resource_dir=HERE / "kernels")
    events = Events()
    sup.subscribe(events)
    with capture_logs() as logs:
        kid = await sup.start_kernel(spec=spec)
    ready = (await events.wait_for(lambda e: e.kind == "ready"))[0]
    assert ready.reason.startswith("exec'd, not forked: the kernel runs")
    proc = sup.actor_of(kid).process
    assert isinstance(proc, LocalProcess) and not isinstance(proc, ForkedProcess)
    warning = next(e for e in logs if e["event"] == "launcher.fork_fallback")
    assert "ipykernel_launcher" in warning["why"] and warning["log_level"] == "warning"
    assert fork.fallbacks == 1 and fork.templates() == []


async def test_strict_refuses_what_it_cannot_fork(fork: ForkServerLauncher) -> None:
    """With strict=True a kernelspec that is not ipykernel is a typed start error."""
    fork.strict = True
    spec = KernelSpec(name="fake", argv=(sys.executable, str(FAKE_KERNEL), "-f",
                                         "{connection_file}"),
                      display_name="fake", language="python", resource_dir=HERE / "kernels")
    async with Supervisor(launch=QUIET.replace(launcher=fork), policy=NEVER) as s:
        with pytest.raises(KernelStartupError, match="cannot fork the kernel"):
            await s.start_kernel(spec=spec)


def test_plans_accept_ipykernel_and_name_what_they_refuse() -> None:
    """plan_fork takes `python [-X ..] -m ipykernel_launcher` and explains every refusal."""
    plan = plan_fork([sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
                      "-f", "c.json"], {"PYTHONPATH": "/x", "PATH": "/bin"})
    assert not isinstance(plan, str)
    assert plan.flags == ("-Xfrozen_modules=off",) and plan.args == ("-f", "c.json")
    assert ("PYTHONPATH", "/x") in plan.import_env
    assert "not a Python interpreter" in str(plan_fork(["/usr/bin/R", "-f", "c.json"]))
    assert "ipykernel_launcher" in str(plan_fork([sys.executable, "-m", "other"]))
    assert "-c" in str(plan_fork([sys.executable, "-c", "pass"]))


async def test_pythonpath_gets_its_own_template_and_its_modules(
        sup: Supervisor, fork: ForkServerLauncher, tmp_path: Path) -> None:
    """A kernel whose env changes PYTHONPATH is forked from a template that imported with it,
    never from the default one."""
    (tmp_path / "fork_marker_mod.py").write_text("WHERE = 'tmp'\n")
    plain = await sup.start_kernel(spec=ipy_spec())
    custom = await sup.start_kernel(spec=ipy_spec(env={"PYTHONPATH": str(tmp_path)}))
    assert len(fork.templates()) == 2
    assert sup.actor_of(plain).process.template is not sup.actor_of(custom).process.template  # type: ignore[union-attr]
    assert await evaluate(sup, custom, "import fork_marker_mod", "fork_marker_mod.WHERE") == "tmp"
    assert await evaluate(sup, plain, "import sys",
                          f"{str(tmp_path)!r} in sys.path") is False


async def test_a_changed_environment_or_refresh_brings_a_fresh_template(
        sup: Supervisor, fork: ForkServerLauncher, tmp_path: Path) -> None:
    """Installing into a directory the template imports from, or refresh(), makes the next
    start use a new template; the old one ends when its last kernel does."""
    env = {"PYTHONPATH": str(tmp_path)}
    first = await sup.start_kernel(spec=ipy_spec(env=env))
    (old,) = fork.templates()
    (tmp_path / "newly_installed.py").write_text("X = 1\n")  # the directory changes
    second = await sup.start_kernel(spec=ipy_spec(env=env))
    (new,) = fork.templates()
    assert new.pid != old.pid and not pid_gone(old.pid, 0)  # kept for its kernel
    await sup.shutdown_kernel(first)
    assert pid_gone(old.pid, 5)
    fork.refresh()
    third = await sup.start_kernel(spec=ipy_spec(env=env))
    assert fork.templates()[0].pid != new.pid
    for kid in (second, third):
        assert await evaluate(sup, kid, "import newly_installed", "newly_installed.X") == 1


async def test_a_template_that_cannot_import_ipykernel_falls_back(
        sup: Supervisor, fork: ForkServerLauncher) -> None:
    """When the template fails to import ipykernel (-S: no site-packages), the start is
    exec'd and the reason logged."""
    with capture_logs() as logs, pytest.raises(KernelStartupError):
        await sup.start_kernel(spec=ipy_spec("nosite", "-S"), startup_timeout=10)
    warning = next(e for e in logs if e["event"] == "launcher.fork_fallback")
    assert "cannot import ipykernel" in warning["why"]


def _pids_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/pids")
    if not os.access(root, os.W_OK):
        return None
    return root


async def test_a_failed_fork_is_a_start_error(sup: Supervisor, fork: ForkServerLauncher,
                                              tmp_path: Path) -> None:
    """fork() failing in the template (EAGAIN: no more processes allowed) fails that start
    with the reason; the template keeps serving once processes are allowed again."""
    import resource

    await sup.start_kernel(spec=ipy_spec())
    (template,) = fork.templates()
    group = None
    if os.geteuid() == 0:
        root = _pids_cgroup()
        if root is None:
            pytest.skip("root without a writable pids cgroup: fork cannot be made to fail")
        group = root / f"fork-test-{os.getpid()}"
        group.mkdir()
        (group / "pids.max").write_text("1")
        (group / "cgroup.procs").write_text(str(template.pid))
    else:
        resource.prlimit(template.pid, resource.RLIMIT_NPROC, (0, 0))
    try:
        with pytest.raises(KernelStartupError, match="fork failed"):
            await sup.start_kernel(spec=ipy_spec())
    finally:
        if group is not None:
            (group.parent / "cgroup.procs").write_text(str(template.pid))
            group.rmdir()
        else:
            resource.prlimit(template.pid, resource.RLIMIT_NPROC,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    kid = await sup.start_kernel(spec=ipy_spec())
    assert sup.actor_of(kid).process.template is template  # type: ignore[union-attr]


def test_launcher_by_name_and_by_kernelspec_metadata() -> None:
    """'fork' names the shared fork launcher, in options or in kernelspec metadata."""
    assert isinstance(launcher_named("fork"), ForkServerLauncher)
    assert LaunchOptions().pick_launcher(ipy_spec(metadata={"launcher": "fork"})) \
        is launcher_named("fork")
    assert LaunchOptions(launcher="exec").pick_launcher(
        ipy_spec(metadata={"launcher": "fork"})) is launcher_named("exec")


OWNER = """
import asyncio, json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from test_forkserver import ipy_spec, QUIET
from supervisor.supervisor import Supervisor
from supervisor.launchers import launcher_named, reaper_pid
async def main():
    async with Supervisor(launch=QUIET.replace(launcher="fork")) as s:
        kids = [await s.start_kernel(spec=ipy_spec()) for _ in range(2)]
        pids = [s.actor_of(k).pid for k in kids]
        templates = [t.pid for t in launcher_named("fork").templates()]
        print("INFO", json.dumps({{"kernels": pids, "templates": templates,
                                   "reaper": reaper_pid()}}), flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def test_sigkill_of_the_supervisor_leaves_no_kernel_and_no_template(tmp_path: Path) -> None:
    """SIGKILL of the supervising process ends its forked kernels and their template."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER.format(repo=str(REPO), tests=str(HERE)))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout is not None
        line = ""
        while not line.startswith("INFO "):
            line = owner.stdout.readline()
            assert line, "the owner died before reporting"
        info = json.loads(line[5:])
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    assert len(info["kernels"]) == 2 and len(info["templates"]) == 1
    assert pid_gone(info["reaper"], 10)  # it exits once everything is gone
    left = [pid for pid in info["kernels"] + info["templates"] if not pid_gone(pid, 0)]
    assert left == []


def test_cli_run_with_launcher_fork_runs_code_in_a_forked_kernel(tmp_path: Path) -> None:
    """`run --launcher fork` runs the code in a kernel whose parent is not the CLI (the
    template), and leaves no runtime file behind."""
    runtime = tmp_path / "runtime"
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--launcher", "fork", "-c",
         "import os; print('parent-is-cli', os.getppid() == int(os.environ['JPY_PARENT_PID']))"],
        cwd=REPO, env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parent-is-cli False" in result.stdout
    assert not runtime.exists() or list(runtime.iterdir()) == []


def test_an_unknown_launcher_name_is_a_configuration_error() -> None:
    """launcher='spawn' is refused when the options are made, naming the choices."""
    from supervisor.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"launcher must be one of \('local', 'exec', 'fork', 'slurm'\)"):
        LaunchOptions(launcher="spawn")


@pytest.mark.skipif(not detect().usable, reason="no writable cgroup hierarchy here")
async def test_a_forked_memory_hog_is_killed_out_of_memory_and_says_so(
        fork: ForkServerLauncher) -> None:
    """A forked kernel joins its own cgroup with the memory limit: over it, it dies out of
    memory with the cause named, and the template lives on."""
    events = Events()
    async with Supervisor(launch=QUIET.replace(launcher=fork, memory_limit="300M"),
                          policy=NEVER) as s:
        s.subscribe(events)
        kid = await s.start_kernel(spec=ipy_spec())
        assert isinstance(s.actor_of(kid).process, ForkedProcess)
        kc = s.get_kernel(kid).client()
        kc.start_channels()
        try:
            with pytest.raises(Exception):  # noqa: B017 - the reply never comes
                await kc.execute("hog = b'x' * (700 << 20)", reply=True, timeout=30)
        finally:
            kc.stop_channels()
        exited = (await events.wait_for(lambda e: e.kind == "exited"))[0]
        assert exited.oom and exited.signal == signal.SIGKILL
        assert "out of memory (limit 300 MiB" in exited.reason
        (template,) = fork.templates()
        assert not pid_gone(template.pid, 0)


async def test_a_port_clash_ends_the_forked_kernel_at_once_and_the_start_retries(
        sup: Supervisor) -> None:
    """A forked kernel that cannot bind a port exits with its traceback instead of hanging
    in its exit handlers, so the start retries on fresh ports and succeeds."""
    import dataclasses
    import socket

    from supervisor.connection import new_connection_info

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        info = dataclasses.replace(new_connection_info(), iopub_port=busy.getsockname()[1])
        with capture_logs() as logs:
            kid = await sup.start_kernel(spec=ipy_spec(), connection_info=info,
                                         startup_timeout=30)
    assert any(e["event"] == "kernel.port_clash" for e in logs)
    assert sup.actor_of(kid).connection_info.iopub_port != info.iopub_port  # type: ignore[union-attr]
    assert isinstance(sup.actor_of(kid).process, ForkedProcess)


async def test_stdout_and_stderr_targets_reach_the_forked_kernel(sup: Supervisor,
                                                                  tmp_path: Path) -> None:
    """stdout to a file and stderr=STDOUT are the forked kernel's fds 1 and 2, as with exec."""
    out = tmp_path / "out.log"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        kid = await sup.start_kernel(spec=ipy_spec(), stdout=fd, stderr=subprocess.STDOUT)
    finally:
        os.close(fd)
    assert isinstance(sup.actor_of(kid).process, ForkedProcess)
    await evaluate(sup, kid, "import os; os.write(1, b'fd1-here\\n'); os.write(2, b'fd2-here\\n')",
                   "1")
    text = out.read_text()
    assert "fd1-here" in text and "fd2-here" in text


async def test_an_independent_kernel_is_execd(sup: Supervisor) -> None:
    """independent=True (may outlive us) is exec'd: a forked kernel dies with its template."""
    kid = await sup.start_kernel(spec=ipy_spec(), independent=True)
    proc = sup.actor_of(kid).process
    assert isinstance(proc, LocalProcess) and not isinstance(proc, ForkedProcess)
    assert "independent" in proc.launch_note
    await sup.shutdown_kernel(kid)

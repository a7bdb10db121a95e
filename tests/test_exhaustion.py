"""Exhaustion: out of file descriptors, processes or disk, or a runtime dir we cannot write.

Each start fails at once with a typed error naming what ran out (or the path it
could not write), leaves no process and no file, and a kernel already running
keeps answering. The fd and process cases run in a subprocess
(tests/kernels/exhaust.py) so that lowering a limit cannot hurt the test session;
the disk cases mount small tmpfs file systems (root only; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_spec, kernel_descendants

from supervisor.errors import ConnectionFileError, ResourceExhaustedError
from supervisor.kernel import KernelActor, LaunchOptions, Start

HERE = Path(__file__).resolve().parent
PIDS = Path("/sys/fs/cgroup/pids")


def _exhaust(mode: str, arg: str, runtime: Path) -> dict[str, object]:
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    out = subprocess.run([sys.executable, str(HERE / "kernels" / "exhaust.py"), mode, arg],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _fast_and_clean(r: dict[str, object], resource: str) -> None:
    assert r["error"] == "ResourceExhaustedError" and r["resource"] == resource, r
    assert float(str(r["seconds"])) < 10, r  # named at once, not after the 30 s timeout
    assert r["a_answers"] and r["a_same_pid"] and r["kernels"] == 1, r
    assert r["left"] == [], r


@pytest.mark.parametrize("headroom", [0, 4, 10])
def test_out_of_file_descriptors_is_named_at_once(headroom: int, tmp_path: Path) -> None:
    """Near RLIMIT_NOFILE a start fails at once naming file descriptors (not "IOPub
    silent" after the timeout); the running kernel keeps answering; nothing is left."""
    _fast_and_clean(_exhaust("fds", str(headroom), tmp_path), "file descriptors")


@contextlib.contextmanager
def _pids_cgroup() -> Iterator[Path]:
    group = PIDS / f"ks-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"no writable pids cgroup here: {exc}")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (PIDS / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_fork_failing_with_eagain_is_named_at_once(tmp_path: Path) -> None:
    """When no process can be forked (a pids cgroup at its limit) a start fails at once
    naming processes; the running kernel keeps answering; nothing is left."""
    with _pids_cgroup() as group:
        r = _exhaust("procs", str(group), tmp_path)
    _fast_and_clean(r, "processes")


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()


async def _start_fails(connection_file: Path | None) -> BaseException:
    actor = KernelActor(LaunchOptions(spec=fake_spec(), forward_stderr=False),
                        connection_file=connection_file)
    actor.start()
    try:
        with pytest.raises(Exception) as caught:
            await actor.ask(Start())
        assert actor.pid is None and actor.state == "exited"
    finally:
        actor.stop()
        await actor.join()
    return caught.value


async def test_a_full_runtime_disk_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    """With the connection file's file system full, the start fails at once with a
    ResourceExhaustedError naming disk space and the file, leaving no partial file."""
    with _tmpfs(tmp_path / "full", "size=64k", "mode=0700") as disk:
        _fill(disk / "filler")
        target = disk / "kernel-full.json"
        err = await _start_fails(target)
        assert isinstance(err, ResourceExhaustedError) and err.resource == "disk space", err
        assert str(target) in str(err)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert not kernel_descendants()


@pytest.mark.parametrize("how", ["read-only mount", "a file in the way", "runtime dir"])
async def test_an_unwritable_runtime_dir_is_named_and_leaves_nothing(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime dir on a read-only file system, or under a regular file (given as the
    connection file's or as $JUPYTER_RUNTIME_DIR), fails the start with a
    ConnectionFileError naming the path; no process is started."""
    if how == "runtime dir":
        (tmp_path / "file").write_text("not a directory")
        runtime = tmp_path / "file" / "runtime"
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
        err = await _start_fails(None)
        assert isinstance(err, ConnectionFileError) and str(runtime) in str(err), err
    elif how == "a file in the way":
        (tmp_path / "file").write_text("not a directory")
        target = tmp_path / "file" / "runtime" / "kernel-x.json"
        err = await _start_fails(target)
        assert isinstance(err, ConnectionFileError) and str(target) in str(err), err
    else:
        with _tmpfs(tmp_path / "ro", "size=64k", "ro") as disk:
            target = disk / "kernel-ro.json"
            err = await _start_fails(target)
            assert isinstance(err, ConnectionFileError) and str(target) in str(err), err
            assert list(disk.iterdir()) == []
    assert not kernel_descendants()

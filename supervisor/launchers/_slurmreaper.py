"""The Slurm reaper sidecar: cancels our Slurm jobs when the supervising process dies.

Runs as its own tiny process (``python -I -S _slurmreaper.py``), started once
per supervising process by :mod:`supervisor.launchers.slurmjobs` on its first
Slurm launch. It reads lines from its stdin, a pipe whose only writer is the
supervising process:

* ``+KEY`` then tab-separated fields registers one launch: ``n<name>`` the
  job's name (known at once), ``j<id>`` its job id (once known), ``g<pgid>``
  the local ``srun``'s process group, ``c<path>`` the ``SLURM_CONF`` to use,
  ``f<path>`` a file to delete with it (the kernel's local connection file);
  registering a key again replaces its fields;
* ``-KEY`` forgets it (the job is over).

At end of file the supervising process is gone, however it died. For every
launch still registered it runs ``scancel`` by job id (the sure way: killing
``srun``'s process group leaves the job running) and by name (a job whose id
we had not learnt yet), then SIGKILLs the local ``srun`` groups, deletes the
files, waits for the
``scancel`` calls (bounded) and exits. It never polls: it blocks in ``read``.
It imports nothing of the package.
"""

import os
import signal
import subprocess
import sys

SCANCEL = os.environ.get("KS_SLURM_SCANCEL", "scancel")


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    launches: dict[str, dict[str, list[str]]] = {}
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            head, *fields = line.decode("utf-8", "replace").split("\t")
            if head[:1] == "+":
                entry: dict[str, list[str]] = {}
                for item in fields:
                    if item:
                        entry.setdefault(item[:1], []).append(item[1:])
                launches[head[1:]] = entry
            elif head[:1] == "-":
                launches.pop(head[1:], None)
    if not launches:
        return 0
    calls: list[subprocess.Popen[bytes]] = []
    by_conf: dict[str, list[dict[str, list[str]]]] = {}
    for entry in launches.values():
        conf = (entry.get("c") or [""])[0]
        by_conf.setdefault(conf, []).append(entry)
    for conf, entries in by_conf.items():
        env = dict(os.environ)
        if conf:
            env["SLURM_CONF"] = conf
        ids = [j for e in entries for j in e.get("j", ())]
        names = [n for e in entries if not e.get("j") for n in e.get("n", ())]
        commands: list[list[str]] = []
        if ids:
            commands.append([SCANCEL, "--quiet", *ids])
        commands.extend([SCANCEL, "--quiet", f"--name={name}"] for name in names)
        for argv in commands:
            try:
                calls.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            except OSError:
                pass
    for entry in launches.values():
        for pgid in entry.get("g", ()):
            try:
                os.killpg(int(pgid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for entry in launches.values():
        for path in entry.get("f", ()):
            try:
                os.unlink(path)
            except OSError:
                pass
    for call in calls:
        try:
            call.wait(timeout=20)
        except subprocess.TimeoutExpired:
            call.kill()
            call.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run nbclient's and jupyter_client's own test suites against our managers.

Usage (from the repository root, in the venv that has ``.[test]`` installed)::

    python tests/peers/run_peer_suites.py             # ours only (~3 min)
    python tests/peers/run_peer_suites.py --baseline  # also with jupyter_client's
                                                      # manager, compared test by test

For each peer it downloads the pinned sdist once (``pip download --no-deps
--no-binary :all:``, cached in ``$PEERS_CACHE`` or ``~/.cache/kernel-supervisor-peers``),
installs the suite's extra test dependencies, unpacks a fresh copy in a temporary
directory and runs the chosen test files with pytest in a subprocess, with
``peer_plugin.py`` substituting our managers (``PEER_MANAGER=ours``) or changing
nothing (``PEER_MANAGER=jupyter_client``). Nothing of the peers' code is kept in
this repository.

The tests in ``exclusions.py`` (they read jupyter_client internals, or exercise a
deliberate difference) are deselected in our run. The run fails (exit 1) when a
test that is not excluded fails or errors with our managers, or, with
``--baseline``, when one passed with jupyter_client's manager and did not pass
with ours. It prints passed/failed/skipped/excluded counts for both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from exclusions import EXCLUDED  # noqa: E402


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    files: tuple[str, ...]
    deps: tuple[str, ...]
    pytest_args: tuple[str, ...]


SUITES = {
    "nbclient": Suite(
        "nbclient", "0.11.0", ("tests",),
        ("flaky", "ipywidgets", "nbconvert>=7.1", "testpath", "xmltodict"),
        ("-o", "asyncio_default_fixture_loop_scope=function"),
    ),
    "jupyter_client": Suite(
        "jupyter_client", "8.10.0", ("tests/test_kernelmanager.py", "tests/test_client.py"),
        ("pytest-jupyter[client]>=0.6.2",),
        ("-p", "no:asyncio"),  # its async tests run on pytest-jupyter's loop
    ),
}

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def cache_dir() -> Path:
    root = os.environ.get("PEERS_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "kernel-supervisor-peers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                   check=True)


def sdist(suite: Suite) -> Path:
    """The pinned sdist, downloaded on first use."""
    folder = cache_dir()
    name = f"{suite.name}-{suite.version}.tar.gz"
    if not (folder / name).exists():
        pip("download", "-q", "--no-deps", "--no-binary", ":all:",
            f"{suite.name}=={suite.version}", "-d", str(folder))
    if not (folder / name).exists():
        sys.exit(f"peer suites: pip download gave no {name}")
    return folder / name


def unpack(archive: Path, into: Path) -> Path:
    """A fresh copy of the sdist; returns its top directory."""
    into.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(p for p in into.iterdir() if p.is_dir())


def run_pytest(suite: Suite, root: Path, manager: str, out: Path,
               deselect: list[str]) -> tuple[dict[str, str], float]:
    """Run the suite in a subprocess; return ({nodeid: outcome}, seconds)."""
    env = dict(os.environ)
    env["PEER_MANAGER"] = manager
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    # The suites run console scripts (jupyter-execute) of the interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    xml = out / f"{suite.name}-{manager}.xml"
    cmd = [sys.executable, "-m", "pytest", *suite.files, "-p", "peer_plugin",
           "-p", "no:cacheprovider", "-q", "--color=no", "--timeout", "120",
           f"--junitxml={xml}", *suite.pytest_args]
    for nodeid in deselect:
        cmd += ["--deselect", nodeid]
    t0 = time.monotonic()
    with (out / f"{suite.name}-{manager}.log").open("w") as log:
        subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, check=False)
    return parse_junit(xml), time.monotonic() - t0


def _nodeid(classname: str, name: str) -> str:
    """pytest's node id from a junit classname ("tests.test_x.TestY") and name."""
    parts = classname.split(".")
    cut = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    nodeid = "/".join(parts[: cut + 1]) + ".py"
    for part in parts[cut + 1:]:
        nodeid += "::" + part
    return nodeid + "::" + name


def parse_junit(xml: Path) -> dict[str, str]:
    """{nodeid: passed|skipped|failed|error}; a teardown error (a second entry for
    the same test) makes the test count as an error."""
    outcomes: dict[str, str] = {}
    if not xml.exists():
        return outcomes
    for case in ET.parse(xml).getroot().iter("testcase"):
        nodeid = _nodeid(case.get("classname", ""), case.get("name", ""))
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "error"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        if _RANK[outcome] >= _RANK[outcomes.get(nodeid, "passed")]:
            outcomes[nodeid] = outcome
    return outcomes


def counts(outcomes: dict[str, str]) -> str:
    c = Counter(outcomes.values())
    return f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--baseline", action="store_true",
                        help="also run with jupyter_client's manager and compare")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-install", action="store_true",
                        help="do not pip install the suites' test dependencies")
    args = parser.parse_args()
    chosen = list(SUITES.values()) if args.suite == "all" else [SUITES[args.suite]]
    if not args.no_install:
        pip("install", "-q", *sorted({d for s in chosen for d in s.deps}))
    work = Path(tempfile.mkdtemp(prefix="peer-suites-"))
    failed = False
    try:
        for suite in chosen:
            excluded = EXCLUDED.get(suite.name, {})
            print(f"\n== {suite.name} {suite.version}: {' '.join(suite.files)}", flush=True)
            root = unpack(sdist(suite), work / f"{suite.name}-ours")
            ours, secs = run_pytest(suite, root, "ours", work, list(excluded))
            bad = sorted(n for n, o in ours.items() if o in ("failed", "error"))
            if not ours:
                print(f"   ours: no result (see {work}/{suite.name}-ours.log)")
                failed = True
                continue
            line = f"   ours:            {counts(ours)}, %s excluded, {secs:.0f} s"
            n_excluded = "?"
            if args.baseline:
                root = unpack(sdist(suite), work / f"{suite.name}-jupyter_client")
                theirs, tsecs = run_pytest(suite, root, "jupyter_client", work, [])
                n_excluded = str(sum(1 for n in theirs
                                     if any(n.startswith(p) for p in excluded)))
                print(line % n_excluded)
                print(f"   jupyter_client:  {counts(theirs)}, {tsecs:.0f} s")
                for nodeid, outcome in theirs.items():
                    if outcome == "passed" and ours.get(nodeid) != "passed" and not any(
                            nodeid.startswith(p) for p in excluded):
                        bad.append(nodeid)
            else:
                print(line % f"{len(excluded)} prefixes")
            for nodeid in sorted(set(bad)):
                print(f"   NOT PASSING WITH OURS: {nodeid} ({ours.get(nodeid, 'not run')})")
            failed = failed or bool(bad)
            print("   excluded (deselected in our run):")
            for prefix, reason in excluded.items():
                print(f"     - {prefix}: {reason}")
    finally:
        if args.keep or failed:
            print(f"\nlogs and junit files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\npeer suites: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The library is silent unless the host configures logging; records go to supervisor.* loggers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from supervisor._log import EVENT_ATTRIBUTE, capture_logs, get_logger

ROOT = Path(__file__).resolve().parents[1]


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-X", "dev", "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_a_host_that_configures_nothing_sees_nothing(tmp_path: Path) -> None:
    """Start, run code, restart and stop a kernel without configuring logging or structlog:
    stdout and stderr stay empty, also under -X dev (no ResourceWarning at exit)."""
    code = (
        "from supervisor import KernelManager\n"
        "km = KernelManager('python3', forward_stderr=False)\n"
        "km.start_kernel()\n"
        "kc = km.client(); kc.start_channels()\n"
        "assert kc.execute('1', reply=True, timeout=30)['content']['status'] == 'ok'\n"
        "kc.stop_channels()\n"
        "km.restart_kernel()\n"
        "km.shutdown_kernel()\n"
    )
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_a_host_that_configures_logging_gets_supervisor_records(tmp_path: Path) -> None:
    """With logging.basicConfig(level=INFO) the lifecycle shows on stderr under supervisor.*
    loggers, fields as key=value; stdout stays the host's."""
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s|%(levelname)s|%(message)s')\n"
        "from supervisor import KernelManager\n"
        "km = KernelManager('python3', forward_stderr=False)\n"
        "km.start_kernel(); km.shutdown_kernel()\n"
        "print('host output')\n"
    )
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "host output\n"
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("supervisor.") for line in lines), lines
    ready = [line for line in lines if "|kernel.ready" in line]
    assert ready and "kernel_id=" in ready[0]


def test_records_carry_the_structured_event() -> None:
    """A record holds the event dict (for renderers) and a readable message; a level below the
    logger's is dropped before any formatting."""
    log = get_logger("supervisor.test")
    with capture_logs() as entries:
        log.info("thing.happened", kernel_id="abc", reason="two words", count=3)
    assert entries == [{"event": "thing.happened", "kernel_id": "abc", "reason": "two words",
                        "count": 3, "log_level": "info"}]
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    target = logging.getLogger("supervisor.test")
    handler = Keep()
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        log.debug("hidden")
        log.warning("shown", reason="two words")
    finally:
        target.removeHandler(handler)
        target.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in seen] == ["shown reason='two words'"]
    assert getattr(seen[0], EVENT_ATTRIBUTE)["reason"] == "two words"

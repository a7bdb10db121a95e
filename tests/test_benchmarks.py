"""Smoke test of the benchmark suite (``python -m benchmarks``): one row, one run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_row_runs_end_to_end(tmp_path: Path) -> None:
    """One quick run of the start row writes results.json (floor and ours numbers) and a table."""
    out = tmp_path / "bench"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "start", "--runs", "1",
         "--warmup", "0", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False,
    )
    log = (out / "run.log").read_text(errors="replace") if (out / "run.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- run.log ---\n{log[-3000:]}"

    results = json.loads((out / "results.json").read_text())
    assert [row["id"] for row in results["rows"]] == ["start"]
    cells = results["rows"][0]["contenders"]
    for name in ("floor", "ours"):
        assert cells[name]["status"] == "ok", cells[name]
        assert len(cells[name]["samples"]) == 1
        assert isinstance(cells[name]["samples"][0], float)
        assert cells[name]["stats"]["n"] == 1
    assert cells["jupyter_client"]["status"] in ("ok", "failed")
    assert results["machine"]["cores"] == os.cpu_count()
    assert not [leak for leak in results["leaks"] if "· ours ·" in leak or "· floor ·" in leak]

    table = proc.stdout
    assert "start (ms)" in table
    for header in ("median", "p95", "min", "max", "ours/floor", "ours/jc"):
        assert header in table
    for name in ("floor", "ours", "jupyter_client"):
        assert name in table
    assert "| start (ms) | floor |" in (out / "results.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "benchmark.png").stat().st_size > 0

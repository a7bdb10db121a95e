"""Statistics, the results table (text and Markdown), results.json and the chart.

Pure functions over the result dicts the runner builds; nothing here touches a
kernel. Runs on the main thread after the measurements (matplotlib with the
Agg backend, no display needed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["cell_stats", "chart", "machine", "markdown_table", "text_table", "write_json"]

CONTENDER_LABELS = {"floor": "floor", "ours": "ours", "jupyter_client": "jupyter_client"}


# -- statistics ------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def cell_stats(samples: Sequence[float]) -> dict[str, float | int] | None:
    """median, p95, min, max, mean, stdev and n of the samples (None when empty)."""
    if not samples:
        return None
    return {
        "median": statistics.median(samples),
        "p95": percentile(samples, 95),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "stdev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "n": len(samples),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is too close to zero to mean anything."""
    if a is None or b is None or b <= 1e-9:
        return None
    return a / b


# -- formatting ------------------------------------------------------------------------------
def _num(x: float) -> str:
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_value(value: float, unit: str) -> str:
    """Seconds shown as ms; % and MB as they are."""
    if unit == "s":
        return _num(value * 1000)
    return _num(value)


def display_unit(unit: str) -> str:
    return "ms" if unit == "s" else unit


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _short(reason: str, width: int = 72) -> str:
    one = " ".join(reason.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def _cells(row: dict[str, Any], contender: str) -> list[str]:
    """median, p95, min, max, n (or a FAILED / n/a text in the first cell)."""
    cell = row["contenders"].get(contender)
    if cell is None:
        return ["not run", "", "", "", ""]
    status = cell["status"]
    if status == "n/a":
        return [cell["reason"], "", "", "", ""]
    if status == "failed":
        return [f"FAILED: {_short(cell['reason'])}", "", "", "", ""]
    st = cell["stats"]
    unit = row["unit"]
    n = str(st["n"])
    if cell["failures"]:
        n += f" ({len(cell['failures'])} failed)"
    return [fmt_value(st["median"], unit), fmt_value(st["p95"], unit),
            fmt_value(st["min"], unit), fmt_value(st["max"], unit), n]


HEADER = ["row", "contender", "median", "p95", "min", "max", "n", "ours/floor", "ours/jc"]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The table body: one line per (row, contender)."""
    out: list[list[str]] = []
    for row in results["rows"]:
        label = f"{row['id']} ({display_unit(row['unit'])})"
        for i, contender in enumerate(CONTENDER_LABELS):
            ratios = ["", ""]
            if contender == "ours":
                ratios = [fmt_ratio(row["ratios"].get("ours/floor")),
                          fmt_ratio(row["ratios"].get("ours/jupyter_client"))]
            out.append([label if i == 0 else "", contender, *_cells(row, contender), *ratios])
    return out


def text_table(results: dict[str, Any]) -> str:
    """A plain aligned table (numbers right-aligned), with the machine line on top.

    A FAILED / n/a cell is a text that starts in the median column and runs on.
    """
    body = table_rows(results)
    numeric = [r for r in body if r[6]] or [HEADER]
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in numeric)) for i in range(2, 9)]
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in body)) for i in range(2)] + widths

    def line(cells: list[str]) -> str:
        head = "  ".join(c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True))
        if not cells[6] and cells[2]:
            return f"{head}  {cells[2]}".rstrip()
        tail = "  ".join(c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True))
        return f"{head}  {tail}".rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = [machine_line(results["machine"]), rule, line(HEADER), rule]
    for i, r in enumerate(body):
        if r[0] and i:
            lines.append("")
        lines.append(line(r))
    lines.append(rule)
    for row in results["rows"]:
        lines.append(f"{row['id']}: {row['title']}")
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """The same table in Markdown, plus the legend of rows and notes."""
    body = table_rows(results)
    esc = [[c.replace("|", "\\|") for c in r] for r in body]
    lines = [f"_{machine_line(results['machine'])}_", "",
             "| " + " | ".join(HEADER) + " |",
             "|" + "|".join(["---", "---", *["---:"] * 7]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    lines += ["", "Rows:", ""]
    for row in results["rows"]:
        text = f"- `{row['id']}`: {row['title']}."
        if row.get("note"):
            text += f" {row['note']}."
        lines.append(text)
    failures = [(row["id"], name, f) for row in results["rows"]
                for name, cell in row["contenders"].items() for f in cell.get("failures", [])]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- `{rid}` / {name}: {_short(f, 300)}" for rid, name, f in failures]
    leaks = results.get("leaks") or []
    if leaks:
        lines += ["", "Left behind after a sample (then killed/removed by the runner):", ""]
        lines += [f"- {leak}" for leak in leaks]
    notes = results.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    cfg = results["config"]
    runs = ", ".join(f"{k} {v}" for k, v in cfg["runs_by_scenario"].items())
    warm = "one global warm-up lifecycle per contender, then " if cfg["global_warmup"] else ""
    lines += ["", f"Mode `{cfg['mode']}`, kernel `{cfg['kernel']}`: {warm}{cfg['warmup']} "
              f"discarded warm-up run(s) per scenario and contender, then measured runs "
              f"({runs}), interleaved floor, ours, jupyter_client sample by sample. "
              f"All in one process, one `asyncio.run` per sample; generated by "
              f"`python -m benchmarks` in {results['duration_s']:.0f} s."]
    return "\n".join(lines) + "\n"


# -- machine ---------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(loadavg_at_start: list[float] | None = None) -> dict[str, Any]:
    """Cores, Python, platform and the versions of everything that matters here."""
    import zmq

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "tornado": _version("tornado"),
        "ipykernel": _version("ipykernel"),
        "jupyter_client": _version("jupyter_client"),
        "kernel-supervisor": _version("kernel-supervisor"),
        "structlog": _version("structlog"),
    }
    if info["kernel-supervisor"] == "not installed":
        import supervisor

        info["kernel-supervisor"] = f"{supervisor.__version__} (source tree)"
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "supervisor"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=False)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if loadavg_at_start is not None:
        info["loadavg_at_start"] = loadavg_at_start
    return info


def machine_line(m: dict[str, Any]) -> str:
    load = ""
    if m.get("loadavg_at_start") and m.get("loadavg_at_end"):
        load = (f"; load average {m['loadavg_at_start'][0]:g} at start, "
                f"{m['loadavg_at_end'][0]:g} at end")
    return (f"{m['cores']} cores, Python {m['python']}, {m['platform']}; pyzmq {m['pyzmq']} "
            f"(libzmq {m['libzmq']}), tornado {m['tornado']}, ipykernel {m['ipykernel']}, "
            f"jupyter_client {m['jupyter_client']}, kernel-supervisor {m['kernel-supervisor']}"
            f"{load}")


# -- files -----------------------------------------------------------------------------------
def write_json(results: dict[str, Any], path: Path) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(results), indent=2) + "\n", encoding="utf-8")


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Box + strip plot per row, contenders side by side; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    rows = results["rows"]
    if not rows:
        return "no rows"
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    colours = {"floor": "#7f7f7f", "ours": "#1f77b4", "jupyter_client": "#ff7f0e"}
    names = list(CONTENDER_LABELS)
    for ax, row in zip(axes.flat, rows, strict=False):
        scale = 1000.0 if row["unit"] == "s" else 1.0
        data: list[list[float]] = []
        for name in names:
            cell = row["contenders"].get(name) or {}
            data.append([v * scale for v in cell.get("samples", [])])
        present = [v for d in data for v in d if v > 0]
        log = bool(present) and max(present) / min(present) > 30
        for x, (name, values) in enumerate(zip(names, data, strict=True)):
            cell = row["contenders"].get(name) or {}
            if values:
                ax.boxplot([values], positions=[x], widths=0.5, showfliers=False, whis=(0, 100),
                           medianprops={"color": "black"},
                           boxprops={"color": colours[name]},
                           whiskerprops={"color": colours[name]},
                           capprops={"color": colours[name]})
                jitter = [x + 0.18 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
                ax.scatter(jitter, values, s=12, alpha=0.7, color=colours[name], zorder=3)
            else:
                label = "FAILED" if cell.get("status") == "failed" else "n/a"
                ax.text(x, 0.5, label, transform=ax.get_xaxis_transform(), ha="center",
                        va="center", color="red" if label == "FAILED" else "grey",
                        fontsize=9, rotation=90)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(["floor", "ours", "jc"])
        ax.set_xlim(-0.6, len(names) - 0.4)
        if log:
            ax.set_yscale("log")
        elif present:
            ax.set_ylim(bottom=0, top=max(present) * 1.15)
        ax.set_title(f"{row['id']} ({display_unit(row['unit'])})", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"kernel-supervisor benchmarks ({results['config']['mode']}, kernel "
                 f"{results['config']['kernel']}): {machine_line(results['machine'])}",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


"""Counters of the gateway and their Prometheus text rendering (written by hand).

:class:`Metrics` is a bag of labelled counters the handlers and bridges bump,
plus the supervisor's own figures (kernels by state, pool, restarts, deaths by
cause) read at scrape time. It belongs to the gateway's IOLoop: counters are
bumped and rendered there only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from supervisor.events import KernelEvent

__all__ = ["Metrics", "death_cause"]

_PREFIX = "kernel_gateway_"
_HELP = {
    "http_requests": "HTTP requests answered, by method and status code.",
    "ws_messages_in": "WebSocket messages relayed from clients to kernels, by channel.",
    "ws_messages_out": "WebSocket frames written to clients.",
    "ws_dropped": "WebSocket messages dropped, by reason.",
    "ws_closed": "WebSocket connections closed by the gateway, by reason.",
    "ws_replayed": "IOPub messages replayed to reconnecting clients.",
    "kernel_messages": "Messages received from kernels, by channel.",
    "kernel_dropped": "Kernel messages not relayed, by reason.",
    "kernel_events": "Supervision events, by kind.",
    "kernel_deaths": "Kernels lost for good, by cause.",
}


def death_cause(event: KernelEvent) -> str:
    """A short label for why a kernel died: signal name, exit code, oom, start."""
    text = event.reason.lower()
    if "out of memory" in text or "oom" in text:
        return "oom"
    if event.signal is not None:
        return f"signal_{event.signal}"
    if event.exit_code is not None:
        return f"exit_{event.exit_code}"
    if text.startswith("start failed"):
        return "start_failed"
    return "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Labelled counters; see the module docstring."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter[tuple[tuple[str, str], ...]]] = {}

    def count(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        key = tuple(sorted(labels.items()))
        self._counters.setdefault(name, Counter())[key] += amount

    def value(self, name: str, **labels: str) -> int:
        """The current value of one labelled counter (0 if never bumped)."""
        return self._counters.get(name, Counter())[tuple(sorted(labels.items()))]

    def total(self, name: str) -> int:
        """A counter summed over all its labels."""
        return sum(self._counters.get(name, Counter()).values())

    def render(self, gauges: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...],
                                                               float]]]) -> str:
        """Prometheus text format 0.0.4: our counters and the given gauges."""
        lines: list[str] = []
        for name in sorted(set(_HELP) | set(self._counters)):
            full = f"{_PREFIX}{name}_total"
            lines.append(f"# HELP {full} {_HELP.get(name, name)}")
            lines.append(f"# TYPE {full} counter")
            values = self._counters.get(name) or Counter({(): 0})
            for key, count in sorted(values.items()):
                lines.append(f"{full}{_labels(key)} {count}")
        for name, (help_text, series) in sorted(gauges.items()):
            full = f"{_PREFIX}{name}"
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} gauge")
            for key, val in sorted(series.items()):
                lines.append(f"{full}{_labels(key)} {val:g}")
        return "\n".join(lines) + "\n"

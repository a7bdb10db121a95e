"""The library's loggers: structlog's API in front, the standard ``logging`` module behind.

Every module gets its logger from :func:`get_logger` with a name under ``supervisor.``.
Records go to the ``logging`` logger of that name and nowhere else, whatever
structlog's global configuration is (the library never calls
``structlog.configure()``), so the host program decides what is shown: nothing at
all unless it configures ``logging`` (the ``supervisor`` logger has a
``NullHandler``). Turn them on with, for example::

    logging.basicConfig(level=logging.INFO)          # every library, plain text
    logging.getLogger("supervisor").setLevel(logging.DEBUG)

A record's message is the event name followed by its fields as ``key=value``; the
fields as a dict are on the record too, as ``record.supervisor_event`` (the CLI
renders them with structlog's console or JSON renderer). A call below the
logger's effective level costs one ``isEnabledFor`` check.

Loggers are plain objects, safe to use from any thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["EVENT_ATTRIBUTE", "capture_logs", "get_logger"]

EVENT_ATTRIBUTE = "supervisor_event"
"""The attribute of a ``logging.LogRecord`` that holds the structured event dict."""

logging.getLogger("supervisor").addHandler(logging.NullHandler())


def _text(value: object) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' ="'):
        return value
    return repr(value)


def _to_stdlib(_: WrappedLogger, method: str, event_dict: EventDict) -> Any:
    """Last processor: (args, kwargs) for the stdlib logger's method."""
    event = dict(event_dict)
    exc_info = event.pop("exc_info", None)
    name = str(event.get("event", ""))
    fields = " ".join(f"{k}={_text(v)}" for k, v in event.items() if k != "event")
    event.setdefault("log_level", "warning" if method == "warn" else method)
    kwargs: dict[str, Any] = {"extra": {EVENT_ATTRIBUTE: event}}
    if exc_info:
        kwargs["exc_info"] = exc_info
    return (f"{name} {fields}" if fields else name,), kwargs


_PROCESSORS = [structlog.stdlib.filter_by_level, structlog.contextvars.merge_contextvars,
               _to_stdlib]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog bound logger that writes to ``logging.getLogger(name)`` only."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger, cache_logger_on_first_use=True)
    return logger


class _Capture(logging.Handler):
    def __init__(self, entries: list[dict[str, Any]],
                 processors: list[Callable[[object, str, MutableMapping[str, Any]], Any]]) -> None:
        super().__init__(logging.DEBUG)
        self.entries = entries
        self.processors = processors

    def emit(self, record: logging.LogRecord) -> None:
        event = dict(getattr(record, EVENT_ATTRIBUTE, None)
                     or {"event": record.getMessage(), "log_level": record.levelname.lower()})
        for processor in self.processors:
            event = processor(None, event["log_level"], event)
        self.entries.append(event)


@contextlib.contextmanager
def capture_logs(
    processors: list[Callable[[object, str, MutableMapping[str, Any]], Any]] | None = None,
    logger: str = "supervisor",
) -> Iterator[list[dict[str, Any]]]:
    """Collect the library's log events (all levels) as dicts while the block runs.

    The counterpart of ``structlog.testing.capture_logs`` for loggers made by
    :func:`get_logger`: each entry has ``event``, ``log_level`` and the fields;
    ``processors`` see each entry first (a test can await them).
    """
    target = logging.getLogger(logger)
    entries: list[dict[str, Any]] = []
    handler = _Capture(entries, list(processors or ()))
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield entries
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)

"""The Jupyter messaging protocol (5.4) wire layer, on pyzmq alone.

This module turns :class:`Message` objects into the multipart frame list of
the Jupyter wire protocol and back::

    [*identities, b"<IDS|MSG>", signature, header, parent_header, metadata, content, *buffers]

with an HMAC signature over the four JSON frames, and it rejects anything
else with a :class:`~supervisor.errors.WireError` subclass (never another
exception type, whatever bytes arrive).

Threads and loops: nothing here owns a thread or an event loop. A
:class:`Session` may be shared between threads; the only mutable state it
has (the replay history of seen signatures) is guarded by a lock. Sockets
passed to :meth:`Session.send` / :meth:`Session.recv` (or the ``_async``
variants) belong to the caller's thread (or asyncio loop) and are used only
within the call. :class:`Message` objects are immutable dataclasses; their
dicts are not copied on the hot path, so treat them as read-only.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from supervisor.errors import ConfigurationError, FrameError, ReplayError, SignatureError, WireError

__all__ = ["DELIMITER", "PROTOCOL_VERSION", "Message", "Session", "new_id", "parse_date", "utcnow"]

PROTOCOL_VERSION = "5.4"
DELIMITER = b"<IDS|MSG>"

_UTC = datetime.timezone.utc
_EMPTY_JSON = b"{}"

# ISO-8601 (the subset Jupyter uses): date, optional time with optional
# fraction, optional "Z" or numeric offset.
_DATE_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(Z|z|[+-]\d{2}(?::?\d{2})?)?)?",
    re.ASCII,
)


def new_id() -> str:
    """Return a fresh random message or session id (a uuid4 string)."""
    # Same result as str(uuid.uuid4()), without the slow UUID object.
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# (unix second, its "YYYY-MM-DDTHH:MM:SS" text): rebuilt once per second.
_second_cache: tuple[int, str] = (-1, "")


def utcnow() -> str:
    """Return the current UTC time as ISO-8601 with microseconds and a ``Z``."""
    global _second_cache
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second_cache
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _second_cache = cached
    return f"{cached[1]}.{micro:06d}Z"


def _format_datetime(value: datetime.datetime) -> str:
    """Encode a datetime as ISO-8601 UTC; a naive datetime is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def parse_date(s: str) -> datetime.datetime:
    """Parse an ISO-8601 timestamp into a tz-aware datetime.

    A timestamp without an offset is taken as UTC. Fractions beyond
    microseconds are truncated. Anything else raises :class:`FrameError`.
    """
    if not isinstance(s, str):
        raise FrameError(f"date is not a string: {type(s).__name__}")
    m = _DATE_RE.fullmatch(s)
    if m is None:
        raise FrameError(f"not an ISO-8601 date: {s[:64]!r}")
    year, month, day, hour, minute, second, fraction, offset = m.groups()
    micro = int((fraction[:6]).ljust(6, "0")) if fraction else 0
    try:
        tz: datetime.tzinfo = _UTC
        if offset and offset not in ("Z", "z"):
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or "0"))
            tz = datetime.timezone(sign * delta)
        return datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tz,
        )
    except (ValueError, OverflowError) as exc:
        raise FrameError(f"invalid date {s[:64]!r}: {exc}") from None


def _date_or_value(value: Any) -> Any:
    """Turn an ISO string into a datetime; leave anything else as it is."""
    if isinstance(value, str):
        try:
            return parse_date(value)
        except FrameError:
            return value
    return value


def _with_date(header: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a header with its ``date`` as a datetime if parseable."""
    out = dict(header)
    if "date" in out:
        out["date"] = _date_or_value(out["date"])
    return out


@dataclass(frozen=True, slots=True)
class Message:
    """One Jupyter message, as sent or received (immutable; dicts shared)."""

    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: tuple[bytes, ...] = ()
    identities: tuple[bytes, ...] = ()

    @property
    def msg_id(self) -> str:
        """The header's ``msg_id``."""
        return str(self.header["msg_id"])

    @property
    def msg_type(self) -> str:
        """The header's ``msg_type``."""
        return str(self.header["msg_type"])

    @property
    def parent_id(self) -> str | None:
        """The parent header's ``msg_id``, or None when there is no parent."""
        pid = self.parent_header.get("msg_id")
        return pid if isinstance(pid, str) else None

    def to_dict(self) -> dict[str, Any]:
        """The message in jupyter_client's dict shape (dates as tz-aware datetimes)."""
        header = _with_date(self.header)
        return {
            "header": header,
            "parent_header": _with_date(self.parent_header),
            "metadata": self.metadata,
            "content": self.content,
            "buffers": list(self.buffers),
            "msg_id": header.get("msg_id"),
            "msg_type": header.get("msg_type"),
        }


def _json_default(obj: Any) -> Any:
    """JSON fallback: datetimes and dates as ISO-8601 strings, nothing else."""
    if isinstance(obj, datetime.datetime):
        return _format_datetime(obj)
    if isinstance(obj, datetime.date):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    separators=(",", ":"),
    default=_json_default,
)


def _dumps(obj: Mapping[str, Any], what: str) -> bytes:
    """Encode one message part as compact UTF-8 JSON, or raise FrameError."""
    if not obj:
        return _EMPTY_JSON
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise FrameError(f"message {what} is not serialisable as JSON: {exc}") from None


def _loads(frame: bytes, what: str) -> dict[str, Any]:
    """Decode one JSON frame that must hold an object, or raise FrameError."""
    if frame == _EMPTY_JSON:
        return {}
    try:
        value = json.loads(frame.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"message {what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError(f"message {what} is a JSON {type(value).__name__}, not an object")
    return value


def _to_bytes(frame: object) -> bytes:
    """One received frame as bytes (bytes pass through uncopied)."""
    if type(frame) is bytes:
        return frame
    if isinstance(frame, zmq.Frame):
        return bytes(frame.bytes)
    if isinstance(frame, memoryview):
        return frame.tobytes()
    if isinstance(frame, (bytes, bytearray)):
        return bytes(frame)
    raise FrameError(f"a frame is a {type(frame).__name__}, not bytes")


def _header_of(parent: Message | Mapping[str, Any] | None) -> dict[str, Any]:
    """The header to use as parent_header: a Message's, a dict message's, or a header."""
    if parent is None:
        return {}
    if isinstance(parent, Message):
        return dict(parent.header)
    header = parent.get("header")
    if isinstance(header, Mapping):
        return dict(header)
    if "msg_id" in parent:
        return dict(parent)
    return {}


class Session:
    """Builds, signs, serialises, verifies and parses messages of one session.

    ``signature_scheme`` is ``"hmac-<algorithm>"`` for any algorithm hashlib
    knows; an empty ``key`` disables signing and verification (and replay
    detection). With a key, every received signature is remembered, at most
    ``replay_history`` of them (oldest forgotten first), and a repeat is
    rejected with :class:`ReplayError` when ``check_replay`` is true.
    """

    def __init__(
        self,
        key: bytes = b"",
        signature_scheme: str = "hmac-sha256",
        *,
        session_id: str | None = None,
        username: str = "kernel-supervisor",
        replay_history: int = 65536,
        check_replay: bool = True,
    ) -> None:
        raw: object = key
        if isinstance(raw, bytearray):
            raw = bytes(raw)
        if not isinstance(raw, bytes):
            raise ConfigurationError(f"key must be bytes, not {type(raw).__name__}")
        key = raw
        if not isinstance(signature_scheme, str) or not signature_scheme.startswith("hmac-"):
            raise ConfigurationError(
                f"signature_scheme must look like 'hmac-sha256', not {signature_scheme!r}"
            )
        digest = signature_scheme[len("hmac-") :]
        try:
            auth = hmac.new(key or b"probe", digestmod=digest)
            auth.copy().hexdigest()
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"signature_scheme {signature_scheme!r}: {digest!r} is not usable with HMAC"
                f" (available: {', '.join(sorted(hashlib.algorithms_available))})"
            ) from exc
        if isinstance(replay_history, bool) or not isinstance(replay_history, int):
            raise ConfigurationError("replay_history must be an int")
        if replay_history < 1:
            raise ConfigurationError(f"replay_history must be >= 1, not {replay_history}")
        if session_id is not None and not isinstance(session_id, str):
            raise ConfigurationError("session_id must be a str")
        self._key = key
        self._scheme = signature_scheme
        self._auth: hmac.HMAC | None = auth if key else None
        self.session_id: str = session_id if session_id is not None else new_id()
        self.username = username
        self.check_replay = check_replay
        self._history_max = replay_history
        self._history: deque[bytes] = deque()
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    @property
    def key(self) -> bytes:
        """The HMAC key (empty: messages are neither signed nor verified)."""
        return self._key

    @property
    def signature_scheme(self) -> str:
        """The scheme, e.g. ``"hmac-sha256"``."""
        return self._scheme

    def __repr__(self) -> str:
        signed = "signed" if self._key else "unsigned"
        return f"<Session {self.session_id} {self._scheme} {signed}>"

    # -- building -----------------------------------------------------------

    def header(self, msg_type: str) -> dict[str, Any]:
        """A fresh header for a message of ``msg_type`` from this session."""
        return {
            "msg_id": new_id(),
            "msg_type": msg_type,
            "session": self.session_id,
            "username": self.username,
            "date": utcnow(),
            "version": PROTOCOL_VERSION,
        }

    def msg(
        self,
        msg_type: str,
        content: Mapping[str, Any] | None = None,
        *,
        parent: Message | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
        header: Mapping[str, Any] | None = None,
    ) -> Message:
        """Build a message; ``parent`` is a Message or a jupyter-style dict.

        An explicit ``header`` is used as given, with any missing standard
        field (msg_id, msg_type, session, username, date, version) filled in.
        """
        if header is None:
            hdr = self.header(msg_type)
        else:
            hdr = dict(header)
            for name, value in self.header(msg_type).items():
                hdr.setdefault(name, value)
        return Message(
            header=hdr,
            parent_header=_header_of(parent),
            metadata=dict(metadata) if metadata else {},
            content=dict(content) if content else {},
            buffers=tuple(buffers),
        )

    # -- signing ------------------------------------------------------------

    def sign(self, parts: Sequence[bytes]) -> bytes:
        """The hex HMAC of ``parts`` as ASCII bytes; ``b""`` when there is no key."""
        if self._auth is None:
            return b""
        h = self._auth.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def _remember(self, signature: bytes) -> None:
        """Record a verified signature; raise ReplayError if it was seen before."""
        with self._lock:
            if signature in self._seen:
                raise ReplayError(f"signature already seen (replayed message): {signature[:16]!r}")
            self._seen.add(signature)
            self._history.append(signature)
            if len(self._history) > self._history_max:
                self._seen.discard(self._history.popleft())

    # -- frames -------------------------------------------------------------

    def serialize(self, msg: Message, identities: Sequence[bytes] = ()) -> list[bytes]:
        """The frame list of ``msg`` (routing ``identities`` first), signed."""
        header = _dumps(msg.header, "header")
        parent = _dumps(msg.parent_header, "parent_header")
        metadata = _dumps(msg.metadata, "metadata")
        content = _dumps(msg.content, "content")
        if self._auth is None:
            signature = b""
        else:
            h = self._auth.copy()
            h.update(header)
            h.update(parent)
            h.update(metadata)
            h.update(content)
            signature = h.hexdigest().encode("ascii")
        frames = [*identities, DELIMITER, signature, header, parent, metadata, content]
        if msg.buffers:
            frames.extend(msg.buffers)
        return frames

    def deserialize(self, frames: Sequence[bytes | zmq.Frame | memoryview]) -> Message:
        """Parse and verify a received frame list; raises only WireError subclasses."""
        try:
            return self._deserialize(frames)
        except WireError:
            raise
        except Exception as exc:  # the contract: nothing but WireError escapes
            raise FrameError(f"malformed message: {type(exc).__name__}: {exc}") from exc

    def _deserialize(self, frames: Sequence[bytes | zmq.Frame | memoryview]) -> Message:
        if isinstance(frames, (bytes, bytearray, memoryview, str)):
            raise FrameError("expected a sequence of frames, got a single buffer")
        parts = [_to_bytes(f) for f in frames]
        try:
            idx = parts.index(DELIMITER)
        except ValueError:
            raise FrameError("no <IDS|MSG> delimiter among the frames") from None
        if len(parts) - idx - 1 < 5:
            raise FrameError(
                f"expected at least 5 frames after the delimiter, got {len(parts) - idx - 1}"
            )
        signature, h, p, m, c = parts[idx + 1 : idx + 6]
        if self._auth is not None:
            if not signature:
                raise SignatureError("message is unsigned but this session has a key")
            check = self._auth.copy()
            check.update(h)
            check.update(p)
            check.update(m)
            check.update(c)
            if not hmac.compare_digest(signature, check.hexdigest().encode("ascii")):
                raise SignatureError("invalid HMAC signature")
            if self.check_replay:
                self._remember(signature)
        header = _loads(h, "header")
        if not isinstance(header.get("msg_id"), str):
            raise FrameError("header has no string msg_id")
        if not isinstance(header.get("msg_type"), str):
            raise FrameError("header has no string msg_type")
        return Message(
            header=header,
            parent_header=_loads(p, "parent_header"),
            metadata=_loads(m, "metadata"),
            content=_loads(c, "content"),
            buffers=tuple(parts[idx + 6 :]),
            identities=tuple(parts[:idx]),
        )

    # -- sockets ------------------------------------------------------------

    def send(self, socket: zmq.Socket[Any], msg: Message, identities: Sequence[bytes] = ()) -> None:
        """Serialise and send ``msg`` on a blocking socket.

        pyzmq sends frames above ``zmq.COPY_THRESHOLD`` (large buffers)
        without copying them.
        """
        socket.send_multipart(self.serialize(msg, identities))

    async def send_async(
        self, socket: zmq.asyncio.Socket, msg: Message, identities: Sequence[bytes] = ()
    ) -> None:
        """Serialise and send ``msg`` on an asyncio socket."""
        await socket.send_multipart(self.serialize(msg, identities))

    def recv(self, socket: zmq.Socket[Any], timeout: float | None = None) -> Message | None:
        """Receive one message, waiting at most ``timeout`` seconds (None: forever).

        Returns None on timeout. A message that fails verification is consumed
        and raises a :class:`WireError` subclass.
        """
        if (
            timeout is not None
            and math.isfinite(timeout)
            and not socket.poll(max(0, math.ceil(timeout * 1000)), zmq.POLLIN)
        ):
            return None
        return self.deserialize(socket.recv_multipart())

    async def recv_async(self, socket: zmq.asyncio.Socket) -> Message:
        """Receive one message from an asyncio socket (raises WireError if bad)."""
        frames = await socket.recv_multipart()
        return self.deserialize(frames)

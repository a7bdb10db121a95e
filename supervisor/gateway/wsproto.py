"""Kernel messages on a WebSocket: the two framings jupyter_server speaks.

* **legacy** (no subprotocol): a message is a JSON object with ``header``,
  ``parent_header``, ``metadata``, ``content``, ``buffers`` (empty),
  ``msg_id``, ``msg_type`` and ``channel``, in a text frame; a message with
  binary buffers goes in a binary frame: a big-endian uint32 count ``n``, then
  ``n`` uint32 offsets (from the frame's start) of the JSON part and of each
  buffer, then those parts.
* **v1** (subprotocol ``v1.kernel.websocket.jupyter.org``): a binary frame of
  little-endian uint64s: the number of offsets ``k``, then ``k`` offsets; the
  bytes between the first two are the channel name, the next four spans are
  the raw JSON header, parent header, metadata and content, the rest buffers.

Kernel-side, a message is the list of raw parts after the signature
(``[header, parent_header, metadata, content, *buffers]``), so relaying in
either direction re-encodes no JSON it does not have to: the legacy text
frame is spliced from the kernel's own JSON bytes. Pure functions, no state.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any, NamedTuple

from supervisor.errors import FrameError

__all__ = [
    "V1_PROTOCOL",
    "Incoming",
    "decode_legacy",
    "decode_v1",
    "encode_legacy",
    "encode_v1",
]

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
CHANNELS = ("shell", "control", "stdin", "iopub")
_MAX_PARTS = 4096


class Incoming(NamedTuple):
    """One message from a WebSocket client, ready to be signed and sent."""

    channel: str
    header: dict[str, Any]
    parent_header: dict[str, Any]
    parts: list[bytes]  # [header, parent_header, metadata, content, *buffers] as JSON bytes


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _from_dict(msg: Any, buffers: list[bytes]) -> Incoming:
    if not isinstance(msg, dict):
        raise FrameError("message is not a JSON object")
    channel = msg.get("channel") or "shell"
    if channel not in CHANNELS or channel == "iopub":
        raise FrameError(f"no such channel {channel!r}")
    header = _obj(msg.get("header"), "header")
    if not isinstance(header.get("msg_id"), str) or not isinstance(header.get("msg_type"), str):
        raise FrameError("header needs string msg_id and msg_type")
    parent = _obj(msg.get("parent_header"), "parent_header")
    metadata = _obj(msg.get("metadata"), "metadata")
    content = _obj(msg.get("content"), "content")
    parts = [_dumps(header), _dumps(parent), _dumps(metadata), _dumps(content), *buffers]
    return Incoming(channel, header, parent, parts)


def decode_legacy(frame: str | bytes) -> Incoming:
    """Parse a legacy text (JSON) or binary (offsets + JSON + buffers) frame."""
    try:
        if isinstance(frame, str):
            return _from_dict(json.loads(frame), [])
        if len(frame) < 4:
            raise FrameError("binary frame too short")
        (count,) = struct.unpack_from("!I", frame, 0)
        if not 1 <= count <= _MAX_PARTS or len(frame) < 4 * (count + 1):
            raise FrameError(f"binary frame claims {count} parts")
        offsets = list(struct.unpack_from(f"!{count}I", frame, 4))
        offsets.append(len(frame))
        if any(b < a for a, b in itertools.pairwise(offsets)) or \
                offsets[0] < 4 * (count + 1):
            raise FrameError("binary frame offsets out of order")
        bufs = [bytes(frame[a:b]) for a, b in itertools.pairwise(offsets)]
        return _from_dict(json.loads(bufs[0]), bufs[1:])
    except FrameError:
        raise
    except (ValueError, UnicodeDecodeError, struct.error, RecursionError) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None


def decode_v1(frame: str | bytes) -> Incoming:
    """Parse a v1 binary frame."""
    if isinstance(frame, str):
        raise FrameError("v1 frames are binary")
    try:
        if len(frame) < 8:
            raise FrameError("v1 frame too short")
        count = int.from_bytes(frame[:8], "little")
        if not 6 <= count <= _MAX_PARTS or len(frame) < 8 * (count + 1):
            raise FrameError(f"v1 frame claims {count} offsets")
        offsets = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(count)]
        if any(b < a for a, b in itertools.pairwise(offsets)) or \
                offsets[0] < 8 * (count + 1) or offsets[-1] > len(frame):
            raise FrameError("v1 frame offsets out of order")
        channel = frame[offsets[0]:offsets[1]].decode("utf-8")
        if channel not in CHANNELS or channel == "iopub":
            raise FrameError(f"no such channel {channel!r}")
        parts = [bytes(frame[a:b]) for a, b in itertools.pairwise(offsets[1:])]
        header = _obj(json.loads(parts[0]), "header")
        parent = _obj(json.loads(parts[1]) if parts[1] else {}, "parent_header")
        if not isinstance(header.get("msg_id"), str) or not isinstance(
                header.get("msg_type"), str):
            raise FrameError("header needs string msg_id and msg_type")
        return Incoming(channel, header, parent, parts)
    except FrameError:
        raise
    except (ValueError, UnicodeDecodeError, IndexError, RecursionError) as exc:
        raise FrameError(f"undecodable v1 frame: {exc}") from None


def encode_v1(channel: str, parts: list[bytes]) -> bytes:
    """A v1 binary frame for kernel ``parts`` on ``channel``."""
    name = channel.encode("utf-8")
    offsets = [8 * (len(parts) + 3)]
    offsets.append(offsets[-1] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = b"".join(n.to_bytes(8, "little") for n in (len(offsets), *offsets))
    return b"".join((head, name, *parts))


def encode_legacy(channel: str, parts: list[bytes], msg_id: str, msg_type: str) -> str | bytes:
    """A legacy frame: JSON text spliced from the kernel's bytes, binary if buffers."""
    header, parent, metadata, content = parts[:4]
    body = b"".join((
        b'{"header":', header or b"{}", b',"parent_header":', parent or b"{}",
        b',"metadata":', metadata or b"{}", b',"content":', content or b"{}",
        b',"buffers":[],"msg_id":', _dumps(msg_id), b',"msg_type":', _dumps(msg_type),
        b',"channel":', _dumps(channel), b"}"))
    buffers = parts[4:]
    if not buffers:
        return body.decode("utf-8", errors="replace")
    chunks = [body, *buffers]
    offsets = [4 * (len(chunks) + 1)]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"!{len(chunks) + 1}I", len(chunks), *offsets) + b"".join(chunks)

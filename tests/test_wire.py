"""Tests of supervisor.wire: framing, signing, replay, parsing, interop and sockets."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.errors import (
    ConfigurationError,
    FrameError,
    ReplayError,
    SignatureError,
    WireError,
)
from supervisor.wire import (
    DELIMITER,
    PROTOCOL_VERSION,
    Message,
    Session,
    new_id,
    parse_date,
    utcnow,
)

KEY = b"a-very-secret-key"
UTC = datetime.timezone.utc


def _split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Identities and the frames after the delimiter."""
    idx = frames.index(DELIMITER)
    return frames[:idx], frames[idx + 1 :]


def _resign(session: Session, frames: list[bytes]) -> list[bytes]:
    """Recompute the signature frame after the caller tampered with the JSON frames."""
    idents, rest = _split(frames)
    rest[0] = session.sign(rest[1:5])
    return [*idents, DELIMITER, *rest]


# -- ids and dates ---------------------------------------------------------


def test_new_id_is_a_uuid4() -> None:
    """new_id returns distinct uuid4 strings."""
    a, b = new_id(), new_id()
    assert a != b
    for value in (a, b):
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


def test_utcnow_is_iso_utc_with_microseconds() -> None:
    """utcnow gives 'YYYY-MM-DDTHH:MM:SS.ffffffZ' close to the real time."""
    s = utcnow()
    assert len(s) == 27 and s[10] == "T" and s.endswith("Z") and s[19] == "."
    parsed = parse_date(s)
    assert abs((datetime.datetime.now(UTC) - parsed).total_seconds()) < 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24T08:28:00.123456Z", datetime.datetime(2026, 11, 24, 8, 28, 0, 123456, UTC)),
        ("2026-11-24T08:28:00Z", datetime.datetime(2026, 11, 24, 8, 28, tzinfo=UTC)),
        ("2026-11-24T08:28:00.5", datetime.datetime(2026, 11, 24, 8, 28, 0, 500000, UTC)),
        ("2026-11-24T08:28:00.1234567891Z", datetime.datetime(2026, 11, 24, 8, 28, 0, 123456, UTC)),
        (
            "2026-11-24T10:28:00.000001+02:00",
            datetime.datetime(2026, 11, 24, 8, 28, 0, 1, UTC),
        ),
        ("2026-11-24T03:28:00-0500", datetime.datetime(2026, 11, 24, 8, 28, tzinfo=UTC)),
        ("2026-11-24", datetime.datetime(2026, 11, 24, tzinfo=UTC)),
    ],
)
def test_parse_date_accepts_iso_variants(text: str, expected: datetime.datetime) -> None:
    """parse_date returns tz-aware datetimes for the ISO-8601 forms Jupyter emits."""
    got = parse_date(text)
    assert got.tzinfo is not None
    assert got == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-13-01T00:00:00Z",
        "2026-11-24T25:00:00Z",
        "2026-11-24T08:28:00+99:00",
        "2026-11-24T08:28:00Zjunk",
        "\uff12\uff10\uff12\uff16-11-24",
        "2026-11-24T08:28:00Z\n",
        12345,
        None,
    ],
)
def test_parse_date_rejects_garbage(text: Any) -> None:
    """parse_date raises FrameError (and nothing else) for non-dates."""
    with pytest.raises(FrameError):
        parse_date(text)


# -- building and round trips ------------------------------------------------


def test_header_has_the_protocol_fields() -> None:
    """Session.header fills msg_id, msg_type, session, username, date and version 5.4."""
    s = Session(KEY, session_id="sess-1", username="alice")
    h = s.header("kernel_info_request")
    assert set(h) == {"msg_id", "msg_type", "session", "username", "date", "version"}
    assert h["msg_type"] == "kernel_info_request"
    assert h["session"] == "sess-1" == s.session_id
    assert h["username"] == "alice"
    assert h["version"] == PROTOCOL_VERSION == "5.4"
    parse_date(h["date"])


def test_round_trip_preserves_every_part() -> None:
    """serialize then deserialize returns the same header, parent, metadata, content,
    buffers and identities, unicode included."""
    sender, receiver = Session(KEY), Session(KEY)
    parent = sender.msg("execute_request", {"code": "1+1"})
    content = {"text": "héllo wörld ✓ 日本語 🐍", "n": [1, 2.5, None, True], "nested": {"k": {}}}
    msg = sender.msg(
        "stream",
        content,
        parent=parent,
        metadata={"tag": "ü", "deep": [{"a": 1}]},
        buffers=[b"\x00\x01binary", b"", bytes(range(256))],
    )
    frames = sender.serialize(msg, identities=[b"id-1", b"\xffid-2"])
    got = receiver.deserialize(frames)
    assert got.header == msg.header
    assert got.parent_header == parent.header
    assert got.metadata == msg.metadata
    assert got.content == content
    assert got.buffers == (b"\x00\x01binary", b"", bytes(range(256)))
    assert got.identities == (b"id-1", b"\xffid-2")
    assert got.msg_id == msg.msg_id and got.msg_type == "stream"
    assert got.parent_id == parent.msg_id
    assert got.header["date"] == msg.header["date"]


def test_serialized_frames_are_compact_utf8_json() -> None:
    """The wire layout is idents, delimiter, hex HMAC, 4 compact UTF-8 JSON frames, buffers."""
    s = Session(KEY)
    msg = s.msg("comm_msg", {"data": "é"}, buffers=[b"buf"])
    frames = s.serialize(msg, [b"who"])
    assert frames[0] == b"who" and frames[1] == DELIMITER
    assert frames[2] == hmac.new(KEY, b"".join(frames[3:7]), hashlib.sha256).hexdigest().encode()
    assert frames[6] == '{"data":"é"}'.encode()
    assert frames[4] == b"{}" and frames[5] == b"{}"
    assert b" " not in frames[3]
    assert frames[7] == b"buf"
    assert json.loads(frames[3]) == msg.header


def test_msg_accepts_a_jupyter_style_dict_parent() -> None:
    """msg(parent=...) takes a Message, a jupyter dict (its 'header') or to_dict() output."""
    s = Session()
    parent = s.msg("execute_request")
    as_dict = {"header": dict(parent.header), "content": {}}
    assert s.msg("status", parent=as_dict).parent_header == parent.header
    child = s.msg("status", parent=parent.to_dict())
    assert child.parent_id == parent.msg_id
    # a to_dict() parent carries a datetime date; it must still serialise to ISO
    got = s.deserialize(s.serialize(child))
    assert got.parent_header["date"] == parent.header["date"]
    assert s.msg("status").parent_id is None


def test_msg_with_explicit_header_fills_missing_fields() -> None:
    """An explicit header is kept as given, missing standard fields are filled in."""
    s = Session()
    m = s.msg("x", header={"msg_id": "fixed", "msg_type": "custom", "extra": 1})
    assert m.msg_id == "fixed" and m.msg_type == "custom" and m.header["extra"] == 1
    assert m.header["session"] == s.session_id and "date" in m.header


def test_to_dict_matches_jupyter_client_shape() -> None:
    """to_dict has jupyter_client's keys and tz-aware datetime dates."""
    s = Session(KEY)
    parent = s.msg("execute_request")
    msg = s.deserialize(
        s.serialize(s.msg("execute_reply", {"status": "ok"}, parent=parent, buffers=[b"x"]))
    )
    d = msg.to_dict()
    assert set(d) == {
        "header",
        "parent_header",
        "metadata",
        "content",
        "buffers",
        "msg_id",
        "msg_type",
    }
    assert d["msg_id"] == msg.msg_id and d["msg_type"] == "execute_reply"
    assert isinstance(d["header"]["date"], datetime.datetime)
    assert d["header"]["date"].tzinfo is not None
    assert d["parent_header"]["date"] == parse_date(parent.header["date"])
    assert d["buffers"] == [b"x"]
    assert d["content"] == {"status": "ok"}
    assert isinstance(msg.header["date"], str)  # the Message itself is untouched


def test_datetimes_in_content_are_encoded_as_iso() -> None:
    """Datetimes in content serialise as ISO-8601 UTC strings (naive taken as UTC)."""
    s = Session()
    aware = datetime.datetime(
        2026, 1, 2, 5, 4, 5, 6, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    naive = datetime.datetime(2026, 1, 2, 3, 4, 5)
    got = s.deserialize(
        s.serialize(s.msg("x", {"a": aware, "n": naive, "d": datetime.date(2026, 1, 2)}))
    )
    assert got.content == {
        "a": "2026-01-02T03:04:05.000006Z",
        "n": "2026-01-02T03:04:05.000000Z",
        "d": "2026-01-02",
    }


def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


@pytest.mark.parametrize(
    "content",
    [
        {"o": object()},
        {"s": {1, 2}},
        {"f": float("nan")},
        {"f": float("inf")},
        {"t": "\ud800"},
        {(1, 2): "tuple key"},
        _circular(),
    ],
)
def test_unserialisable_content_raises_frame_error(content: dict[Any, Any]) -> None:
    """serialize refuses content that is not strict JSON with FrameError."""
    s = Session(KEY)
    with pytest.raises(FrameError):
        s.serialize(s.msg("x", content))


# -- signatures ----------------------------------------------------------------


def test_wrong_key_is_rejected() -> None:
    """A message signed with another key fails with SignatureError."""
    frames = Session(b"key-one").serialize(Session(b"key-one").msg("x"))
    with pytest.raises(SignatureError) as info:
        Session(b"key-two").deserialize(frames)
    assert not isinstance(info.value, ReplayError)


def test_tampered_content_is_rejected() -> None:
    """Changing one content byte after signing fails with SignatureError."""
    s = Session(KEY)
    frames = s.serialize(s.msg("execute_request", {"code": "print(1)"}))
    frames[-1] = frames[-1].replace(b"1", b"2")
    with pytest.raises(SignatureError):
        Session(KEY).deserialize(frames)


def test_missing_signature_with_key_is_rejected() -> None:
    """An unsigned message is refused by a session that has a key."""
    frames = Session().serialize(Session().msg("x"))
    assert frames[1] == b""
    with pytest.raises(SignatureError):
        Session(KEY).deserialize(frames)


def test_empty_key_accepts_unsigned_and_signed() -> None:
    """A keyless session neither signs nor verifies, and never reports replays."""
    s = Session()
    assert s.sign([b"a", b"b"]) == b""
    frames = s.serialize(s.msg("x", {"v": 1}))
    assert s.deserialize(frames).content == {"v": 1}
    assert s.deserialize(frames).content == {"v": 1}  # no replay check without a key
    signed = Session(KEY).serialize(Session(KEY).msg("y"))
    assert s.deserialize(signed).msg_type == "y"


@pytest.mark.parametrize(
    ("scheme", "hexlen"),
    [("hmac-sha512", 128), ("hmac-md5", 32), ("hmac-sha1", 40), ("hmac-sha3_256", 64)],
)
def test_other_hashlib_schemes(scheme: str, hexlen: int) -> None:
    """Any hashlib digest works as hmac-<name>, and a scheme mismatch is rejected."""
    s = Session(KEY, scheme)
    assert s.signature_scheme == scheme
    frames = s.serialize(s.msg("x", {"k": "v"}))
    assert len(frames[1]) == hexlen
    algo = scheme.removeprefix("hmac-")
    assert frames[1] == hmac.new(KEY, b"".join(frames[2:6]), algo).hexdigest().encode()
    assert Session(KEY, scheme).deserialize(frames).content == {"k": "v"}
    with pytest.raises(SignatureError):
        Session(KEY, "hmac-sha256").deserialize(frames)


@pytest.mark.parametrize("scheme", ["sha256", "hmac-", "hmac-nope", "hmac-shake_128", "HMAC-X", 7])
def test_bad_scheme_is_a_configuration_error(scheme: Any) -> None:
    """An unknown or unusable signature scheme fails at construction."""
    with pytest.raises(ConfigurationError):
        Session(KEY, scheme)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": "text-key"},
        {"key": None},
        {"replay_history": 0},
        {"replay_history": True},
        {"session_id": 5},
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any]) -> None:
    """A str key, a non-positive history or a bad session id is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        Session(**kwargs)


def test_sign_matches_hmac_and_key_is_read_only() -> None:
    """sign() is the hex HMAC of the concatenated parts; key and scheme are exposed."""
    raw_key: Any = bytearray(KEY)
    s = Session(raw_key, "hmac-sha256")
    assert s.key == KEY and isinstance(s.key, bytes)
    with pytest.raises(AttributeError):
        s.key = b"other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.signature_scheme = "hmac-md5"  # type: ignore[misc]
    parts = [b"one", b"two", b""]
    assert s.sign(parts) == hmac.new(KEY, b"onetwo", "sha256").hexdigest().encode("ascii")
    assert s.sign(parts) == s.sign(parts)  # the precomputed HMAC is not consumed


def test_replay_is_rejected() -> None:
    """The same signed frames accepted once are refused the second time."""
    sender, receiver = Session(KEY), Session(KEY)
    frames = sender.serialize(sender.msg("x"))
    receiver.deserialize(frames)
    with pytest.raises(ReplayError):
        receiver.deserialize(frames)
    # with replay checking off, repeats are accepted
    lax = Session(KEY, check_replay=False)
    lax.deserialize(frames)
    lax.deserialize(frames)


def test_replay_history_is_bounded() -> None:
    """Only the last replay_history signatures are remembered; the oldest is forgotten."""
    sender, receiver = Session(KEY), Session(KEY, replay_history=2)
    a, b, c = (sender.serialize(sender.msg("x", {"i": i})) for i in range(3))
    receiver.deserialize(a)
    receiver.deserialize(b)
    with pytest.raises(ReplayError):
        receiver.deserialize(a)
    receiver.deserialize(c)  # evicts a
    assert receiver.deserialize(a).content == {"i": 0}  # accepted again, evicts b
    with pytest.raises(ReplayError):
        receiver.deserialize(c)  # c is still remembered
    assert receiver.deserialize(b).content == {"i": 1}  # b was forgotten


def test_forged_signature_does_not_enter_the_history() -> None:
    """A rejected (badly signed) message does not make its genuine twin look replayed."""
    s = Session(KEY)
    frames = s.serialize(s.msg("x"))
    forged = list(frames)
    forged[-1] = b'{"evil":1}'
    with pytest.raises(SignatureError):
        s.deserialize(forged)
    assert s.deserialize(frames).msg_type == "x"


# -- malformed frames ------------------------------------------------------------


def _valid(session: Session) -> list[bytes]:
    return session.serialize(session.msg("x", {"a": 1}), [b"id"])


@pytest.mark.parametrize(
    ("mutate", "resign"),
    [
        (lambda f: [x for x in f if x != DELIMITER], False),  # no delimiter
        (lambda f: f[:5], False),  # too few frames after the delimiter
        (lambda f: [*f[:3], b"[]", *f[4:]], True),  # header is a list
        (lambda f: [*f[:3], b'{"msg_type":"x"}', *f[4:]], True),  # no msg_id
        (lambda f: [*f[:3], b'{"msg_id":"1","msg_type":2}', *f[4:]], True),  # bad msg_type
        (lambda f: [*f[:6], b'"content"'], True),  # content is a string
        (lambda f: [*f[:6], b"\xff\xfe{}"], True),  # not utf-8
        (lambda f: [*f[:5], b"{", f[6]], True),  # truncated json
        (lambda f: [*f[:5], b"[" * 100_000, f[6]], True),  # absurdly deep json
        (lambda f: "not a list", False),
        (lambda f: b"".join(f), False),
        (lambda f: [*f, 42], False),  # a non-bytes frame
        (lambda f: None, False),
    ],
)
def test_malformed_frames_raise_frame_error(mutate: Any, resign: bool) -> None:
    """Structurally bad frame lists raise FrameError, even when correctly signed."""
    s = Session(KEY)
    frames = mutate(_valid(s))
    if resign:
        frames = _resign(s, frames)
    with pytest.raises(FrameError):
        Session(KEY).deserialize(frames)


def test_deserialize_accepts_frames_memoryviews_and_bytearrays() -> None:
    """zmq.Frame, memoryview and bytearray frames parse like bytes."""
    s = Session(KEY)
    frames = s.serialize(s.msg("x", {"a": 1}, buffers=[b"buf"]), [b"id"])
    mixed: list[Any] = [
        zmq.Frame(frames[0]),
        memoryview(frames[1]),
        bytearray(frames[2]),
        *frames[3:6],
        zmq.Frame(frames[6]),
        memoryview(frames[7]),
    ]
    got = Session(KEY).deserialize(mixed)
    assert got.content == {"a": 1} and got.buffers == (b"buf",) and got.identities == (b"id",)
    assert all(type(b) is bytes for b in got.buffers + got.identities)


# -- hypothesis ----------------------------------------------------------------------

_frame = st.one_of(
    st.binary(max_size=48),
    st.just(DELIMITER),
    st.sampled_from(
        [
            b"",
            b"{}",
            b"[]",
            b"null",
            b'{"msg_id":"a","msg_type":"b"}',
            b'{"msg_id":1}',
            b"\xff",
            b"{",
            b"NaN",
            b'"\\ud800"',
        ]
    ),
)
_odd_frame = st.one_of(
    _frame,
    _frame.map(bytearray),
    _frame.map(lambda b: memoryview(b)),
    st.integers(),
    st.none(),
    st.text(max_size=8),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_odd_frame, max_size=12), keyed=st.booleans())
def test_arbitrary_frames_raise_only_wire_errors(frames: list[Any], keyed: bool) -> None:
    """Any list of arbitrary frames either parses or raises a WireError subclass."""
    s = Session(KEY if keyed else b"")
    try:
        msg = s.deserialize(frames)
    except WireError:
        return
    assert isinstance(msg.msg_id, str) and isinstance(msg.msg_type, str)


@settings(max_examples=300)
@given(
    data=st.data(),
    keyed=st.booleans(),
    resign=st.booleans(),
    op=st.sampled_from(["truncate", "replace", "insert", "drop_delim", "bad_delim", "swap"]),
)
def test_mutated_messages_raise_only_wire_errors(
    data: st.DataObject, keyed: bool, resign: bool, op: str
) -> None:
    """Truncated, corrupted or reordered real messages (re-signed or not) raise only WireError."""
    s = Session(KEY if keyed else b"")
    frames = s.serialize(s.msg("x", {"a": [1, "é"]}, buffers=[b"b1"]), [b"id"])
    n = len(frames)
    if op == "truncate":
        frames = frames[: data.draw(st.integers(0, n - 1))]
    elif op == "replace":
        frames[data.draw(st.integers(0, n - 1))] = data.draw(_frame)
    elif op == "insert":
        frames.insert(data.draw(st.integers(0, n)), data.draw(_frame))
    elif op == "drop_delim":
        frames.remove(DELIMITER)
    elif op == "bad_delim":
        frames[1] = data.draw(st.sampled_from([b"<IDS|MSG", b"<ids|msg>", b"<IDS|MSG> "]))
    else:
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        frames[i], frames[j] = frames[j], frames[i]
    if resign and DELIMITER in frames and len(frames) - frames.index(DELIMITER) > 5:
        frames = _resign(s, frames)
    try:
        Session(s.key).deserialize(frames)
    except WireError:
        pass


_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), inner, max_size=5),
    ),
    max_leaves=8,
)
_json_object = st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), _json, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    content=_json_object,
    metadata=_json_object,
    buffers=st.lists(st.binary(max_size=64), max_size=3),
    identities=st.lists(
        st.binary(min_size=1, max_size=16).filter(lambda b: b != DELIMITER), max_size=3
    ),
    msg_type=st.text(max_size=20, alphabet=st.characters(codec="utf-8")),
)
def test_round_trip_property(
    content: dict[str, Any],
    metadata: dict[str, Any],
    buffers: list[bytes],
    identities: list[bytes],
    msg_type: str,
) -> None:
    """Any JSON content, metadata, buffers and identities survive serialize/deserialize."""
    s = Session(KEY)
    msg = s.msg(msg_type, content, metadata=metadata, buffers=buffers)
    got = Session(KEY).deserialize(s.serialize(msg, identities))
    assert got.content == content
    assert got.metadata == metadata
    assert got.header == msg.header
    assert got.buffers == tuple(buffers)
    assert got.identities == tuple(identities)


# -- interop with jupyter_client ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512"])
def test_jupyter_client_accepts_our_messages(scheme: str) -> None:
    """jupyter_client's Session verifies and decodes a message we signed."""
    from jupyter_client.session import Session as JCSession

    ours = Session(KEY, scheme)
    parent = ours.msg("execute_request", {"code": "x"})
    msg = ours.msg(
        "execute_result",
        {"data": {"text/plain": "ü"}},
        parent=parent,
        metadata={"m": 1},
        buffers=[b"raw"],
    )
    theirs = JCSession(key=KEY, signature_scheme=scheme)
    idents, rest = theirs.feed_identities(ours.serialize(msg, [b"client"]), copy=True)
    d = theirs.deserialize(rest)
    assert idents == [b"client"]
    assert d["msg_id"] == msg.msg_id and d["msg_type"] == "execute_result"
    assert d["content"] == msg.content and d["metadata"] == {"m": 1}
    assert d["parent_header"]["msg_id"] == parent.msg_id
    assert d["header"]["date"] == parse_date(msg.header["date"])
    assert [bytes(b) for b in d["buffers"]] == [b"raw"]
    # our to_dict matches what jupyter_client produced, key for key
    mine = msg.to_dict()
    for key in ("header", "parent_header", "metadata", "content", "msg_id", "msg_type"):
        assert mine[key] == d[key], key


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512"])
def test_we_accept_jupyter_client_messages(scheme: str) -> None:
    """A message jupyter_client's Session serialised is verified and decoded by ours."""
    from jupyter_client.session import Session as JCSession

    theirs = JCSession(key=KEY, signature_scheme=scheme, username="bob")
    parent = theirs.msg("kernel_info_request")
    jmsg = theirs.msg("kernel_info_reply", content={"status": "ok", "é": [1, 2]}, parent=parent)
    frames = theirs.serialize(jmsg, ident=[b"route-a", b"route-b"])
    got = Session(KEY, scheme).deserialize(frames)
    assert got.identities == (b"route-a", b"route-b")
    assert got.msg_id == jmsg["msg_id"] and got.msg_type == "kernel_info_reply"
    assert got.content == {"status": "ok", "é": [1, 2]}
    assert got.parent_id == parent["msg_id"]
    assert got.header["username"] == "bob"
    assert got.to_dict()["header"]["date"] == jmsg["header"]["date"]
    with pytest.raises(SignatureError):
        Session(b"other", scheme).deserialize(frames)


# -- sockets -------------------------------------------------------------------------------


@pytest.fixture
def router_dealer() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A ROUTER bound on a random TCP port and a DEALER connected to it."""
    with zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        dealer = ctx.socket(zmq.DEALER)
        try:
            for sock in (router, dealer):
                sock.linger = 0
            dealer.setsockopt(zmq.IDENTITY, b"dealer-1")
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            yield router, dealer
        finally:
            dealer.close()
            router.close()


def test_sync_send_recv_over_tcp(
    router_dealer: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    """send/recv carry a request with a large buffer DEALER->ROUTER and a reply back."""
    router, dealer = router_dealer
    client, kernel = Session(KEY), Session(KEY)
    big = bytes(range(256)) * 400  # above zmq.COPY_THRESHOLD: sent without copying
    request = client.msg("comm_msg", {"data": "ping"}, buffers=[big, b"small"])
    client.send(dealer, request)
    got = kernel.recv(router, timeout=5)
    assert got is not None
    assert got.identities == (b"dealer-1",)
    assert got.msg_id == request.msg_id and got.buffers == (big, b"small")
    kernel.send(router, kernel.msg("comm_msg", {"data": "pong"}, parent=got), got.identities)
    reply = client.recv(dealer, timeout=5)
    assert reply is not None and reply.content == {"data": "pong"}
    assert reply.parent_id == request.msg_id and reply.identities == ()
    assert client.recv(dealer, timeout=0.05) is None
    assert client.recv(dealer, timeout=0) is None


def test_sync_recv_raises_wire_error_on_garbage(
    router_dealer: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    """recv consumes an invalid message and raises FrameError, then keeps working."""
    router, dealer = router_dealer
    s = Session(KEY)
    dealer.send_multipart([b"junk", b"more junk"])
    with pytest.raises(FrameError):
        s.recv(router, timeout=5)
    s.send(dealer, s.msg("after"))
    got = Session(KEY).recv(router, timeout=5)
    assert got is not None and got.msg_type == "after"


async def test_async_send_recv_over_inproc() -> None:
    """send_async/recv_async carry a message and its reply over asyncio sockets."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.linger = 0
        dealer.setsockopt(zmq.IDENTITY, b"async-dealer")
        router.bind("inproc://wire-test")
        dealer.connect("inproc://wire-test")
        client, kernel = Session(KEY, "hmac-sha512"), Session(KEY, "hmac-sha512")
        request = client.msg("execute_request", {"code": "ünïcode"}, buffers=[b"b"])
        await client.send_async(dealer, request)
        got = await asyncio.wait_for(kernel.recv_async(router), 5)
        assert got.identities == (b"async-dealer",)
        assert got.content == {"code": "ünïcode"} and got.buffers == (b"b",)
        await kernel.send_async(
            router, kernel.msg("execute_reply", {"status": "ok"}, parent=got), got.identities
        )
        reply = await asyncio.wait_for(client.recv_async(dealer), 5)
        assert reply.parent_id == request.msg_id and reply.content == {"status": "ok"}
        await dealer.send_multipart([DELIMITER, b"", b"{}", b"{}", b"{}", b"{}"])
        with pytest.raises(SignatureError):
            await asyncio.wait_for(kernel.recv_async(router), 5)
    finally:
        dealer.close()
        router.close()
        ctx.term()


def test_message_is_frozen() -> None:
    """Message is an immutable dataclass with the documented defaults."""
    m = Message(header={"msg_id": "1", "msg_type": "t"}, parent_header={}, metadata={}, content={})
    assert m.buffers == () and m.identities == () and m.parent_id is None
    with pytest.raises(AttributeError):
        m.content = {}  # type: ignore[misc]

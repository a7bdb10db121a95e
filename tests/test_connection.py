"""Tests for supervisor.connection: validation, files, ports, ipc, jupyter_client interop."""

from __future__ import annotations

import inspect
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from supervisor.connection import (
    CHANNELS,
    ConnectionInfo,
    allocate_ports,
    connection_file_path,
    ensure_runtime_dir,
    ipc_paths,
    new_connection_info,
    new_key,
    read_connection_file,
    remove_connection_files,
    runtime_dir,
    write_connection_file,
)
from supervisor.errors import ConfigurationError, ConnectionFileError

HAS_CURVE = bool(zmq.has("curve"))
PUB, SEC = zmq.curve_keypair() if HAS_CURVE else (b"A" * 40, b"B" * 40)


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A not-yet-existing runtime dir under tmp_path, selected with JUPYTER_RUNTIME_DIR."""
    path = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with a permissive umask so that modes must be set explicitly."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sample(**over: Any) -> ConnectionInfo:
    fields: dict[str, Any] = dict(
        shell_port=5001, iopub_port=5002, stdin_port=5003, control_port=5004, hb_port=5005,
        ip="127.0.0.1", key=b"secret", kernel_name="python3",
    )
    fields.update(over)
    return ConnectionInfo(**fields)


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shell_port": "5555"}, "shell_port"),
        ({"iopub_port": True}, "iopub_port"),
        ({"hb_port": 70000}, "hb_port"),
        ({"stdin_port": -1}, "stdin_port"),
        ({"transport": "udp"}, "transport"),
        ({"ip": ""}, "ip"),
        ({"ip": 127}, "ip"),
        ({"key": "not-bytes"}, "key"),
        ({"signature_scheme": "sha256"}, "signature_scheme"),
        ({"signature_scheme": "hmac-nosuchhash"}, "signature_scheme"),
        ({"signature_scheme": "hmac-shake_128"}, "signature_scheme"),
        ({"kernel_name": None}, "kernel_name"),
        ({"curve_publickey": PUB}, "curve_secretkey"),
        ({"curve_secretkey": SEC}, "curve_publickey"),
        ({"curve_publickey": b"short", "curve_secretkey": SEC}, "curve_publickey"),
        ({"curve_publickey": PUB, "curve_secretkey": "x" * 40}, "curve_secretkey"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Every invalid constructor value raises ConnectionFileError naming that field."""
    with pytest.raises(ConnectionFileError) as info:
        _sample(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_valid_schemes_and_ipc_ports_are_accepted() -> None:
    """Any HMAC-capable hashlib digest is a valid scheme; ipc suffixes may exceed 65535."""
    for scheme in ("hmac-sha256", "hmac-sha512", "hmac-md5", "hmac-sha3_256"):
        assert _sample(signature_scheme=scheme).signature_scheme == scheme
    assert _sample(transport="ipc", ip="/tmp/k", shell_port=100000).shell_port == 100000


@pytest.mark.parametrize(
    ("drop_or_change", "field"),
    [
        ({"drop": "hb_port"}, "hb_port"),
        ({"drop": "key"}, "key"),
        ({"drop": "ip"}, "ip"),
        ({"drop": "transport"}, "transport"),
        ({"drop": "signature_scheme"}, "signature_scheme"),
        ({"shell_port": "5001"}, "shell_port"),
        ({"key": 12}, "key"),
        ({"curve_publickey": 5, "curve_secretkey": SEC.decode()}, "curve_publickey"),
        ({"transport": "pgm"}, "transport"),
    ],
)
def test_from_dict_errors_name_field_and_path(drop_or_change: dict[str, Any], field: str) -> None:
    """A missing or mistyped field in a dict is reported with its name and the file path."""
    data = _sample().to_dict()
    change = dict(drop_or_change)
    if "drop" in change:
        del data[change.pop("drop")]
    data.update(change)
    with pytest.raises(ConnectionFileError) as info:
        ConnectionInfo.from_dict(data, path="/some/kernel-x.json")
    assert info.value.field == field
    assert info.value.path == "/some/kernel-x.json"
    assert field in str(info.value) and "/some/kernel-x.json" in str(info.value)


def test_from_dict_ignores_extras_and_defaults_kernel_name() -> None:
    """Unknown keys are ignored and an absent kernel_name (old files) reads as empty."""
    data = _sample().to_dict()
    del data["kernel_name"]
    data["something_new"] = [1, 2]
    info = ConnectionInfo.from_dict(data)
    assert info.kernel_name == ""
    assert info.key == b"secret"


# -- dict layout and urls ------------------------------------------------------------


@pytest.mark.parametrize("curve", [False, True])
def test_round_trip(curve: bool) -> None:
    """to_dict then from_dict gives back an equal ConnectionInfo, with or without curve."""
    extra = {"curve_publickey": PUB, "curve_secretkey": SEC} if curve else {}
    info = _sample(**extra)
    data = info.to_dict()
    assert ConnectionInfo.from_dict(json.loads(json.dumps(data))) == info
    assert info.encrypted is curve
    assert ("curve_secretkey" in data) is curve
    assert isinstance(data["key"], str)


def test_to_dict_layout_matches_jupyter_client(tmp_path: Path) -> None:
    """to_dict has the same keys, order and values as jupyter_client's written file."""
    from jupyter_client.connect import write_connection_file as jc_write

    info = _sample(curve_publickey=PUB, curve_secretkey=SEC)
    fname, _ = jc_write(
        str(tmp_path / "jc.json"), shell_port=5001, iopub_port=5002, stdin_port=5003,
        control_port=5004, hb_port=5005, ip="127.0.0.1", key=b"secret",
        kernel_name="python3", curve_publickey=PUB, curve_secretkey=SEC,
    )
    with open(fname) as f:
        written = json.load(f)
    assert list(written.items()) == list(info.to_dict().items())


def test_urls_and_ports() -> None:
    """url() and port() give tcp://ip:port and ipc://ip-port per channel."""
    info = _sample()
    assert [info.url(c) for c in CHANNELS] == [f"tcp://127.0.0.1:{p}" for p in range(5001, 5006)]
    assert info.port("hb") == 5005
    ipc = _sample(transport="ipc", ip="/run/k", shell_port=1)
    assert ipc.url("shell") == "ipc:///run/k-1"
    with pytest.raises(ConfigurationError):
        info.port("bogus")


# -- keys and ports ------------------------------------------------------------------


def test_new_key_is_64_hex_and_fresh() -> None:
    """new_key() returns 64 lowercase hex ASCII bytes and never repeats."""
    keys = [new_key() for _ in range(200)]
    for key in keys:
        assert isinstance(key, bytes) and len(key) == 64
        int(key, 16)
        assert key == key.lower()
    assert len(set(keys)) == len(keys)


def test_allocate_ports_distinct_and_bindable() -> None:
    """allocate_ports returns distinct ports that can then all be bound on that interface."""
    ports = allocate_ports(8)
    assert len(set(ports)) == 8
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in socks:
            s.close()
    assert allocate_ports(0) == []
    with pytest.raises(ConfigurationError):
        allocate_ports(-1)
    with pytest.raises(ConfigurationError):
        allocate_ports(1, ip="203.0.113.7")  # TEST-NET address: not on this host


def test_new_connection_info_tcp_binds(rt: Path) -> None:
    """A fresh tcp ConnectionInfo has 5 distinct ports whose urls zmq can bind."""
    info = new_connection_info(kernel_name="k")
    ports = [info.port(c) for c in CHANNELS]
    assert len(set(ports)) == 5
    assert len(info.key) == 64 and not info.encrypted
    ctx = zmq.Context()
    try:
        for channel in CHANNELS:
            s = ctx.socket(zmq.ROUTER)
            try:
                s.bind(info.url(channel))
            finally:
                s.close(linger=0)
    finally:
        ctx.term()
    assert new_connection_info(key=b"given").key == b"given"


@pytest.mark.skipif(not HAS_CURVE, reason="libzmq without CURVE")
def test_new_connection_info_curve_keypair(rt: Path) -> None:
    """curve=True yields a matching Z85 keypair; without it no keys are set."""
    info = new_connection_info(curve=True)
    assert info.encrypted
    assert info.curve_secretkey is not None
    assert zmq.curve_public(info.curve_secretkey) == info.curve_publickey
    assert new_connection_info().curve_publickey is None


# -- runtime dir and files -------------------------------------------------------------


def test_runtime_dir_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime_dir follows JUPYTER_RUNTIME_DIR, JUPYTER_DATA_DIR, XDG_DATA_HOME, then HOME."""
    from jupyter_core.paths import jupyter_runtime_dir

    for var in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("JUPYTER_PLATFORM_DIRS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    cases = [
        ({}, tmp_path / "home/.local/share/jupyter/runtime"),
        ({"XDG_DATA_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg/jupyter/runtime"),
        ({"JUPYTER_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data/runtime"),
        ({"JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}, tmp_path / "rt"),
    ]
    for env, expected in cases:
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        assert runtime_dir() == expected
        assert runtime_dir() == Path(jupyter_runtime_dir())
    assert connection_file_path("abc") == tmp_path / "rt" / "kernel-abc.json"


def test_write_default_path_modes(rt: Path, umask_zero: None) -> None:
    """The default file is kernel-<uuid>.json in a runtime dir created 0700, the file 0600."""
    info = _sample()
    path = write_connection_file(info)
    try:
        assert path.parent == rt
        assert path.name.startswith("kernel-") and path.suffix == ".json"
        assert _mode(rt) == 0o700
        assert _mode(path) == 0o600
        assert sorted(p.name for p in rt.iterdir()) == [path.name]  # no temp file left
        assert read_connection_file(path) == info
    finally:
        remove_connection_files(path, info)
    assert not path.exists()


def test_existing_runtime_dir_mode_is_left_alone(rt: Path) -> None:
    """ensure_runtime_dir fixes the mode only of a directory it creates itself."""
    rt.mkdir(mode=0o755)
    rt.chmod(0o755)
    assert ensure_runtime_dir() == rt
    assert _mode(rt) == 0o755


def test_overwrite_is_atomic_and_private(tmp_path: Path, umask_zero: None) -> None:
    """Writing over an existing world-readable file replaces it with a fresh 0600 one."""
    target = tmp_path / "conn.json"
    target.write_text("old")
    target.chmod(0o644)
    info = _sample(kernel_name="new")
    assert write_connection_file(info, target) == target
    assert _mode(target) == 0o600
    assert read_connection_file(str(target)).kernel_name == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["conn.json"]


def test_write_into_missing_dir_fails_cleanly(tmp_path: Path) -> None:
    """Writing into a directory that does not exist raises ConnectionFileError with the path."""
    target = tmp_path / "nope" / "c.json"
    with pytest.raises(ConnectionFileError) as info:
        write_connection_file(_sample(), target)
    assert info.value.path == str(target)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("{not json", "JSON"), ("[1, 2]", "object"), (b"\xff\xfe{}", "JSON")],
)
def test_read_bad_files(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    """Unparsable or non-object files raise ConnectionFileError carrying the path."""
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConnectionFileError) as info:
        read_connection_file(path)
    assert info.value.path == str(path)
    assert fragment in str(info.value)
    with pytest.raises(ConnectionFileError):
        read_connection_file(tmp_path / "missing.json")


# -- interop -------------------------------------------------------------------------


def _km_view(path: Path) -> dict[str, Any]:
    from jupyter_client import KernelManager

    km = KernelManager()
    km.load_connection_file(str(path))
    view: dict[str, Any] = {c + "_port": getattr(km, c + "_port") for c in CHANNELS}
    view.update(
        ip=km.ip, transport=km.transport, key=km.session.key,
        signature_scheme=km.session.signature_scheme,
        curve_publickey=km.curve_publickey, curve_secretkey=km.curve_secretkey,
    )
    return view


def _our_view(info: ConnectionInfo) -> dict[str, Any]:
    view: dict[str, Any] = {c + "_port": info.port(c) for c in CHANNELS}
    view.update(
        ip=info.ip, transport=info.transport, key=info.key,
        signature_scheme=info.signature_scheme,
        curve_publickey=info.curve_publickey, curve_secretkey=info.curve_secretkey,
    )
    return view


@pytest.mark.parametrize("variant", ["tcp", "curve", "ipc", "sha512"])
def test_jupyter_client_reads_our_file(rt: Path, variant: str) -> None:
    """A file we write loads into jupyter_client's KernelManager with identical values."""
    info = new_connection_info(
        transport="ipc" if variant == "ipc" else "tcp",
        curve=variant == "curve" and HAS_CURVE,
        signature_scheme="hmac-sha512" if variant == "sha512" else "hmac-sha256",
        kernel_name="python3",
    )
    path = write_connection_file(info)
    try:
        assert _km_view(path) == _our_view(info)
        with open(path) as f:
            raw = json.load(f)
        assert raw["kernel_name"] == "python3"
    finally:
        remove_connection_files(path, info)


@pytest.mark.parametrize("variant", ["tcp", "curve", "ipc"])
def test_we_read_jupyter_client_file(tmp_path: Path, variant: str) -> None:
    """A file jupyter_client writes (with curve keys when supported) reads back identically."""
    from jupyter_client.connect import write_connection_file as jc_write

    kwargs: dict[str, Any] = {"key": new_key(), "kernel_name": "k1"}
    if variant == "ipc":
        kwargs.update(transport="ipc", ip=str(tmp_path / "sock"))
    if variant == "curve":
        if "curve_publickey" not in inspect.signature(jc_write).parameters:
            pytest.skip("this jupyter_client does not write curve keys")
        kwargs.update(curve_publickey=PUB, curve_secretkey=SEC)
    fname, written = jc_write(str(tmp_path / "jc.json"), **kwargs)
    cfg: dict[str, Any] = dict(written)
    info = read_connection_file(fname)
    assert info.to_dict() == cfg
    assert info.key == kwargs["key"]
    if variant == "curve":
        assert (info.curve_publickey, info.curve_secretkey) == (PUB, SEC)
    if variant == "ipc":
        assert [str(p) for p in ipc_paths(info)] == [
            f"{tmp_path / 'sock'}-{cfg[c + '_port']}" for c in CHANNELS
        ]


# -- ipc -----------------------------------------------------------------------------


def test_ipc_paths_skip_existing_and_are_removed(rt: Path) -> None:
    """ipc suffixes skip socket files that exist; zmq binds the paths; cleanup removes all."""
    prefix = str(rt / "k")
    rt.mkdir()
    Path(f"{prefix}-1").touch()
    Path(f"{prefix}-3").touch()
    info = new_connection_info(transport="ipc", ipc_prefix=prefix)
    assert [info.port(c) for c in CHANNELS] == [2, 4, 5, 6, 7]
    assert ipc_paths(info) == [Path(f"{prefix}-{n}") for n in (2, 4, 5, 6, 7)]
    assert ipc_paths(_sample()) == []
    path = write_connection_file(info)
    ctx = zmq.Context()
    socks = []
    try:
        for channel in CHANNELS:
            s = ctx.socket(zmq.ROUTER)
            socks.append(s)
            s.bind(info.url(channel))
        assert all(p.exists() for p in ipc_paths(info))
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    for p in ipc_paths(info):  # zmq may or may not unlink on close; recreate to be sure
        p.touch()
    remove_connection_files(path, info)
    remove_connection_files(path, info)  # second call: everything already missing
    assert not path.exists()
    assert not any(p.exists() for p in ipc_paths(info))
    Path(f"{prefix}-1").unlink()
    Path(f"{prefix}-3").unlink()


def test_ipc_default_prefix_in_runtime_dir(rt: Path, umask_zero: None) -> None:
    """Without ipc_prefix the socket prefix is a new name inside a 0700 runtime dir."""
    a = new_connection_info(transport="ipc", ip="ignored")
    b = new_connection_info(transport="ipc")
    assert Path(a.ip).parent == rt and Path(b.ip).parent == rt
    assert a.ip != b.ip
    assert _mode(rt) == 0o700
    assert [a.port(c) for c in CHANNELS] == [1, 2, 3, 4, 5]
    assert a.url("hb") == f"ipc://{a.ip}-5"

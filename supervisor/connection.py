"""Connection files: the ports, address, key and scheme a kernel binds to.

:class:`ConnectionInfo` is an immutable value; the functions here create one
(fresh ports or ipc socket paths, a new key, optionally a CurveZMQ keypair),
write it atomically as the JSON file a kernel reads with ``-f``, read one back,
and remove it together with any ipc socket files. The JSON layout is the one
jupyter_client writes, so files are interchangeable in both directions.

Threading: :class:`ConnectionInfo` is frozen and may be shared between threads
and loops; the functions are plain blocking calls (small file-system
operations) that any thread may use. The one piece of state is the
process-wide set of reserved ports (:func:`reserve_ports`), guarded by a lock.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from supervisor._log import get_logger
from supervisor.errors import (
    ConfigurationError,
    ConnectionFileError,
    ResourceExhaustedError,
    SupervisorError,
)

__all__ = [
    "CHANNELS",
    "ConnectionInfo",
    "PortReservation",
    "allocate_ports",
    "claim_ports",
    "connection_file_path",
    "ensure_runtime_dir",
    "ipc_paths",
    "new_connection_info",
    "new_key",
    "read_connection_file",
    "remove_connection_files",
    "reserve_ports",
    "reserved_ports",
    "runtime_dir",
    "write_connection_file",
]

log = get_logger("supervisor.connection")

CHANNELS: tuple[str, ...] = ("shell", "iopub", "stdin", "control", "hb")
TRANSPORTS = ("tcp", "ipc")
_PORT_FIELDS = tuple(f"{c}_port" for c in CHANNELS)
_Z85_KEY_LEN = 40  # a 32-byte CurveZMQ key in Z85 text


def _hmac_usable(digest: str) -> bool:
    try:
        hmac.new(b"probe", digestmod=digest)
    except (ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything needed to reach one kernel's five channels.

    ``key`` and the curve keys are bytes (ASCII text in the file); for the
    ``ipc`` transport ``ip`` is a path prefix and each "port" is a suffix
    number, the socket file being ``f"{ip}-{port}"``.
    """

    shell_port: int = 0
    iopub_port: int = 0
    stdin_port: int = 0
    control_port: int = 0
    hb_port: int = 0
    ip: str = "127.0.0.1"
    transport: str = "tcp"
    key: bytes = b""
    signature_scheme: str = "hmac-sha256"
    kernel_name: str = ""
    curve_publickey: bytes | None = None
    curve_secretkey: bytes | None = None

    def __post_init__(self) -> None:
        def bad(fld: str, why: str) -> ConnectionFileError:
            return ConnectionFileError(f"connection info field {fld!r}: {why}", field=fld)

        if not isinstance(self.transport, str) or self.transport not in TRANSPORTS:
            raise bad("transport", f"must be one of {TRANSPORTS}, not {self.transport!r}")
        limit = 65535 if self.transport == "tcp" else sys.maxsize
        for fld in _PORT_FIELDS:
            value = getattr(self, fld)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(fld, f"must be an int, not {type(value).__name__}")
            if not 0 <= value <= limit:
                raise bad(fld, f"{value} is out of range 0..{limit}")
        if not isinstance(self.ip, str):
            raise bad("ip", f"must be a str, not {type(self.ip).__name__}")
        if not self.ip:
            raise bad("ip", "must not be empty")
        if not isinstance(self.key, bytes):
            raise bad("key", f"must be bytes, not {type(self.key).__name__}")
        scheme = self.signature_scheme
        if not isinstance(scheme, str):
            raise bad("signature_scheme", f"must be a str, not {type(scheme).__name__}")
        if not scheme.startswith("hmac-") or not _hmac_usable(scheme[len("hmac-") :]):
            raise bad(
                "signature_scheme",
                f"{scheme!r} is not 'hmac-' followed by a hashlib algorithm usable with HMAC",
            )
        if not isinstance(self.kernel_name, str):
            raise bad("kernel_name", f"must be a str, not {type(self.kernel_name).__name__}")
        for fld in ("curve_publickey", "curve_secretkey"):
            value = getattr(self, fld)
            if value is None:
                continue
            if not isinstance(value, bytes):
                raise bad(fld, f"must be bytes or None, not {type(value).__name__}")
            if len(value) != _Z85_KEY_LEN or not value.isascii():
                raise bad(fld, f"must be a {_Z85_KEY_LEN}-character Z85 key")
        if (self.curve_publickey is None) != (self.curve_secretkey is None):
            missing = "curve_secretkey" if self.curve_secretkey is None else "curve_publickey"
            raise bad(missing, "curve_publickey and curve_secretkey must be set together")

    @property
    def encrypted(self) -> bool:
        """True when the kernel's sockets use CurveZMQ."""
        return self.curve_secretkey is not None

    def port(self, channel: str) -> int:
        """The port (or ipc suffix) of ``channel``, one of :data:`CHANNELS`."""
        if channel not in CHANNELS:
            raise ConfigurationError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
        port: int = getattr(self, f"{channel}_port")
        return port

    def url(self, channel: str) -> str:
        """The ZeroMQ endpoint of ``channel``: ``tcp://ip:port`` or ``ipc://ip-port``."""
        port = self.port(channel)
        if self.transport == "tcp":
            return f"tcp://{self.ip}:{port}"
        return f"ipc://{self.ip}-{port}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of a connection file, laid out as jupyter_client writes it."""
        data: dict[str, Any] = {fld: getattr(self, fld) for fld in _PORT_FIELDS}
        data["ip"] = self.ip
        data["key"] = self.key.decode()
        data["transport"] = self.transport
        data["signature_scheme"] = self.signature_scheme
        data["kernel_name"] = self.kernel_name
        if self.curve_publickey is not None:
            data["curve_publickey"] = self.curve_publickey.decode("ascii")
        if self.curve_secretkey is not None:
            data["curve_secretkey"] = self.curve_secretkey.decode("ascii")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str | None = None) -> ConnectionInfo:
        """Build from a connection-file object; extra keys are ignored.

        ``kernel_name`` may be absent (older files); every other standard field
        is required. Text fields may also be given as bytes.
        """
        where = f" in {path}" if path else ""
        if not isinstance(data, Mapping):
            raise ConnectionFileError(
                f"connection info{where} must be a JSON object, not {type(data).__name__}",
                path=path,
            )

        def need(fld: str) -> Any:
            if fld not in data:
                raise ConnectionFileError(
                    f"connection info{where} is missing field {fld!r}", field=fld, path=path
                )
            return data[fld]

        def wrong(fld: str, value: Any, expected: str) -> ConnectionFileError:
            return ConnectionFileError(
                f"connection info{where}: field {fld!r} must be {expected},"
                f" not {type(value).__name__}",
                field=fld,
                path=path,
            )

        def text(fld: str, value: Any) -> str:
            if isinstance(value, bytes):
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    raise wrong(fld, value, "UTF-8 text") from None
            if not isinstance(value, str):
                raise wrong(fld, value, "a string")
            return value

        def raw(fld: str, value: Any) -> bytes:
            if isinstance(value, bytes):
                return value
            if not isinstance(value, str):
                raise wrong(fld, value, "a string")
            return value.encode()

        ports: dict[str, int] = {}
        for fld in _PORT_FIELDS:
            value = need(fld)
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong(fld, value, "an integer")
            ports[fld] = value
        curve: dict[str, bytes | None] = {}
        for fld in ("curve_publickey", "curve_secretkey"):
            value = data.get(fld)
            curve[fld] = None if value is None else raw(fld, value)
        try:
            return cls(
                **ports,
                ip=text("ip", need("ip")),
                transport=text("transport", need("transport")),
                key=raw("key", need("key")),
                signature_scheme=text("signature_scheme", need("signature_scheme")),
                kernel_name=text("kernel_name", data.get("kernel_name", "")),
                curve_publickey=curve["curve_publickey"],
                curve_secretkey=curve["curve_secretkey"],
            )
        except ConnectionFileError as exc:
            if path is None or exc.path is not None:
                raise
            raise ConnectionFileError(f"{exc} (in {path})", field=exc.field, path=path) from None


# -- keys and ports ------------------------------------------------------------------


def new_key() -> bytes:
    """A fresh HMAC key: 256 random bits as 64 lowercase hex ASCII characters."""
    return secrets.token_hex(32).encode("ascii")


# Ports handed out by this process and not yet given back: a start never gets a
# port another start of ours holds (the probe sockets close before the kernel
# binds, so the system alone would happily hand the same port out twice).
_reserved_lock = threading.Lock()
_reserved: set[int] = set()
_PROBE_LIMIT = 512  # probe sockets tried for one request before giving up


class PortReservation:
    """TCP ports reserved in this process until :meth:`release` (idempotent).

    Thread-safe. While reserved, :func:`reserve_ports` and
    :func:`allocate_ports` in this process never hand these ports out again;
    other processes are not bound by it.
    """

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports: tuple[int, ...] = tuple(ports)
        self._released = False

    def release(self) -> None:
        """Give the ports back (they may be handed out again)."""
        with _reserved_lock:
            if not self._released:
                _reserved.difference_update(self.ports)
                self._released = True

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._released

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"PortReservation({list(self.ports)}, {state})"


def reserved_ports() -> frozenset[int]:
    """The ports currently reserved in this process (a snapshot)."""
    with _reserved_lock:
        return frozenset(_reserved)


def _port_error(ip: str, exc: OSError) -> SupervisorError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ResourceExhaustedError(
            f"cannot allocate TCP ports on {ip!r}: too many open files ({exc})",
            resource="file descriptors", errno=exc.errno)
    return ConfigurationError(f"cannot allocate TCP ports on {ip!r}: {exc}")


def _pick_ports(n: int, ip: str, *, reserve: bool) -> list[int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigurationError(f"allocate_ports: n must be a non-negative int, not {n!r}")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    probes: list[socket.socket] = []
    chosen: list[int] = []
    try:
        # Every probe stays bound until the choice is made (so the system gives
        # distinct ports), and the choice is recorded before any probe closes.
        while len(chosen) < n:
            if len(probes) >= n + _PROBE_LIMIT:
                raise ConfigurationError(
                    f"cannot allocate {n} TCP ports on {ip!r}: {len(probes)} probed ports "
                    f"were all reserved by this process")
            sock = socket.socket(family, socket.SOCK_STREAM)
            probes.append(sock)
            sock.bind((ip, 0))
            port = int(sock.getsockname()[1])
            with _reserved_lock:
                if port in _reserved or port in chosen:
                    continue
                chosen.append(port)
                if reserve:
                    _reserved.add(port)
        return chosen
    except OSError as exc:
        if reserve:
            with _reserved_lock:
                _reserved.difference_update(chosen)
        raise _port_error(ip, exc) from exc
    except BaseException:
        if reserve:
            with _reserved_lock:
                _reserved.difference_update(chosen)
        raise
    finally:
        for sock in probes:
            sock.close()


def allocate_ports(n: int = 5, ip: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``ip`` a moment ago.

    Ports reserved in this process (:func:`reserve_ports`) are skipped, but
    the ones returned are not reserved: another process, or a later call,
    could take one before the kernel binds it. Starts use :func:`reserve_ports`.
    """
    return _pick_ports(n, ip, reserve=False)


def reserve_ports(n: int = 5, ip: str = "127.0.0.1") -> PortReservation:
    """Like :func:`allocate_ports`, and the ports stay reserved in this process.

    No other :func:`reserve_ports` or :func:`allocate_ports` call in this
    process returns them until the reservation is released.
    """
    return PortReservation(_pick_ports(n, ip, reserve=True))


def claim_ports(ports: Sequence[int]) -> PortReservation | None:
    """Reserve the given ports (a connection file's); None if one is already reserved."""
    wanted = {p for p in ports if p}
    with _reserved_lock:
        if wanted & _reserved:
            return None
        _reserved.update(wanted)
    return PortReservation(sorted(wanted))


def _ipc_suffixes(prefix: str, n: int) -> list[int]:
    found: list[int] = []
    candidate = 1
    while len(found) < n:
        if not os.path.exists(f"{prefix}-{candidate}"):
            found.append(candidate)
        candidate += 1
    return found


def new_connection_info(
    *,
    ip: str = "127.0.0.1",
    transport: str = "tcp",
    key: bytes | None = None,
    signature_scheme: str = "hmac-sha256",
    kernel_name: str = "",
    curve: bool = False,
    ipc_prefix: str | None = None,
    ports: Sequence[int] | None = None,
) -> ConnectionInfo:
    """A fresh :class:`ConnectionInfo`: new ports (or ipc paths), key and keypair.

    For ``tcp`` the ports are :func:`allocate_ports` on ``ip``. For ``ipc``,
    ``ip`` is ignored: the prefix is ``ipc_prefix`` or a new name in
    :func:`runtime_dir` (created if needed), and the suffixes are the lowest
    numbers from 1 whose socket file does not exist yet. ``ports`` (five, in
    :data:`CHANNELS` order) are used as given, for ports already reserved with
    :func:`reserve_ports`. ``key=None`` means
    :func:`new_key`; ``curve=True`` adds a ``zmq.curve_keypair()``.
    """
    if transport not in TRANSPORTS:
        raise ConnectionFileError(
            f"transport must be one of {TRANSPORTS}, not {transport!r}", field="transport"
        )
    if ports is not None:
        if len(ports) != len(CHANNELS):
            raise ConfigurationError(f"ports: {len(CHANNELS)} are needed, not {len(ports)}")
        ports = list(ports)
    if transport == "tcp":
        host = ip
        if ports is None:
            ports = allocate_ports(len(CHANNELS), ip)
    else:
        if ipc_prefix is None:
            host = str(ensure_runtime_dir() / f"kernel-{uuid.uuid4().hex[:12]}-ipc")
        else:
            host = ipc_prefix
        if ports is None:
            ports = _ipc_suffixes(host, len(CHANNELS))
    public: bytes | None = None
    secret: bytes | None = None
    if curve:
        if not zmq.has("curve"):
            raise ConfigurationError("curve=True but this libzmq was built without CURVE")
        public, secret = zmq.curve_keypair()
    return ConnectionInfo(
        **dict(zip(_PORT_FIELDS, ports, strict=True)),
        ip=host,
        transport=transport,
        key=new_key() if key is None else key,
        signature_scheme=signature_scheme,
        kernel_name=kernel_name,
        curve_publickey=public,
        curve_secretkey=secret,
    )


# -- runtime directory ---------------------------------------------------------------


def _data_dir() -> Path:
    explicit = os.environ.get("JUPYTER_DATA_DIR")
    if explicit:
        return Path(explicit)
    home = Path("~").expanduser().resolve()
    if sys.platform == "darwin":
        return home / "Library" / "Jupyter"
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg if xdg else home / ".local" / "share") / "jupyter"


def runtime_dir() -> Path:
    """Where connection files live, by jupyter_core's rules (POSIX).

    ``$JUPYTER_RUNTIME_DIR``, else ``<data dir>/runtime`` where the data dir
    is ``$JUPYTER_DATA_DIR``, else ``$XDG_DATA_HOME/jupyter`` or
    ``~/.local/share/jupyter`` (``~/Library/Jupyter`` on macOS).
    """
    explicit = os.environ.get("JUPYTER_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    return _data_dir() / "runtime"


def ensure_runtime_dir() -> Path:
    """:func:`runtime_dir`, created with mode 0700 if it did not exist.

    A runtime dir that cannot be made (read-only file system, a file in the
    way, no permission, disk full) is a :class:`ConnectionFileError` naming it.
    """
    path = runtime_dir()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if not path.is_dir():
                raise ConfigurationError(
                    f"runtime dir {path} exists but is not a directory") from None
        else:
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise ConnectionFileError(
            f"cannot create the runtime dir {path}: {exc.strerror or exc}", path=str(path)
        ) from exc
    return path


def connection_file_path(kernel_id: str) -> Path:
    """The conventional connection file of ``kernel_id``: ``runtime_dir()/kernel-<id>.json``."""
    return runtime_dir() / f"kernel-{kernel_id}.json"


# -- files ---------------------------------------------------------------------------


def write_connection_file(
    info: ConnectionInfo, path: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``info`` to ``path`` atomically (mode 0600 from creation); return the path.

    The default path is a new ``kernel-<uuid>.json`` in the runtime dir; the
    runtime dir is created (0700) when the file goes there. The data lands in
    a temporary file in the same directory that is then renamed over ``path``,
    so a reader never sees a partial file.
    """
    target = connection_file_path(str(uuid.uuid4())) if path is None else Path(path)
    if target.parent.absolute() == runtime_dir().absolute():
        ensure_runtime_dir()
    payload = json.dumps(info.to_dict(), indent=2)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)  # mkstemp already used 0600; be explicit
                f.write(payload)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise ConnectionFileError(
            f"cannot write connection file {target}: {exc}", path=str(target)
        ) from exc
    return target


def read_connection_file(path: str | os.PathLike[str]) -> ConnectionInfo:
    """Load and validate a connection file; any problem is a :class:`ConnectionFileError`."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConnectionFileError(f"cannot read connection file {name}: {exc}", path=name) from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ConnectionFileError(
            f"connection file {name} is not valid JSON: {exc}", path=name
        ) from exc
    if not isinstance(data, dict):
        raise ConnectionFileError(
            f"connection file {name} must hold a JSON object, not {type(data).__name__}",
            path=name,
        )
    return ConnectionInfo.from_dict(data, path=name)


def ipc_paths(info: ConnectionInfo) -> list[Path]:
    """The five ipc socket files of ``info`` (empty for tcp)."""
    if info.transport != "ipc":
        return []
    return [Path(f"{info.ip}-{info.port(c)}") for c in CHANNELS]


def remove_connection_files(path: Path | None, info: ConnectionInfo | None) -> None:
    """Delete the connection file and any ipc socket files; missing ones are fine.

    Other failures (permissions) are logged, not raised: this runs in cleanup.
    """
    victims: list[Path] = [] if path is None else [Path(path)]
    if info is not None:
        victims.extend(ipc_paths(info))
    for victim in victims:
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("connection.remove_failed", path=str(victim), error=str(exc))

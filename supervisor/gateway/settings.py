"""The gateway's configuration: one frozen value object, validated at construction.

:class:`GatewaySettings` holds everything the HTTP/WebSocket layer needs
(address, auth, limits, CORS, TLS, pools, culling); :func:`settings_from_env`
reads the Jupyter Kernel Gateway ``KG_*`` variables so a deployment written for
Kernel Gateway keeps working. Plain values only: no loop, no thread, nothing
owned.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.errors import ConfigurationError

__all__ = ["DEFAULT_ENV_ALLOWLIST", "GatewaySettings", "is_loopback", "settings_from_env"]

# Besides KERNEL_*, the variables a client may set for its kernel.
DEFAULT_ENV_ALLOWLIST: tuple[str, ...] = ("LANG", "LC_ALL", "TZ")
# The env keys that say nothing about how a kernel must be launched: a request
# carrying only these may be served from the warm pool.
POOL_NEUTRAL_ENV: frozenset[str] = frozenset(
    {"KERNEL_USERNAME", "KERNEL_WORKING_DIR", "KERNEL_LAUNCH_TIMEOUT"})


def is_loopback(ip: str) -> bool:
    """True when ``ip`` only listens on this machine (127/8, ::1, localhost)."""
    if ip in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _positive(name: str, value: object, *, allow_zero: bool = False, kind: type = float) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        what = "non-negative" if allow_zero else "positive"
        raise ConfigurationError(f"{name} must be a {what} {kind.__name__}, not {value!r}")


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway listens, authenticates and limits (see docs/gateway.md).

    ``token`` is the shared secret every request must carry; ``None`` means
    "generate a random one" (the resolved value is in :attr:`token`), and
    ``auth=False`` turns authentication off, which is refused on a
    non-loopback ``ip`` unless ``allow_insecure`` is set.
    """

    ip: str = "127.0.0.1"
    port: int = 8888
    base_url: str = "/"
    token: str | None = None
    auth: bool = True
    allow_insecure: bool = False
    allow_origin: str = ""
    certfile: str | None = None
    keyfile: str | None = None
    max_kernels: int | None = None
    prespawn: Mapping[str, int] = field(default_factory=dict)
    default_kernel_name: str = "python3"
    list_kernels: bool = True
    env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST
    cull_idle_timeout: float = 0.0
    cull_interval: float = 300.0
    cull_connected: bool = False
    cull_busy: bool = False
    max_message_size: int = 64 * 1024 * 1024
    client_buffer: int = 16 * 1024 * 1024
    replay_messages: int = 2000
    replay_window: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.ip, str) or not self.ip:
            raise ConfigurationError(f"ip must be a non-empty string, not {self.ip!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not (
                0 <= self.port <= 65535):
            raise ConfigurationError(f"port must be an int in 0..65535, not {self.port!r}")
        base = self.base_url if isinstance(self.base_url, str) else ""
        if not base.startswith("/"):
            raise ConfigurationError(f"base_url must start with '/', not {self.base_url!r}")
        object.__setattr__(self, "base_url", base.rstrip("/") + "/")
        if not self.auth:
            if not is_loopback(self.ip) and not self.allow_insecure:
                raise ConfigurationError(
                    f"refusing to run without auth on {self.ip} (not a loopback address); "
                    "pass allow_insecure (--no-auth-force) if you really mean it")
            object.__setattr__(self, "token", "")
        elif self.token is None or self.token == "":
            object.__setattr__(self, "token", secrets.token_hex(24))
        elif not isinstance(self.token, str):
            raise ConfigurationError("token must be a string")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigurationError("certfile and keyfile go together")
        if self.max_kernels is not None:
            _positive("max_kernels", self.max_kernels, kind=int)
        pre = dict(self.prespawn)
        for name, count in pre.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"prespawn kernel names must be strings, not {name!r}")
            _positive(f"prespawn[{name!r}]", count, allow_zero=True, kind=int)
        object.__setattr__(self, "prespawn", pre)
        if not isinstance(self.default_kernel_name, str) or not self.default_kernel_name:
            raise ConfigurationError("default_kernel_name must be a non-empty string")
        object.__setattr__(self, "env_allowlist", tuple(self.env_allowlist))
        _positive("cull_idle_timeout", self.cull_idle_timeout, allow_zero=True)
        _positive("cull_interval", self.cull_interval)
        _positive("max_message_size", self.max_message_size, kind=int)
        _positive("client_buffer", self.client_buffer, kind=int)
        _positive("replay_messages", self.replay_messages, allow_zero=True, kind=int)
        _positive("replay_window", self.replay_window, allow_zero=True)

    @property
    def scheme(self) -> str:
        """``https`` with a certificate, else ``http``."""
        return "https" if self.certfile else "http"

    def url(self, port: int | None = None) -> str:
        """The base URL clients use (``port`` overrides, e.g. after binding port 0)."""
        host = self.ip if self.ip not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port if port is None else port}{self.base_url}"

    def replace(self, **changes: Any) -> GatewaySettings:
        """A copy with ``changes`` applied (and validated again)."""
        if "token" not in changes and self.auth:
            changes["token"] = self.token
        return dataclasses.replace(self, **changes)


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """GatewaySettings keyword arguments read from Kernel Gateway's ``KG_*`` variables.

    ``KG_PRESPAWN_COUNT`` prespawns kernels of ``KG_DEFAULT_KERNEL_NAME``
    (python3 when unset), as Kernel Gateway does. Callers apply these only
    for options not given on the command line.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    try:
        if "KG_IP" in env:
            out["ip"] = env["KG_IP"]
        if "KG_PORT" in env:
            out["port"] = int(env["KG_PORT"])
        if env.get("KG_AUTH_TOKEN"):
            out["token"] = env["KG_AUTH_TOKEN"]
        if env.get("KG_MAX_KERNELS"):
            out["max_kernels"] = int(env["KG_MAX_KERNELS"])
        if env.get("KG_DEFAULT_KERNEL_NAME"):
            out["default_kernel_name"] = env["KG_DEFAULT_KERNEL_NAME"]
        if env.get("KG_PRESPAWN_COUNT"):
            name = out.get("default_kernel_name", "python3")
            out["prespawn"] = {name: int(env["KG_PRESPAWN_COUNT"])}
        if "KG_ALLOW_ORIGIN" in env:
            out["allow_origin"] = env["KG_ALLOW_ORIGIN"]
        if env.get("KG_BASE_URL"):
            out["base_url"] = env["KG_BASE_URL"]
        if "KG_LIST_KERNELS" in env:
            out["list_kernels"] = _env_bool(env["KG_LIST_KERNELS"])
    except ValueError as exc:
        raise ConfigurationError(f"bad KG_* environment variable: {exc}") from exc
    return out

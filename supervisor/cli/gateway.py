"""``kernel-supervisor gateway``: serve kernels to notebook servers over HTTP/WebSocket.

One ``asyncio.run()`` of :func:`supervisor.gateway.serve` on the main thread:
the Supervisor, its kernels, the tornado server and every handler belong to
that loop; SIGINT and SIGTERM stop it (every kernel shut down, exit 0). The
URL and the token go to stdout once the server listens; logs go to stderr.

Options not given on the command line are read from Kernel Gateway's ``KG_*``
environment variables (see docs/gateway.md). ``KG_AUTH_TOKEN`` is removed from
the environment once read, so kernels never inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from supervisor.cli._common import (
    Context,
    add_containment_arguments,
    add_launcher_arguments,
    containment_options,
    launcher_options,
    seconds_arg,
)
from supervisor.errors import ConfigurationError
from supervisor.gateway import GatewaySettings, Server, serve, settings_from_env
from supervisor.kernel import LaunchOptions

NAME = "gateway"
SUMMARY = "serve kernels to JupyterLab / jupyter_server (--gateway-url)"
DESCRIPTION = (
    "Run a Jupyter Kernel Gateway (the 'jupyter-websocket' API) over a supervisor:\n"
    "point JupyterLab or jupyter_server at it with --gateway-url. Kernels come from\n"
    "warm pools (--prespawn), are culled when idle and restarted by policy.\n"
    "Unset options are read from KG_IP, KG_PORT, KG_AUTH_TOKEN, KG_MAX_KERNELS,\n"
    "KG_PRESPAWN_COUNT, KG_DEFAULT_KERNEL_NAME, KG_ALLOW_ORIGIN, KG_BASE_URL and\n"
    "KG_LIST_KERNELS. SIGINT/SIGTERM shut every kernel down and exit 0.")


def _prespawn(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    try:
        value = int(count) if sep else -1
    except ValueError:
        value = -1
    if not name or value < 0:
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT, not {text!r}")
    return name, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("listening")
    net.add_argument("--ip", help="address to listen on (default 127.0.0.1; KG_IP)")
    net.add_argument("--port", type=int, help="port (default 8888, 0: any free; KG_PORT)")
    net.add_argument("--base-url", help="URL prefix (default /; KG_BASE_URL)")
    net.add_argument("--certfile", help="TLS certificate (PEM); with --keyfile")
    net.add_argument("--keyfile", help="TLS private key (PEM)")
    sec = p.add_argument_group("auth and safety")
    sec.add_argument("--token", help="the token clients must send (default: random, printed; "
                                     "KG_AUTH_TOKEN)")
    sec.add_argument("--no-auth", action="store_true",
                     help="no token at all (refused off loopback unless --no-auth-force)")
    sec.add_argument("--no-auth-force", action="store_true",
                     help="allow --no-auth on a non-loopback address")
    sec.add_argument("--allow-origin", help="CORS / WebSocket origin allowed ('*': any; "
                                            "KG_ALLOW_ORIGIN)")
    sec.add_argument("--env-allow", action="append", metavar="VAR", default=None,
                     help="besides KERNEL_*, an environment variable clients may set for "
                          "their kernel (repeatable)")
    sec.add_argument("--max-message-size", type=_positive_int, metavar="BYTES",
                     help="largest WebSocket message accepted (default 64 MiB)")
    sec.add_argument("--client-buffer", type=_positive_int, metavar="BYTES",
                     help="per-client outgoing budget before IOPub is dropped (default 16 MiB)")
    kern = p.add_argument_group("kernels")
    kern.add_argument("--default-kernel-name", help="kernelspec used when a request names none "
                                                    "(default python3; KG_DEFAULT_KERNEL_NAME)")
    kern.add_argument("--max-kernels", type=_positive_int, metavar="N",
                      help="refuse new kernels (403) beyond N (KG_MAX_KERNELS)")
    kern.add_argument("--prespawn", type=_prespawn, action="append", metavar="NAME=N",
                      help="keep N warm kernels of NAME for POST /api/kernels (repeatable; "
                           "KG_PRESPAWN_COUNT for the default kernel)")
    kern.add_argument("--list-kernels", action=argparse.BooleanOptionalAction, default=None,
                      help="allow GET /api/kernels (default on; KG_LIST_KERNELS)")
    kern.add_argument("--cull-idle-timeout", type=seconds_arg, metavar="S",
                      help="shut kernels idle for S seconds down (default: never)")
    kern.add_argument("--cull-interval", type=seconds_arg, metavar="S",
                      help="seconds between culling rounds (default 300)")
    kern.add_argument("--cull-connected", action="store_true",
                      help="cull idle kernels even with clients connected")
    kern.add_argument("--cull-busy", action="store_true", help="cull busy kernels too")
    kern.add_argument("--replay-window", type=seconds_arg, metavar="S",
                      help="how long a disconnected client may come back and get the IOPub "
                           "it missed (default 120)")
    add_containment_arguments(p)
    add_launcher_arguments(p)


def settings_from(args: argparse.Namespace, environ: dict[str, str]) -> GatewaySettings:
    """The settings: KG_* variables first, command-line options over them."""
    kw: dict[str, Any] = settings_from_env(environ)
    given = {
        "ip": args.ip, "port": args.port, "base_url": args.base_url, "token": args.token,
        "certfile": args.certfile, "keyfile": args.keyfile, "allow_origin": args.allow_origin,
        "default_kernel_name": args.default_kernel_name, "max_kernels": args.max_kernels,
        "list_kernels": args.list_kernels, "cull_idle_timeout": args.cull_idle_timeout,
        "cull_interval": args.cull_interval, "max_message_size": args.max_message_size,
        "client_buffer": args.client_buffer, "replay_window": args.replay_window,
    }
    kw.update({k: v for k, v in given.items() if v is not None})
    if args.prespawn:
        kw["prespawn"] = dict(args.prespawn)
    elif "prespawn" in kw and args.default_kernel_name:
        kw["prespawn"] = {args.default_kernel_name: sum(kw["prespawn"].values())}
    if args.env_allow:
        kw["env_allowlist"] = (*GatewaySettings.env_allowlist, *args.env_allow)
    if args.no_auth:
        kw["auth"] = False
        kw.pop("token", None)
    kw["allow_insecure"] = bool(args.no_auth_force)
    kw["cull_connected"] = bool(args.cull_connected)
    kw["cull_busy"] = bool(args.cull_busy)
    return GatewaySettings(**kw)


def _announce(server: Server) -> None:
    settings = server.settings
    url = server.url
    print(f"Kernel gateway listening at {url}", flush=True)
    if settings.auth:
        print(f"Token: {settings.token}", flush=True)
        print(f"Use it: jupyter lab --gateway-url={url} "
              f"--GatewayClient.auth_token={settings.token}", flush=True)
    else:
        print(f"Use it: jupyter lab --gateway-url={url}", flush=True)


def run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        settings = settings_from(args, dict(os.environ))
    except ConfigurationError as exc:
        args.parser.error(str(exc))
    launch = LaunchOptions(forward_stderr=ctx.forward_stderr, **containment_options(args),
                           **launcher_options(args))
    os.environ.pop("KG_AUTH_TOKEN", None)  # kernels inherit our environment: not the token
    code = asyncio.run(serve(settings, on_ready=_announce, launch=launch))
    sys.stdout.flush()
    return code

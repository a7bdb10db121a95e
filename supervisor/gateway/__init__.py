"""A Jupyter Kernel Gateway ("jupyter-websocket" API) over a Supervisor, on tornado.

jupyter_server, JupyterLab and Notebook 7 use it with ``--gateway-url``:
REST endpoints for kernelspecs and kernels, the kernel WebSocket (legacy JSON
and ``v1.kernel.websocket.jupyter.org``), ``/api/events`` and ``/metrics``.
Embed it with :func:`make_app` on a running Supervisor, or run it with
:func:`serve` / :class:`Server`. Everything belongs to the loop the
Supervisor runs on.
"""

from __future__ import annotations

from supervisor.gateway.app import Gateway, GatewayApp, make_app
from supervisor.gateway.server import Server, serve
from supervisor.gateway.settings import GatewaySettings, settings_from_env

__all__ = ["Gateway", "GatewayApp", "GatewaySettings", "Server", "make_app", "serve",
           "settings_from_env"]

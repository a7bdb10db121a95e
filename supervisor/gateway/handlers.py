"""The HTTP handlers of the Kernel Gateway REST API, plus auth, CORS and errors.

Every handler derives from :class:`GatewayHandler`, which checks the token
(``Authorization: token T`` or ``?token=T``, compared in constant time) before
anything else, writes errors as JSON ``{"reason", "message"}``, sets CORS
headers when ``allow_origin`` is configured and counts requests for
``/metrics``. Handlers live on the gateway's IOLoop (tornado's rule: one
handler object per request, used on the loop only).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import mimetypes
from http import HTTPStatus
from pathlib import Path
from typing import Any

import tornado.web

from supervisor import __version__
from supervisor.errors import (
    KernelDeadError,
    KernelLimitError,
    KernelSpecError,
    KernelStartupError,
    KernelStateError,
    NoSuchKernel,
)
from supervisor.gateway.app import Gateway
from supervisor.kernelspec import KernelSpec, find_kernel_specs, get_kernel_spec

__all__ = ["GatewayHandler", "routes"]

_ID = r"(?P<kernel_id>[\w-]+)"
_LOGO_NAMES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg", "kernel.js", "kernel.css")


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def token_of(handler: tornado.web.RequestHandler) -> str:
    """The token a request carries (header first, then the query), or ''."""
    auth = handler.request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return handler.get_query_argument("token", "") or ""


def authorized(gateway: Gateway, handler: tornado.web.RequestHandler) -> bool:
    """True when auth is off or the request carries the right token."""
    expected = gateway.settings.token or ""
    if not gateway.settings.auth:
        return True
    given = token_of(handler)
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def cors_headers(gateway: Gateway, handler: tornado.web.RequestHandler) -> None:
    """Access-Control-* headers for browsers, when an origin is allowed."""
    allowed = gateway.settings.allow_origin
    if not allowed:
        return
    handler.set_header("Access-Control-Allow-Origin", allowed)
    handler.set_header("Access-Control-Allow-Headers",
                       "Authorization, Content-Type, X-Requested-With, X-XSRFToken")
    handler.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
    if allowed != "*":
        handler.set_header("Vary", "Origin")


class GatewayHandler(tornado.web.RequestHandler):
    """Base: token check, JSON errors, CORS, request counting."""

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.application.settings["gateway"]
        return gateway

    def set_default_headers(self) -> None:
        cors_headers(self.gateway, self)
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        if not authorized(self.gateway, self):
            raise tornado.web.HTTPError(401, "missing or wrong token", reason="Unauthorized")

    def options(self, *args: Any, **kwargs: Any) -> None:
        self.set_status(204)
        self.finish()

    def on_finish(self) -> None:
        self.gateway.metrics.count("http_requests", method=self.request.method or "",
                                   code=str(self.get_status()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason or _phrase(status_code)
        message = reason
        exc_info = kwargs.get("exc_info")
        if exc_info is not None:
            exc = exc_info[1]
            if isinstance(exc, tornado.web.HTTPError):
                message = exc.log_message or reason
                if exc.args and exc.log_message:
                    message = exc.log_message % exc.args
            else:
                message = "internal error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"reason": reason, "message": message}))

    def json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))

    def body_json(self) -> dict[str, Any]:
        """The request body as a JSON object ({} when empty); 400 when it is not one."""
        raw = self.request.body
        if not raw or not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise tornado.web.HTTPError(400, "malformed JSON body: %s", exc,
                                        reason="Bad Request") from None
        if not isinstance(value, dict):
            raise tornado.web.HTTPError(400, "the body must be a JSON object",
                                        reason="Bad Request")
        return value

    def kernel_or_404(self, kernel_id: str) -> None:
        if not self.gateway.has_kernel(kernel_id) and kernel_id not in self.gateway.dead:
            raise tornado.web.HTTPError(404, "no kernel %s", kernel_id, reason="Not Found")


class ApiHandler(GatewayHandler):
    def get(self) -> None:
        self.json({"version": __version__, "gateway": "kernel-supervisor"})


def spec_model(spec: KernelSpec, base_url: str) -> dict[str, Any]:
    """jupyter_server's kernelspec model: name, spec, resources (URLs)."""
    resources: dict[str, str] = {}
    for fname in _LOGO_NAMES:
        if (spec.resource_dir / fname).is_file():
            key = fname.rsplit(".", 1)[0] if fname.startswith("logo") else fname
            resources[key] = f"{base_url}kernelspecs/{spec.name}/{fname}"
    return {"name": spec.name, "spec": spec.to_dict(), "resources": resources}


class KernelSpecsHandler(GatewayHandler):
    def get(self) -> None:
        base = self.gateway.settings.base_url
        specs: dict[str, Any] = {}
        for name in sorted(find_kernel_specs()):
            try:
                specs[name] = spec_model(get_kernel_spec(name), base)
            except KernelSpecError:
                continue  # broken spec: left out (and logged by kernelspec)
        default = self.gateway.settings.default_kernel_name
        if default not in specs and specs:
            default = sorted(specs)[0]
        self.json({"default": default, "kernelspecs": specs})


class KernelSpecHandler(GatewayHandler):
    def get(self, name: str) -> None:
        try:
            spec = get_kernel_spec(name)
        except NoSuchKernel:
            raise tornado.web.HTTPError(404, "no kernelspec named %s", name,
                                        reason="Not Found") from None
        except KernelSpecError as exc:
            raise tornado.web.HTTPError(404, "kernelspec %s is broken: %s", name, exc,
                                        reason="Not Found") from None
        self.json(spec_model(spec, self.gateway.settings.base_url))


class KernelSpecResourceHandler(GatewayHandler):
    def get(self, name: str, path: str) -> None:
        try:
            spec = get_kernel_spec(name)
        except KernelSpecError:
            raise tornado.web.HTTPError(404, "no kernelspec named %s", name,
                                        reason="Not Found") from None
        root = spec.resource_dir.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file() or \
                target.name == "kernel.json":
            raise tornado.web.HTTPError(404, "no resource %s in %s", path, name,
                                        reason="Not Found")
        kind, _ = mimetypes.guess_type(target.name)
        self.set_header("Content-Type", kind or "application/octet-stream")
        self.finish(Path(target).read_bytes())


class KernelsHandler(GatewayHandler):
    def get(self) -> None:
        if not self.gateway.settings.list_kernels:
            raise tornado.web.HTTPError(403, "listing kernels is turned off",
                                        reason="Forbidden")
        self.json(self.gateway.models())

    async def post(self) -> None:
        body = self.body_json()
        settings = self.gateway.settings
        name = body.get("name") or settings.default_kernel_name
        env = body.get("env") or {}
        if not isinstance(name, str):
            raise tornado.web.HTTPError(400, "name must be a string", reason="Bad Request")
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise tornado.web.HTTPError(400, "env must map strings to strings",
                                        reason="Bad Request")
        env = {k: v for k, v in env.items()
               if k.startswith("KERNEL_") or k in settings.env_allowlist}
        try:
            get_kernel_spec(name)
        except KernelSpecError:
            raise tornado.web.HTTPError(404, "no kernelspec named %s", name,
                                        reason="Not Found") from None
        try:
            kernel_id = await self.gateway.start_kernel(name, env)
        except KernelLimitError as exc:
            raise tornado.web.HTTPError(403, "%s", exc, reason="Kernel limit reached") from None
        except (KernelStartupError, KernelDeadError) as exc:
            raise tornado.web.HTTPError(500, "kernel %s did not start: %s", name, exc,
                                        reason="Kernel start failed") from None
        # Subscribe to its IOPub now, so the client's WebSocket finds it live.
        with contextlib.suppress(KernelStateError):
            self.gateway.bridge(kernel_id)
        self.set_header("Location", f"{settings.base_url}api/kernels/{kernel_id}")
        self.json(self.gateway.kernel_model(kernel_id), 201)


class KernelHandler(GatewayHandler):
    def get(self, kernel_id: str) -> None:
        self.kernel_or_404(kernel_id)
        try:
            self.json(self.gateway.kernel_model(kernel_id))
        except KernelStateError:
            raise tornado.web.HTTPError(404, "no kernel %s", kernel_id,
                                        reason="Not Found") from None

    async def delete(self, kernel_id: str) -> None:
        self.kernel_or_404(kernel_id)
        gateway = self.gateway
        if gateway.has_kernel(kernel_id):
            try:
                await gateway.supervisor.shutdown_kernel(kernel_id)
            except (KernelStateError, KernelDeadError):
                pass  # gone meanwhile: the result the client wanted
        gateway.forget(kernel_id)
        gateway.close_bridge(kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(GatewayHandler):
    async def post(self, kernel_id: str, action: str) -> None:
        self.kernel_or_404(kernel_id)
        self.body_json()
        gateway = self.gateway
        if not gateway.has_kernel(kernel_id):
            raise tornado.web.HTTPError(409, "kernel %s is dead", kernel_id, reason="Conflict")
        try:
            if action == "interrupt":
                await gateway.supervisor.interrupt_kernel(kernel_id)
                self.set_status(204)
                self.finish()
                return
            await gateway.supervisor.restart_kernel(kernel_id)
        except KernelStateError as exc:
            raise tornado.web.HTTPError(404, "%s", exc, reason="Not Found") from None
        except (KernelDeadError, KernelStartupError) as exc:
            raise tornado.web.HTTPError(500, "%s of %s failed: %s", action, kernel_id, exc,
                                        reason=f"{action.capitalize()} failed") from None
        self.json(gateway.kernel_model(kernel_id))


class MetricsHandler(GatewayHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gateway.render_metrics())


class NotFoundHandler(GatewayHandler):
    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(404, "no such endpoint", reason=HTTPStatus(404).phrase)


def routes(base_url: str) -> list[Any]:
    """The URL table, under ``base_url``."""
    from supervisor.gateway.websocket import ChannelsHandler, EventsHandler  # noqa: PLC0415

    b = base_url
    return [
        (rf"{b}api/?", ApiHandler),
        (rf"{b}api/kernelspecs/?", KernelSpecsHandler),
        (rf"{b}api/kernelspecs/(?P<name>[^/]+)/?", KernelSpecHandler),
        (rf"{b}kernelspecs/(?P<name>[^/]+)/(?P<path>.+)", KernelSpecResourceHandler),
        (rf"{b}api/kernels/?", KernelsHandler),
        (rf"{b}api/kernels/{_ID}/?", KernelHandler),
        (rf"{b}api/kernels/{_ID}/(?P<action>interrupt|restart)/?", KernelActionHandler),
        (rf"{b}api/kernels/{_ID}/channels", ChannelsHandler),
        (rf"{b}api/events", EventsHandler),
        (rf"{b}metrics", MetricsHandler),
        (r".*", NotFoundHandler),
    ]

"""The gateway's REST API against real fake kernels: every endpoint and bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from gateway_util import TOKEN, close_all, execute, gateway, stdout_of, write_specs
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from supervisor.errors import ConfigurationError
from supervisor.gateway import GatewaySettings, settings_from_env

DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(autouse=True)
def _specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(write_specs(tmp_path / "share")))


async def test_api_and_kernelspecs_have_jupyter_server_shapes() -> None:
    """GET /api, /api/kernelspecs, /api/kernelspecs/NAME and a resource have the expected models."""
    async with gateway() as gw:
        api = await gw.json("GET", "api")
        assert "version" in api
        specs = await gw.json("GET", "api/kernelspecs")
        assert specs["default"] == "fake"
        fake = specs["kernelspecs"]["fake"]
        assert fake["name"] == "fake"
        assert fake["spec"]["display_name"] == "Fake fake"
        assert fake["spec"]["metadata"] == {"purpose": "tests"}
        assert fake["resources"]["logo-64x64"].endswith("/kernelspecs/fake/logo-64x64.png")
        one = await gw.json("GET", "api/kernelspecs/fake2")
        assert one["name"] == "fake2" and one["resources"] == {}
        logo = await gw.fetch("GET", "kernelspecs/fake/logo-64x64.png")
        assert logo.code == 200 and logo.body.startswith(b"\x89PNG")
        assert logo.headers["Content-Type"] == "image/png"


async def test_unknown_kernelspec_and_resources_are_404_json() -> None:
    """An unknown kernelspec (GET or POST) and a missing or escaping resource answer 404 JSON."""
    async with gateway() as gw:
        for method, path, body in [("GET", "api/kernelspecs/nope", None),
                                   ("POST", "api/kernels", {"name": "nope"}),
                                   ("GET", "kernelspecs/nope/logo-64x64.png", None),
                                   ("GET", "kernelspecs/fake/missing.png", None),
                                   ("GET", "kernelspecs/fake/..%2Ffake2%2Fkernel.json", None),
                                   ("GET", "kernelspecs/fake/kernel.json", None),
                                   ("GET", "api/nothing-here", None)]:
            resp = await gw.fetch(method, path, body)
            assert resp.code == 404, (path, resp.code)
            err = json.loads(resp.body)
            assert set(err) == {"reason", "message"}, err


async def test_kernel_lifecycle_over_rest() -> None:
    """POST makes a kernel (201 + Location), GET/list show its model, interrupt 204, restart 200, DELETE 204 then 404."""
    async with gateway() as gw:
        resp = await gw.fetch("POST", "api/kernels", {"name": "fake"})
        assert resp.code == 201
        model = json.loads(resp.body)
        kid = model["id"]
        assert uuid.UUID(kid)
        assert resp.headers["Location"] == f"/api/kernels/{kid}"
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "fake" and model["connections"] == 0
        assert isinstance(model["connections"], int)
        assert DATE.match(model["last_activity"]), model["last_activity"]
        listed = await gw.json("GET", "api/kernels")
        assert [m["id"] for m in listed] == [kid]
        got = await gw.json("GET", f"api/kernels/{kid}")
        assert got["execution_state"] in ("idle", "starting", "busy")
        resp = await gw.fetch("POST", f"api/kernels/{kid}/interrupt", {})
        assert resp.code == 204
        pid = gw.server.supervisor.actor_of(kid).pid
        restarted = await gw.json("POST", f"api/kernels/{kid}/restart", {})
        assert restarted["id"] == kid
        assert gw.server.supervisor.actor_of(kid).pid != pid
        resp = await gw.fetch("DELETE", f"api/kernels/{kid}")
        assert resp.code == 204
        assert (await gw.fetch("GET", f"api/kernels/{kid}")).code == 404
        assert await gw.json("GET", "api/kernels") == []


async def test_default_name_and_env_filtering() -> None:
    """A POST without a name uses the default kernel; only KERNEL_* and allow-listed env reach it."""
    async with gateway(env_allowlist=("ALLOWED_VAR",)) as gw:
        model = await gw.json("POST", "api/kernels", {"env": {
            "KERNEL_FOO": "1", "ALLOWED_VAR": "2", "LD_PRELOAD": "/evil.so"}}, expect=201)
        assert model["name"] == "fake"
        env = gw.server.supervisor.actor_of(model["id"]).options.env
        assert dict(env) == {"KERNEL_FOO": "1", "ALLOWED_VAR": "2"}


async def test_bad_input_is_400_json_and_unknown_kernel_404() -> None:
    """Malformed JSON or wrong types give 400 {reason, message}; an unknown kernel id 404 on every kernel endpoint."""
    async with gateway() as gw:
        for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
            resp = await gw.fetch("POST", "api/kernels", raw=raw)
            assert resp.code == 400, raw
            err = json.loads(resp.body)
            assert err["reason"] == "Bad Request" and err["message"]
        for body in ({"name": 3}, {"env": ["a"]}, {"env": {"KERNEL_X": 1}}):
            assert (await gw.fetch("POST", "api/kernels", body)).code == 400, body
        ghost = str(uuid.uuid4())
        for method, path in [("GET", f"api/kernels/{ghost}"), ("DELETE", f"api/kernels/{ghost}"),
                             ("POST", f"api/kernels/{ghost}/interrupt"),
                             ("POST", f"api/kernels/{ghost}/restart")]:
            resp = await gw.fetch(method, path, {} if method == "POST" else None)
            assert resp.code == 404, (method, path)
            assert set(json.loads(resp.body)) == {"reason", "message"}


async def test_max_kernels_is_403_with_a_reason() -> None:
    """With max_kernels=1 a second POST answers 403 with a JSON reason, and works again after a DELETE."""
    async with gateway(max_kernels=1) as gw:
        kid = await gw.new_kernel()
        resp = await gw.fetch("POST", "api/kernels", {"name": "fake"})
        assert resp.code == 403
        err = json.loads(resp.body)
        assert "max_kernels" in err["message"]
        assert (await gw.fetch("DELETE", f"api/kernels/{kid}")).code == 204
        await gw.new_kernel()


async def test_list_kernels_can_be_turned_off() -> None:
    """list_kernels=False (KG_LIST_KERNELS) refuses GET /api/kernels with 403."""
    async with gateway(list_kernels=False) as gw:
        assert (await gw.fetch("GET", "api/kernels")).code == 403


async def test_prespawned_pool_serves_post() -> None:
    """With prespawn fake=1, POST /api/kernels hands out the warm kernel and the pool refills."""
    async with gateway(prespawn={"fake": 1}) as gw:
        sup = gw.server.supervisor
        pooled = await sup.acquire("fake")  # wait for the pool: take and give back a slot
        await sup.shutdown_kernel(pooled)
        events = []
        sup.subscribe(events.append)
        model = await gw.json("POST", "api/kernels", {"name": "fake",
                                                      "env": {"KERNEL_USERNAME": "me"}},
                              expect=201)
        assert model["id"] not in (pooled,)
        stats = sup.statistics()
        assert stats.kernels == 1
        # A request with launch-relevant env gets a fresh kernel, not a pooled one.
        other = await gw.json("POST", "api/kernels", {"name": "fake", "env": {"KERNEL_X": "1"}},
                              expect=201)
        assert dict(sup.actor_of(other["id"]).options.env) == {"KERNEL_X": "1"}
        sup.unsubscribe(events.append)


async def test_auth_refuses_missing_or_wrong_token_everywhere() -> None:
    """Every endpoint answers 401 without the token or with a wrong one, and works with ?token=."""
    async with gateway() as gw:
        kid = await gw.new_kernel()
        paths = [("GET", "api"), ("GET", "api/kernelspecs"), ("GET", "api/kernelspecs/fake"),
                 ("GET", "kernelspecs/fake/logo-64x64.png"), ("GET", "api/kernels"),
                 ("POST", "api/kernels"), ("GET", f"api/kernels/{kid}"),
                 ("DELETE", f"api/kernels/{kid}"), ("POST", f"api/kernels/{kid}/interrupt"),
                 ("POST", f"api/kernels/{kid}/restart"), ("GET", "metrics"),
                 ("GET", "api/events"), ("GET", f"api/kernels/{kid}/channels")]
        for method, path in paths:
            for token in ("", "wrong-token"):
                resp = await gw.fetch(method, path, {} if method == "POST" else None,
                                      token=token)
                assert resp.code == 401, (method, path, token, resp.code)
        ok = await gw.fetch("GET", f"api?token={TOKEN}", token="")
        assert ok.code == 200
        assert (await gw.fetch("GET", f"api/kernels/{kid}")).code == 200


async def test_cors_headers_when_an_origin_is_allowed() -> None:
    """With allow_origin set, responses carry Access-Control-Allow-Origin and preflight OPTIONS is 204 without a token."""
    async with gateway(allow_origin="https://lab.example") as gw:
        resp = await gw.fetch("GET", "api")
        assert resp.headers["Access-Control-Allow-Origin"] == "https://lab.example"
        pre = await gw.fetch("OPTIONS", "api/kernels", token="")
        assert pre.code == 204
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    async with gateway() as gw:
        resp = await gw.fetch("GET", "api")
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_metrics_are_prometheus_text() -> None:
    """/metrics is Prometheus text with kernel gauges and request counters that move."""
    async with gateway() as gw:
        await gw.new_kernel()
        text = (await gw.fetch("GET", "metrics")).body.decode()
        assert "# TYPE kernel_gateway_kernels gauge" in text
        assert "kernel_gateway_kernels 1" in text
        assert re.search(r'kernel_gateway_http_requests_total\{code="201",method="POST"\} 1', text)
        assert 'kernel_gateway_kernel_events_total{kind="ready"}' in text
        for line in text.splitlines():
            assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? -?[0-9.e+]+$", line), line


def test_settings_are_validated() -> None:
    """GatewaySettings refuses bad values, and no-auth off loopback unless forced."""
    with pytest.raises(ConfigurationError):
        GatewaySettings(port=70000)
    with pytest.raises(ConfigurationError):
        GatewaySettings(max_kernels=0)
    with pytest.raises(ConfigurationError):
        GatewaySettings(prespawn={"python3": -1})
    with pytest.raises(ConfigurationError):
        GatewaySettings(certfile="a.pem")
    with pytest.raises(ConfigurationError):
        GatewaySettings(ip="0.0.0.0", auth=False)
    assert GatewaySettings(ip="0.0.0.0", auth=False, allow_insecure=True).token == ""
    assert GatewaySettings(ip="127.0.0.1", auth=False).token == ""
    generated = GatewaySettings()
    assert generated.token and len(generated.token) >= 32
    assert GatewaySettings().token != generated.token
    assert GatewaySettings(base_url="/gw").base_url == "/gw/"


def test_kg_environment_variables_map_to_settings() -> None:
    """The KG_* variables become settings (prespawn for the default kernel name)."""
    env = {"KG_IP": "0.0.0.0", "KG_PORT": "9999", "KG_AUTH_TOKEN": "t", "KG_MAX_KERNELS": "7",
           "KG_PRESPAWN_COUNT": "2", "KG_DEFAULT_KERNEL_NAME": "fake", "KG_ALLOW_ORIGIN": "*",
           "KG_BASE_URL": "/kg", "KG_LIST_KERNELS": "false"}
    kw = settings_from_env(env)
    assert kw == {"ip": "0.0.0.0", "port": 9999, "token": "t", "max_kernels": 7,
                  "default_kernel_name": "fake", "prespawn": {"fake": 2},
                  "allow_origin": "*", "base_url": "/kg", "list_kernels": False}
    settings = GatewaySettings(**kw)
    assert settings.url() == "http://127.0.0.1:9999/kg/"
    with pytest.raises(ConfigurationError):
        settings_from_env({"KG_PORT": "eighty"})


def self_signed(tmp: Path) -> tuple[str, str]:
    """A throwaway certificate for 127.0.0.1 (openssl)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_tls_serves_https_and_wss(tmp_path: Path) -> None:
    """With certfile/keyfile the gateway speaks HTTPS and WSS (and its URL says https)."""
    cert, key = self_signed(tmp_path)
    async with gateway(certfile=cert, keyfile=key) as gw:
        assert gw.url.startswith("https://127.0.0.1:")
        resp = await gw.http.fetch(HTTPRequest(gw.url + "api", validate_cert=False,
                                               headers={"Authorization": f"token {TOKEN}"}))
        assert json.loads(resp.body)["version"]
        kid = json.loads((await gw.http.fetch(HTTPRequest(
            gw.url + "api/kernels", method="POST", body="{}", validate_cert=False,
            headers={"Authorization": f"token {TOKEN}"}))).body)["id"]
        ws = await websocket_connect(HTTPRequest(
            f"wss{gw.url[5:]}api/kernels/{kid}/channels", validate_cert=False,
            headers={"Authorization": f"token {TOKEN}"}))
        _, seen = await execute(ws, "print('secure')")
        assert stdout_of(seen) == "secure\n"
        await close_all(ws)


async def test_base_url_prefixes_every_endpoint() -> None:
    """With base_url=/kg/ the API, Location and resource URLs live under it, and nothing outside it answers."""
    async with gateway(base_url="/kg") as gw:
        assert gw.url.endswith("/kg/")
        resp = await gw.fetch("POST", "api/kernels", {"name": "fake"})
        assert resp.code == 201
        assert resp.headers["Location"].startswith("/kg/api/kernels/")
        specs = await gw.json("GET", "api/kernelspecs")
        assert specs["kernelspecs"]["fake"]["resources"]["logo-64x64"].startswith("/kg/kernelspecs/")
        outside = await gw.http.fetch(HTTPRequest(gw.url.replace("/kg/", "/api"),
                                                  headers={"Authorization": f"token {TOKEN}"}),
                                      raise_error=False)
        assert outside.code == 404

"""Web pages may not drive edgeproxy: DNS rebinding, cross-site requests, disallowed Origins.

A page the user opens can make the browser call 127.0.0.1 (and, by DNS rebinding, read the
answer). Each test sends what such a browser sends, over a real socket, to the client and the
admin listeners, and checks the answer and what the origin (or the reload) did not get; then
that curl, the official SDK and an allowed browser app are served as before.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import load_file
from edgeproxy.ops.server import Proxy
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_edge import edge_config, hop, raw_request

MakeProxy = Callable[..., Awaitable[RunningProxy]]
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
TOKEN = "browser-test-token-7f3a9c1e5b"


def chat(host: str | None, extra: str = "", token: str | None = None) -> bytes:
    """A chat completion as a browser (or curl) would send it: Host as given, then ``extra``."""
    head = f"POST /v1/chat/completions HTTP/1.{0 if host is None else 1}\r\n"  # (1.1 requires Host)
    if host is not None:
        head += f"Host: {host}\r\n"
    if token is not None:
        head += f"x-edgeproxy-token: {token}\r\n"
    head += f"Content-Type: application/json\r\nAuthorization: Bearer sk-client\r\n{extra}"
    return f"{head}Content-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT


def get(path: str, host: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def chats(origin: FakeOrigin) -> list[Any]:
    return [r for r in origin.requests if r.path_only == "/v1/chat/completions"]


def port_of(p: RunningProxy) -> int:
    return int(p.url.rsplit(":", 1)[1])


# -- the client listener -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",  # DNS rebinding: the page's own name, now pointing at 127.0.0.1
        "evil.example",
        "127.0.0.1.nip.io:{port}",  # a public name that resolves to loopback
        "localhost.evil.example:{port}",
        "0.0.0.0:{port}",  # the "0.0.0.0 day" way to reach loopback from a page
        "evil.example:{port}:80",
        "[::1",
    ],
)
async def test_dns_rebinding_host_is_refused(origin: FakeOrigin, proxy: RunningProxy, host: str) -> None:
    status, headers, body = await raw_request(proxy.url, chat(host.format(port=port_of(proxy))))
    assert status == 403, body
    assert headers["x-edgeproxy-error"] == "browser_refused"
    assert b"hosts" in body  # the answer says how to allow a name on purpose
    assert not chats(origin)  # the client's credential went nowhere


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",  # curl, the SDKs
        "127.0.0.1",
        "localhost:{port}",
        "LOCALHOST:9999",  # another port: an ssh tunnel, a port forward
        "localhost.",
        "[::1]:{port}",
        "myapp.localhost:{port}",  # *.localhost is loopback by definition
        "127.0.0.2:{port}",
        None,  # HTTP/1.0, no Host: not a browser
    ],
)
async def test_loopback_names_are_served(origin: FakeOrigin, proxy: RunningProxy, host: str | None) -> None:
    status, _, body = await raw_request(proxy.url, chat(None if host is None else host.format(port=port_of(proxy))))
    assert status == 200, body
    assert len(chats(origin)) == 1


async def test_hosts_lists_more_names(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    listen = {"address": f"127.0.0.1:{free_port()}", "hosts": ["edgeproxy.internal", "*.dev.internal"]}
    p = await make_proxy(proxy_config(origin.url, listen=listen))
    for host, expected in [
        ("edgeproxy.internal:8787", 200),
        ("EdgeProxy.Internal", 200),
        ("a.dev.internal:80", 200),
        ("dev.internal", 403),  # *.x is the names under x, not x itself
        ("evil.example", 403),
        ("localhost", 200),  # the loopback names stay
    ]:
        status, _, body = await raw_request(p.url, chat(host))
        assert status == expected, (host, body)


@pytest.mark.parametrize(
    "extra",
    [
        "Origin: https://evil.example\r\n",
        "Origin: null\r\n",  # a sandboxed iframe, a file:// page
        "Origin: http://localhost:3000\r\nSec-Fetch-Site: same-site\r\n",  # not listed
        "Sec-Fetch-Site: cross-site\r\n",  # a page of another site, without Origin
    ],
)
async def test_browser_pages_are_refused(origin: FakeOrigin, proxy: RunningProxy, extra: str) -> None:
    status, headers, body = await raw_request(proxy.url, chat(f"127.0.0.1:{port_of(proxy)}", extra))
    assert status == 403, body
    assert headers["x-edgeproxy-error"] == "browser_refused"
    assert b"origins" in body  # how to allow a browser app on purpose
    assert not chats(origin)


async def test_cross_site_get_is_refused(origin: FakeOrigin, proxy: RunningProxy) -> None:
    """`<img src=http://127.0.0.1:8787/v1/models>` on any page: a GET with no Origin."""
    status, _, _ = await raw_request(proxy.url, get("/v1/models", "127.0.0.1", "Sec-Fetch-Site: cross-site\r\n"))
    assert status == 403
    assert not origin.requests
    # Typed into the address bar (Sec-Fetch-Site: none), or from the listener's own site: served.
    for site in ("none", "same-origin"):
        status, _, _ = await raw_request(proxy.url, get("/v1/models", "127.0.0.1", f"Sec-Fetch-Site: {site}\r\n"))
        assert status == 200


async def test_an_allowed_browser_app_is_served(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    listen = {"address": f"127.0.0.1:{free_port()}", "origins": ["http://localhost:3000", "https://app.example/"]}
    p = await make_proxy(proxy_config(origin.url, listen=listen))
    host = f"127.0.0.1:{port_of(p)}"
    for extra in (
        "Origin: http://localhost:3000\r\nSec-Fetch-Site: same-site\r\n",
        "Origin: https://app.example\r\nSec-Fetch-Site: cross-site\r\n",  # listed: cross-site is fine
    ):
        status, _, body = await raw_request(p.url, chat(host, extra))
        assert status == 200, body
    assert len(chats(origin)) == 2
    for extra in ("Origin: http://localhost:3001\r\n", "Origin: https://app.example.evil\r\n"):
        status, _, _ = await raw_request(p.url, chat(host, extra))
        assert status == 403
    assert len(chats(origin)) == 2


async def test_star_allows_any_page(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(proxy_config(origin.url, listen={"address": f"127.0.0.1:{free_port()}", "origins": "*"}))
    extra = "Origin: https://anything.example\r\nSec-Fetch-Site: cross-site\r\n"
    status, _, _ = await raw_request(p.url, chat(f"127.0.0.1:{port_of(p)}", extra))
    assert status == 200
    status, _, _ = await raw_request(p.url, chat("evil.example", extra))
    assert status == 403  # any page, but still not through a rebinding name


async def test_curl_and_the_openai_sdk_are_unaffected(origin: FakeOrigin, proxy: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        chunks = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=[], stream=True)]
        assert chunks
    finally:
        await client.close()
    if shutil.which("curl") is None:
        return
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", proxy.url + "/v1/models",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert out == b"200"


async def test_unix_socket_takes_any_host(origin: FakeOrigin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """Browsers cannot reach a unix socket; clients there send whatever Host their URL has."""
    sock = tmp_path / "edge.sock"
    cfg = proxy_config(origin.url, listen=[f"127.0.0.1:{free_port()}", f"unix:{sock}"])
    await make_proxy(cfg)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        async with s.post("http://edgeproxy.sock/v1/chat/completions", data=CHAT) as r:
            assert r.status == 200
        async with s.post("http://x/v1/chat/completions", data=CHAT, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403  # Origin is still checked


async def test_listener_other_hosts_reach_checks_origin_not_host(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Off loopback the tokens guard the listener and it answers to any name; a web page is
    still refused, even one that holds a token."""
    port = free_port("0.0.0.0")
    p = await make_proxy(proxy_config(origin.url, listen={"address": f"0.0.0.0:{port}", "tokens": [TOKEN]}))
    url = f"http://127.0.0.1:{port}"
    status, _, body = await raw_request(url, chat("edge.example.com:8443", token=TOKEN))
    assert status == 200, body
    status, headers, _ = await raw_request(url, chat("edge.example.com", "Origin: https://evil.example\r\n", TOKEN))
    assert status == 403 and headers["x-edgeproxy-error"] == "browser_refused"
    status, _, _ = await raw_request(url, chat("edge.example.com", "Sec-Fetch-Site: cross-site\r\n", TOKEN))
    assert status == 403
    assert len(chats(origin)) == 1
    assert p.proxy.listeners[0].engine.guard is not None


async def test_hops_from_a_sidecar_are_not_browser_requests(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A hop names its origin in the target (absolute form, which browsers never send); its
    Host is whatever the sidecar's client put there, and its token decides."""
    edge = await make_proxy(edge_config(origin))
    status, _, body = await raw_request(edge.url, hop(origin.url + "/v1/chat/completions", body=CHAT))
    assert status == 200, body  # (Host: x)


# -- the admin listener ------------------------------------------------------------------


def _file_config(origin: FakeOrigin, tmp_path: Path, admin: object) -> Path:
    path = tmp_path / "edgeproxy.yaml"
    cfg = proxy_config(origin.url, admin={"listen": admin})
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _from_file(path: Path) -> Proxy:
    proxy = Proxy(load_file(str(path), env={}))
    await proxy.start()
    return proxy


@pytest.fixture
async def admin_proxy(origin: FakeOrigin, tmp_path: Path) -> Any:
    """A proxy read from a file (so that a reload has something to read), admin on loopback."""
    port = free_port()
    proxy = await _from_file(_file_config(origin, tmp_path, f"127.0.0.1:{port}"))
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        await proxy.stop(0.5)


async def test_cross_site_reload_is_refused(admin_proxy: tuple[Proxy, str]) -> None:
    """`<form method=post action=http://127.0.0.1:8788/-/reload>` on any page."""
    proxy, url = admin_proxy
    host = url.removeprefix("http://")
    for extra in (
        "Sec-Fetch-Site: cross-site\r\n",
        "Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\n",
        "Origin: null\r\n",
    ):
        req = f"POST /-/reload HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\n\r\n".encode()
        status, headers, body = await raw_request(url, req)
        assert status == 403, body
        assert headers["x-edgeproxy-error"] == "browser_refused"
    assert proxy.generation == 1 and not any(proxy.metrics.reloads.values.values())  # no reload happened
    # The same POST from curl reloads (so the refusals above were the guard's).
    req = f"POST /-/reload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()
    status, _, body = await raw_request(url, req)
    assert status == 200, body
    assert proxy.generation == 2


@pytest.mark.parametrize("path", ["/-/status", "/metrics", "/-/healthy"])
async def test_admin_refuses_dns_rebinding(admin_proxy: tuple[Proxy, str], path: str) -> None:
    _, url = admin_proxy
    port = url.rsplit(":", 1)[1]
    status, headers, body = await raw_request(url, get(path, f"evil.example:{port}"))
    assert status == 403 and headers["x-edgeproxy-error"] == "browser_refused"
    assert b"upstreams" not in body and b"# HELP" not in body  # nothing of the status or metrics
    status, _, _ = await raw_request(url, get(path, f"127.0.0.1:{port}"))
    assert status == 200


async def test_admin_hosts_and_origins_allow_an_internal_tool(origin: FakeOrigin, tmp_path: Path) -> None:
    port = free_port()
    admin = {"address": f"127.0.0.1:{port}", "origins": ["http://localhost:3000"], "hosts": ["admin.internal"]}
    proxy = await _from_file(_file_config(origin, tmp_path, admin))
    try:
        url = f"http://127.0.0.1:{port}"
        status, _, _ = await raw_request(url, get("/-/status", "admin.internal", "Origin: http://localhost:3000\r\n"))
        assert status == 200
        status, _, _ = await raw_request(url, get("/-/status", "admin.internal", "Origin: http://localhost:3001\r\n"))
        assert status == 403
    finally:
        await proxy.stop(0.5)


async def test_reload_rebuilds_the_guard(origin: FakeOrigin, tmp_path: Path) -> None:
    """Allowing an origin takes a reload, not a restart."""
    port = free_port()
    path = tmp_path / "edgeproxy.yaml"
    cfg = proxy_config(origin.url, listen=f"127.0.0.1:{port}")
    path.write_text(yaml.safe_dump(cfg))
    proxy = await _from_file(path)
    try:
        url, extra = f"http://127.0.0.1:{port}", "Origin: http://localhost:3000\r\n"
        status, _, _ = await raw_request(url, chat("localhost", extra))
        assert status == 403
        cfg["listen"] = {"address": f"127.0.0.1:{port}", "origins": ["http://localhost:3000"]}
        path.write_text(yaml.safe_dump(cfg))
        ok, detail = await proxy.reload()
        assert ok, detail
        status, _, _ = await raw_request(url, chat("localhost", extra))
        assert status == 200
    finally:
        await proxy.stop(0.5)


def test_guard_is_off_when_nothing_to_check() -> None:
    """`origins: *` on a listener that does not check Host: no guard at all, nothing to pay."""
    from edgeproxy.config import load_dict
    from edgeproxy.engine.guard import BrowserGuard

    cfg = load_dict({"listen": {"address": "0.0.0.0:8787", "tokens": [TOKEN], "origins": ["*"]}}, env={})
    assert BrowserGuard.for_listener(cfg.listen[0]) is None

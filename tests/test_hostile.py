"""Hostile input is normal input: path tricks, our own headers from a client, protocol edges.

Each test sends what an attacker (or a confused client) would, over a real socket, and
asserts what a user would notice: the answer, and what the origin did or did not get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_edge import TOKEN, edge_config, hop, hop_pair, raw_request

MakeProxy = Callable[..., Awaitable[RunningProxy]]
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def post(path: str, extra: str = "", version: str = "1.1", body: bytes = CHAT) -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-client\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/x/../../admin",
        "/v1/./chat/completions",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2e/%2e%2E/admin",
        "/v1/chat%2f..%2fadmin",
        "/v1/chat%5c..%5cadmin",
        "/v1/chat/completions/..?q=1",
    ],
)
async def test_dot_segments_never_reach_the_origin(origin: FakeOrigin, proxy: RunningProxy, path: str) -> None:
    status, headers, body = await raw_request(proxy.url, post(path))
    assert status == 400 and headers["x-edgeproxy-error"] == "unsafe_path"
    assert b"unsafe_path" in body
    assert not origin.requests  # the key (or the client's credential) went nowhere


async def test_dots_in_names_and_queries_are_fine(origin: FakeOrigin, proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as s:
        url = proxy.url + "/gemini/v1beta/models/gemini-1.5-pro:generateContent?alt=x.y&z=../a"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
        async with s.post(url, json=body, headers={"x-goog-api-key": "k"}) as r:
            assert r.status == 200
    assert origin.requests[-1].path_only == "/v1beta/models/gemini-1.5-pro:generateContent"


async def test_an_edge_refuses_dot_segments_in_hop_targets(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    status, headers, _ = await raw_request(edge.url, hop(f"{origin.url}/v1/x/../../admin"))
    assert status == 400 and headers["x-edgeproxy-error"] == "unsafe_path"
    assert not origin.requests


async def test_client_sent_edgeproxy_headers_never_reach_the_origin(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    extra = "x-edgeproxy-base: abc:1:2\r\nX-EdgeProxy-Endpoint: http://evil\r\nx-edgeproxy-probe: 1\r\nx-keep: yes\r\n"
    direct = await make_proxy(proxy_config(origin.url))
    status, _, _ = await raw_request(direct.url, post("/v1/chat/completions", extra))
    assert status == 200
    side, _ = await hop_pair(origin, make_proxy)
    status, _, _ = await raw_request(side.url, post("/v1/chat/completions", extra))
    assert status == 200  # (the sidecar's own hop headers still reach the edge: it answered)
    seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"]
    assert len(seen) == 2
    for r in seen:
        names = {k.lower() for k in r.headers}
        assert "x-keep" in names
        assert not [n for n in names if n.startswith("x-edgeproxy-")], names


async def test_an_http2_request_line_is_refused(origin: FakeOrigin, proxy: RunningProxy) -> None:
    status, headers, _ = await raw_request(proxy.url, post("/v1/chat/completions", version="2.0"))
    assert status == 505 and headers["x-edgeproxy-error"] == "http_version"
    assert not origin.requests


async def test_100_continue_only_for_http11(origin: FakeOrigin, proxy: RunningProxy) -> None:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    for version, interim in (("1.1", True), ("1.0", False)):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            head = post("/v1/chat/completions", "Expect: 100-continue\r\n", version, CHAT).split(b"\r\n\r\n")[0]
            writer.write(head + b"\r\n\r\n")
            await writer.drain()
            if interim:
                assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100")
            else:
                with pytest.raises(asyncio.TimeoutError):  # nothing until the body comes
                    await asyncio.wait_for(reader.readline(), 0.3)
            writer.write(CHAT)
            await writer.drain()
            rest = b""
            while b" 200 " not in rest:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 5)
                assert chunk, rest
                rest += chunk
            assert b" 100 " not in rest  # one interim answer at most, and only for HTTP/1.1
        finally:
            writer.close()


async def test_our_answers_do_not_name_python_or_aiohttp(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    cfg = proxy_config(origin.url, admin={"listen": f"127.0.0.1:{free_port()}"})
    p = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for url in (p.url + "/nowhere", p.admin_url + "/-/healthy", p.admin_url + "/metrics"):
            async with s.get(url) as r:
                assert r.headers.get("Server") == "edgeproxy", url


async def test_our_token_in_authorization_on_an_unknown_path_is_a_404(
    origin: FakeOrigin, make_proxy: MakeProxy
) -> None:
    cfg = proxy_config(origin.url, listen={"address": f"127.0.0.1:{free_port()}", "tokens": [TOKEN]})
    p = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/nowhere", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 404 and r.headers["x-request-id"]
        async with s.get(p.url + "/nowhere", headers={"Authorization": "Bearer wrong-token-0123456789"}) as r:
            assert r.status == 401  # a stranger learns nothing about which paths exist


async def test_sidecar_probes_are_not_counted_as_edge_traffic(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    side, edge = await hop_pair(origin, make_proxy)
    await asyncio.sleep(1.2)  # a probe interval (1 s in sidecar_config): a few more probes
    counted = edge.proxy.metrics.requests.values
    assert not [k for k in counted if k[1] == "0"], counted  # (were counted with status 0)
    async with aiohttp.ClientSession() as s:
        async with s.post(side.url + "/v1/chat/completions", data=CHAT, headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 200
    assert counted.get(("openai", "200")) == 1  # the one real request

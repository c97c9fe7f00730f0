"""Hostile input is normal input: path tricks, our own headers from a client, protocol edges.

Each test sends what an attacker (or a confused client) would, over a real socket, and
asserts what a user would notice: the answer, and what the origin did or did not get.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import zstandard

from edgeproxy.config import ConfigError, load_dict
from edgeproxy.ops.server import Proxy
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_cli import ROOT
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
        "/v1/..\\..\\admin",  # a raw backslash: a slash to WHATWG and Node URL parsers
        "/v1/x/..;/admin",  # Tomcat reads ..; as ..
        "/v1/a%00b",
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


# -- client timeouts, per-address caps, the body memory budget --------------------------------


def limited(origin: FakeOrigin, **limits: object) -> dict[str, object]:
    return proxy_config(origin.url, limits=limits)


async def open_from(url: str, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Does the server close this connection (EOF, or a reset) within ``seconds``?"""
    try:
        while True:
            if not await asyncio.wait_for(reader.read(65536), seconds):
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_slow_heads_are_closed_and_others_are_served(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(limited(origin, header_timeout="1s"))
    slow = [await open_from(p.url, "127.0.0.2") for _ in range(100)]
    for _, w in slow:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = asyncio.get_running_loop().time()
    async with aiohttp.ClientSession() as s:  # another address, meanwhile: served as usual
        async with s.post(p.url + "/v1/chat/completions", data=CHAT, headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 200
    for _, w in slow:  # a byte now and then does not buy more time
        w.write(b"a")
    results = await asyncio.gather(*(closed_within(r, 6.0) for r, _ in slow))
    assert all(results), f"{results.count(False)} slow heads still open"
    assert asyncio.get_running_loop().time() - started < 8
    assert p.proxy.metrics.client_limits.values[("header_timeout",)] == 100
    for _, w in slow:
        w.close()


async def test_a_whole_head_on_time_is_not_cut_by_the_header_timeout(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Keep-alive requests one after the other, each slower in total than header_timeout."""
    p = await make_proxy(limited(origin, header_timeout="1s"))
    reader, writer = await open_from(p.url, "127.0.0.1")
    try:
        for _ in range(3):
            writer.write(post("/v1/chat/completions"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.6)  # idle between requests: keepalive_timeout's business, not the head's
    finally:
        writer.close()


async def test_connections_per_address_are_capped(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(limited(origin, max_connections_per_address=20))
    held = [await open_from(p.url, "127.0.0.3") for _ in range(20)]
    extra = [await open_from(p.url, "127.0.0.3") for _ in range(5)]
    assert all(await asyncio.gather(*(closed_within(r, 2.0) for r, _ in extra)))  # refused as they open
    assert not any(await asyncio.gather(*(closed_within(r, 0.3) for r, _ in held)))  # the first 20 stay
    async with aiohttp.ClientSession() as s:  # another address is not affected
        async with s.post(p.url + "/v1/chat/completions", data=CHAT, headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 200
    for _, w in held[:5]:
        w.close()
    await asyncio.sleep(0.2)
    again = [await open_from(p.url, "127.0.0.3") for _ in range(5)]  # room again once some left
    assert not any(await asyncio.gather(*(closed_within(r, 0.3) for r, _ in again)))
    assert p.proxy.metrics.client_limits.values[("max_connections_per_address",)] == 5
    for _, w in held[5:] + extra + again:
        w.close()


async def test_an_idle_connection_is_closed_after_keepalive_timeout(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(limited(origin, keepalive_timeout="1s"))
    never, _ = await open_from(p.url, "127.0.0.1")  # never sends a request
    after, writer = await open_from(p.url, "127.0.0.1")  # idle after one
    writer.write(post("/v1/chat/completions"))
    assert (await asyncio.wait_for(after.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    assert all(await asyncio.gather(closed_within(never, 5.0), closed_within(after, 5.0)))


async def test_a_stalled_body_gets_408_and_reaches_no_origin(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(limited(origin, body_timeout="1s"))
    reader, writer = await open_from(p.url, "127.0.0.1")
    request = post("/v1/chat/completions", body=CHAT)
    writer.write(request[: len(request) - 20])  # all but the body's last 20 bytes
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408") and b"x-edgeproxy-error: body_timeout" in head.lower()
    assert await closed_within(reader, 3.0)
    assert not origin.requests
    assert p.proxy.metrics.client_limits.values[("body_timeout",)] == 1


async def test_held_bodies_are_bounded_by_buffer_memory(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Two 600 KiB uploads that stall near their end, against 1 MiB of buffer memory: the second
    is refused at once (503, Retry-After) instead of the process holding it; when the first is
    cut by the body timeout the budget is back and a new upload is served."""
    p = await make_proxy(limited(origin, buffer_memory="1MiB", replay_body="900KiB", body_timeout="2s"))
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * (600 << 10) + b'"}]}'
    stalled = []
    for _ in range(2):
        r, w = await open_from(p.url, "127.0.0.1")
        w.write(post("/v1/chat/completions", body=body)[:-1000])  # all but the body's last 1000 bytes
        await asyncio.sleep(0.3)  # (held as it arrives: what a stalled upload sent, not what it announced)
        stalled.append((r, w))
    await asyncio.sleep(0.3)
    second = await asyncio.wait_for(stalled[1][0].readuntil(b"\r\n\r\n"), 5)
    assert second.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in second.lower()
    assert p.proxy.bodies.held >= 590 << 10  # (the first, held as far as it came)
    first = await asyncio.wait_for(stalled[0][0].readuntil(b"\r\n\r\n"), 6)
    assert first.startswith(b"HTTP/1.1 408")
    assert p.proxy.bodies.held == 0
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", data=body, headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 200
            await r.read()
    for _ in range(50):  # (given back as the handler ends, a moment after the last byte went)
        if not p.proxy.bodies.held:
            break
        await asyncio.sleep(0.02)
    assert p.proxy.bodies.held == 0
    for _, w in stalled:
        w.close()


async def test_a_stream_cut_by_the_end_of_a_drain_says_so_in_band(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.events, origin.event_interval = 100, 0.05  # a five-second stream
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
            assert (await r.content.readline()).startswith(b"data: ")
            stopping = asyncio.create_task(p.proxy.stop(0.3))  # drain_timeout far shorter than the stream
            rest = await asyncio.wait_for(r.read(), 10)
            await stopping
    events = [e for e in rest.split(b"\n\n") if e.strip()]
    assert b"[DONE]" not in rest  # never a fake end
    assert events[-1].startswith(b"data: {") and b'"error"' in events[-1] and b"shutting_down" in events[-1]
    assert p.proxy.metrics.stream_errors.values[("openai", "shutting_down")] == 1


# -- startup: what check verifies, and errors that name what they are about ------------------


async def test_a_unix_socket_in_a_missing_directory_is_made_and_served(origin: FakeOrigin, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "edgeproxy" / "edgeproxy.sock"
    cfg = proxy_config(origin.url, listen=f"unix:{sock}")
    config = load_dict(cfg, env={})  # check passes: the directory can be made
    proxy = Proxy(config)
    await proxy.start()
    try:
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.post("http://x/v1/chat/completions", data=CHAT, headers={"Authorization": "Bearer k"}) as r:
                assert r.status == 200
    finally:
        await proxy.stop(0)


def test_check_refuses_a_socket_it_could_not_make(origin: FakeOrigin, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = proxy_config(origin.url, listen=f"unix:{blocker}/sub/edgeproxy.sock")
    with pytest.raises(ConfigError) as err:
        load_dict(cfg, env={})
    assert "listen" in str(err.value) and str(blocker) in str(err.value)


async def test_a_port_in_use_is_named_at_startup(origin: FakeOrigin) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proxy = Proxy(load_dict(proxy_config(origin.url, listen=f"127.0.0.1:{port}"), env={}))
        with pytest.raises(OSError) as err:
            await proxy.start()
    assert f"127.0.0.1:{port}" in str(err.value)


# -- smaller: codings at the edge ---------------------------------------------------------------


async def test_a_multi_member_gzip_hop_body_is_accepted(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    half = len(CHAT) // 2
    body = gzip.compress(CHAT[:half]) + gzip.compress(CHAT[half:])  # RFC 1952: members in a row
    status, _, _ = await raw_request(
        edge.url, hop(f"{origin.url}/v1/chat/completions", extra="Content-Encoding: gzip\r\n", body=body)
    )
    assert status == 200
    assert origin.requests[-1].body == CHAT


async def test_an_edge_without_zstandard_refuses_a_zstd_hop_body(origin: FakeOrigin, tmp_path: Path) -> None:
    port = free_port()
    cfg = edge_config(origin, listen={"address": f"127.0.0.1:{port}", "tokens": [TOKEN]})
    conf = tmp_path / "edge.yaml"
    conf.write_bytes(orjson.dumps(cfg))
    no_zstd = "import sys; sys.modules['zstandard'] = None; from edgeproxy.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", no_zstd, "run", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        body = zstandard.ZstdCompressor().compress(CHAT)
        request = hop(f"{origin.url}/v1/chat/completions", extra="Content-Encoding: zstd\r\n", body=body)
        for _ in range(100):
            try:
                status, headers, _ = await raw_request(url, request)
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert status == 415 and headers["x-edgeproxy-error"] == "unsupported_encoding"
        assert not [r for r in origin.requests if r.method == "POST"]  # never forwarded compressed
    finally:
        proc.terminate()
        proc.wait(10)


async def test_warming_a_path_through_a_broken_proxy_backs_off(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A proxy that takes connections and closes them at once: the pool's warming tries again
    less and less often (it used to be once a second, for ever)."""
    accepted = 0

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = proxy_config(origin.url, lines={"corp": {"proxy": f"http://127.0.0.1:{port}"}}, probe={"interval": "30s"})
        cfg["upstreams"] = {"openai": cfg["upstreams"]["openai"]}  # one path
        p = await make_proxy(cfg)
        await asyncio.sleep(8)
        probes = sum(v for k, v in p.proxy.metrics.probes.values.items())
        # Once a second would be 8 warming tries; doubling from 1 s (ticks at 0, 1, 2, 4): 4.
        assert 1 <= accepted - probes <= 5, (accepted, probes)
    finally:
        server.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Name: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls to a plain port\r\n\r\n",
    ],
)
async def test_malformed_http_gets_a_json_error(origin: FakeOrigin, proxy: RunningProxy, raw: bytes) -> None:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)  # then the connection closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400" and b"application/json" in head.lower()
    assert orjson.loads(body)["error"]["code"] == "bad_request"
    assert b"Traceback" not in answer and b"aiohttp" not in answer
    assert not origin.requests


async def test_an_idle_connection_outlives_the_header_timeout(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A sidecar's warm connection to an edge sends nothing until it is needed: it is the
    idle (keep-alive) timeout's, not the header timeout's, so warm pools stay warm."""
    p = await make_proxy(limited(origin, header_timeout="1s", keepalive_timeout="3s"))
    reader, writer = await open_from(p.url, "127.0.0.1")
    assert not await closed_within(reader, 2.0)  # past header_timeout: still open
    writer.write(post("/v1/chat/completions"))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    writer.close()

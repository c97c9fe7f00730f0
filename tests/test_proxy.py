"""Core forwarding behaviour, over real sockets: edgeproxy between a client and the fake origin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import GZIP_BODY, FakeOrigin

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def _post(url: str, body: Any = None, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        data = orjson.dumps(body) if isinstance(body, (dict, list)) else body
        async with s.post(url, data=data, headers=headers, **kw) as r:
            return r.status, r.headers, await r.read()


async def _raw(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        out = await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()
    return out


async def test_forwards_path_query_and_rewrites_host(origin: FakeOrigin, proxy: RunningProxy) -> None:
    status, _, body = await _post(proxy.url + "/v1/echo?a=1&b=%20x", b"hello")
    assert status == 200
    echo = orjson.loads(body)
    assert echo["path"] == "/v1/echo"
    assert origin.requests[-1].path == "/v1/echo?a=1&b=%20x"
    assert echo["headers"]["host"] == f"127.0.0.1:{origin.port}"
    assert echo["body_len"] == 5


async def test_prefix_replaced_by_endpoint_path(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = proxy_config(origin.url)
    cfg["upstreams"] = {
        "relay": {"prefix": "/openai/v1", "provider": "openai", "endpoints": [{"url": origin.url + "/v1"}]}
    }
    p = await make_proxy(cfg)
    status, _, _body = await _post(p.url + "/openai/v1/echo?q=1", b"{}")
    assert status == 200
    assert origin.requests[-1].path == "/v1/echo?q=1"


async def test_hop_by_hop_headers_stripped_and_request_id(origin: FakeOrigin, proxy: RunningProxy) -> None:
    headers = {
        "Connection": "keep-alive, X-Private",
        "X-Private": "must-not-pass",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "TE": "trailers",
        "X-Custom": "kept",
        "x-request-id": "req-from-client",
    }
    status, _, body = await _post(proxy.url + "/v1/echo", b"{}", headers=headers)
    assert status == 200
    seen = orjson.loads(body)["headers"]
    for h in ("x-private", "keep-alive", "proxy-authorization", "te", "x-edgeproxy-token"):
        assert h not in seen, h
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "req-from-client"
    # without one, a request id is generated, sent upstream and returned
    status, _rh, body = await _post(proxy.url + "/v1/echo", b"{}")
    rid = orjson.loads(body)["headers"]["x-request-id"]
    assert len(rid) >= 16


async def test_compressed_response_passes_byte_for_byte(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/v1/gzip", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert await r.read() == GZIP_BODY


async def test_unknown_route_is_404_in_openai_shape(proxy: RunningProxy) -> None:
    status, headers, body = await _post(proxy.url + "/nope/chat", b"{}")
    assert status == 404
    assert headers["x-edgeproxy-error"] == "no_route"
    assert orjson.loads(body)["error"]["code"] == "no_route"


async def test_body_limits(origin: FakeOrigin, proxy: RunningProxy) -> None:
    big = os.urandom(20 * 1024 * 1024)  # over replay_body (16 MiB): streamed through
    status, _, body = await _post(proxy.url + "/v1/echo", big)
    assert status == 200
    assert orjson.loads(body)["body_sha256"] == hashlib.sha256(big).hexdigest()
    n = len(origin.requests)
    status, headers, body = await _post(proxy.url + "/v1/echo", b"x" * (33 * 1024 * 1024))
    assert status == 413
    assert headers["x-edgeproxy-error"] == "too_large"
    assert "over the limit" in orjson.loads(body)["error"]["message"]
    assert len(origin.requests) == n  # refused before anything reached the origin


async def test_chunked_upload_over_limit_is_413(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url, limits={"max_body": "1MiB", "replay_body": "256KiB"}))

    async def gen() -> Any:
        for _ in range(40):
            yield b"y" * 65536

    status, _headers, _ = await _post(p.url + "/v1/echo", gen())
    assert status == 413


async def test_large_upload_streams_with_little_memory(origin: FakeOrigin, make_proxy: Any) -> None:
    """A 200 MB /v1/files upload (max_body raised) goes through without being held in memory."""
    import resource

    p = await make_proxy(proxy_config(origin.url, limits={"max_body": "512MiB"}))
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()

    async def gen() -> Any:
        for _ in range(200):
            digest.update(chunk)
            yield chunk

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status, _, body = await _post(p.url + "/v1/files", gen(), headers={"Content-Type": "application/octet-stream"})
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert status == 200, body
    result = orjson.loads(body)
    assert result["bytes"] == 200 * 1024 * 1024
    assert result["sha256"] == digest.hexdigest()
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB for a 200 MB upload"


async def test_keys_injected_the_providers_way(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = proxy_config(origin.url)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["${OPENAI_KEY}"]
    cfg["upstreams"]["anthropic"]["endpoints"][0]["keys"] = ["sk-ant-real"]
    cfg["upstreams"]["gemini"]["endpoints"][0]["keys"] = ["g-real"]
    p = await make_proxy(cfg, env={"OPENAI_KEY": "sk-real"})
    await _post(p.url + "/v1/echo", b"{}", headers={"Authorization": "Bearer client-junk"})
    seen = origin.requests[-1].headers
    assert seen["Authorization"] == "Bearer sk-real"
    await _post(p.url + "/anthropic/v1/echo", b"{}", headers={"x-api-key": "client-junk"})
    seen = origin.requests[-1].headers
    assert seen["x-api-key"] == "sk-ant-real"
    assert "Authorization" not in seen
    await _post(p.url + "/gemini/v1/echo", b"{}")
    assert origin.requests[-1].headers["x-goog-api-key"] == "g-real"


async def test_client_credentials_pass_through_without_keys(origin: FakeOrigin, proxy: RunningProxy) -> None:
    await _post(proxy.url + "/v1/echo", b"{}", headers={"Authorization": "Bearer sk-client"})
    assert origin.requests[-1].headers["Authorization"] == "Bearer sk-client"


TOKEN = "tok-0123456789abcdef"


async def test_listener_tokens(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = proxy_config(origin.url)
    cfg["listen"] = {"address": cfg["listen"], "tokens": [TOKEN]}
    cfg["upstreams"]["anthropic"]["endpoints"][0]["keys"] = ["sk-ant-real"]
    p = await make_proxy(cfg)
    # no token, wrong token: 401 in the provider's shape, nothing reaches the origin
    status, headers, body = await _post(p.url + "/v1/echo", b"{}")
    assert status == 401 and headers["x-edgeproxy-error"] == "unauthorized"
    assert "error" in orjson.loads(body)
    status, _, body = await _post(p.url + "/anthropic/v1/messages", b"{}", headers={"x-edgeproxy-token": TOKEN + "x"})
    assert status == 401 and orjson.loads(body)["type"] == "error"
    assert origin.requests == []
    # x-edgeproxy-token: accepted, and never forwarded; the client's own key passes (no keys here)
    status, _, body = await _post(
        p.url + "/v1/echo", b"{}", headers={"x-edgeproxy-token": TOKEN, "Authorization": "Bearer sk-client"}
    )
    assert status == 200
    seen = orjson.loads(body)["headers"]
    assert "x-edgeproxy-token" not in seen and seen["authorization"] == "Bearer sk-client"
    # a Bearer token does not count where the client's credential must pass through
    status, _, _ = await _post(p.url + "/v1/echo", b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 401
    # where the endpoint injects keys, the provider's auth header may carry the token instead
    status, _, _ = await _post(p.url + "/anthropic/v1/echo", b"{}", headers={"x-api-key": TOKEN})
    assert status == 200
    assert origin.requests[-1].headers["x-api-key"] == "sk-ant-real"


async def test_unix_socket_listener(origin: FakeOrigin, make_proxy: Any, tmp_path: Any) -> None:
    sock = str(tmp_path / "ep.sock")
    await make_proxy(proxy_config(origin.url, listen=f"unix:{sock}"))
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post("http://localhost/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert (await r.json())["object"] == "chat.completion"


async def test_client_disconnect_stops_origin_stream(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.events = 100
    origin.event_interval = 0.05
    async with aiohttp.ClientSession() as s:
        r = await s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"
        await r.content.readline()
        r.close()  # the client goes away mid-stream
    await origin.wait_disconnects(1, timeout=1.0)
    assert origin.streams_completed == 0


async def test_stream_events_are_not_buffered(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.events = 5
    origin.event_interval = 0.3
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    sent = orjson.loads(line[6:])["x_origin_ts"]
                    arrivals.append(time.time() - sent)
    assert len(arrivals) >= 5
    # each event arrives right after the origin wrote it, not when the stream ends
    assert max(arrivals) < 0.25, arrivals


async def test_500_concurrent_streams_complete_intact(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.events = 10
    origin.event_interval = 0.01
    expected = None

    async def one(s: aiohttp.ClientSession) -> bytes:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            return await r.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        bodies = await asyncio.gather(*(one(s) for _ in range(500)))
    for body in bodies:
        events = [e for e in body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[1:-2])
        expected = expected or text
        assert text == expected == "echo: hi"
    assert origin.streams_completed == 500


async def test_origin_cut_mid_stream_gives_in_band_error(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.events = 10
    origin.drop_after_events = 3
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = await r.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 4
    assert b"[DONE]" not in body  # never a fake end
    err = orjson.loads(events[-1][6:])["error"]
    assert err["code"] == "upstream_reset"

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/anthropic/v1/messages", json={**CHAT, "max_tokens": 5, "stream": True}) as r:
            body = await r.read()
    assert body.split(b"\n\n")[-2].startswith(b"event: error\ndata: ")


async def test_origin_timeout_is_504(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url, failover={"first_byte_timeout": "300ms"}))
    origin.latency = 2.0
    started = time.monotonic()
    status, headers, _body = await _post(p.url + "/v1/chat/completions", CHAT)
    assert status == 504
    assert headers["x-edgeproxy-error"] == "timeout"
    assert time.monotonic() - started < 1.5


async def test_malformed_requests_get_400_and_proxy_survives(origin: FakeOrigin, proxy: RunningProxy) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    out = await _raw(port, b"GARBAGE\r\n\r\n")
    assert out.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert b"Traceback" not in out
    out = await _raw(port, b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n")
    assert out.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    huge = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    out = await _raw(port, huge)
    assert out.split(b" ")[1].startswith(b"4")
    assert b"Traceback" not in out
    # truncated body: client sent less than Content-Length and went away
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort")
    writer.close()
    await asyncio.sleep(0.1)
    # and the proxy still serves
    status, _, _ = await _post(proxy.url + "/v1/chat/completions", CHAT)
    assert status == 200


async def test_warm_pool_ready_before_first_request(origin: FakeOrigin, proxy: RunningProxy) -> None:
    path = proxy.proxy.state.paths[("openai", origin.url + "/v1", "direct")]
    for _ in range(50):
        if path.pool.idle:
            break
        await asyncio.sleep(0.02)
    assert path.pool.idle >= 1
    connects = path.pool.connects
    for _ in range(5):
        status, _, _ = await _post(proxy.url + "/v1/chat/completions", CHAT)
        assert status == 200
    assert path.pool.connects == connects  # sequential requests reuse the warm connection


async def test_access_log_and_admin_hold_no_secrets(origin: FakeOrigin, make_proxy: Any, tmp_path: Any) -> None:
    cfg = proxy_config(origin.url, admin={"listen": f"127.0.0.1:{free_port()}"}, log={"access": "json"})
    cfg["listen"] = {"address": cfg["listen"], "tokens": [TOKEN]}
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-secret-key-123"]
    p = await make_proxy(cfg)
    r, w = os.pipe()
    os.set_blocking(r, False)
    p.proxy.access._fd = w  # capture the access log
    status, _, _ = await _post(
        p.url + "/v1/chat/completions?key=query-secret", CHAT, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    await asyncio.sleep(0.05)
    line = os.read(r, 65536)
    rec = orjson.loads(line.splitlines()[-1])
    assert rec["status"] == 200 and rec["upstream"] == "openai" and rec["line"] == "direct"
    assert rec["path"] == "/v1/chat/completions" and rec["attempts"] == 1 and rec["streamed"] is False
    assert rec["bytes_in"] > 0 and rec["bytes_out"] > 0 and rec["ttfb_ms"] >= 0
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin_url + "/-/status") as resp:
            status_body = await resp.read()
        async with s.get(p.admin_url + "/metrics") as resp:
            metrics = await resp.read()
        async with s.get(p.admin_url + "/-/ready") as resp:
            assert resp.status == 200
        async with s.get(p.admin_url + "/-/healthy") as resp:
            assert resp.status == 200
    assert b'edgeproxy_requests_total{status="200",upstream="openai"} 1.0' in metrics
    assert b"edgeproxy_ttfb_seconds_bucket" in metrics
    for blob in (line, status_body, metrics):
        for secret in (b"sk-secret-key-123", TOKEN.encode(), b"query-secret"):
            assert secret not in blob
    os.close(r)
    os.close(w)


async def test_admin_paths_not_served_on_client_listener(proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/-/status") as r:
            assert r.status == 404


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_origin_error_statuses_pass_through(origin: FakeOrigin, proxy: RunningProxy, status: int) -> None:
    origin.fail_status = status
    origin.retry_after = "7"
    code, headers, body = await _post(proxy.url + "/v1/chat/completions", CHAT)
    assert code == status
    assert headers["Retry-After"] == "7"
    assert "fake origin failure" in orjson.loads(body)["error"]["message"]


async def test_slow_client_gets_a_large_stream_intact(origin: FakeOrigin, proxy: RunningProxy) -> None:
    """Backpressure: a client that stops reading pauses the origin, loses nothing."""
    # ~16 MB: more than the kernel's socket buffers on both sides can hide
    origin.reply = "".join(chr(0x4E00 + i % 500) for i in range(2_000_000)) + "x" * 10_000_000
    origin.events = 200
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            await asyncio.sleep(0.5)  # not reading: buffers fill up to the origin
            body = await r.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[1:-2])
    assert text == origin.reply

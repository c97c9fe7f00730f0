"""Origins that misbehave at the HTTP level (hand-written raw servers), and odd client bytes.

Each case was a real bug once: a pool slot lost, a POST sent twice, a response rewritten by
bytes after its end, a cut body passed off as whole.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningProxy, proxy_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
REQ = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


@pytest.fixture
async def raw_origin() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await r.readuntil(b"\r\n\r\n")
                    if head.startswith(b"GET /v1/models"):  # edgeproxy's probe
                        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                        continue
                    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0] or 0)
                    await r.readexactly(length)
                    if await handler(r, w) is False:  # type: ignore[func-returns-value]
                        return
            except (asyncio.IncompleteReadError, ConnectionError, IndexError):
                pass
            finally:
                w.close()

        srv = await asyncio.start_server(guarded, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start
    for srv in servers:
        srv.close()


async def raw(p: RunningProxy, data: bytes = REQ, timeout: float = 5.0) -> bytes:
    host, port = p.url[7:].split(":")
    r, w = await asyncio.open_connection(host, int(port))
    w.write(data)
    out = b""
    try:
        while chunk := await asyncio.wait_for(r.read(65536), timeout):
            out += chunk
    finally:
        w.close()
    return out


async def test_origin_closing_after_a_keep_alive_answer_loses_no_pool_slot(raw_origin: Any, make_proxy: Any) -> None:
    async def answer_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.2)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # looks keep-alive ...
        return False  # ... and closes at once

    url = await raw_origin(answer_then_close)
    p = await make_proxy(proxy_config(url, pool={"max_per_path": 1, "warm": 0}, probe={"interval": "60s"}))
    answers = await asyncio.gather(*(raw(p) for _ in range(3)))
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    path = next(iter(p.proxy.state.paths.values()))
    assert path.inflight == 0 and path.pool.active == 0
    assert (await raw(p, timeout=3.0)).startswith(b"HTTP/1.1 200")


async def test_post_not_sent_twice_when_the_origin_resets_after_reading_it(raw_origin: Any, make_proxy: Any) -> None:
    seen = 0

    async def work_then_reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        nonlocal seen
        seen += 1
        if seen == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # a first answer: the conn is pooled
            return True
        await asyncio.sleep(0.3)  # "generating" ...
        w.transport.abort()  # ... then the connection dies
        return False

    url = await raw_origin(work_then_reset)
    p = await make_proxy(proxy_config(url, pool={"warm": 0}, probe={"interval": "60s"}, failover={"retries": 0}))
    assert (await raw(p)).startswith(b"HTTP/1.1 200")
    assert (await raw(p)).startswith(b"HTTP/1.1 502")  # on the reused connection
    assert seen == 2  # the POST reached the origin once, and was not replayed


async def test_bytes_after_a_response_never_rewrite_it(raw_origin: Any, make_proxy: Any) -> None:
    async def smuggle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 503 Nope\r\nSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n"
        )
        return True

    url = await raw_origin(smuggle)
    p = await make_proxy(proxy_config(url, pool={"warm": 0}, probe={"interval": "60s"}))
    for _ in range(3):  # and the connection it came on is not reused with that junk in it
        answer = await raw(p)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert b"injected" not in answer and b"503" not in answer


async def test_close_delimited_body_cut_by_a_reset_is_not_passed_off_as_whole(raw_origin: Any, make_proxy: Any) -> None:
    async def partial_then_rst(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"choices":[{"text":"partial')
        await w.drain()
        await asyncio.sleep(0.1)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        w.transport.abort()
        return False

    url = await raw_origin(partial_then_rst)
    p = await make_proxy(proxy_config(url, pool={"warm": 0}, probe={"interval": "60s"}))
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", data=b"{}") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_origin_answering_mid_upload_is_relayed(make_proxy: Any) -> None:
    async def early_413(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        await r.read(65536)
        w.write(b'HTTP/1.1 413 Payload Too Large\r\nContent-Length: 17\r\nConnection: close\r\n\r\n{"error":"large"}')
        await w.drain()
        w.close()

    srv = await asyncio.start_server(early_413, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        p = await make_proxy(
            proxy_config(url, pool={"warm": 0}, probe={"interval": "60s"}, limits={"replay_body": "1KiB"})
        )

        async def body() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b"x" * 65536
                await asyncio.sleep(0.005)

        async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/files", data=body()) as r:
            assert r.status == 413
            assert await r.read() == b'{"error":"large"}'
    finally:
        srv.close()


async def test_odd_bytes_in_client_headers_get_clean_answers(origin: Any, make_proxy: Any) -> None:
    cfg = proxy_config(origin.url)
    cfg["listen"] = {"address": cfg["listen"], "tokens": ["tok-0123456789abcdef"]}
    p = await make_proxy(cfg)
    bad_token = (
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-edgeproxy-token: \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    assert (await raw(p, bad_token)).startswith(b"HTTP/1.1 401")
    odd_id = (
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-edgeproxy-token: tok-0123456789abcdef\r\n"
        b"x-request-id: \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    answer = await raw(p, odd_id)
    assert answer.startswith(b"HTTP/1.1 200")
    assert origin.requests[-1].headers["x-request-id"].isascii()  # replaced by one of ours


async def test_client_that_stops_reading_is_cut_loose(origin: Any, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url, failover={"stream_idle_timeout": "1s"}))
    origin.reply = "x" * 30_000_000  # far more than socket buffers hold
    origin.events = 300
    host, port = p.url[7:].split(":")
    r, w = await asyncio.open_connection(host, int(port))
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    w.write(head + body)
    await r.read(1000)  # the stream started; now the client reads nothing more
    path = next(x for x in p.proxy.state.paths.values() if x.upstream == "openai")
    for _ in range(100):
        if path.inflight == 0:
            break
        await asyncio.sleep(0.1)
    assert path.inflight == 0, "the stalled client still holds the upstream connection"
    w.close()


def _sse_head(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n" + extra + b"\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def _first_bytes_after(p: RunningProxy, expect: bytes) -> float:
    """Seconds until ``expect`` shows up in the (decompressed) stream."""
    started = asyncio.get_running_loop().time()
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", data=b"{}") as r:
        seen = b""
        async for chunk in r.content.iter_any():
            seen += chunk
            if expect in seen:
                return asyncio.get_running_loop().time() - started
    raise AssertionError(f"{expect!r} never arrived: {seen[:200]!r}")


@pytest.mark.parametrize("framing", [b"\r\r", b"\n\r\n", b"\r\n\r\n"])
async def test_sse_events_with_any_line_ends_go_out_at_once(raw_origin: Any, make_proxy: Any, framing: bytes) -> None:
    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(_sse_head() + _chunk(b"data: first" + framing))
        await w.drain()
        await asyncio.sleep(1.0)
        w.write(_chunk(b"data: second" + framing) + b"0\r\n\r\n")
        return True

    p = await make_proxy(proxy_config(await raw_origin(stream), pool={"warm": 0}, probe={"interval": "60s"}))
    assert await _first_bytes_after(p, b"data: first") < 0.8


async def test_compressed_sse_is_relayed_as_it_comes(raw_origin: Any, make_proxy: Any) -> None:
    import zlib

    async def gz_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        z = zlib.compressobj(wbits=31)  # gzip
        w.write(
            _sse_head(b"Content-Encoding: gzip\r\n")
            + _chunk(z.compress(b"data: first\n\n") + z.flush(zlib.Z_SYNC_FLUSH))
        )
        await w.drain()
        await asyncio.sleep(1.0)
        w.write(_chunk(z.compress(b"data: second\n\n") + z.flush()) + b"0\r\n\r\n")
        return True

    p = await make_proxy(proxy_config(await raw_origin(gz_stream), pool={"warm": 0}, probe={"interval": "60s"}))
    assert await _first_bytes_after(p, b"data: first") < 0.8


async def test_first_event_larger_than_the_read_buffer(raw_origin: Any, make_proxy: Any) -> None:
    big = b"data: " + b"x" * 700_000 + b"\n\n"

    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(_sse_head())
        for i in range(0, len(big), 65536):
            w.write(_chunk(big[i : i + 65536]))
            await w.drain()
        w.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return True

    p = await make_proxy(
        proxy_config(
            await raw_origin(stream),
            pool={"warm": 0},
            probe={"interval": "60s"},
            failover={"first_event_timeout": "3s"},
        )
    )
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", data=b"{}") as r:
        assert r.status == 200
        assert await r.read() == big + b"data: [DONE]\n\n"


async def test_cut_after_the_streams_own_end_is_a_clean_end(raw_origin: Any, make_proxy: Any) -> None:
    async def done_then_cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(_sse_head() + _chunk(b"data: {}\n\n") + _chunk(b"data: [DONE]\n\n"))
        await w.drain()
        await asyncio.sleep(0.1)
        w.transport.abort()  # no final chunk: the body is cut, but after [DONE]
        return False

    p = await make_proxy(proxy_config(await raw_origin(done_then_cut), pool={"warm": 0}, probe={"interval": "60s"}))
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", data=b"{}") as r:
        body = await r.read()  # a clean end: no payload error
    assert body == b"data: {}\n\ndata: [DONE]\n\n"  # and no error event after the end


async def test_a_post_read_and_reset_at_once_is_not_sent_again(raw_origin: Any, make_proxy: Any) -> None:
    """A reused connection reset right after a POST went out: the origin may have read it (a
    fast origin reads and fails in microseconds), so it is not re-sent silently; a request
    that is safe to repeat (Idempotency-Key) is, and the re-send shows in the access log's
    attempt_log and in edgeproxy_attempts_total."""
    seen = 0

    async def then_reset_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        nonlocal seen
        seen += 1
        if seen % 2 == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # pooled for the next one
            return True
        w.transport.abort()  # read the whole POST, then reset, with no delay
        return False

    url = await raw_origin(then_reset_at_once)
    p = await make_proxy(proxy_config(url, pool={"warm": 0}, probe={"interval": "60s"}, failover={"retries": 0}))
    assert (await raw(p)).startswith(b"HTTP/1.1 200")
    assert (await raw(p)).startswith(b"HTTP/1.1 502")
    assert seen == 2  # read once, never replayed
    assert (await raw(p)).startswith(b"HTTP/1.1 200")  # (a new connection; pooled again)
    keyed = REQ.replace(b"Content-Length: 2", b"Idempotency-Key: k-1\r\nContent-Length: 2")
    assert (await raw(p, keyed)).startswith(b"HTTP/1.1 200")  # reset, re-sent on a new connection
    assert seen == 5
    attempts = p.proxy.metrics.attempts.values
    assert attempts[("openai", "direct", "stale_connection")] == 1

"""The edge role and `via` lines: sidecar -> (compressed, authenticated hop) -> edge -> origin.

Everything runs for real on localhost: two edgeproxy instances (a sidecar with a `via` line,
an edge whose listener has tokens), the fake origin, the line simulator between sidecar and
edge (it counts the bytes on the hop), TLS with throwaway certificates from `trustme`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import brotli
import openai
import orjson
import pytest
import trustme

from edgeproxy.proto import codec
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin

TOKEN = "edge-token-0123456789abcdef"
MakeProxy = Callable[..., Awaitable[RunningProxy]]

# A chat request with some bulk: a multi-turn conversation (what crosses the hop in real use).
HISTORY = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: please explain the retry policy again. " * 8}
    for i in range(24)
]


def edge_config(origin: Any, **overrides: Any) -> dict[str, Any]:
    """An edge: a listener with tokens, serving the fake origin's endpoints."""
    cfg = proxy_config(origin.url, listen={"address": f"127.0.0.1:{free_port()}", "tokens": [TOKEN]})
    cfg.update(overrides)
    return cfg


def sidecar_config(origin: Any, *edges: str, compress: str = "br", **overrides: Any) -> dict[str, Any]:
    """A sidecar whose only lines are `via` lines to ``edges`` (http://host:port each)."""
    lines = {f"edge{i}": {"via": url, "token": TOKEN, "compress": compress} for i, url in enumerate(edges)}
    cfg = proxy_config(origin.url, lines=lines, probe={"interval": "1s", "timeout": "1s"})
    cfg.update(overrides)
    return cfg


async def ready(proxy: RunningProxy, timeout: float = 5.0) -> None:
    """Wait until every path has answered a probe (the first requests then go somewhere sure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paths = proxy.proxy.state.paths.values()
        if all(p.health.last_probe_ok for p in paths):
            return
        await asyncio.sleep(0.02)
    states = {p.label: (p.health.state, p.health.last_error) for p in proxy.proxy.state.paths.values()}
    raise AssertionError(f"paths not probed in time: {states}")


async def hop_pair(origin: FakeOrigin, make_proxy: MakeProxy, **sidecar: Any) -> tuple[RunningProxy, RunningProxy]:
    edge = await make_proxy(edge_config(origin))
    side = await make_proxy(sidecar_config(origin, edge.url, **sidecar))
    await ready(side)
    return side, edge


# -- end to end with the SDKs --------------------------------------------------------------


@pytest.mark.parametrize("compress", ["br", "gzip", "zstd", "off"])
async def test_openai_sdk_through_sidecar_and_edge(origin: FakeOrigin, make_proxy: MakeProxy, compress: str) -> None:
    side, _ = await hop_pair(origin, make_proxy, compress=compress)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=origin.url + "/v1", api_key="sk-client", max_retries=0)
    messages = [*HISTORY, {"role": "user", "content": "hello edge"}]

    got = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    want = await direct.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert got.choices[0].message.content == want.choices[0].message.content
    # The origin got the body plain and whole (decompressed at the edge), and the client's key.
    seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"]
    assert seen[0].json()["messages"] == messages
    assert seen[0].headers.get("Content-Encoding") is None
    assert seen[0].headers["Authorization"] == "Bearer sk-client"
    assert "x-edgeproxy-token" not in {k.lower() for k in seen[0].headers}

    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == want.choices[0].message.content


async def test_anthropic_sdk_streams_through_the_hop(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    side, _ = await hop_pair(origin, make_proxy)
    client = anthropic.AsyncAnthropic(base_url=side.url + "/anthropic", api_key="sk-ant", max_retries=0)
    direct = anthropic.AsyncAnthropic(base_url=origin.url, api_key="sk-ant", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "stream me"}],
    }
    want = await direct.messages.create(**kwargs)
    async with client.messages.stream(**kwargs) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == want.content[0].text  # type: ignore[union-attr]
    got = await client.messages.create(**kwargs)
    assert got.content == want.content


async def test_hop_carries_compressed_bytes(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """What crosses the hop (counted by the line simulator) is several times smaller, and the
    metrics say so on both sides."""
    edge = await make_proxy(edge_config(origin))
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HISTORY, "stream": True})
    sizes = {}
    for compress in ("off", "br"):
        sim = LineSim("127.0.0.1", edge.proxy.listeners[0].config.port or 0)
        await sim.start()
        try:
            side = await make_proxy(sidecar_config(origin, f"http://{sim.address}", compress=compress))
            await ready(side)
            up0, down0 = sim.bytes_up, sim.bytes_down
            async with aiohttp.ClientSession() as s:
                async with s.post(side.url + "/v1/chat/completions", data=body) as r:
                    assert r.status == 200
                    assert r.headers.get("Content-Encoding") is None  # the app gets plain bytes
                    events = (await r.read()).split(b"\n\n")
            assert events[-2] == b"data: [DONE]"
            await asyncio.sleep(0.05)
            sizes[compress] = (sim.bytes_up - up0, sim.bytes_down - down0)
            raw_stream = side.proxy.metrics.hop_bytes.values.get(("sidecar", "edge0", "down", "raw"), 0)
            async with aiohttp.ClientSession() as s:
                plain = body.replace(b'"stream":true', b'"stream":false')
                headers = {"Accept-Encoding": "identity"}  # (one that takes br would get it passed through)
                async with s.post(side.url + "/v1/chat/completions", data=plain, headers=headers) as r:
                    assert r.status == 200 and (await r.json())["object"] == "chat.completion"
        finally:
            await sim.stop()
    (up_off, down_off), (up_br, down_br) = sizes["off"], sizes["br"]
    assert up_br * 4 < up_off, sizes
    assert down_br * 1.5 < down_off, sizes  # a short fake stream; bench/compress.py measures 500 events
    side_metrics = side.proxy.metrics.hop_bytes.values
    assert side_metrics[("sidecar", "edge0", "up", "wire")] < side_metrics[("sidecar", "edge0", "up", "raw")]
    assert side_metrics[("sidecar", "edge0", "down", "wire")] < side_metrics[("sidecar", "edge0", "down", "raw")]
    assert side_metrics[("sidecar", "edge0", "down", "raw")] > raw_stream  # a JSON answer is counted too
    edge_metrics = edge.proxy.metrics.hop_bytes.values
    assert edge_metrics[("edge", "", "down", "wire")] < edge_metrics[("edge", "", "down", "raw")]


async def test_stream_events_arrive_one_by_one_through_compression(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Per-event flushing: with events 150 ms apart, the client sees each one when it is sent,
    not in a burst at the end."""
    origin.events = 6
    origin.event_interval = 0.15
    side, _ = await hop_pair(origin, make_proxy)
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    arrivals = []
    async with aiohttp.ClientSession() as s:
        async with s.post(side.url + "/v1/chat/completions", data=body) as r:
            start = time.monotonic()
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    _, buf = buf.split(b"\n\n", 1)
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 6
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Most gaps are the origin's interval: events were not held back and bunched up.
    assert sum(1 for g in gaps if g > 0.08) >= len(gaps) - 2, arrivals


async def test_app_that_asks_for_gzip_gets_it_passed_through(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    side, _ = await hop_pair(origin, make_proxy, compress="gzip")
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HISTORY})
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(side.url + "/v1/chat/completions", data=body, headers={"Accept-Encoding": "gzip"}) as r:
            raw = await r.read()
            assert r.headers["Content-Encoding"] == "gzip"
    doc = orjson.loads(codec.decoder("gzip", 1 << 20).feed(raw))
    assert doc["object"] == "chat.completion"


# -- security of the edge ------------------------------------------------------------------


async def raw_request(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()


def hop(target: str, token: str | None = TOKEN, extra: str = "", body: bytes = b"") -> bytes:
    auth = f"x-edgeproxy-token: {token}\r\n" if token is not None else ""
    return f"POST {target} HTTP/1.1\r\nHost: x\r\n{auth}{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_edge_refuses_wrong_or_missing_token(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    target = origin.url + "/v1/chat/completions"
    for token in (None, "wrong-token-0123456789", TOKEN[:-1]):
        status, headers, body = await raw_request(edge.url, hop(target, token))
        assert status == 401
        assert headers["x-edgeproxy-error"] == "unauthorized"
        assert TOKEN.encode() not in body
    assert not [r for r in origin.requests if r.path_only == "/v1/chat/completions"]


async def test_edge_slows_down_repeated_wrong_tokens(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    target = origin.url + "/v1/models"
    times = []
    for _ in range(9):
        started = time.monotonic()
        status, headers, _ = await raw_request(edge.url, hop(target, "wrong-token-0123456789"))
        times.append(time.monotonic() - started)
        assert status == 401
    # The first few mistakes are answered at once (the very first may be slow while a just
    # started proxy warms its pools and probes on a busy machine: a generous bound for it).
    assert times[0] < 1.0 and max(times[1:5]) < 0.1, times
    assert times[-1] >= 0.7, times  # then each one waits longer (0.1, 0.2, 0.4, 0.8 s...)
    assert headers.get("connection", "").lower() == "close"
    # The right token is never held back.
    started = time.monotonic()
    status, _, _ = await raw_request(edge.url, hop(target, TOKEN))
    assert status != 401 and time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:1/v1/chat/completions",  # a port the edge does not serve
        "http://169.254.169.254/latest/meta-data/",  # the classic SSRF target
        "http://evil.example.com/v1/chat/completions",
        "https://{origin}/v1/chat/completions",  # right host and port, wrong scheme
        "http://{origin}/other/path",  # right origin, outside the endpoint's base path
        "http://user:pw@{origin}/v1/models",
        "ftp://{origin}/v1/models",
        "http://{origin}/v1/../other/secret",  # dot segments climbing out of the base path
        "http://{origin}/v1/%2e%2e/other/secret",
        "http://{origin}/v1/./../other",
    ],
)
async def test_edge_is_no_open_relay(origin: FakeOrigin, make_proxy: MakeProxy, target: str) -> None:
    cfg = edge_config(origin)
    cfg["upstreams"] = {"openai": cfg["upstreams"]["openai"]}  # serves <origin>/v1 only
    edge = await make_proxy(cfg)
    edge_port = edge.proxy.listeners[0].config.port
    target = target.format(origin=origin.url.removeprefix("http://"))
    before = len(origin.requests)
    status, headers, body = await raw_request(edge.url, hop(target))
    dots = "/." in target or "%2e" in target  # refused for its path before anything else
    assert (status, headers["x-edgeproxy-error"]) == ((400, "unsafe_path") if dots else (403, "forbidden")), body
    assert len(origin.requests) == before
    # And it really did not connect anywhere else: nothing listens there to tell, so check
    # the edge opened no path (its state only knows its own endpoints).
    assert all(p.endpoint.port in (origin.port, edge_port) for p in edge.proxy.state.paths.values())


async def test_tokenless_listener_takes_no_hop_requests(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    sidecar = await make_proxy(proxy_config(origin.url))
    status, headers, _ = await raw_request(sidecar.url, hop(origin.url + "/v1/models", token=None))
    assert status == 403
    assert headers["x-edgeproxy-error"] == "forbidden"


# -- keys on either side -------------------------------------------------------------------


async def test_edge_injects_its_own_keys(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    origin.require_key = "sk-edge-key"
    cfg = edge_config(origin)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-edge-key"]
    edge = await make_proxy(cfg)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-app-has-none", max_retries=0)
    got = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "k"}])
    assert got.choices[0].message.content
    assert origin.requests[-1].headers["Authorization"] == "Bearer sk-edge-key"


# -- bad compressed data -------------------------------------------------------------------


def brotli_bomb(gib: int) -> bytes:
    c = brotli.Compressor(quality=5)
    zeros = b"\0" * (1 << 22)
    parts = [c.process(zeros) for _ in range(gib * 256)]
    parts.append(c.finish())
    return b"".join(parts)


BOMB = brotli_bomb(1)


async def test_request_bomb_is_refused_quickly(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    started = time.monotonic()
    extra = "Content-Encoding: br\r\n"
    status, _headers, body = await raw_request(
        edge.url, hop(origin.url + "/v1/chat/completions", extra=extra, body=BOMB)
    )
    assert time.monotonic() - started < 2.0
    assert status == 413
    assert b"bomb" in body or b"limit" in body
    assert not [r for r in origin.requests if r.path_only == "/v1/chat/completions"]


async def test_broken_compressed_request_is_a_clear_400(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    good = codec.encode("br", orjson.dumps({"model": "gpt-4o-mini", "messages": HISTORY}))
    for broken in (good[: len(good) // 2], b"not brotli at all" * 10):
        extra = "Content-Encoding: br\r\n"
        status, headers, body = await raw_request(
            edge.url, hop(origin.url + "/v1/chat/completions", extra=extra, body=broken)
        )
        assert status == 400, body
        assert headers["x-edgeproxy-error"] == "bad_encoding"
    assert not [r for r in origin.requests if r.path_only == "/v1/chat/completions"]


class FakeEdge:
    """A misbehaving edge: answers every hop with a fixed compressed body (and a probe OK)."""

    def __init__(self, body: bytes, sse: bool, cut: bool = False) -> None:
        self.body = body
        self.sse = sse
        self.cut = cut
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if b"x-edgeproxy-probe" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                ctype = b"text/event-stream" if self.sse else b"application/json"
                if self.cut:  # chunked, then the connection dies before the last chunk
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype)
                    writer.write(b"\r\nContent-Encoding: br\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"%x\r\n%b\r\n" % (len(self.body), self.body))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.close()
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Encoding: br\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (len(self.body), self.body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_response_bomb_from_an_edge_is_refused(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    fake = FakeEdge(BOMB, sse=False)
    url = await fake.start()
    try:
        side = await make_proxy(sidecar_config(origin, url))
        await ready(side)
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            # (an app that takes br would get the edge's bytes passed through as they are)
            async with s.get(side.url + "/v1/models", headers={"Accept-Encoding": "identity"}) as r:
                body = await r.read()
                assert r.status == 502, body
                assert r.headers["x-edgeproxy-error"] == "bad_encoding_upstream"
        assert time.monotonic() - started < 2.0
    finally:
        fake.stop()


async def test_truncated_compressed_stream_ends_with_an_in_band_error(
    origin: FakeOrigin, make_proxy: MakeProxy
) -> None:
    enc = codec.encoder("br")
    events = b"".join(enc.process(b'data: {"n": %d}\n\n' % i) + enc.flush() for i in range(5))
    fake = FakeEdge(events, sse=True, cut=True)  # never finished: no brotli end, no last chunk
    url = await fake.start()
    try:
        side = await make_proxy(sidecar_config(origin, url))
        await ready(side)
        async with aiohttp.ClientSession() as s:
            async with s.post(side.url + "/v1/chat/completions", data=b"{}") as r:
                assert r.status == 200
                text = await r.read()
        frames = text.split(b"\n\n")
        assert frames[:5] == [b'data: {"n": %d}' % i for i in range(5)]
        assert b'"error"' in frames[5] and b"[DONE]" not in text
    finally:
        fake.stop()


# -- which edge: the whole path --------------------------------------------------------------


async def test_traffic_goes_to_the_edge_with_the_better_whole_path(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Two edges as two `via` lines; the hop to one is degraded (80 ms each way): requests go
    through the other."""
    edges = [await make_proxy(edge_config(origin)) for _ in range(2)]
    sims = [LineSim("127.0.0.1", e.proxy.listeners[0].config.port or 0) for e in edges]
    for sim in sims:
        await sim.start()
    sims[0].delay = 0.08
    try:
        side = await make_proxy(sidecar_config(origin, *(f"http://{s.address}" for s in sims)))
        await ready(side)
        await asyncio.sleep(1.5)  # a couple of probe rounds
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(side.url + "/v1/models") as r:
                    assert r.status == 200
        assert edges[1].proxy.metrics.requests.values.get(("openai", "200"), 0) >= 9
        assert edges[0].proxy.metrics.requests.values.get(("openai", "200"), 0) <= 1
    finally:
        for sim in sims:
            await sim.stop()


async def test_whole_path_score_counts_the_edges_own_rtt(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Two edges, equally close to the sidecar; one is far from the origin (its own line to
    it is 150 ms each way). The sidecar scores hop RTT + the edge's RTT to the origin, so it
    picks the edge near the origin, not just the shortest first leg. (150 ms, not less: on a
    busy machine the near edge's own samples jump by tens of ms, and it once did at 80.)"""
    sim = LineSim("127.0.0.1", origin.port)  # "the origin" as both edges and the sidecar see it
    sim.delay_by_source = {"127.0.0.3": 0.15}  # the far edge's source address
    await sim.start()
    try:
        url = f"http://{sim.address}"
        near = await make_proxy(edge_config(FakeOriginAt(url)))
        far_cfg = edge_config(FakeOriginAt(url), lines={"far": {"bind": "127.0.0.3"}})
        far = await make_proxy(far_cfg)
        side = await make_proxy(sidecar_config(FakeOriginAt(url), far.url, near.url))
        await ready(side)
        paths = {p.line.name: p for p in side.proxy.state.paths.values() if p.upstream == "openai"}
        # A few probe rounds (1 s apart): one sample can jump by a few hundred ms on a busy
        # machine; the smoothed estimate settles.
        deadline = time.monotonic() + 8
        while True:
            await asyncio.sleep(0.2)
            far_srtt, near_srtt = paths["edge0"].estimator.srtt, paths["edge1"].estimator.srtt
            settled = far_srtt is not None and near_srtt is not None and far_srtt > near_srtt + 0.1
            if settled or time.monotonic() > deadline:
                break
        assert settled, (far_srtt, near_srtt)  # the far edge's 300 ms RTT counted
        status = paths["edge0"].status()
        assert status["edge_rtt_ms"] is not None and status["edge_rtt_ms"] > 150  # shown apart too
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(side.url + "/v1/models") as r:
                    assert r.status == 200
        assert near.proxy.metrics.requests.values.get(("openai", "200"), 0) == 5
        assert far.proxy.metrics.requests.values.get(("openai", "200"), 0) == 0
    finally:
        await sim.stop()


class FakeOriginAt:
    """Just the ``url`` of an origin, for the config helpers."""

    def __init__(self, url: str) -> None:
        self.url = url


async def test_tls_hop_with_private_ca(origin: FakeOrigin, make_proxy: MakeProxy, tmp_path: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "edge.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    port = free_port()
    edge = await make_proxy(
        edge_config(
            origin,
            listen={
                "address": f"127.0.0.1:{port}",
                "tokens": [TOKEN],
                "tls": {"cert": str(tmp_path / "edge.pem"), "key": str(tmp_path / "edge.pem")},
            },
        )
    )
    assert edge.proxy.listeners[0].config.tls is not None
    good = sidecar_config(origin)
    good["lines"] = {"tls": {"via": f"https://127.0.0.1:{port}", "token": TOKEN, "ca": str(tmp_path / "ca.pem")}}
    side = await make_proxy(good)
    await ready(side)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    got = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "tls"}])
    assert got.choices[0].message.content

    # A certificate our CA did not sign: the hop is refused, nothing reaches the origin.
    bad = sidecar_config(origin)
    bad["lines"] = {"tls": {"via": f"https://127.0.0.1:{port}", "token": TOKEN, "ca": str(tmp_path / "other-ca.pem")}}
    side_bad = await make_proxy(bad)
    before = len(origin.requests)
    async with aiohttp.ClientSession() as s:
        async with s.get(side_bad.url + "/v1/models") as r:
            body = await r.read()
            assert r.status == 502, body
            assert b"certificate" in body.lower()
    assert len(origin.requests) == before


# -- more of the hop's behaviour -----------------------------------------------------------


async def test_client_compressed_body_passes_through_as_sent(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """An app that gzips its own request body: the origin gets exactly that (with its
    Content-Encoding), directly and through the hop (where the edge may decode it, once)."""
    import gzip
    import hashlib

    plain = orjson.dumps({"model": "gpt-4o-mini", "messages": HISTORY})
    packed = gzip.compress(plain)
    side, _ = await hop_pair(origin, make_proxy)
    direct = await make_proxy(proxy_config(origin.url))
    echoes = []
    for proxy in (direct, side):
        async with aiohttp.ClientSession() as s:
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            async with s.post(proxy.url + "/v1/echo", data=packed, headers=headers) as r:
                assert r.status == 200
                echoes.append(await r.json())
    # Directly: the very bytes the app sent, under its Content-Encoding.
    assert echoes[0]["body_sha256"] == hashlib.sha256(packed).hexdigest()
    assert echoes[0]["headers"]["content-encoding"] == "gzip"
    # Through the hop: the edge decoded it (bounded), so the origin gets it plain, once.
    assert echoes[1]["body_sha256"] == hashlib.sha256(plain).hexdigest()
    assert "content-encoding" not in echoes[1]["headers"]


async def test_wrong_via_token_fails_over_to_another_line(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    cfg = sidecar_config(origin)
    cfg["lines"] = {"edge": {"via": edge.url, "token": "not-the-edge-token-xyz"}, "direct": {}}
    side = await make_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    for _ in range(3):
        got = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        assert got.choices[0].message.content
    path = side.proxy.state.paths[("openai", origin.url + "/v1", "edge")]
    await asyncio.sleep(0.2)
    assert path.health.last_probe_ok is False  # the edge refuses our probes too: the path is not usable
    assert "401" in (path.health.last_error or "")

    # With nowhere else to go, the app gets a clear error (not the edge's 401 as if its key were wrong).
    cfg = sidecar_config(origin)
    cfg["lines"] = {"edge": {"via": edge.url, "token": "not-the-edge-token-xyz"}}
    only = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(only.url + "/v1/models") as r:
            assert r.status == 502
            assert r.headers["x-edgeproxy-error"] == "via_refused"
            assert "not-the-edge-token" not in await r.text()


async def test_edge_without_a_way_to_the_origin_fails_the_whole_path(make_proxy: MakeProxy) -> None:
    """The edge's own line to the origin is dead: its probe answers say so, and the sidecar
    marks the via path down (the first leg alone would look fine)."""
    dead = FakeOriginAt(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    edge = await make_proxy(edge_config(dead))
    side = await make_proxy(sidecar_config(dead, edge.url))
    path = side.proxy.state.paths[("openai", dead.url + "/v1", "edge0")]
    deadline = time.monotonic() + 5
    while path.health.state != "down" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert path.health.state == "down"
    assert "503" in (path.health.last_error or "")


async def test_stream_broken_at_the_origin_reaches_the_app_as_an_in_band_error(
    origin: FakeOrigin, make_proxy: MakeProxy
) -> None:
    origin.drop_after_events = 4
    side, _ = await hop_pair(origin, make_proxy)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a long answer please"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            got.append(chunk)
    assert len(got) >= 1  # what came before the break was delivered
    assert "broke" in str(info.value)


async def test_large_streamed_upload_crosses_the_hop_compressed(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A body over replay_body streams through the hop (compressed on the way) intact."""
    import hashlib

    edge = await make_proxy(edge_config(origin))
    side = await make_proxy(sidecar_config(origin, edge.url, limits={"replay_body": "64KiB"}))
    await ready(side)
    line = b"".join(orjson.dumps({"custom_id": f"r{i}", "body": {"messages": HISTORY[:4]}}) + b"\n" for i in range(400))
    digest = hashlib.sha256(line).hexdigest()
    async with aiohttp.ClientSession() as s:

        async def gen() -> Any:
            for i in range(0, len(line), 50_000):
                yield line[i : i + 50_000]

        async with s.post(side.url + "/v1/files", data=gen(), headers={"Content-Type": "application/jsonl"}) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
    assert doc["bytes"] == len(line) and doc["sha256"] == digest
    metrics = side.proxy.metrics.hop_bytes.values
    assert metrics[("sidecar", "edge0", "up", "wire")] * 5 < metrics[("sidecar", "edge0", "up", "raw")]


async def test_hop_token_never_shows_in_logs_status_or_metrics(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    import os

    edge = await make_proxy(edge_config(origin, admin={"listen": f"127.0.0.1:{free_port()}"}, log={"access": "json"}))
    side = await make_proxy(
        sidecar_config(origin, edge.url, admin={"listen": f"127.0.0.1:{free_port()}"}, log={"access": "json"})
    )
    await ready(side)
    pipes = []
    for proxy in (edge, side):
        r, w = os.pipe()
        os.set_blocking(r, False)
        proxy.proxy.access._fd = w  # capture the access log
        pipes.append((r, w))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            side.url + "/v1/chat/completions", data=orjson.dumps({"model": "m", "messages": HISTORY})
        ) as r:
            assert r.status == 200
        # a wrong token at the edge: its error and log must not echo what was sent either
        status, _, body = await raw_request(edge.url, hop(origin.url + "/v1/models", "guess-guess-guess-guess"))
        assert status == 401 and b"guess" not in body
        await asyncio.sleep(0.05)
        blobs = [os.read(r, 65536) for r, _ in pipes]
        for proxy in (edge, side):
            for url in ("/-/status", "/metrics"):
                async with s.get(proxy.admin_url + url) as resp:
                    blobs.append(await resp.read())
    records = [orjson.loads(x) for x in blobs[0].splitlines()]
    assert any(rec["path"].startswith("http://") and rec["status"] == 200 for rec in records)  # the hop, logged
    for blob in blobs:
        assert TOKEN.encode() not in blob
        assert b"guess-guess" not in blob
    for r, w in pipes:
        os.close(r)
        os.close(w)


async def test_two_endpoints_at_one_origin_are_told_apart(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A relay serving OpenAI at <origin>/v1 and Anthropic at <origin>: an Anthropic request for
    /v1/messages lies under both base paths; the sidecar's endpoint URL says which it is, so
    the edge injects the Anthropic key the Anthropic way."""
    cfg = edge_config(origin)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-openai-on-edge"]
    cfg["upstreams"]["anthropic"]["endpoints"][0]["keys"] = ["sk-ant-on-edge"]
    edge = await make_proxy(cfg)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    client = anthropic.AsyncAnthropic(base_url=side.url + "/anthropic", api_key="unused", max_retries=0)
    await client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    seen = [r for r in origin.requests if r.path_only == "/v1/messages"][-1]
    assert seen.headers["x-api-key"] == "sk-ant-on-edge"
    assert "Authorization" not in seen.headers and "x-edgeproxy-endpoint" not in {k.lower() for k in seen.headers}


# -- found in review: each of these once went wrong --------------------------------------------


async def test_upload_with_content_length_over_replay_body_crosses_the_hop(
    origin: FakeOrigin, make_proxy: MakeProxy
) -> None:
    """A body with a Content-Length, too big to hold for a retry, is streamed, compressed
    (so re-framed as chunked) and decoded at the edge: the origin gets exactly the bytes."""
    import hashlib

    edge = await make_proxy(edge_config(origin))
    side = await make_proxy(sidecar_config(origin, edge.url, limits={"replay_body": "64KiB"}))
    await ready(side)
    data = b"".join(orjson.dumps({"custom_id": f"r{i}", "body": HISTORY[i % 20]}) + b"\n" for i in range(600))
    assert len(data) > 64 * 1024
    async with aiohttp.ClientSession() as s:
        async with s.post(side.url + "/v1/files", data=data, headers={"Content-Type": "application/jsonl"}) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
    assert doc["bytes"] == len(data) and doc["sha256"] == hashlib.sha256(data).hexdigest()


async def test_very_repetitive_body_is_not_taken_for_a_bomb(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """An agent history repeating one 30 KB tool output 150 times (4.7 MB, compresses ~500x) is a
    real request, not a bomb: it reaches the origin whole."""
    side, _ = await hop_pair(origin, make_proxy)
    tool_output = "".join(f"line {i}: def handler_{i}(request): return respond(request, {i})\n" for i in range(450))
    messages = [
        {"role": "user", "content": f"run {i}"} if i % 2 else {"role": "tool", "content": tool_output}
        for i in range(300)
    ]
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": messages})
    assert len(body) > 4_000_000
    async with aiohttp.ClientSession() as s:
        async with s.post(side.url + "/v1/chat/completions", data=body) as r:
            assert r.status == 200, await r.text()
    seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"][-1]
    assert seen.body == body


async def test_answer_in_a_coding_the_app_takes_passes_through(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """A br line, an app that takes gzip (httpx's default): the sidecar asks the edge for gzip
    first, and the answer passes through to the app as it came (no decoding, no size cap)."""
    side, _ = await hop_pair(origin, make_proxy, compress="br")
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HISTORY})
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        headers = {"Accept-Encoding": "gzip, deflate"}
        async with s.post(side.url + "/v1/chat/completions", data=body, headers=headers) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            doc = orjson.loads(codec.decoder("gzip", 1 << 20).feed(await r.read()))
    assert doc["object"] == "chat.completion"


async def test_non_sse_stream_is_not_held_back_by_compression(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Gemini's streamGenerateContent without alt=sse is a JSON array sent piece by piece: the
    edge flushes its compressor after every piece, so the app sees them as they come."""
    origin.events = 5
    origin.event_interval = 0.2
    side, _ = await hop_pair(origin, make_proxy)
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "stream it"}]}]})
    arrivals = []
    async with aiohttp.ClientSession() as s:
        url = side.url + "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent"
        async with s.post(url, data=body, headers={"Accept-Encoding": "identity"}) as r:
            assert r.status == 200
            start = time.monotonic()
            async for _ in r.content.iter_any():
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0] < 0.5, arrivals  # the first piece came at once, not at the end (~1 s)


async def test_models_map_on_the_edge_applies_to_compressed_bodies(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    cfg = edge_config(origin)
    cfg["upstreams"]["openai"]["endpoints"][0]["models"] = {"gpt-4o-mini": "renamed-on-edge"}
    edge = await make_proxy(cfg)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    for messages in ([{"role": "user", "content": "short"}], HISTORY):  # sent plain, then compressed
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"][-1]
        assert seen.json()["model"] == "renamed-on-edge"


def test_wrong_token_throttle_stays_bounded() -> None:
    """However long (and however many at once) someone guesses, the wait stays capped (no
    overflow), and an IPv6 /64 counts as one guesser; memory is bounded."""
    from edgeproxy.engine.auth import AuthThrottle

    throttle = AuthThrottle()
    delays = [throttle.on_failure("203.0.113.9") for _ in range(5000)]  # all at once: they queue
    assert delays[:5] == [0.0] * 5 and max(delays) == pytest.approx(AuthThrottle.MAX_WAIT)
    assert delays[5:9] == pytest.approx([0.1, 0.3, 0.7, 1.5], abs=0.01)  # each after the one before
    for i in range(10):
        delay = throttle.on_failure(f"2001:db8:1:2::{i:x}")
    assert delay > 0  # ten addresses of one /64 were one guesser
    for i in range(AuthThrottle.MAX_PEERS + 100):
        throttle.on_failure(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(throttle._fails) <= AuthThrottle.MAX_PEERS


# -- conversation deltas -------------------------------------------------------------------


async def test_next_turn_of_a_conversation_crosses_as_a_delta(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Turn N re-sends turns 1..N-1: the sidecar sends only what is new (plus the name of the
    body it extends), the edge puts it back together, and the origin gets the whole body."""
    edge = await make_proxy(edge_config(origin))
    sim = LineSim("127.0.0.1", edge.proxy.listeners[0].config.port or 0)
    await sim.start()
    try:
        side = await make_proxy(sidecar_config(origin, f"http://{sim.address}"))
        await ready(side)
        client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
        rng = random.Random(7)
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(rng.choices(words, k=120))}
            for i in range(24)
        ]
        # Tools come after the messages in the body, the same every turn: shared too (a suffix).
        tools = [
            {
                "type": "function",
                "function": {
                    "name": f"tool_{i}",
                    "description": " ".join(rng.choices(words, k=40)),
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                },
            }
            for i in range(8)
        ]
        sent = []
        for turn in range(3):
            messages.append({"role": "user", "content": f"turn {turn}: and what about timeouts?"})
            before = sim.bytes_up
            got = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)  # type: ignore[arg-type]
            sent.append(sim.bytes_up - before)
            messages.append({"role": "assistant", "content": got.choices[0].message.content or ""})
            seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"][-1]
            assert seen.json()["messages"] == messages[:-1]  # whole, in order, every turn
    finally:
        await sim.stop()
    # The first turn is compressed whole; the next ones are a small delta each: their new
    # messages (a few hundred bytes) and the request's headers, not the history nor the tools.
    assert sent[1] * 4 < sent[0] and sent[2] * 4 < sent[0], sent
    assert max(sent[1:]) < 1500, sent


async def test_edge_that_lost_the_base_gets_the_body_whole(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    side, edge = await hop_pair(origin, make_proxy)
    client = openai.AsyncOpenAI(base_url=side.url + "/v1", api_key="sk-client", max_retries=0)
    messages: list[dict[str, str]] = [*HISTORY, {"role": "user", "content": "first"}]
    await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    edge.proxy.bases._bodies.clear()  # as after an edge restart
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    got = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert got.choices[0].message.content
    seen = [r for r in origin.requests if r.path_only == "/v1/chat/completions"]
    assert len(seen) == 2 and seen[-1].json()["messages"] == messages  # once, whole
    assert edge.proxy.metrics.requests.values.get(("openai", "409")) == 1  # the delta it refused


async def test_a_delta_naming_an_unknown_base_is_refused(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    edge = await make_proxy(edge_config(origin))
    extra = "x-edgeproxy-base: 00112233445566778899aabbccddeeff:100\r\n"
    status, headers, _ = await raw_request(edge.url, hop(origin.url + "/v1/chat/completions", extra=extra, body=b"}"))
    assert status == 409 and headers["x-edgeproxy-error"] == "hop_base_unknown"
    assert not [r for r in origin.requests if r.path_only == "/v1/chat/completions"]


async def test_edges_own_keys_refused_reach_the_app_as_an_answer(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """The edge's key was revoked: the app gets the edge's 401 keys_refused (its keys, not our
    hop, are the problem), and the via line is not blamed for it."""
    cfg = edge_config(origin)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-edge-revoked"]
    origin.revoked_keys.add("sk-edge-revoked")
    edge = await make_proxy(cfg)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(side.url + "/v1/models") as r:
                assert r.status == 401
                assert r.headers["x-edgeproxy-error"] == "keys_refused"
    path = side.proxy.state.paths[("openai", origin.url + "/v1", "edge0")]
    assert path.health.state == "up"


async def test_edges_own_keys_refused_leave_the_sidecars_keys_enabled(
    origin: FakeOrigin, make_proxy: MakeProxy
) -> None:
    """Keys on both sides: the edge's refusal (keys_refused, its own keys) is an answer to pass
    on, not a verdict on the sidecar's key; the sidecar used to disable its keys for it."""
    cfg = edge_config(origin)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-edge-revoked"]
    origin.revoked_keys.add("sk-edge-revoked")
    edge = await make_proxy(cfg)
    side_cfg = sidecar_config(origin, edge.url)
    side_cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = ["sk-side-a-0123456789", "sk-side-b-0123456789"]
    side = await make_proxy(side_cfg)
    await ready(side)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(side.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}) as r:
                assert r.status == 401 and r.headers["x-edgeproxy-error"] == "keys_refused"
    pool = next(iter(side.proxy.pipeline.chains["openai"].filters)).pools[origin.url + "/v1"]  # type: ignore[attr-defined]
    assert [k.disabled for k in pool.keys] == [None, None]
    assert origin.key_refused["sk-edge-revoked"] == 1  # once: then the edge answers keys_refused itself
    assert len(origin.requests) == 1


async def test_a_sidecars_refused_key_is_checked_through_the_edge(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Keys on the sidecar only: its check of a refused key crosses the hop to the origin
    (the edge passes it on, it does not answer it like a probe). The revoked key is disabled,
    the restricted one stays, every client request is served."""
    restricted, revoked, good = "sk-side-a-0123456789", "sk-side-b-0123456789", "sk-side-c-0123456789"
    origin.restricted_keys[restricted] = {"gpt-4o"}
    origin.revoked_keys.add(revoked)
    edge = await make_proxy(edge_config(origin))
    side_cfg = sidecar_config(origin, edge.url)
    side_cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = [restricted, revoked, good]
    side = await make_proxy(side_cfg)
    await ready(side)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.post(side.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
    assert origin.key_checks == {restricted: 1, revoked: 1}
    pool = next(iter(side.proxy.pipeline.chains["openai"].filters)).pools[origin.url + "/v1"]  # type: ignore[attr-defined]
    assert [k.disabled for k in pool.keys] == [None, "401", None]


async def test_the_edge_meters_json_answers_before_compressing_them(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Both sides count the tokens of a JSON answer the edge compresses for the hop (the edge
    reads the usage before its compression; before the engine had filters it read the
    compressed bytes and counted nothing)."""
    side, edge = await hop_pair(origin, make_proxy)
    body = {"model": "gpt-4o-mini", "messages": [*HISTORY, {"role": "user", "content": "hi"}]}
    plain = {"Accept-Encoding": "identity"}  # (an answer in a coding the app takes passes, unread)
    async with aiohttp.ClientSession() as s, s.post(side.url + "/v1/chat/completions", json=body, headers=plain) as r:
        assert r.status == 200
        await r.read()
    down = {k: v for k, v in edge.proxy.metrics.hop_bytes.values.items() if k[0] == "edge" and k[2] == "down"}
    assert down, "the edge compressed the answer"
    side_tokens = dict(side.proxy.metrics.tokens.values)
    assert side_tokens and dict(edge.proxy.metrics.tokens.values) == side_tokens

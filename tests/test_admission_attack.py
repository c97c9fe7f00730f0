"""Admission under hostile and heavy conditions (a second review: reloads, drains, stalled and
vanishing clients, hedges, shared answers). Each test's docstring says what a user sees."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import load_dict, load_file
from edgeproxy.ops.server import Proxy
from tests.conftest import RunningProxy, free_port
from tests.fakes.origin import FakeOrigin
from tests.test_admission import admitted, ask, chat, served_order, waiting
from tests.test_admission_edges import the_queue
from tests.test_edge import TOKEN, ready, sidecar_config


async def _reloaded(origin: FakeOrigin, tmp_path: Path, change: Any) -> list[tuple[int, dict[str, str], bytes]]:
    """Three requests wait behind a slow one; the reload ``change(cfg)`` makes; their answers."""
    cfg, conf = admitted(origin, {"max_inflight": 1, "queue_timeout": "5s"}), tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        p = RunningProxy(proxy)
        origin.latency = 0.4
        tasks = [asyncio.ensure_future(ask(p, f"r{i}")) for i in range(4)]
        await waiting(p, 3)
        change(cfg)
        conf.write_text(yaml.safe_dump(cfg))
        ok, detail = await proxy.reload()
        assert ok, detail
        return list(await asyncio.gather(*tasks))
    finally:
        await proxy.stop(1.0)


# -- HIGH: a reload that changes an endpoint fails every waiter with a 502 ------------------------
async def test_a_reload_that_moves_an_endpoint_keeps_the_waiters(
    origin: FakeOrigin, origin2: FakeOrigin, tmp_path: Path
) -> None:
    """ "A reload keeps the queue": but the waiters run on the State they arrived with, and the
    reload closed that State's removed paths' pools. Each waiter granted after the swap plans
    the old endpoint and gets 502 upstream_unreachable "pool is closed": the origin is fine,
    the operator only moved the upstream to another URL (or added a relay, renamed a line)."""

    def move(cfg: dict[str, Any]) -> None:
        cfg["upstreams"]["openai"]["endpoints"] = [{"url": origin2.url + "/v1"}]

    answers = await _reloaded(origin, tmp_path, move)
    assert [(s, h.get("x-edgeproxy-error")) for s, h, _ in answers] == [(200, None)] * 4, [
        b[:120] for _, _, b in answers
    ]


async def test_a_reload_that_removes_the_upstream_does_not_blame_its_origin(origin: FakeOrigin, tmp_path: Path) -> None:
    """The same with the upstream removed: the waiters get 502 "pool is closed" (error kind
    `connect`, code upstream_unreachable): a client and a dashboard read an unreachable
    origin. Served as they were admitted, or told the upstream is gone: either, not that."""

    def remove(cfg: dict[str, Any]) -> None:
        del cfg["upstreams"]["openai"]

    answers = await _reloaded(origin, tmp_path, remove)
    assert answers[0][0] == 200
    for status, headers, body in answers[1:]:
        assert status != 502 and headers.get("x-edgeproxy-error") != "connect", body[:160]


# -- MEDIUM: the drain's end cuts the waiters off without an answer --------------------------------
async def test_waiters_still_queued_when_the_drain_ends_get_a_clean_503(origin: FakeOrigin) -> None:
    """SIGTERM with requests queued: they wait out drain_timeout, then the listener's shutdown
    cancels them and the client reads "Server disconnected" (no status: for a POST it cannot
    tell whether anything was done; the access log says 499 client_disconnected). They never
    reached an origin: a 503 shutting_down with Retry-After is the honest answer, as streams
    get their in-band error."""
    proxy = Proxy(load_dict(admitted(origin, {"max_inflight": 1, "queue_timeout": "20s"})))
    await proxy.start()
    p = RunningProxy(proxy)
    origin.events, origin.event_interval = 100, 0.05  # the slot holder: a 5 s stream
    holder = asyncio.ensure_future(ask(p, "holder", stream=True))
    await origin.wait_requests(1)
    waiters = [asyncio.ensure_future(ask(p, f"w{i}")) for i in range(3)]
    await waiting(p, 3)
    t0 = time.monotonic()
    await proxy.stop(0.5)
    answers = await asyncio.gather(*waiters, return_exceptions=True)
    assert time.monotonic() - t0 < 2.0
    for a in answers:
        assert not isinstance(a, BaseException), repr(a)
        status, headers, _ = a
        assert (status, headers.get("x-edgeproxy-error")) == (503, "shutting_down")
        assert "Retry-After" in headers
    await asyncio.gather(holder, return_exceptions=True)
    assert served_order(origin) == ["holder"]


# -- MEDIUM: "retry in 30s" when a slot frees in a moment ------------------------------------------
async def test_retry_after_is_not_queue_timeout_when_no_one_waits(origin: FakeOrigin, make_proxy: Any) -> None:
    """`queue: 0` (a cap, no waiting): the refused request is told Retry-After: 30 ("retry in
    30s"), i.e. queue_timeout, because no slot was given back yet in the rate window; no one
    waits ahead of it, the slot frees when one request ends (0.3 s here). The OpenAI and
    Anthropic SDKs obey retry-after-ms: a 30 s stall for a 0.3 s blip (seen across a `via` hop
    too: the edge's refusal reaches the sidecar's client as is)."""
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 0}))
    origin.latency = 0.3
    holder = asyncio.ensure_future(ask(p, "holder"))
    await origin.wait_requests(1)
    status, headers, body = await ask(p, "refused")
    assert status == 503 and headers["x-edgeproxy-error"] == "overloaded"
    assert int(headers["Retry-After"]) <= 2, (headers["Retry-After"], body)
    assert (await holder)[0] == 200


# -- LOW/MEDIUM: a high request sharing a low leader's fetch waits as low ------------------------
async def test_a_high_request_sharing_a_queued_low_fetch_waits_as_high(origin: FakeOrigin, make_proxy: Any) -> None:
    """With the cache on, a request that asks what a queued request asks shares its fetch
    (no slot of its own): the fetch stays in the leader's class. A high (chat) client asking
    what a low (batch) client asks waits behind the whole low backlog, where alone it would
    have gone next: priority inversion."""
    cfg = admitted(origin, {"max_inflight": 1})
    cfg["upstreams"]["openai"]["cache"] = {"ttl": "1h"}
    p = await make_proxy(cfg)
    origin.latency = 1.0
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    lows = [asyncio.ensure_future(ask(p, f"low{i}", "low")) for i in range(6)]
    await waiting(p, 6)
    low_same = asyncio.ensure_future(ask(p, "same", "low"))
    await waiting(p, 7)
    high_same = asyncio.ensure_future(ask(p, "same", "high"))
    await asyncio.sleep(0.1)
    origin.latency = 0.05
    status, headers, _ = await high_same
    assert status == 200 and headers.get("x-edgeproxy-cache") == "coalesced"
    await asyncio.gather(blocker, low_same, *lows)
    assert served_order(origin).index("same") == 1, served_order(origin)


# -- hedges took origin capacity from the waiters (they shared their request's slot) ------------
async def test_hedges_do_not_take_the_origin_capacity_waiters_queue_for(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """max_inflight 2 with failover.hedge: while 18 requests wait for a slot, every admitted
    request that is slow hedges, and the origins serve 4 at once: the cap an operator sets to
    stay under a provider's concurrency limit is doubled exactly when the upstream is
    saturated, and the hedges run ahead of requests that waited."""
    cfg = admitted(origin, {"max_inflight": 2})
    cfg["upstreams"]["openai"]["endpoints"] = [{"url": origin.url + "/v1"}, {"url": origin2.url + "/v1"}]
    cfg["upstreams"]["openai"]["failover"] = {"hedge": "50ms"}
    p = await make_proxy(cfg)
    origin.latency = origin2.latency = 0.3
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, origin.serving + origin2.serving)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    answers = await asyncio.gather(*(ask(p, f"r{i}") for i in range(20)))
    watcher.cancel()
    assert {a[0] for a in answers} == {200}
    assert peak <= 2, f"max_inflight 2, yet {peak} at the origins at once"


# -- LOW (design): a body too big to replay holds its slot while it trickles in -------------------
@pytest.mark.xfail(strict=True, reason="a body past limits.replay_body streams to the origin on its slot; not fixed")
async def test_a_slow_upload_past_replay_body_does_not_hold_a_slot(origin: FakeOrigin, make_proxy: Any) -> None:
    """A body within limits.replay_body is read before the plan: a slow uploader holds no slot
    (checked: fine). A bigger one is streamed to the origin from the slot's first attempt, so
    an upload that sends a little every body_timeout holds a slot as long as it likes while
    the origin has nothing to work on, and the queue behind it times out (503 here)."""
    limits = {"replay_body": "1kb", "buffer_memory": "10mb"}
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue_timeout": "1s"}, limits=limits))
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y" * 5000}]})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    _reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
    try:
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:-10])  # ... and stalls
        await asyncio.sleep(0.3)
        status, headers, _ = await ask(p, "other")
        assert status == 200, headers.get("x-edgeproxy-error")
    finally:
        writer.close()


# -- checks that pass (kept as regression guards) ---------------------------------------------------
async def test_thousands_of_vanishing_waiters_leave_nothing_behind(origin: FakeOrigin, make_proxy: Any) -> None:
    """3,000 clients queue and drop their connections while the head never moves: the lines
    stay compacted (dead tickets <= 64 + waiting), the engine forgets each request."""
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 100000, "queue_timeout": "60s"}))
    origin.latency = 30
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    queue = the_queue(p)
    port = int(p.url.rsplit(":", 1)[1])
    body = orjson.dumps(chat("x"))
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    req += b"x-edgeproxy-priority: low\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    try:
        for _ in range(15):
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            for _, w in conns:
                w.write(req)
            await waiting(p, 200)
            for _, w in conns:
                w.transport.abort()
            await waiting(p, 0)
            assert sum(len(line) for line in queue._lines.values()) <= 64 + 1
        await asyncio.sleep(0.1)
        assert len(p.proxy.listeners[0].engine._inflight) == 1  # the blocker
    finally:
        blocker.cancel()
        await asyncio.gather(blocker, return_exceptions=True)


async def test_a_client_that_stops_reading_its_stream_frees_the_slot(origin: FakeOrigin, make_proxy: Any) -> None:
    """The slot of a stream whose client reads nothing is freed after stream_idle_timeout."""
    import socket

    cfg = admitted(origin, {"max_inflight": 1, "queue_timeout": "10s"})
    cfg["upstreams"]["openai"]["failover"] = {"stream_idle_timeout": "1s"}
    p = await make_proxy(cfg)
    origin.reply, origin.events = "x" * (12 << 20), 200
    body = orjson.dumps(chat("s", True))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", int(p.url.rsplit(":", 1)[1])))
        s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        await asyncio.sleep(0.3)
        assert the_queue(p).inflight == 1
        origin.reply = None
        t0 = time.monotonic()
        assert (await ask(p, "other"))[0] == 200
        assert time.monotonic() - t0 < 2.0
    finally:
        s.close()


async def test_an_overloaded_edge_does_not_take_the_hop_down(origin: FakeOrigin, make_proxy: Any) -> None:
    """Across a `via` hop the edge's 503 overloaded reaches the sidecar's client as is (with its
    Retry-After), and the sidecar's path stays usable once the burst is over."""
    listen = {"address": f"127.0.0.1:{free_port()}", "tokens": [{"token": TOKEN, "name": "side"}]}
    edge = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 0}, listen=listen))
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    origin.latency = 0.3
    answers = await asyncio.gather(*(ask(side, f"b{i}") for i in range(6)))
    assert sorted(a[0] for a in answers) == [200] + [503] * 5
    assert all(a[1]["x-edgeproxy-error"] == "overloaded" for a in answers if a[0] == 503)
    origin.latency = 0.01
    assert (await ask(side, "after"))[0] == 200

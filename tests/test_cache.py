"""The response cache and request coalescing, through a real edgeproxy to the fake origin."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import ConfigError, load_dict, load_file
from edgeproxy.engine import Flight
from edgeproxy.filters.cache import _storable
from edgeproxy.filters.cachestore import Entry, MemoryStore, decode, encode
from edgeproxy.ops.server import Proxy
from tests.conftest import RedisServer, RunningProxy, proxy_config
from tests.fakes.origin import FakeOrigin

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "classify this"}]}
STREAM = {**CHAT, "stream": True}


def cached(origin: FakeOrigin, upstream_cache: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    cfg = proxy_config(origin.url, **over)
    cfg["upstreams"]["openai"]["cache"] = upstream_cache or {"ttl": "1h"}
    return cfg


async def ask(
    p: RunningProxy, body: Any = CHAT, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            p.url + "/v1/chat/completions",
            data=raw if raw is not None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def calls(origin: FakeOrigin) -> int:
    return len([r for r in origin.requests if r.path.endswith("/chat/completions")])


async def test_a_repeated_request_is_answered_from_the_cache(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin))
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-a", max_retries=0)
    first = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    second = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert first.headers["x-edgeproxy-cache"] == "miss" and second.headers["x-edgeproxy-cache"] == "hit"
    assert second.parse().id == first.parse().id  # the same answer (the origin numbers its answers)
    assert first.headers["x-request-id"] != second.headers["x-request-id"]  # each its own request id
    assert calls(origin) == 1
    saved = p.proxy.metrics.tokens_saved.values.get(("openai",), 0)
    assert saved == first.parse().usage.total_tokens  # a hit's tokens are saved, not spent


async def test_the_same_json_written_another_way_is_the_same_request(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin))
    status, _, body = await ask(p)
    other = b'{ "messages" : [ {"content": "classify this", "role": "user"} ],\n  "model": "gpt-4o-mini" }'
    status2, headers, body2 = await ask(p, raw=other)
    assert (status, status2, headers["x-edgeproxy-cache"]) == (200, 200, "hit")
    assert body2 == body and calls(origin) == 1
    _, headers, _ = await ask(p, {**CHAT, "temperature": 0})  # another request: another entry
    assert headers["x-edgeproxy-cache"] == "miss" and calls(origin) == 2


async def test_a_stream_is_replayed_byte_for_byte(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin))
    status, headers, first = await ask(p, STREAM)
    assert status == 200 and headers["x-edgeproxy-cache"] == "miss" and first.rstrip().endswith(b"data: [DONE]")
    status, headers, second = await ask(p, STREAM)
    assert status == 200 and headers["x-edgeproxy-cache"] == "hit"
    assert headers["Content-Type"].startswith("text/event-stream")
    assert second == first and calls(origin) == 1
    _, headers, _ = await ask(p, CHAT)  # the non-stream form of the prompt is another entry
    assert headers["x-edgeproxy-cache"] == "miss"


async def test_tenants_never_share_answers_unless_the_operator_says(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin))
    _, _, a = await ask(p, headers={"Authorization": "Bearer sk-alice"})
    _, headers, b = await ask(p, headers={"Authorization": "Bearer sk-bob"})
    assert headers["x-edgeproxy-cache"] == "miss" and a != b and calls(origin) == 2
    _, headers, a2 = await ask(p, headers={"Authorization": "Bearer sk-alice"})
    assert headers["x-edgeproxy-cache"] == "hit" and a2 == a

    shared = await make_proxy(cached(origin, {"ttl": "1h", "shared": True}))
    _, _, a = await ask(shared, headers={"Authorization": "Bearer sk-alice"})
    _, headers, b = await ask(shared, headers={"Authorization": "Bearer sk-bob"})
    assert headers["x-edgeproxy-cache"] == "hit" and a == b


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["json", "sse"])
async def test_identical_requests_at_once_go_upstream_once(
    origin: FakeOrigin, make_proxy: Any, body: dict[str, Any]
) -> None:
    origin.latency, origin.events, origin.event_interval = 0.3, 8, 0.02
    p = await make_proxy(cached(origin))
    results = await asyncio.gather(*(ask(p, body) for _ in range(40)))
    assert calls(origin) == 1
    assert {r[0] for r in results} == {200}
    assert len({r[2] for r in results}) == 1  # 40 identical answers (events in order)
    kinds = sorted(r[1]["x-edgeproxy-cache"] for r in results)
    assert kinds.count("miss") == 1 and kinds.count("coalesced") == 39


async def test_shared_streams_count_as_active_streams(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.events, origin.event_interval = 8, 0.1
    p = await make_proxy(cached(origin))
    sharers = [asyncio.ensure_future(ask(p, STREAM)) for _ in range(3)]
    await origin.wait_requests(1)
    await asyncio.sleep(0.3)  # mid-stream: every client's stream is being relayed
    assert p.proxy.metrics.active_streams.values.get(("openai",)) == 3
    assert [r[0] for r in await asyncio.gather(*sharers)] == [200] * 3
    assert p.proxy.metrics.active_streams.values.get(("openai",)) == 0


async def test_the_leader_leaving_does_not_cancel_the_others_answer(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.latency, origin.events, origin.event_interval = 0.3, 10, 0.05  # the others join before it leaves
    p = await make_proxy(cached(origin))

    async def leave_after_first_event() -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.post(p.url + "/v1/chat/completions", json=STREAM) as r,
        ):
            await r.content.readline()  # the first event, then the client goes away

    leader = asyncio.ensure_future(leave_after_first_event())
    await asyncio.sleep(0.05)
    followers = [asyncio.ensure_future(ask(p, STREAM)) for _ in range(3)]
    await leader
    results = await asyncio.gather(*followers)
    assert [r[0] for r in results] == [200] * 3
    assert all(r[2].rstrip().endswith(b"data: [DONE]") for r in results)
    assert len({r[2] for r in results}) == 1 and calls(origin) == 1
    await asyncio.sleep(0.1)
    _, headers, again = await ask(p, STREAM)  # and the whole answer was stored
    assert headers["x-edgeproxy-cache"] == "hit" and again == results[0][2]


async def test_a_failed_fetch_gives_every_sharer_the_same_error_and_stores_nothing(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    origin.latency, origin.fail_status = 0.2, 400  # (a 4xx: not retried)
    p = await make_proxy(cached(origin))
    results = await asyncio.wait_for(asyncio.gather(*(ask(p) for _ in range(5))), 5.0)  # never a hang
    assert {r[0] for r in results} == {400} and len({r[2] for r in results}) == 1
    origin.fail_status = None
    status, headers, _ = await ask(p)
    assert status == 200 and headers["x-edgeproxy-cache"] == "miss"


async def test_a_broken_stream_is_not_stored(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.events, origin.drop_after_events, origin.drop_times = 6, 3, 1
    p = await make_proxy(cached(origin))
    status, _, body = await ask(p, STREAM)
    assert status == 200 and b"[DONE]" not in body and b"error" in body  # the in-band error
    status, headers, body = await ask(p, STREAM)
    assert headers["x-edgeproxy-cache"] == "miss" and body.rstrip().endswith(b"data: [DONE]")


async def test_the_client_says_how_its_request_uses_the_cache(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin))
    await ask(p)
    _, headers, _ = await ask(p, headers={"x-edgeproxy-cache": "off"})
    assert headers["x-edgeproxy-cache"] == "bypass" and calls(origin) == 2
    _, headers, _ = await ask(p, headers={"Cache-Control": "no-store"})
    assert headers["x-edgeproxy-cache"] == "bypass" and calls(origin) == 3
    _, headers, fresh = await ask(p, headers={"Cache-Control": "no-cache"})
    assert headers["x-edgeproxy-cache"] == "miss" and calls(origin) == 4
    await asyncio.sleep(0.05)
    _, headers, body = await ask(p)
    assert headers["x-edgeproxy-cache"] == "hit" and body == fresh  # refreshed
    _, headers, _ = await ask(p, {**CHAT, "n": 2}, headers={"x-edgeproxy-cache": "ttl=300ms"})
    await asyncio.sleep(0.05)
    assert (await ask(p, {**CHAT, "n": 2}))[1]["x-edgeproxy-cache"] == "hit"
    await asyncio.sleep(0.4)
    assert (await ask(p, {**CHAT, "n": 2}))[1]["x-edgeproxy-cache"] == "miss"  # its own TTL is over
    status, _, error = await ask(p, headers={"x-edgeproxy-cache": "forever"})
    assert status == 400 and b"x-edgeproxy-cache" in error


async def test_answers_over_max_entry_are_not_stored(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(cached(origin, cache={"max_entry": "1KiB"}))
    origin.events = 40
    await ask(p, STREAM)  # a stream of 40 events: several KB
    _, headers, _ = await ask(p, STREAM)
    assert headers["x-edgeproxy-cache"] == "miss"
    await ask(p)  # a small JSON answer fits
    await asyncio.sleep(0.05)
    assert (await ask(p))[1]["x-edgeproxy-cache"] == "hit"


async def test_an_upstream_without_cache_is_untouched(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url))
    _, headers, _ = await ask(p)
    _, headers, _ = await ask(p)
    assert "x-edgeproxy-cache" not in headers and calls(origin) == 2


async def test_the_memory_store_drops_the_least_recently_used_first() -> None:
    store = MemoryStore(max_memory=3000)
    entry = Entry(200, (("content-type", "application/json"),), b"x" * 900, False, 5)
    for key in (b"a", b"b", b"c"):
        await store.put(key, entry, 60)
    assert await store.get(b"a") is not None  # a is used: b is now the oldest
    await store.put(b"d", entry, 60)
    assert await store.get(b"b") is None and await store.get(b"a") is not None
    assert store.evictions == 1 and store.stored_bytes <= 3000
    await store.put(b"e", entry, 0.01)
    await asyncio.sleep(0.02)
    assert await store.get(b"e") is None  # expired
    assert decode(encode(entry)) == entry and decode(b"not ours") is None


def test_cache_config_errors_name_the_key_path() -> None:
    cfg = proxy_config("http://127.0.0.1:1", cache={"store": "memcached://x", "max_entry": "1"})
    cfg["upstreams"]["openai"]["cache"] = {"tll": "1h"}
    with pytest.raises(ConfigError) as err:
        load_dict(cfg)
    text = str(err.value)
    assert "cache.store" in text and "cache.max_entry" in text and "upstreams.openai.cache.tll" in text


async def test_a_redis_store_shares_answers_across_proxies(
    origin: FakeOrigin, make_proxy: Any, redis_server: RedisServer
) -> None:
    """Two edgeproxy processes (two hosts) naming one Redis: one upstream call between them."""
    a = await make_proxy(cached(origin, cache={"store": redis_server.url}))
    b = await make_proxy(cached(origin, cache={"store": redis_server.url}))
    _, headers, first = await ask(a, STREAM)
    assert headers["x-edgeproxy-cache"] == "miss"
    await asyncio.sleep(0.1)  # (the write to Redis goes on after the answer)
    _, headers, second = await ask(b, STREAM)
    assert headers["x-edgeproxy-cache"] == "hit" and second == first and calls(origin) == 1


async def test_redis_going_away_costs_no_client_anything(
    origin: FakeOrigin, make_proxy: Any, redis_server: RedisServer
) -> None:
    p = await make_proxy(cached(origin, cache={"store": redis_server.url}))
    await ask(p)
    await asyncio.sleep(0.1)
    assert (await ask(p))[1]["x-edgeproxy-cache"] == "hit"
    redis_server.stop()
    results = await asyncio.gather(*(ask(p, {**CHAT, "seed": i}) for i in range(50)))
    assert {r[0] for r in results} == {200}  # 0 client errors
    assert {r[1]["x-edgeproxy-cache"] for r in results} <= {"miss", "bypass"}
    assert p.proxy.metrics.cache_errors.values or any(r[1]["x-edgeproxy-cache"] == "bypass" for r in results)
    redis_server.start()
    loop = asyncio.get_running_loop()
    deadline, seed = loop.time() + 15, 1000
    while loop.time() < deadline:  # the back-off ends, the store is asked again, it answers
        seed += 1
        await ask(p, {**CHAT, "seed": seed})
        await asyncio.sleep(0.1)
        if (await ask(p, {**CHAT, "seed": seed}))[1]["x-edgeproxy-cache"] == "hit":
            break
        await asyncio.sleep(0.4)
    else:
        raise AssertionError("the cache did not recover when Redis came back")


async def test_when_every_client_has_left_the_origin_stops_generating(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.events, origin.event_interval = 40, 0.05
    p = await make_proxy(cached(origin))
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=STREAM) as r:
        await r.content.readline()  # the first event; then the only client asking goes away
    await origin.wait_disconnects(1, 2.0)  # the fetch was cancelled: its connection closed
    _, headers, body = await ask(p, STREAM)
    assert headers["x-edgeproxy-cache"] == "miss" and body.rstrip().endswith(b"data: [DONE]")


async def test_a_reload_keeps_the_cache(origin: FakeOrigin, tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    cfg = cached(origin)
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        p = RunningProxy(proxy)
        _, _, first = await ask(p)
        cfg["upstreams"]["openai"]["cache"] = {"ttl": "2h"}  # the upstream's TTL changes, the store does not
        conf.write_text(yaml.safe_dump(cfg))
        ok, summary = await proxy.reload()
        assert ok, summary
        _, headers, again = await ask(p)
        assert headers["x-edgeproxy-cache"] == "hit" and again == first
    finally:
        await proxy.stop(1.0)


async def test_the_access_log_and_metrics_say_what_the_cache_did(
    origin: FakeOrigin, make_proxy: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    p = await make_proxy(cached(origin, log={"access": "json"}))
    for _ in range(2):
        await ask(p, headers={"Authorization": "Bearer sk-secret-alice"})
    await asyncio.sleep(0.3)  # (the access log is written without blocking)
    records = [orjson.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [r.get("cache") for r in records if r.get("path") == "/v1/chat/completions"] == ["miss", "hit"]
    metrics = p.proxy.metrics.render().decode()
    assert 'edgeproxy_cache_requests_total{result="hit",upstream="openai"} 1.0' in metrics
    assert 'edgeproxy_cache_entries{store="memory"} 1.0' in metrics
    assert "sk-secret-alice" not in metrics


async def test_what_changes_the_answer_is_in_the_key_and_state_changes_are_never_cached(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(cached(origin))
    await ask(p, headers={"anthropic-beta": "a", "Accept-Encoding": "gzip"})
    _, headers, _ = await ask(p, headers={"anthropic-beta": "b"})
    assert headers["x-edgeproxy-cache"] == "miss"  # another API beta: another answer
    assert "accept-encoding" not in {k.lower() for k in origin.requests[-1].headers}  # a plain answer, for anyone
    for _ in range(2):
        async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/threads/t1/messages", json=CHAT) as r:
            assert r.headers["x-edgeproxy-cache"] == "bypass"
    assert len([r for r in origin.requests if "/threads/" in r.path]) == 2  # both reached the API


def test_only_a_whole_clean_answer_is_stored_and_without_its_per_request_headers() -> None:
    def flight(body: bytes, ctype: str = "text/event-stream", **extra: str) -> Flight:
        f = Flight(b"k")
        f.begin(200, [("Content-Type", ctype), ("Set-Cookie", "__cf_bm=x"), ("x-ratelimit-remaining-requests", "9"),
                      *extra.items()], ctype == "text/event-stream")  # fmt: skip
        f.add(body)
        f.finish()
        return f

    done = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    entry = _storable(flight(done), 3, 1 << 20, "openai", False)
    assert entry is not None and entry.body == done
    assert [k for k, _ in entry.headers] == ["Content-Type"]  # no cookie, no rate-limit counters
    error_then_done = b'data: {"error": {"message": "' + b"x" * 600 + b'"}}\n\ndata: [DONE]\n\n'
    assert _storable(flight(error_then_done), 0, 1 << 20, "openai", False) is None
    assert _storable(flight(done[:-16]), 0, 1 << 20, "openai", False) is None  # no [DONE]: cut short
    assert _storable(flight(done, **{"Cache-Control": "no-store"}), 0, 1 << 20, "openai", False) is None
    assert _storable(flight(done, **{"Cache-Control": "private"}), 0, 1 << 20, "openai", True) is None
    assert _storable(flight(done, **{"Content-Encoding": "gzip"}), 0, 1 << 20, "openai", False) is None
    assert _storable(flight(b'{"id": 1}', "application/json"), 0, 4, "openai", False) is None  # over max_entry


async def test_an_error_edgeproxy_answers_on_a_caching_upstream_says_what_the_cache_did(make_proxy: Any) -> None:
    dead = FakeOrigin()
    await dead.start()
    url = dead.url
    await dead.stop()  # nothing listens there any more
    cfg = proxy_config(url, failover={"retries": 0})
    cfg["upstreams"]["openai"]["cache"] = {"ttl": "1h"}
    p = await make_proxy(cfg)
    status, headers, _ = await ask(p)
    assert status == 502 and headers["x-edgeproxy-cache"] == "miss"

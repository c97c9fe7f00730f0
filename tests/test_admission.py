"""Admission control (priorities, a concurrency cap, a fair queue) and weighted endpoints,
through a real edgeproxy to the fake origin."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import ConfigError, load_dict, load_file
from edgeproxy.ops.server import Proxy
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_cli import run_cli
from tests.test_edge import TOKEN, ready, sidecar_config

BATCH = "batch-token-0123456789abcdef"
CHAT_TOKEN = "chat-token-0123456789abcdef"


def admitted(origin: FakeOrigin, admission: dict[str, Any], **over: Any) -> dict[str, Any]:
    cfg = proxy_config(origin.url, **over)
    cfg["upstreams"]["openai"]["admission"] = admission
    return cfg


def chat(tag: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": tag}]}
    return {**body, "stream": True} if stream else body


async def ask(
    p: RunningProxy, tag: str, priority: str | None = None, headers: dict[str, str] | None = None, stream: bool = False
) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if priority is not None:
        h["x-edgeproxy-priority"] = priority
    url = p.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, json=chat(tag, stream), headers=h) as r:
        return r.status, dict(r.headers), await r.read()


def served_order(origin: FakeOrigin) -> list[str]:
    """The tags of the chat requests in the order the origin got them."""
    return [r.json()["messages"][0]["content"] for r in origin.requests if r.path.endswith("/chat/completions")]


async def waiting(p: RunningProxy, n: int) -> None:
    """Until ``n`` requests wait in the openai upstream's queue."""
    queue = next(f.queue for f in p.proxy.pipeline.chains["openai"].all_filters() if hasattr(f, "queue"))
    for _ in range(500):
        if queue.queued == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{queue.queued} waiting, not {n}")


# -- config ---------------------------------------------------------------------------------------
def test_config_errors_name_the_key_path(origin: FakeOrigin) -> None:
    cfg = admitted(origin, {"max_inflight": 0, "queue": "lots", "queue_timeout": "soon", "burst": 1})
    cfg["upstreams"]["openai"]["endpoints"][0]["weight"] = -2
    cfg["listen"] = [{"address": "127.0.0.1:1", "tokens": [{"token": BATCH, "priority": "urgent"}, {"name": "x"}]}]
    with pytest.raises(ConfigError) as err:
        load_dict(cfg)
    text = str(err.value)
    for path in (
        "upstreams.openai.admission.max_inflight",
        "upstreams.openai.admission.queue:",
        "upstreams.openai.admission.queue_timeout",
        "upstreams.openai.admission.burst: unknown key",
        "upstreams.openai.endpoints[0].weight",
        "listen[0].tokens[0].priority: 'urgent' is not one of high, normal, low",
        "listen[0].tokens[1].token: missing",
    ):
        assert path in text
    assert BATCH not in text


# -- the cap and the queue ------------------------------------------------------------------------
async def test_the_origin_never_sees_more_than_max_inflight(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 2}))
    origin.latency = 0.15
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-a", max_retries=0)
    answers = await asyncio.gather(*(client.chat.completions.create(**chat(f"r{i}")) for i in range(7)))
    assert [a.choices[0].message.content for a in answers] == [f"echo: r{i}" for i in range(7)]
    assert origin.max_serving == 2  # the other five waited in edgeproxy, not at the origin


async def test_high_goes_before_low_that_came_first_and_low_is_not_starved(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1}))
    origin.latency = 1.0  # (the blocker holds the one slot while the others queue)
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    lows = [asyncio.ensure_future(ask(p, f"low{i}", "low")) for i in range(3)]
    await waiting(p, 3)
    highs = [asyncio.ensure_future(ask(p, f"high{i}", "high")) for i in range(12)]
    await waiting(p, 15)
    origin.latency = 0.01
    results = await asyncio.gather(blocker, *lows, *highs)
    assert all(status == 200 for status, _, _ in results)
    order = served_order(origin)
    assert order[1] == "high0"  # the high that came last went first
    # ... but low, there before, keeps a share: one slot in ten while every class waits
    assert order.index("low0") <= 3
    assert order.index("low1") <= 12


async def test_a_full_queue_answers_503_with_retry_after_in_the_providers_shape(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 2}))
    origin.latency = 2.0
    first = [asyncio.ensure_future(ask(p, f"r{i}")) for i in range(3)]
    await waiting(p, 2)
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-a", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(**chat("one too many"))
    origin.latency = 0.01
    assert err.value.status_code == 503
    assert err.value.response.headers["x-edgeproxy-error"] == "overloaded"
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert "queue is full" in err.value.message
    assert [s for s, _, _ in await asyncio.gather(*first)] == [200, 200, 200]  # those already queued: served
    assert "one too many" not in served_order(origin)


async def test_a_full_queue_turns_away_the_newest_low_not_a_high(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 2}))
    origin.latency = 1.0
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    low0 = asyncio.ensure_future(ask(p, "low0", "low"))
    await waiting(p, 1)
    low1 = asyncio.ensure_future(ask(p, "low1", "low"))
    await waiting(p, 2)
    origin.latency = 0.01
    high, turned_away = await asyncio.wait_for(asyncio.gather(ask(p, "high", "high"), low1), 5)
    assert high[0] == 200
    assert turned_away[0] == 503 and turned_away[1]["x-edgeproxy-error"] == "overloaded"  # low1 made room
    assert (await low0)[0] == 200 and (await blocker)[0] == 200
    assert served_order(origin) == ["blocker", "high", "low0"]


async def test_a_request_waits_no_longer_than_queue_timeout(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue_timeout": "300ms"}))
    origin.latency = 1.5
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    t0 = time.monotonic()
    status, headers, body = await ask(p, "late")
    took = time.monotonic() - t0
    assert status == 503 and headers["x-edgeproxy-error"] == "overloaded" and "Retry-After" in headers
    assert 0.25 <= took < 1.2  # its deadline, not the blocker's end
    assert b"queue_timeout" in body
    assert (await blocker)[0] == 200


async def test_a_client_that_leaves_the_queue_frees_its_place(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1, "queue": 1}))
    origin.latency = 1.0
    blocker = asyncio.ensure_future(ask(p, "blocker"))
    await origin.wait_requests(1)
    leaver = asyncio.ensure_future(ask(p, "leaver"))
    await waiting(p, 1)
    leaver.cancel()
    await waiting(p, 0)
    origin.latency = 0.01
    assert (await ask(p, "next"))[0] == 200  # the queue's one place was free again
    assert (await blocker)[0] == 200
    assert "leaver" not in served_order(origin)


async def test_a_stream_holds_its_slot_to_its_end(origin: FakeOrigin, make_proxy: Any, tmp_path: Path) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 1}))
    origin.events, origin.event_interval = 6, 0.05
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        stream = asyncio.ensure_future(ask(p, "stream", stream=True))
        await origin.wait_requests(1)
        status, _, _ = await ask(p, "after", "high")
        assert status == 200 and (await stream)[0] == 200
        await asyncio.sleep(0.05)
    records = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    after = next(r for r in records if r["priority"] == "high")
    assert after["queue_ms"] >= 150  # it waited for the stream's events (about 0.25 s of them)


# -- who asks --------------------------------------------------------------------------------------
async def test_a_tokens_class_is_its_default_and_its_cap(origin: FakeOrigin, make_proxy: Any, tmp_path: Path) -> None:
    listen = [
        {
            "address": f"127.0.0.1:{free_port()}",
            "tokens": [
                {"token": BATCH, "name": "batch", "priority": "low", "max_priority": "low"},
                {"token": CHAT_TOKEN, "name": "chat"},
            ],
        }
    ]
    p = await make_proxy(admitted(origin, {"max_inflight": 4}, listen=listen))
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        assert (await ask(p, "b1", headers={"x-edgeproxy-token": BATCH}))[0] == 200
        assert (await ask(p, "b2", "high", headers={"x-edgeproxy-token": BATCH}))[0] == 200  # asks above its cap
        assert (await ask(p, "c1", headers={"x-edgeproxy-token": CHAT_TOKEN}))[0] == 200
        assert (await ask(p, "c2", "high", headers={"x-edgeproxy-token": CHAT_TOKEN}))[0] == 200
        await asyncio.sleep(0.05)
    text = log_path.read_text()
    records = [orjson.loads(line) for line in text.splitlines()]
    assert [(r["client"], r["priority"]) for r in records] == [
        ("batch", "low"),
        ("batch", "low"),  # lowered to its cap, not refused
        ("chat", "normal"),
        ("chat", "high"),
    ]
    assert all(r["queue_ms"] >= 0 for r in records)
    assert BATCH not in text and CHAT_TOKEN not in text


async def test_an_unknown_priority_is_a_clear_400(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(admitted(origin, {"max_inflight": 4}))
    status, _, body = await ask(p, "x", "urgent")
    assert status == 400 and b"x-edgeproxy-priority must be high, normal or low" in body
    assert served_order(origin) == []


async def test_without_admission_the_priority_header_costs_nothing_and_goes_nowhere(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(proxy_config(origin.url))
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        assert (await ask(p, "x", "whatever"))[0] == 200  # not ours to judge when admission is off
        await asyncio.sleep(0.05)
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert "priority" not in record and "queue_ms" not in record
    assert "x-edgeproxy-priority" not in {k.lower() for k in origin.requests[-1].headers}  # never sent upstream


# -- keys are what is short -------------------------------------------------------------------------
KEYS = ["sk-adm-key-0000000000000000"]


def keyed(origin: FakeOrigin, admission: dict[str, Any]) -> dict[str, Any]:
    cfg = admitted(origin, admission)
    cfg["upstreams"]["openai"]["endpoints"][0]["keys"] = KEYS
    return cfg


async def test_waits_for_a_rate_limited_key_go_by_priority(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, {"queue_timeout": "10s"}))
    origin.fail_status, origin.fail_times, origin.retry_after = 429, 1, "1"
    first = asyncio.ensure_future(ask(p, "first"))
    await origin.wait_requests(1)  # refused: the only key cools down for 1 s
    await asyncio.sleep(0.05)
    lows = [asyncio.ensure_future(ask(p, f"low{i}", "low")) for i in range(2)]
    await waiting(p, 2)
    high = asyncio.ensure_future(ask(p, "high", "high"))
    await waiting(p, 3)
    results = await asyncio.gather(first, high, *lows)
    assert [s for s, _, _ in results] == [200] * 4
    assert [t for t in served_order(origin) if t != "first"] == ["high", "low0", "low1"]


async def test_no_key_before_the_deadline_is_a_429_at_once(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, {"queue_timeout": "200ms"}))
    origin.limit_keys(KEYS, requests=1, window=5.0)
    assert (await ask(p, "first"))[0] == 200
    t0 = time.monotonic()
    status, headers, _ = await ask(p, "second")
    assert status == 429 and headers["x-edgeproxy-error"] == "rate_limited"
    assert time.monotonic() - t0 < 0.15  # said at once: no key frees up in time
    assert float(headers["retry-after-ms"]) > 1000


# -- with the other filters and reloads ------------------------------------------------------------
async def test_a_cache_hit_takes_no_slot(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = admitted(origin, {"max_inflight": 1})
    cfg["upstreams"]["openai"]["cache"] = {"ttl": "1h"}
    p = await make_proxy(cfg)
    assert (await ask(p, "cached"))[0] == 200
    origin.latency = 1.0
    slow = asyncio.ensure_future(ask(p, "slow"))
    await origin.wait_requests(2)
    t0 = time.monotonic()
    status, headers, _ = await ask(p, "cached")
    assert status == 200 and headers["x-edgeproxy-cache"] == "hit"
    assert time.monotonic() - t0 < 0.5  # not behind the slow one's slot
    assert (await slow)[0] == 200


async def test_a_reload_keeps_the_waiters_and_applies_the_new_cap(origin: FakeOrigin, tmp_path: Path) -> None:
    cfg, conf = admitted(origin, {"max_inflight": 1}), tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        p = RunningProxy(proxy)
        origin.latency = 0.4
        first = [asyncio.ensure_future(ask(p, f"r{i}")) for i in range(4)]
        await waiting(p, 3)
        cfg["upstreams"]["openai"]["admission"] = {"max_inflight": 4}
        conf.write_text(yaml.safe_dump(cfg))
        ok, detail = await proxy.reload()
        assert ok, detail
        t0 = time.monotonic()
        assert [s for s, _, _ in await asyncio.gather(*first)] == [200] * 4
        assert time.monotonic() - t0 < 0.75  # the three waiters went at once, not one by one
        assert origin.max_serving >= 3
    finally:
        await proxy.stop(1.0)


# -- weights ---------------------------------------------------------------------------------------
async def test_weights_split_requests_between_endpoints(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    cfg = proxy_config(origin.url)
    cfg["upstreams"]["openai"]["endpoints"] = [
        {"url": origin.url + "/v1", "weight": 3},
        {"url": origin2.url + "/v1", "weight": 1},
    ]
    p = await make_proxy(cfg)
    for batch in range(10):
        await asyncio.gather(*(ask(p, f"r{batch}-{i}") for i in range(20)))
    assert (len(served_order(origin)), len(served_order(origin2))) == (150, 50)


async def test_a_weighted_endpoint_down_gives_its_share_away_and_gets_it_back(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    cfg = proxy_config(origin.url, probe={"interval": "200ms", "timeout": "200ms"})
    cfg["upstreams"]["openai"]["endpoints"] = [
        {"url": origin.url + "/v1", "weight": 3},
        {"url": origin2.url + "/v1", "weight": 1},
    ]
    p = await make_proxy(cfg)
    origin.fail_status = 503  # (answers probes; every request fails)
    statuses = [(await ask(p, f"down{i}"))[0] for i in range(40)]
    assert statuses == [200] * 40  # failed over to the other endpoint
    assert len(served_order(origin2)) == 40
    origin.fail_status = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = len(served_order(origin))
        await asyncio.gather(*(ask(p, f"back{i}") for i in range(8)))
        if len(served_order(origin)) - before == 6:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the endpoint did not get its share back within 10 s")


# -- across a `via` hop ------------------------------------------------------------------------------
async def test_the_priority_crosses_the_hop_and_the_edge_caps_it(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    edge_cfg = admitted(
        origin,
        {"max_inflight": 4},
        listen={
            "address": f"127.0.0.1:{free_port()}",
            "tokens": [{"token": TOKEN, "name": "tokyo-sidecar", "max_priority": "normal"}],
        },
    )
    edge = await make_proxy(edge_cfg)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    log_path = tmp_path / "edge-access.log"
    with log_path.open("wb") as f:
        edge.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        for priority in ("low", "high", None):
            assert (await ask(side, f"via-{priority}", priority))[0] == 200
        await asyncio.sleep(0.05)
    records = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    hops = [r for r in records if r["path"].endswith("/chat/completions")]
    assert [(r["client"], r["priority"]) for r in hops] == [
        ("tokyo-sidecar", "low"),
        ("tokyo-sidecar", "normal"),  # asked high at the sidecar: the edge's token caps it
        ("tokyo-sidecar", "normal"),
    ]


async def test_status_shows_slots_and_waiters(origin: FakeOrigin, make_proxy: Any) -> None:
    admin = free_port()
    p = await make_proxy(admitted(origin, {"max_inflight": 1}, admin={"listen": f"127.0.0.1:{admin}"}))
    origin.latency = 1.0
    held = [asyncio.ensure_future(ask(p, "holder")), asyncio.ensure_future(ask(p, "waiter", "low"))]
    await waiting(p, 1)
    r = await asyncio.to_thread(run_cli, "status", "--admin", f"http://127.0.0.1:{admin}")
    origin.latency = 0.01
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("UPSTREAM") and "WAITING_LOW" in line)
    assert lines[header + 1].split() == ["openai", "1", "1", "0", "0", "1"]
    assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]

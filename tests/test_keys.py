"""Key pools: several API keys per endpoint, spread by headroom, each rate-limited on its own.

The fake origin enforces per-key limits with real-shaped OpenAI / Anthropic rate-limit headers,
answers 429 with Retry-After when a key is over, and 401 for a revoked key. The clients are
the official SDKs and plain aiohttp, over real sockets. Timing targets live in bench/keys.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from edgeproxy.config import ConfigError, dump_redacted, key_id, load_dict, load_file
from edgeproxy.filters.keypool import Key, KeyPool, origin_bucket, rate_limits
from edgeproxy.filters.keys import KeyPools
from edgeproxy.ops.server import Proxy
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_cli import run_cli

KEYS = ["sk-key-aaaaaaaaaaaaaaaaaaaa", "sk-key-bbbbbbbbbbbbbbbbbbbb", "sk-key-cccccccccccccccccccc"]
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def key_pool(proxy: Proxy, url: str) -> KeyPool:
    """The running key pool of an endpoint of upstream openai (held by its KeyPools filter)."""
    chain = proxy.pipeline.chains["openai"]
    return next(f for f in chain.filters if isinstance(f, KeyPools)).pools[url]


def keyed(origin: FakeOrigin, keys: list[Any], **failover: Any) -> dict[str, Any]:
    """openai and anthropic upstreams at the origin, both with the key pool ``keys``."""
    cfg = proxy_config(origin.url, admin={"listen": f"127.0.0.1:{free_port()}"})
    cfg["upstreams"] = {
        "openai": {"prefix": "/v1", "endpoints": [{"url": origin.url + "/v1", "keys": keys}]},
        "anthropic": {
            "prefix": "/anthropic",
            "provider": "anthropic",
            "endpoints": [{"url": origin.url, "keys": keys}],
        },
    }
    if failover:
        cfg["failover"] = failover
    return cfg


async def post(url: str, path: str = "/v1/chat/completions", body: Any = CHAT) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        return r.status, dict(r.headers), await r.read()


def used_keys(origin: FakeOrigin) -> list[str]:
    return [r.headers.get("Authorization", "")[7:] or r.headers.get("x-api-key", "") for r in origin.requests]


async def status(p: RunningProxy) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(p.admin_url + "/-/status") as r:
        return orjson.loads(await r.read())  # type: ignore[no-any-return]


async def metrics(p: RunningProxy) -> str:
    async with aiohttp.ClientSession() as s, s.get(p.admin_url + "/metrics") as r:
        return await r.text()


# -- the pure parts ------------------------------------------------------------------------


def test_openai_and_anthropic_headers_read_alike() -> None:
    openai_h = [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"X-RateLimit-Limit-Tokens", b"150000"),
        (b"x-ratelimit-remaining-tokens", b"149984"),
        (b"x-ratelimit-reset-tokens", b"6m0s"),
    ]
    assert rate_limits(openai_h) == {"requests": (60.0, 59.0, 1.0), "tokens": (150000.0, 149984.0, 360.0)}
    anth = [
        (b"anthropic-ratelimit-requests-limit", b"50"),
        (b"anthropic-ratelimit-requests-remaining", b"0"),
        (b"anthropic-ratelimit-requests-reset", b"2030-01-01T00:00:30Z"),
    ]
    limits = rate_limits(anth)
    assert limits is not None and limits["requests"][:2] == (50.0, 0.0) and limits["requests"][2] > 0
    assert rate_limits([(b"content-type", b"application/json")]) is None


def test_a_per_minute_bucket_is_read_exactly() -> None:
    # 60/min, 0 left, full again in 59.5 s: half a request is there, the next one in 0.5 s.
    bucket = origin_bucket(60, 0, 59.5, now=100.0)
    assert bucket.wait_for(1, 100.0) == pytest.approx(0.5)
    # not a per-minute bucket (a day): assume the worst, refill in a straight line to the reset
    bucket = origin_bucket(1000, 0, 3600.0, now=0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(3.6)


def _pool(n: int) -> KeyPool:
    cfg = load_dict({"upstreams": {"o": {"prefix": "/v1", "endpoints": [{"url": "https://x/v1", "keys": KEYS[:n]}]}}})
    return KeyPool(
        "https://x/v1",
        [Key(kc, kc.key.encode(), i, 0.0) for i, kc in enumerate(cfg.upstreams[0].endpoints[0].key_configs())],
    )


def test_pick_spreads_evenly_then_prefers_headroom() -> None:
    pool = _pool(3)
    picks = []
    for _ in range(9):
        key = pool.pick(0.0)
        assert key is not None
        key.on_pick(0.0)
        picks.append(key.index)
    assert sorted(picks) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the origin says key 1 has most room left, key 0 least: key 1 goes first, key 0 last
    for key, left in zip(pool.keys, (10, 50, 30), strict=True):
        key.on_rate_limits({"requests": (60.0, float(left), 60.0 - left)}, 0.0)
    order = []
    for _ in range(3):
        key = pool.pick(0.0)
        assert key is not None
        order.append(key.index)
        key.on_pick(0.0)
    assert order[0] == 1 and 0 not in order


# -- config --------------------------------------------------------------------------------


def test_keys_accept_strings_and_mappings() -> None:
    raw = {
        "upstreams": {
            "openai": {
                "prefix": "/v1",
                "endpoints": [
                    {
                        "url": "https://a/v1",
                        "keys": ["${K0}", {"key": "${K1}", "id": "team-a", "rpm": 500, "tpm": 200000}],
                    }
                ],
                "failover": {"queue_timeout": "5s"},
            }
        }
    }
    cfg = load_dict(raw, env={"K0": KEYS[0], "K1": KEYS[1]})
    ep = cfg.upstreams[0].endpoints[0]
    assert ep.keys == (KEYS[0], KEYS[1])  # the plain list existing code reads is still there
    pool = ep.key_configs()
    assert [(k.id, k.rpm, k.tpm) for k in pool] == [(key_id(KEYS[0]), None, None), ("team-a", 500, 200000)]
    assert cfg.upstreams[0].failover.queue_timeout == 5.0 and cfg.failover.queue_timeout == 2.0
    view = orjson.dumps(dump_redacted(cfg)).decode()
    assert KEYS[0] not in view and KEYS[1] not in view and "team-a" in view
    assert KEYS[0] not in repr(cfg) and KEYS[1] not in repr(pool)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([{"id": "x"}], "upstreams.openai.endpoints[0].keys[0].key: missing"),
        ([{"key": KEYS[0], "rpm": 0}], "upstreams.openai.endpoints[0].keys[0].rpm: must be >= 1, got 0"),
        ([{"key": KEYS[0], "tpm": "many"}], "upstreams.openai.endpoints[0].keys[0].tpm: expected an integer"),
        ([{"key": KEYS[0], "rmp": 5}], "upstreams.openai.endpoints[0].keys[0].rmp: unknown key (did you mean 'rpm'?)"),
        ([{"key": KEYS[0], "id": "a b"}], "upstreams.openai.endpoints[0].keys[0].id: use 1-64 letters"),
        ([KEYS[0], {"key": KEYS[0]}], "upstreams.openai.endpoints[0].keys[1]: the same key as"),
        ([{"key": KEYS[0], "id": "t"}, {"key": KEYS[1], "id": "t"}], "upstreams.openai.endpoints[0].keys[1]: id 't'"),
        ([{"key": ""}], "upstreams.openai.endpoints[0].keys[0].key: empty key"),
    ],
)
def test_key_errors_name_their_path_and_never_the_key(keys: list[Any], message: str) -> None:
    raw = {"upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": "https://a/v1", "keys": keys}]}}}
    with pytest.raises(ConfigError) as err:
        load_dict(raw, env={})
    text = str(err.value)
    assert message in text
    assert KEYS[0] not in text and KEYS[1] not in text


# -- over real sockets ---------------------------------------------------------------------


async def test_keys_share_the_load_evenly(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, KEYS))
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="ignored", max_retries=0)
    try:
        for _ in range(12):
            r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content == "echo: hi"
    finally:
        await client.close()
    assert sorted(used_keys(origin)) == sorted(KEYS * 4)


async def test_a_429_cools_that_key_only_and_the_client_never_sees_it(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.limit_keys(KEYS[:2], requests=1, window=60.0)
    origin.key_limits[KEYS[0]].level = 0.0  # key 0 is spent already (another app used it)
    p = await make_proxy(keyed(origin, KEYS[:2], queue_timeout=0))
    first = await post(p.url)
    assert first[0] == 200
    assert origin.key_limited[KEYS[0]] == 1 and origin.key_served[KEYS[1]] == 1  # retried at once, key 1
    # key 1 said "0 left" in its headers and key 0 asked for ~60 s: nothing more is sent; with
    # queue_timeout 0 the client gets an honest 429 at once instead
    status_, headers, body = await post(p.url)
    assert status_ == 429
    assert origin.key_limited[KEYS[0]] == 1 and sum(origin.key_served.values()) == 1  # origin saw no more
    true_wait = origin.next_accept_in()
    assert float(headers["retry-after-ms"]) / 1000 == pytest.approx(true_wait, rel=0.05)
    assert int(headers["Retry-After"]) >= true_wait
    assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
    # the line was not blamed: the path is up, no failures
    path = next(iter(p.proxy.state.paths.values()))
    assert path.health.state == "up" and path.failures == 0
    st = await status(p)
    keys = {k["id"]: k for k in next(u for u in st["upstreams"] if u["name"] == "openai")["keys"][origin.url + "/v1"]}
    assert keys[key_id(KEYS[0])]["state"] == "cooling" and keys[key_id(KEYS[0])]["limited"] == 1
    assert keys[key_id(KEYS[1])]["state"] == "exhausted" and keys[key_id(KEYS[1])]["requests_left"] == 0
    assert KEYS[0] not in orjson.dumps(st).decode()


async def test_a_revoked_key_is_disabled_and_the_others_carry_on(
    origin: FakeOrigin, make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    p = await make_proxy(keyed(origin, KEYS))
    for _ in range(3):
        assert (await post(p.url))[0] == 200
    origin.revoked_keys.add(KEYS[1])
    with caplog.at_level(logging.WARNING, logger="edgeproxy"):
        results = [await post(p.url) for _ in range(12)]
    assert [r[0] for r in results] == [200] * 12  # not even the first client saw the 401
    assert origin.key_refused[KEYS[1]] == 1  # one try with it, then never again
    assert origin.key_checks == {KEYS[1]: 1}  # the check that confirmed it was dead
    assert used_keys(origin)[-12:].count(KEYS[1]) == 1
    assert key_id(KEYS[1]) in caplog.text and "401" in caplog.text and KEYS[1] not in caplog.text
    text = await metrics(p)
    assert f'edgeproxy_key_disabled{{endpoint="{origin.url}/v1",key="{key_id(KEYS[1])}",upstream="openai"}} 1.0' in text
    assert KEYS[1] not in text


async def test_a_reload_re_enables_disabled_keys_and_keeps_what_it_knew(origin: FakeOrigin, tmp_path: Path) -> None:
    origin.limit_keys(KEYS[:1], requests=10, window=60.0)
    conf = tmp_path / "edgeproxy.yaml"
    conf.write_bytes(orjson.dumps(keyed(origin, KEYS[:2])))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        url = f"http://{proxy.config.listen[0].host}:{proxy.config.listen[0].port}"
        origin.revoked_keys.add(KEYS[1])
        assert [(await post(url))[0] for _ in range(3)] == [200] * 3
        pool = key_pool(proxy, origin.url + "/v1")
        assert [k.state(time.monotonic()) for k in pool.keys] == ["ready", "disabled"]
        left = pool.keys[0].origin_requests
        assert left is not None and int(left.level) == 7
        origin.revoked_keys.clear()  # someone fixed the key, then reloaded
        ok, _ = await proxy.reload()
        assert ok
        pool = key_pool(proxy, origin.url + "/v1")
        assert [k.state(time.monotonic()) for k in pool.keys] == ["ready", "ready"]
        kept = pool.keys[0].origin_requests
        assert kept is not None and int(kept.level) == 7  # what the headers said survives the reload
        assert [(await post(url))[0] for _ in range(4)] == [200] * 4
        assert origin.key_served[KEYS[0]] <= 6  # key 1 takes its share again
    finally:
        await proxy.stop(1.0)


async def test_with_no_key_left_the_client_gets_our_401(origin: FakeOrigin, make_proxy: Any) -> None:
    # Not the origin's own 401: OpenAI's names the refused key (masked, but its last
    # characters). Ours says what happened, and that a reload brings the keys back.
    p = await make_proxy(keyed(origin, KEYS[:2]))
    origin.revoked_keys.update(KEYS[:2])
    status_, headers, body = await post(p.url)
    assert status_ == 401 and headers["x-edgeproxy-error"] == "keys_refused"
    assert b"revoked" not in body and b"next reload" in body
    assert sum(origin.key_refused.values()) == 2
    status_, _, body = await post(p.url)
    assert status_ == 401 and sum(origin.key_refused.values()) == 2  # no more tries with dead keys
    assert b"refused every API key of upstream openai" in body and b"next reload" in body


async def test_a_403_from_two_keys_is_about_the_request(origin: FakeOrigin, make_proxy: Any) -> None:
    # A 403 from a second key for the same request is the request's problem (a model the
    # account may not use, a region), not two dead keys: the client gets the 403 and every key
    # stays in the pool, however many such requests come.
    p = await make_proxy(keyed(origin, KEYS))
    origin.fail_status, origin.fail_times = 403, 6
    assert [(await post(p.url))[0] for _ in range(3)] == [403] * 3
    assert [(await post(p.url))[0] for _ in range(4)] == [200] * 4
    pool = key_pool(p.proxy, origin.url + "/v1")
    assert [k.state(time.monotonic()) for k in pool.keys].count("disabled") == 0


async def test_a_403_once_for_a_key_that_checks_fine_disables_nothing(origin: FakeOrigin, make_proxy: Any) -> None:
    # The first key tried is refused once; its check (GET /models with it) answers: the
    # refusal was about that request. Another key takes it; the first stays in the pool.
    p = await make_proxy(keyed(origin, KEYS))
    origin.fail_status, origin.fail_times = 403, 1
    assert (await post(p.url))[0] == 200
    assert sum(origin.key_checks.values()) == 1
    pool = key_pool(p.proxy, origin.url + "/v1")
    assert [k.state(time.monotonic()) for k in pool.keys].count("disabled") == 0


async def test_a_key_refused_403_everywhere_is_disabled(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, KEYS))
    origin.revoked_keys.add(KEYS[0])
    origin.revoked_status = 403  # an account suspended: its check is refused too
    assert [(await post(p.url))[0] for _ in range(4)] == [200] * 4
    assert origin.key_refused[KEYS[0]] == 1 and origin.key_checks[KEYS[0]] == 1
    pool = key_pool(p.proxy, origin.url + "/v1")
    assert [k.state(time.monotonic()) for k in pool.keys] == ["disabled", "ready", "ready"]


async def test_requests_queue_for_a_key_within_queue_timeout(origin: FakeOrigin, make_proxy: Any) -> None:
    # one request per 0.5 s per key; four requests at once on two keys: two must wait
    origin.limit_keys(KEYS[:2], requests=1, window=0.5)
    p = await make_proxy(keyed(origin, KEYS[:2], queue_timeout="5s"))
    results = await asyncio.gather(*(post(p.url) for _ in range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert sum(origin.key_served.values()) == 4


async def test_local_rpm_limits_before_the_origin_says_no(origin: FakeOrigin, make_proxy: Any) -> None:
    keys = [{"key": KEYS[0], "rpm": 2, "id": "small"}]
    p = await make_proxy(keyed(origin, keys, queue_timeout=0))
    assert (await post(p.url))[0] == 200
    assert (await post(p.url))[0] == 200
    status_, headers, _ = await post(p.url)
    assert status_ == 429 and len(origin.requests) == 2  # ours: the origin never saw the third
    assert 25 <= float(headers["retry-after-ms"]) / 1000 <= 30  # one request every 30 s
    assert headers["Retry-After"] == "30"


async def test_anthropic_sdk_through_a_pool(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.limit_keys(KEYS[:2], requests=1, window=60.0)
    p = await make_proxy(keyed(origin, KEYS[:2], queue_timeout=0))
    client = anthropic.AsyncAnthropic(base_url=p.url + "/anthropic", api_key="ignored", max_retries=0)
    try:
        for _ in range(2):
            r = await client.messages.create(
                model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
            assert r.content[0].text == "echo: hi"  # type: ignore[union-attr]
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(
                model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await client.close()
    assert sorted(used_keys(origin)) == sorted(KEYS[:2])
    assert sum(origin.key_limited.values()) == 0  # edgeproxy knew from the headers: no 429 was needed
    wait = float(err.value.response.headers["retry-after-ms"]) / 1000
    assert origin.next_accept_in() <= wait <= origin.next_accept_in() + 1.5  # the reset is in whole seconds


async def test_the_access_log_names_keys_by_id(origin: FakeOrigin, make_proxy: Any, tmp_path: Path) -> None:
    p = await make_proxy(keyed(origin, KEYS[:2]))
    origin.revoked_keys.add(KEYS[0])
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        assert (await post(p.url))[0] == 200
        await asyncio.sleep(0.05)  # the log flushes on the next loop turn
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["key"] == key_id(KEYS[1])
    assert [(a["outcome"], a["key"]) for a in record["attempt_log"]] == [
        ("401", key_id(KEYS[0])),
        ("ok", key_id(KEYS[1])),
    ]
    assert KEYS[0] not in log_path.read_text() and KEYS[1] not in log_path.read_text()


async def test_a_stream_is_sent_again_with_another_key_before_it_starts(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.limit_keys(KEYS[:2], requests=5, window=60.0)
    origin.key_limits[KEYS[0]].level = 0.0
    p = await make_proxy(keyed(origin, KEYS[:2]))
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="ignored", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "stream me"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text == "echo: stream me"
    assert origin.key_limited[KEYS[0]] == 1 and origin.key_served[KEYS[1]] == 1


async def test_edgeproxy_status_lists_keys_by_id(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, [KEYS[0], {"key": KEYS[1], "id": "team-b", "rpm": 100}]))
    origin.revoked_keys.add(KEYS[0])
    assert (await post(p.url))[0] == 200
    r = await asyncio.to_thread(run_cli, "status", "--admin", p.admin_url)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[2]: line for line in r.stdout.splitlines() if line.startswith("openai ")}
    assert "disabled (401)" in lines[key_id(KEYS[0])] and "ready" in lines["team-b"]
    r = await asyncio.to_thread(run_cli, "status", "--json", "--admin", p.admin_url)
    keys = json.loads(r.stdout)["upstreams"]
    assert KEYS[0] not in r.stdout and KEYS[1] not in r.stdout
    assert any(k["id"] == "team-b" and k["rpm"] == 100 for u in keys for pool in u["keys"].values() for k in pool)


# -- found in review: each of these once went wrong --------------------------------------------


async def test_tokens_the_origin_already_counted_are_not_charged_twice(origin: FakeOrigin, make_proxy: Any) -> None:
    """The origin's remaining-tokens header already counts the answer's own usage: charging
    it again made edgeproxy refuse (429) a request the origin had room for."""
    origin.limit_keys(KEYS[:1], requests=1000, window=60.0, tokens=30000)
    p = await make_proxy(keyed(origin, KEYS[:1], queue_timeout="1s"))
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 80000}]}  # ~20k tokens
    assert (await post(p.url, body=big))[0] == 200
    status_, headers, _ = await post(p.url)  # a small one: the origin has ~10k tokens left
    assert status_ == 200, headers.get("x-edgeproxy-error")
    assert len(origin.requests) == 2


async def test_hedges_do_not_overshoot_a_local_rpm(origin: FakeOrigin, make_proxy: Any) -> None:
    keys = [{"key": KEYS[0], "rpm": 1, "id": "one"}]
    p = await make_proxy(keyed(origin, keys, queue_timeout=0, hedge="5s"))
    results = await asyncio.gather(*(post(p.url) for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 429, 429, 429, 429]
    assert len(origin.requests) == 1  # the key was taken as planned, not when the hedge started


async def test_a_revoked_key_is_never_sent_again_even_with_hedges(origin: FakeOrigin, make_proxy: Any) -> None:
    origin.revoked_keys.add(KEYS[0])
    p = await make_proxy(keyed(origin, KEYS[:1], hedge="5s"))
    assert (await post(p.url))[0] == 401  # refused once: disabled
    results = await asyncio.gather(*(post(p.url) for _ in range(5)))
    assert [r[0] for r in results] == [401] * 5  # ours, keys_refused
    assert origin.key_refused[KEYS[0]] == 1  # the disabled key never went out again


def test_absurd_rate_limit_headers_cost_nothing_and_sideline_no_key() -> None:
    """A reset of 16k digits is refused at once (no regex backtracking on the event loop); a
    reset centuries away keeps the key out for at most MAX_WAIT, not for ever."""
    from edgeproxy.proto.providers import MAX_WAIT

    started = time.perf_counter()
    limits = rate_limits(
        [
            (b"x-ratelimit-limit-requests", b"60"),
            (b"x-ratelimit-remaining-requests", b"0"),
            (b"x-ratelimit-reset-requests", b"1" * 16000 + b"x"),
        ]
    )
    assert time.perf_counter() - started < 0.05
    assert limits == {"requests": (60.0, 0.0, None)}
    pool = _pool(1)
    key = pool.keys[0]
    far = [
        (b"anthropic-ratelimit-requests-limit", b"50"),
        (b"anthropic-ratelimit-requests-remaining", b"0"),
        (b"anthropic-ratelimit-requests-reset", b"2999-01-01T00:00:00Z"),
    ]
    parsed = rate_limits(far)
    assert parsed is not None
    key.on_rate_limits(parsed, 0.0)
    assert 0 < key.available_in(0.0) <= MAX_WAIT


async def test_a_hedged_request_the_client_abandons_still_logs_its_key(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    """Two slow endpoints, a hedge started on the second: the client gives up first. The
    access log still names the key of the attempt the request was on (by id)."""
    from tests.test_failover import two_endpoints

    other = FakeOrigin()
    await other.start()
    try:
        cfg = two_endpoints(origin.url, other.url, failover={"hedge": "100ms"})
        for ep in cfg["upstreams"]["openai"]["endpoints"]:
            ep["keys"] = [KEYS[0]] if ep["url"].startswith(origin.url) else [KEYS[1]]
        p = await make_proxy(cfg)
        origin.latency = other.latency = 3.0
        log_path = tmp_path / "access.log"
        with log_path.open("wb") as f:
            p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
                with contextlib.suppress(asyncio.TimeoutError):
                    async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                        await r.read()
            await asyncio.sleep(0.3)
        record = orjson.loads(log_path.read_bytes().splitlines()[-1])
        assert record["status"] == 499
        assert record["key"] == key_id(KEYS[0])  # the first attempt's: the request never moved off it
        assert KEYS[0] not in log_path.read_text() and KEYS[1] not in log_path.read_text()
    finally:
        await other.stop()

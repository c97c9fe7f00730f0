"""Failover before commit, honest errors after it: each fault the users fight, over real sockets.

Time bounds here are generous (a shared 2-core machine); bench/failover.py measures the
real figures.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningProxy, proxy_config
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def post(url: str, body: dict[str, Any] = CHAT) -> tuple[int, bytes, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.read(), time.monotonic() - started


def two_endpoints(a: str, b: str, **over: Any) -> dict[str, Any]:
    cfg = proxy_config("", **over)
    cfg["upstreams"] = {"openai": {"prefix": "/v1", "endpoints": [{"url": a + "/v1"}, {"url": b + "/v1"}]}}
    return cfg


async def two_lines_proxy(make_proxy: Any, near: LineSim, far: LineSim, **over: Any) -> RunningProxy:
    cfg = two_endpoints(f"http://{near.address}", f"http://{far.address}", **over)
    cfg.setdefault("probe", {"interval": "1s", "timeout": "500ms"})
    p: RunningProxy = await make_proxy(cfg)
    up = p.proxy.state.upstream("openai")
    assert up is not None
    for _ in range(200):
        if up.order[0].endpoint.port == near.port and all(x.estimator.srtt for x in up.paths):
            break
        await asyncio.sleep(0.02)
    assert up.order[0].endpoint.port == near.port
    return p


@pytest.mark.parametrize("fault", ["reset", "refuse"])
async def test_dead_line_costs_the_client_nothing(
    lines: tuple[LineSim, LineSim], make_proxy: Any, fault: str, origin: FakeOrigin
) -> None:
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far)
    near.set_mode(fault)  # refuse: new connections fail (20 at once need ~19 new ones)
    results = await asyncio.gather(*(post(p.url) for _ in range(20)))
    assert [r[0] for r in results] == [200] * 20
    assert max(r[2] for r in results) < 2.0


async def test_blackholed_line_is_escaped_within_a_second(
    lines: tuple[LineSim, LineSim], make_proxy: Any, origin: FakeOrigin
) -> None:
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far)
    near.set_mode("blackhole")  # accepts, forwards nothing: the attempts just hang
    results = await asyncio.gather(*(post(p.url) for _ in range(10)))
    assert [r[0] for r in results] == [200] * 10
    slowest = max(r[2] for r in results)
    assert slowest < 2.0, f"slowest request took {slowest:.2f}s"  # the target is 1 s (bench)
    assert sum(p.proxy.metrics.rescues.values.values()) >= 1


async def test_503_endpoint_fails_over_with_bounded_attempts(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url))
    origin.fail_status = 503
    results = [await post(p.url) for _ in range(30)]
    assert [r[0] for r in results] == [200] * 30
    # ejected after 5 in a row: the failing endpoint is not hammered
    assert len(origin.requests) <= 6
    assert len(origin2.requests) == 30


async def test_429_cools_the_endpoint_for_retry_after(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url))
    origin.fail_status, origin.fail_times, origin.retry_after = 429, 1, "2"
    status, _, _ = await post(p.url)
    assert status == 200 and len(origin.requests) == 1 and len(origin2.requests) == 1
    for _ in range(10):
        assert (await post(p.url))[0] == 200
    assert len(origin.requests) == 1  # nothing for the endpoint that asked for 2 s
    await asyncio.sleep(2.1)
    paths = {x.endpoint.port: x for x in p.proxy.state.paths.values()}
    upstream = p.proxy.state.upstream("openai")
    assert upstream.is_usable(paths[origin.port], CHAT["model"], time.monotonic())  # usable again after the wait
    assert p.proxy.metrics.failovers.values[("openai", "status_429")] == 1


async def test_429_with_nowhere_to_go_waits_a_short_retry_after(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.fail_status, origin.fail_times, origin.retry_after = 429, 1, "1"
    status, _, took = await post(p.url)
    assert status == 200 and 0.9 < took < 3.0
    origin.fail_status, origin.fail_times, origin.retry_after = 429, 1, "30"
    status, body, _ = await post(p.url)
    assert status == 429  # a long wait: the origin's answer, unchanged
    assert b"fake origin failure (429)" in body


async def test_silent_endpoint_is_left_at_first_byte_timeout(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url, failover={"first_byte_timeout": "1s"}))
    origin.latency = 30  # accepts, never answers in time
    status, _, took = await post(p.url)
    assert status == 200 and took < 3.0
    assert len(origin.requests) == 1  # the silent path was not tried again
    assert len(origin2.requests) == 1


async def test_stream_silent_before_first_event_fails_over(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url, failover={"first_event_timeout": "500ms"}))
    origin.stall_after_events = 0  # headers, then nothing
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = await r.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert len(origin2.requests) == 1


async def test_stream_cut_after_commit_ends_with_in_band_error(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.events = 57  # + role chunk + finish chunk + [DONE] = 60 frames
    origin.drop_after_events = 40
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = await r.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 41 and b"[DONE]" not in body
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_reset"
    assert (await post(proxy.url))[0] == 200  # and the proxy is fine


async def test_stream_stall_after_commit_ends_at_idle_timeout(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(proxy_config(origin.url, failover={"stream_idle_timeout": "500ms"}))
    origin.events = 50
    origin.stall_after_events = 20
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = await r.read()
    took = time.monotonic() - started
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 21 and b"[DONE]" not in body
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_timeout"
    assert 0.4 < took < 3.0


async def test_anthropic_stream_cut_mid_event_gets_a_clean_error_event(origin: FakeOrigin, proxy: RunningProxy) -> None:
    """The in-band error starts on an event boundary: what the client parses is whole."""
    origin.drop_after_events = 5
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/anthropic/v1/messages", json={**CHAT, "max_tokens": 50, "stream": True}) as r:
            body = await r.read()
    blocks = [b for b in body.split(b"\n\n") if b]
    assert blocks[-1].startswith(b"event: error\ndata: ")
    for block in blocks:
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        orjson.loads(data[0])  # every event is whole JSON


async def test_400_is_one_attempt_and_unchanged(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url))
    origin.fail_status = 400
    async with aiohttp.ClientSession() as s:
        async with s.post(origin.url + "/v1/chat/completions", json=CHAT) as r:
            direct = await r.read()
    status, body, _ = await post(p.url)
    assert status == 400
    assert orjson.loads(body) == orjson.loads(direct)
    assert len(origin.requests) == 2 and len(origin2.requests) == 0  # direct + one attempt


async def test_models_renamed_only_on_the_endpoint_that_maps_them(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    cfg = two_endpoints(origin.url, origin2.url)
    cfg["upstreams"]["openai"]["endpoints"][1]["models"] = {"gpt-4o": "relay/gpt-4o-2024-08-06"}
    p = await make_proxy(cfg)
    assert (await post(p.url))[0] == 200
    assert origin.requests[-1].json()["model"] == "gpt-4o"
    origin.fail_status = 503
    assert (await post(p.url))[0] == 200
    assert origin2.requests[-1].json()["model"] == "relay/gpt-4o-2024-08-06"
    assert origin2.requests[-1].json()["messages"] == CHAT["messages"]


async def test_retry_budget_bounds_attempts_when_everything_fails(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url, failover={"retries": 1}))
    origin.fail_status = origin2.fail_status = 500
    statuses = [(await post(p.url))[0] for _ in range(40)]
    assert set(statuses) == {500}  # the origin's own answer, after the retries allowed
    attempts = len(origin.requests) + len(origin2.requests)
    # retries to the other endpoint are free while it is healthy (until 5 failures eject it),
    # then the budget allows 20% of the requests (at least 5)
    assert attempts <= 40 + 5 + max(5, 0.2 * 40) + 1, attempts
    assert p.proxy.state.upstreams[0].budget.exhausted > 0


async def test_hedge_sends_a_second_attempt_and_the_first_answer_wins(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(two_endpoints(origin.url, origin2.url, failover={"hedge": "200ms"}))
    origin.latency = 3.0  # slow, not dead
    status, _, took = await post(p.url)
    assert status == 200 and took < 1.5
    assert len(origin.requests) == 1 and len(origin2.requests) == 1
    assert p.proxy.metrics.hedges.values[("openai",)] == 1
    origin.latency = 0
    status, _, _ = await post(p.url)  # a quick answer: no hedge
    assert status == 200 and p.proxy.metrics.hedges.values[("openai",)] == 1


async def test_budget_does_not_stand_between_a_hung_endpoint_and_a_healthy_one(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """Many requests time out on one endpoint at once: each moves to the healthy one."""
    p = await make_proxy(two_endpoints(origin.url, origin2.url, failover={"first_byte_timeout": "500ms"}))
    origin.latency = 5
    results = await asyncio.gather(*(post(p.url) for _ in range(40)))
    assert [r[0] for r in results] == [200] * 40
    assert p.proxy.state.upstreams[0].budget.exhausted == 0


async def test_a_request_with_nowhere_left_to_go_is_not_rescued_into_an_error(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """Its line fails probes, but this request already used its retry: it keeps its chance."""
    cfg = two_endpoints(origin.url, origin2.url, failover={"retries": 1, "first_byte_timeout": "5s"})
    cfg["probe"] = {"interval": "1s", "timeout": "300ms"}
    p = await make_proxy(cfg)
    origin.fail_status = 503  # A answers 503: the request moves to B, its one retry
    origin2.latency, origin2.probes_affected = 1.5, True  # B is slow, and its probes time out
    status, _, took = await post(p.url)
    assert status == 200 and 1.4 < took < 4.0
    assert sum(p.proxy.metrics.rescues.values.values()) == 0


@pytest.mark.parametrize("status", [400, 409])
async def test_retry_on_honours_the_4xx_it_lists(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any, status: int
) -> None:
    """`retry_on` accepts 400-599: a 4xx it lists goes on to the other endpoint like a 503
    would (it used to be returned before retry_on was read); unlisted, it reaches the client."""
    origin.fail_status, origin.fail_times = status, 100  # the preferred endpoint always answers it
    listed = two_endpoints(origin.url, origin2.url, failover={"retry_on": ["reset", str(status)]})
    listed["upstreams"]["openai"]["endpoints"][1]["priority"] = 2
    p = await make_proxy(listed)
    assert [(await post(p.url))[0] for _ in range(3)] == [200] * 3
    assert len(origin.requests) == 3 and len(origin2.requests) == 3  # each tried A, then B
    unlisted = two_endpoints(origin.url, origin2.url)
    unlisted["upstreams"]["openai"]["endpoints"][1]["priority"] = 2
    q = await make_proxy(unlisted)
    assert [(await post(q.url))[0] for _ in range(3)] == [status] * 3
    assert len(origin2.requests) == 3  # B saw nothing more

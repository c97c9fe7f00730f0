"""Failover that knows models: one model's outage or rate limit keeps the others on the primary;
configurable ejection with restores; stream-aware and per-model timeouts; a silent origin is
not waited on twice. Real sockets: two fake origins (primary, fallback), edgeproxy between."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edgeproxy.config import FailoverConfig, load_dict
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import proxy_config
from tests.fakes.origin import FakeOrigin, ModelFailure


def primary_and_fallback(primary: str, fallback: str, lines: bool = False, **over: Any) -> dict[str, Any]:
    """The operator's set-up: a primary endpoint and a fallback (a lower priority tier)."""
    cfg = proxy_config("", **over)
    first: dict[str, Any] = {"url": primary + "/v1", "priority": 1}
    if lines:  # two lines to the primary (two source addresses)
        cfg["lines"] = {"a": {"bind": "127.0.0.2"}, "b": {"bind": "127.0.0.3"}}
        first["lines"] = ["a", "b"]
    second: dict[str, Any] = {"url": fallback + "/v1", "priority": 2}
    if lines:
        second["lines"] = ["a"]
    cfg["upstreams"] = {"openai": {"prefix": "/v1", "endpoints": [first, second]}}
    cfg.setdefault("probe", {"interval": "1s", "timeout": "500ms"})
    return cfg


async def ask(url: str, model: str, stream: bool = False) -> tuple[int, bytes, float]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.read(), time.monotonic() - started


def models_served(origin: FakeOrigin) -> list[str]:
    return [r.json()["model"] for r in origin.requests]


async def test_one_models_503s_eject_that_model_only(origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url))
    origin.model_failures["model-x"] = ModelFailure(status=503)
    for _ in range(5):  # five 503s in a row for model-x: each rescued by the fallback
        assert (await ask(p.url, "model-x"))[0] == 200
    origin.requests.clear()
    fallback.requests.clear()
    for _ in range(5):
        assert (await ask(p.url, "model-x"))[0] == 200
        assert (await ask(p.url, "model-y"))[0] == 200
    # model-x is ejected at the primary: straight to the fallback; model-y keeps the primary
    assert models_served(origin) == ["model-y"] * 5
    assert models_served(fallback) == ["model-x"] * 5
    status = p.proxy.status()["upstreams"][0]
    (row,) = status["origins"]
    assert row["model"] == "model-x" and row["state"] == "ejected"
    assert all(path["state"] == "up" for path in status["paths"])  # the lines are fine
    primary = origin.url + "/v1"
    assert p.proxy.metrics.ejections.values[("openai", primary, "*", "model-x")] == 1


async def test_a_429_for_one_model_cools_only_that_model(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url))
    origin.model_failures["model-x"] = ModelFailure(status=429, retry_after="2")
    assert (await ask(p.url, "model-x"))[0] == 200  # the 429, then the fallback
    del origin.model_failures["model-x"]
    origin.requests.clear()
    fallback.requests.clear()
    for _ in range(3):
        assert (await ask(p.url, "model-y"))[0] == 200
        assert (await ask(p.url, "model-x"))[0] == 200
    assert models_served(origin) == ["model-y"] * 3  # the pause was for model-x only
    assert models_served(fallback) == ["model-x"] * 3
    await asyncio.sleep(2.1)
    assert (await ask(p.url, "model-x"))[0] == 200
    assert models_served(origin)[-1] == "model-x"  # the pause is over


async def test_every_model_failing_ejects_the_endpoint(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(
        primary_and_fallback(origin.url, fallback.url, failover={"ejection": {"origin_errors": 4, "max_time": "30s"}})
    )
    origin.fail_status = 503  # everything fails, probes aside (the models list still works)
    for model in ("model-a", "model-b", "model-a", "model-b"):
        assert (await ask(p.url, model))[0] == 200
    origin.requests.clear()
    assert (await ask(p.url, "model-c"))[0] == 200  # a model never seen: the endpoint is out
    assert origin.requests == []
    rows = {row["model"]: row["state"] for row in p.proxy.status()["upstreams"][0]["origins"]}
    assert rows["*"] == "ejected"


async def test_a_trial_restores_at_once_and_restores_are_counted(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    cfg = primary_and_fallback(
        origin.url, fallback.url, failover={"ejection": {"origin_errors": 2, "base_time": "500ms", "max_time": "1s"}}
    )
    p = await make_proxy(cfg)
    origin.model_failures["model-x"] = ModelFailure(status=500)
    for _ in range(2):
        await ask(p.url, "model-x")
    del origin.model_failures["model-x"]  # the origin recovers
    await asyncio.sleep(0.6)  # the ejection is over: the next request is the trial
    origin.requests.clear()
    for _ in range(3):
        assert (await ask(p.url, "model-x"))[0] == 200
    assert models_served(origin) == ["model-x"] * 3
    assert p.proxy.metrics.restores.values[("openai", origin.url + "/v1", "*", "model-x")] == 1
    assert p.proxy.status()["upstreams"][0]["origins"] == []


async def test_a_probe_answered_5xx_takes_the_path_down_and_its_recovery_brings_traffic_back(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover={"ejection": {"max_time": "1m"}}))
    origin.fail_status, origin.probes_affected = 503, True  # a whole-origin outage
    for _ in range(6):
        await ask(p.url, "model-x")
    await origin.wait_for(
        lambda: p.proxy.status()["upstreams"][0]["paths"][-1]["state"] == "down", 5.0, "the primary probed down"
    )
    origin.fail_status, origin.probes_affected = None, False  # it is back
    recovered = time.monotonic()
    origin.requests.clear()
    while not origin.requests and time.monotonic() - recovered < 10:
        assert (await ask(p.url, "model-x"))[0] == 200
        await asyncio.sleep(0.2)
    # seen by a probe within 2 s (down paths are probed that often); the model's ejection
    # (up to a minute here) lifted with it
    assert origin.requests and time.monotonic() - recovered < 4.0


async def test_a_silent_stream_is_left_at_stream_first_byte_timeout_not_first_byte_timeout(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    failover = {"stream_first_byte_timeout": "1s", "first_byte_timeout": "1m"}
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover=failover))
    origin.model_failures["model-x"] = ModelFailure(silent=True)
    status, body, took = await ask(p.url, "model-x", stream=True)
    assert status == 200 and b"[DONE]" in body and 0.9 < took < 4.0  # the fallback's stream
    del origin.model_failures["model-x"]
    origin.model_failures["model-y"] = ModelFailure(status=None, delay=2.0)  # slow, not silent
    status, _, took = await ask(p.url, "model-y")  # a non-streaming answer: not cut at 1 s
    assert status == 200 and took >= 1.9 and models_served(origin)[-1] == "model-y"


async def test_per_model_timeouts_override_the_upstreams(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    failover = {"stream_first_byte_timeout": "500ms", "models": {"slow-*": {"stream_first_byte_timeout": "5s"}}}
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover=failover))
    for model in ("slow-thinker", "quick"):
        origin.model_failures[model] = ModelFailure(status=None, delay=1.0)  # headers after a second
    status, _, _ = await ask(p.url, "slow-thinker", stream=True)
    assert status == 200 and models_served(origin) == ["slow-thinker"]  # waited for
    status, _, _ = await ask(p.url, "quick", stream=True)
    assert status == 200 and models_served(fallback) == ["quick"]  # given up on at 500 ms


def test_default_timeouts_escape_a_silent_stream_but_wait_for_reasoning_models() -> None:
    f = load_dict({}).upstreams[0].failover
    assert f.timeouts("gpt-4o", streaming=True).first_byte <= 30  # silent stream: left within 30 s
    assert f.timeouts("gpt-4o", streaming=False).first_byte >= 300  # long generations take minutes
    assert f.timeouts("o3-mini", streaming=True).first_event >= 600  # thinks before its first event
    assert f.timeouts("o3-mini", streaming=True).first_byte <= 30  # but its headers come at once
    custom = FailoverConfig(models=(("o3*", FailoverConfig().models[0][1]),))
    assert custom.timeouts("o3", False).first_byte == 600


async def test_a_silent_origin_is_not_waited_on_again_over_another_line(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    cfg = primary_and_fallback(origin.url, fallback.url, lines=True, failover={"stream_first_byte_timeout": "1s"})
    p = await make_proxy(cfg)
    origin.model_failures["model-x"] = ModelFailure(silent=True)
    status, body, took = await ask(p.url, "model-x", stream=True)
    # one wait on the primary (its line answers probes: the silence is the origin's), then
    # the fallback endpoint, not the primary again over line b
    assert status == 200 and b"[DONE]" in body and took < 2.9
    assert len(origin.requests) == 1 and len(fallback.requests) == 1


async def test_a_black_holed_line_is_still_escaped_to_the_same_endpoint(origin: FakeOrigin, make_proxy: Any) -> None:
    """Only one endpoint, two lines: a timeout that is the origin's still retries over the
    other line when nothing else is left (the avoided endpoint is a fallback, not banned)."""
    cfg = proxy_config(origin.url, failover={"stream_first_byte_timeout": "1s"})
    cfg["lines"] = {"a": {"bind": "127.0.0.2"}, "b": {"bind": "127.0.0.3"}}
    cfg["upstreams"]["openai"]["endpoints"][0]["lines"] = ["a", "b"]
    p = await make_proxy(cfg)
    origin.model_failures["model-x"] = ModelFailure(silent=True)
    status, _, _ = await ask(p.url, "model-x", stream=True)
    assert status == 504  # silent everywhere: the client gets our timeout, after both lines
    assert len(origin.requests) == 2


async def test_the_access_log_names_the_model(origin: FakeOrigin, make_proxy: Any, tmp_path: Path) -> None:
    p = await make_proxy(proxy_config(origin.url))
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        assert (await ask(p.url, "gpt-4o-mini"))[0] == 200
        await asyncio.sleep(0.05)  # the log flushes on the next loop turn
    assert orjson.loads(log_path.read_bytes().splitlines()[-1])["model"] == "gpt-4o-mini"


async def test_stalled_streams_count_against_their_model(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    failover = {"stream_idle_timeout": "300ms"}
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover=failover))
    origin.stall_after_events = 2  # the stream starts, then the origin goes quiet (after commit)
    status, body, _ = await ask(p.url, "model-x", stream=True)
    assert status == 200 and b"upstream_timeout" in body and b"[DONE]" not in body  # honest
    origin.stall_after_events = None  # (a stall is silence: one ejects the model there)
    assert (await ask(p.url, "model-x", stream=True))[0] == 200
    assert models_served(fallback) == ["model-x"]  # ejected at the primary for that model
    rows = p.proxy.status()["upstreams"][0]["origins"]
    assert [(r["model"], r["state"]) for r in rows if r["state"] == "ejected"] == [("model-x", "ejected")]


async def test_a_503_sent_on_by_a_fallback_still_counts_against_its_model(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = proxy_config(origin.url, failover={"ejection": {"origin_errors": 2}})
    cfg["upstreams"]["openai"]["fallbacks"] = [{"on": 503, "model": "model-y"}]
    p = await make_proxy(cfg)
    origin.model_failures["model-x"] = ModelFailure(status=503)
    for _ in range(2):
        status, body, _ = await ask(p.url, "model-x")
        assert status == 200 and b'"model":"model-y"' in body  # the fallback model's answer
    (openai,) = [u for u in p.proxy.status()["upstreams"] if u["name"] == "openai"]
    rows = openai["origins"]
    assert [(r["model"], r["state"]) for r in rows if r["state"] == "ejected"] == [("model-x", "ejected")]


async def test_a_stream_begun_before_the_ejection_does_not_restore_it_by_ending(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover={"ejection": {"max_time": "30s"}}))
    origin.event_interval = 0.1  # a long stream of model-x, begun while all is well
    long_stream = asyncio.ensure_future(ask(p.url, "model-x", stream=True))
    await origin.wait_for(lambda: origin.active_streams == 1, 2.0, "the stream began")
    origin.model_failures["model-x"] = ModelFailure(status=503)  # then model-x fails
    for _ in range(5):
        assert (await ask(p.url, "model-x"))[0] == 200
    assert (await long_stream)[0] == 200  # it ends cleanly now, after the ejection
    origin.requests.clear()
    assert (await ask(p.url, "model-x"))[0] == 200
    assert origin.requests == []  # still ejected: that stream's good end predates the outage


async def test_a_silent_model_costs_one_request_its_timeout_not_five(
    origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover={"stream_first_byte_timeout": "1s"}))
    origin.model_failures["model-x"] = ModelFailure(silent=True)
    _, _, first = await ask(p.url, "model-x", stream=True)
    assert first >= 1.0  # the first one waits out the silence...
    for _ in range(3):
        status, _, took = await ask(p.url, "model-x", stream=True)
        assert status == 200 and took < 0.9  # ...the next ones go straight to the fallback
    assert len(origin.requests) == 1
    assert (await ask(p.url, "model-y", stream=True))[0] == 200 and len(origin.requests) == 2  # others stay

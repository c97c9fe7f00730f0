"""Review of issue 13 (per-model health): bugs found, each proven on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from edgeproxy.config import load_file
from edgeproxy.ops.server import Proxy
from edgeproxy.proto.models import request_model
from edgeproxy.routing import state as state_module
from tests.conftest import free_port, proxy_config
from tests.fakes.origin import FakeOrigin, ModelFailure
from tests.test_model_health import ask, models_served, primary_and_fallback


def gemini_pair(primary: str, second: str, **over: Any) -> dict[str, Any]:
    cfg = proxy_config("", **over)
    cfg["upstreams"] = {
        "gemini": {
            "prefix": "/gemini",
            "provider": "gemini",
            "endpoints": [{"url": primary, "priority": 1}, {"url": second, "priority": 2}],
        }
    }
    cfg.setdefault("probe", {"interval": "1s", "timeout": "500ms"})
    return cfg


def conversation() -> dict[str, Any]:
    """A Gemini chat with history: its assistant turns have "role": "model"."""
    turns = [("user", "hi"), ("model", "hello"), ("user", "and?"), ("model", "well"), ("user", "go on")]
    return {"contents": [{"role": r, "parts": [{"text": t}]} for r, t in turns]}


async def ask_gemini(url: str, model: str) -> int:
    target = f"{url}/gemini/v1beta/models/{model}:generateContent"
    async with aiohttp.ClientSession() as s, s.post(target, json=conversation()) as r:
        await r.read()
        return r.status


def gemini_served(origin: FakeOrigin) -> list[str]:
    return [r.path_only.rsplit("/models/", 1)[1].split(":")[0] for r in origin.requests]


def test_a_gemini_conversation_names_its_model_in_the_url() -> None:
    target = "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    assert request_model(orjson.dumps(conversation()), target) == "gemini-2.5-pro"
    one_model_turn = {"contents": conversation()["contents"][:3]}
    assert request_model(orjson.dumps(one_model_turn), target) == "gemini-2.5-pro"
    # a tool call's argument named "model" in the history is not the request's model
    call = {"contents": [{"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"model": "x"}}}]}]}
    assert request_model(orjson.dumps(call), target) == "gemini-2.5-pro"


async def test_a_gemini_429_for_one_model_in_a_conversation_cools_only_that_model(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
) -> None:
    p = await make_proxy(gemini_pair(origin.url, fallback.url))
    origin.model_failures["gemini-x"] = ModelFailure(status=429, retry_after="5")
    assert await ask_gemini(p.url, "gemini-x") == 200  # the 429, then the fallback
    origin.requests.clear()
    fallback.requests.clear()
    assert await ask_gemini(p.url, "gemini-y") == 200
    assert gemini_served(origin) == ["gemini-y"]  # the pause was gemini-x's only


async def model_x_ejected_briefly(origin: FakeOrigin, fallback: FakeOrigin, make_proxy: Any) -> Any:
    """A proxy whose primary ejected model-x for 300 ms (two 503s) and whose ejection is over:
    its next request for model-x is the half-open trial."""
    ejection = {"origin_errors": 2, "base_time": "300ms", "max_time": "300ms"}
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover={"ejection": ejection}))
    origin.model_failures["model-x"] = ModelFailure(status=503)
    for _ in range(2):
        assert (await ask(p.url, "model-x"))[0] == 200
    await asyncio.sleep(0.4)
    return p


async def test_a_trial_answered_429_does_not_hold_the_model_out_for_30s(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
) -> None:
    p = await model_x_ejected_briefly(origin, fallback, make_proxy)
    origin.model_failures["model-x"] = ModelFailure(status=429, retry_after="1")
    assert (await ask(p.url, "model-x"))[0] == 200  # the trial: a 429, rescued by the fallback
    del origin.model_failures["model-x"]
    await asyncio.sleep(1.3)  # the pause the 429 asked for is over
    origin.requests.clear()
    for _ in range(2):
        assert (await ask(p.url, "model-x"))[0] == 200
        await asyncio.sleep(0.4)
    assert models_served(origin) != []  # back on the primary (a trial, at least)


async def test_a_trial_whose_client_left_does_not_hold_the_model_out_for_30s(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
) -> None:
    p = await model_x_ejected_briefly(origin, fallback, make_proxy)
    origin.model_failures["model-x"] = ModelFailure(status=None, delay=1.0)  # recovered, but slow
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.3):
            await ask(p.url, "model-x")  # the trial; its client gives up and leaves
    del origin.model_failures["model-x"]
    await asyncio.sleep(1.0)
    origin.requests.clear()
    for _ in range(2):
        assert (await ask(p.url, "model-x"))[0] == 200
        await asyncio.sleep(0.4)
    assert models_served(origin) != []  # a new trial went to the primary


async def test_forgotten_entries_do_not_switch_off_per_model_cool_downs(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_module, "MAX_ORIGINS", 4)  # (256 in production: 256 models ever paused)
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url))
    for i in range(4):  # four models each paused once, long ago (rarely used since)
        origin.model_failures[f"rare-{i}"] = ModelFailure(status=429, retry_after="0.2")
        assert (await ask(p.url, f"rare-{i}"))[0] == 200
    await asyncio.sleep(0.3)  # every pause is over: nothing is wrong anywhere
    origin.model_failures["model-x"] = ModelFailure(status=429, retry_after="5")
    assert (await ask(p.url, "model-x"))[0] == 200
    origin.requests.clear()
    assert (await ask(p.url, "model-x"))[0] == 200
    assert models_served(origin) == []  # model-x is paused at the primary for 5 s


async def test_a_path_rebuilt_by_a_reload_does_not_lift_a_models_ejection(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    tmp_path: Path,
) -> None:
    conf, port = tmp_path / "c.yaml", free_port()
    cfg = primary_and_fallback(
        origin.url, fallback.url, failover={"ejection": {"origin_errors": 2, "base_time": "1m", "max_time": "1m"}}
    )
    cfg["listen"] = f"127.0.0.1:{port}"
    cfg["lines"] = {"a": {}}
    for ep in cfg["upstreams"]["openai"]["endpoints"]:
        ep["lines"] = ["a"]
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        url = f"http://127.0.0.1:{port}"
        origin.model_failures["model-x"] = ModelFailure(status=503)
        for _ in range(2):
            assert (await ask(url, "model-x"))[0] == 200
        rows = proxy.status()["upstreams"][0]["origins"]
        assert [r["model"] for r in rows if r["state"] == "ejected"] == ["model-x"]
        cfg["lines"] = {"a": {"bind": "127.0.0.1"}}  # a line setting changed: its paths are new
        conf.write_text(yaml.safe_dump(cfg))
        ok, summary = await proxy.reload()
        assert ok and "rebuilt" in summary, summary
        await asyncio.sleep(1.5)  # the new paths' first probes: "up"
        rows = proxy.status()["upstreams"][0]["origins"]
        assert [r["model"] for r in rows if r["state"] == "ejected"] == ["model-x"]  # still failing
    finally:
        await proxy.stop(1.0)


async def test_a_model_name_cannot_write_lines_into_the_log(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = await make_proxy(primary_and_fallback(origin.url, fallback.url, failover={"ejection": {"origin_errors": 2}}))
    evil = "x at a:b after nothing\n2099-01-01 WARNING forged line"
    origin.model_failures[evil] = ModelFailure(status=503)
    body = {"model": evil, "messages": [{"role": "user", "content": "hi"}], "metadata": {"model": "y"}}
    with caplog.at_level(logging.INFO, logger="edgeproxy"):
        for _ in range(2):
            async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
    assert not any("\n" in rec.getMessage() for rec in caplog.records if rec.name == "edgeproxy")


async def test_a_big_body_naming_model_twice_is_not_parsed_on_the_event_loop(
    origin: FakeOrigin, make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from edgeproxy.proto import models

    threads: list[str] = []
    parsed = models._parsed

    def spy(body: bytes) -> str | None:
        threads.append(threading.current_thread().name)
        return parsed(body)

    monkeypatch.setattr(models, "_parsed", spy)
    p = await make_proxy(proxy_config(origin.url))
    tool = {"type": "function", "function": {"name": "pick", "parameters": {"properties": {"model": {}}}}}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 4_000_000}], "tools": [tool]}
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
    assert threads and threads[0] != threading.main_thread().name  # 4 MB parsed off the loop


async def test_a_line_ejection_lifted_by_a_probe_is_counted_as_a_restore(
    origin: FakeOrigin,
    fallback: FakeOrigin,
    make_proxy: Any,
) -> None:
    cfg = primary_and_fallback(origin.url, fallback.url, failover={"ejection": {"base_time": "1m", "max_time": "1m"}})
    p = await make_proxy(cfg)
    origin.drop_after_events, origin.drop_times = 0, 3  # reset before the first event: the line's
    for _ in range(3):
        assert (await ask(p.url, "model-x", stream=True))[0] == 200  # rescued by the fallback
    labels = ("openai", origin.url + "/v1", "direct", "*")
    assert p.proxy.metrics.ejections.values[labels] == 1
    await origin.wait_for(
        lambda: all(x["state"] == "up" for x in p.proxy.status()["upstreams"][0]["paths"]), 3.0, "a probe lifted it"
    )
    assert p.proxy.metrics.restores.values.get(labels) == 1  # README: restores are counted like ejections

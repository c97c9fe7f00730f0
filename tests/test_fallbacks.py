"""Error-aware fallbacks (upstreams.X.fallbacks), over real sockets: an origin's error answer
sends the request again with another model; everything else passes through unchanged."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeproxy.config import ConfigError, load_dict, load_file
from edgeproxy.proto.providers import error_codes
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin, ModelFailure

CTX = ModelFailure(status=400, code="context_length_exceeded", message="This model's maximum context length is 8192")
HI: Any = [{"role": "user", "content": "hi"}]


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, **extra}


def with_fallbacks(origin_url: str, fallbacks: list[Any], upstream: str = "openai", **over: Any) -> Any:
    cfg = proxy_config(origin_url, **over)
    cfg["upstreams"][upstream]["fallbacks"] = fallbacks
    return cfg


async def post(url: str, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, **kw) as r:
        return r.status, await r.read()


def models_seen(origin: FakeOrigin) -> list[str | None]:
    return [orjson.loads(r.body).get("model") if r.body else None for r in origin.requests]


def fallbacks_counted(p: RunningProxy) -> dict[tuple[str, ...], float]:
    return dict(p.proxy.metrics.fallbacks.values)


@pytest.fixture
def access_log(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


async def logged(p: RunningProxy, log_path: Path, call: Any) -> dict[str, Any]:
    """The access-log record of the one request ``call`` makes."""
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        await call()
        await asyncio.sleep(0.05)  # the log flushes on the next loop turn
    record: dict[str, Any] = orjson.loads(log_path.read_bytes().splitlines()[-1])
    return record


# -- the official SDKs get the fallback model's answer ------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_gets_the_fallback_models_answer(origin: FakeOrigin, make_proxy: Any, stream: bool) -> None:
    p = await make_proxy(with_fallbacks(origin.url, [{"on": "context_length_exceeded", "model": "gpt-4.1"}]))
    origin.model_failures["gpt-4o-mini"] = CTX
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        if stream:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
                )
            ]
            assert {c.model for c in chunks} == {"gpt-4.1"}
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"
            usage = chunks[-1].usage
        else:
            r = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
            assert r.model == "gpt-4.1" and r.choices[0].message.content == "echo: hi"
            usage = r.usage
    finally:
        await client.close()
    assert usage is not None and usage.total_tokens > 0  # the fallback model's own usage
    assert models_seen(origin) == ["gpt-4o-mini", "gpt-4.1"]
    assert fallbacks_counted(p) == {("openai", "context_length_exceeded", "gpt-4.1"): 1}
    tokens = p.proxy.metrics.tokens.values
    assert {labels[1] for labels in tokens} == {"gpt-4.1"}  # metered under the model that answered


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_sdk_falls_back_on_its_error_type(origin: FakeOrigin, make_proxy: Any, stream: bool) -> None:
    fallbacks = [{"on": "overloaded_error", "model": "claude-sonnet-4-5"}]
    p = await make_proxy(with_fallbacks(origin.url, fallbacks, upstream="anthropic"))
    origin.model_failures["claude-opus-4-1"] = ModelFailure(status=529, code="overloaded_error")
    client = anthropic.AsyncAnthropic(base_url=p.url + "/anthropic", api_key="sk-ant-test", max_retries=0)
    message: Any
    try:
        if stream:
            async with client.messages.stream(model="claude-opus-4-1", max_tokens=10, messages=HI) as s:
                text = "".join([t async for t in s.text_stream])
                message = await s.get_final_message()
            assert text == "echo: hi"
        else:
            message = await client.messages.create(model="claude-opus-4-1", max_tokens=10, messages=HI)
            assert message.content[0].text == "echo: hi"
    finally:
        await client.close()
    assert message.model == "claude-sonnet-4-5" and message.usage.output_tokens > 0
    assert models_seen(origin) == ["claude-opus-4-1", "claude-sonnet-4-5"]
    assert fallbacks_counted(p) == {("anthropic", "overloaded_error", "claude-sonnet-4-5"): 1}


async def test_gemini_falls_back_in_the_url(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(
        with_fallbacks(origin.url, [{"on": "RESOURCE_EXHAUSTED", "model": "gemini-2.0-flash-lite"}], "gemini")
    )
    origin.model_failures["gemini-2.0-flash"] = ModelFailure(status=429)  # Gemini's status: RESOURCE_EXHAUSTED
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, answer = await post(p.url, body, "/gemini/v1beta/models/gemini-2.0-flash:generateContent?alt=json")
    assert status == 200, answer
    assert [r.path for r in origin.requests] == [
        "/v1beta/models/gemini-2.0-flash:generateContent?alt=json",
        "/v1beta/models/gemini-2.0-flash-lite:generateContent?alt=json",
    ]
    assert origin.requests[1].body == origin.requests[0].body  # the body as sent: it names no model


# -- what is matched, what is never rerouted ----------------------------------------------


@pytest.mark.parametrize("code", ["content_policy_violation", "content_filter"])
async def test_content_policy_refusal_is_not_rerouted_unless_listed(
    origin: FakeOrigin, make_proxy: Any, code: str
) -> None:
    # A status entry and the error's type both match the answer; neither reroutes a refusal.
    fallbacks = [{"on": 400, "model": "gpt-4.1"}, {"on": "invalid_request_error", "model": "gpt-4o"}]
    p = await make_proxy(with_fallbacks(origin.url, fallbacks))
    origin.model_failures["gpt-4o-mini"] = ModelFailure(status=400, code=code, message="refused by policy")
    status, body = await post(p.url, chat())
    assert status == 400 and orjson.loads(body)["error"]["code"] == code
    assert models_seen(origin) == ["gpt-4o-mini"] and fallbacks_counted(p) == {}
    # Listed by its code, it is.
    p2 = await make_proxy(with_fallbacks(origin.url, [{"on": code, "model": "gpt-4.1"}]))
    status, body = await post(p2.url, chat())
    assert status == 200 and orjson.loads(body)["model"] == "gpt-4.1"


async def test_status_fallback_wins_over_retry_on(origin: FakeOrigin, make_proxy: Any) -> None:
    # 503 is in retry_on (the default), and there is no other path: the fallback takes it.
    p = await make_proxy(with_fallbacks(origin.url, [{"on": "503", "model": "gpt-4o"}]))
    origin.model_failures["gpt-4o-mini"] = ModelFailure(status=503)
    status, body = await post(p.url, chat())
    assert status == 200 and orjson.loads(body)["model"] == "gpt-4o"
    assert models_seen(origin) == ["gpt-4o-mini", "gpt-4o"]
    assert fallbacks_counted(p) == {("openai", "503", "gpt-4o"): 1}


async def test_an_unmatched_error_passes_through_unchanged(origin: FakeOrigin, make_proxy: Any) -> None:
    fallbacks = [{"on": "context_length_exceeded", "model": "gpt-4.1"}, {"on": 404, "model": "gpt-4o"}]
    p = await make_proxy(with_fallbacks(origin.url, fallbacks))
    origin.model_failures["gpt-4o-mini"] = ModelFailure(status=400, code="invalid_value", message="m" * 3000)
    async with aiohttp.ClientSession() as s:
        async with s.post(origin.url + "/v1/chat/completions", json=chat()) as r:
            direct = await r.read()
        status, body = await post(p.url, chat())
    assert status == 400 and body == direct  # read for the look, every byte still relayed
    assert models_seen(origin) == ["gpt-4o-mini"] * 2


async def test_from_limits_an_entry_to_one_model(origin: FakeOrigin, make_proxy: Any) -> None:
    fallbacks = [{"on": "context_length_exceeded", "model": "gpt-4.1", "from": "gpt-4o"}]
    p = await make_proxy(with_fallbacks(origin.url, fallbacks))
    origin.model_failures["gpt-4o-mini"] = origin.model_failures["gpt-4o"] = CTX
    assert (await post(p.url, chat("gpt-4o-mini")))[0] == 400
    status, body = await post(p.url, chat("gpt-4o"))
    assert status == 200 and orjson.loads(body)["model"] == "gpt-4.1"
    assert models_seen(origin) == ["gpt-4o-mini", "gpt-4o", "gpt-4.1"]


async def test_a_coded_error_body_is_decoded_for_the_look(make_proxy: Any) -> None:
    """OpenAI gzips its answers, errors included, for clients that accept it (the SDKs do)."""
    seen: list[str] = []

    async def completions(request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        seen.append(model)
        if model == "gpt-4o-mini":
            error = {
                "error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}
            }
            return web.Response(
                status=400,
                body=gzip.compress(orjson.dumps(error)),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return web.json_response({"object": "chat.completion", "model": model, "choices": []})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        cfg = with_fallbacks(f"http://127.0.0.1:{port}", [{"on": "context_length_exceeded", "model": "gpt-4.1"}])
        p = await make_proxy(cfg)
        status, body = await post(p.url, chat(), headers={"Accept-Encoding": "gzip"})
        assert status == 200 and orjson.loads(body)["model"] == "gpt-4.1"
        assert seen == ["gpt-4o-mini", "gpt-4.1"]
    finally:
        await runner.cleanup()


# -- where it goes, how far, and what it counts as --------------------------------------------


async def test_fallback_model_on_another_endpoint_is_renamed_there(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """The fallback is planned like a new request: the endpoint that serves it (the other one:
    this one's gpt-4.1 is down) gets it under its own name for it."""
    cfg = with_fallbacks("", [{"on": "context_length_exceeded", "model": "gpt-4.1"}])
    cfg["upstreams"] = {
        "openai": {
            "prefix": "/v1",
            "endpoints": [
                {"url": origin.url + "/v1"},
                {"url": origin2.url + "/v1", "models": {"gpt-4.1": "gpt-4.1-b"}},
            ],
            "fallbacks": cfg["upstreams"]["openai"]["fallbacks"],
        }
    }
    p = await make_proxy(cfg)
    for o in (origin, origin2):
        o.model_failures["gpt-4o-mini"] = CTX
    origin.model_failures["gpt-4.1"] = ModelFailure(status=503)
    for _ in range(3):
        status, body = await post(p.url, chat())
        assert status == 200 and orjson.loads(body)["model"] == "gpt-4.1-b"  # as that origin names it
    assert set(models_seen(origin2)) <= {"gpt-4o-mini", "gpt-4.1-b"} and "gpt-4.1-b" in models_seen(origin2)
    assert "gpt-4.1-b" not in models_seen(origin)


async def test_the_fallback_models_timeouts_apply(origin: FakeOrigin, make_proxy: Any) -> None:
    """Timeouts are per model (failover.models): the fallback's, not the asked model's."""
    fallbacks = [{"on": "context_length_exceeded", "model": "slow-model"}]
    failover = {"retries": 0, "models": {"slow-*": {"first_byte_timeout": "300ms"}}}
    p = await make_proxy(with_fallbacks(origin.url, fallbacks, failover=failover))
    origin.model_failures["gpt-4o-mini"] = CTX
    origin.model_failures["slow-model"] = ModelFailure(status=None, delay=3.0)
    started = asyncio.get_running_loop().time()
    status, body = await post(p.url, chat())
    assert status == 504 and asyncio.get_running_loop().time() - started < 2.0, body
    assert models_seen(origin) == ["gpt-4o-mini", "slow-model"]


async def test_chains_are_bounded(origin: FakeOrigin, make_proxy: Any, access_log: Path) -> None:
    fallbacks = [
        {"on": "context_length_exceeded", "model": "gpt-4.1"},
        {"on": "model_not_found", "model": "gpt-4o"},
        {"on": "context_length_exceeded", "model": "gpt-4o-mini"},  # back to the first: never
        {"on": 400, "model": "gpt-4.1"},  # tried already: never
    ]
    p = await make_proxy(with_fallbacks(origin.url, fallbacks))
    origin.model_failures.update(
        {"gpt-4o-mini": CTX, "gpt-4.1": ModelFailure(status=404, code="model_not_found"), "gpt-4o": CTX}
    )
    record = await logged(p, access_log, lambda: post(p.url, chat()))
    assert record["status"] == 400  # the last model's own answer
    assert models_seen(origin) == ["gpt-4o-mini", "gpt-4.1", "gpt-4o"]
    assert [(a["outcome"], a.get("fallback")) for a in record["attempt_log"]] == [
        ("400", "context_length_exceeded -> gpt-4.1"),
        ("404", "model_not_found -> gpt-4o"),
        ("ok", None),
    ]
    assert record["model"] == "gpt-4o" and record["fallback_from"] == "gpt-4o-mini"


async def test_attempt_log_says_why(origin: FakeOrigin, make_proxy: Any, access_log: Path) -> None:
    p = await make_proxy(with_fallbacks(origin.url, [{"on": "context_length_exceeded", "model": "gpt-4.1"}]))
    origin.model_failures["gpt-4o-mini"] = CTX
    record = await logged(p, access_log, lambda: post(p.url, chat()))
    assert record["status"] == 200 and record["error"] is None
    assert record["model"] == "gpt-4.1" and record["fallback_from"] == "gpt-4o-mini"
    first, second = record["attempt_log"]
    assert first["outcome"] == "400" and first["fallback"] == "context_length_exceeded -> gpt-4.1"
    assert second["outcome"] == "ok" and "fallback" not in second
    assert p.proxy.metrics.attempts.values[("openai", "direct", "400")] == 1


async def test_a_fallback_is_not_a_retry(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    """Neither failover.retries nor the retry budget stop it; a fallback match wins over a
    retry_on that lists the status: the next attempt carries the new model, not the old one
    on another endpoint."""
    cfg = with_fallbacks("", [{"on": "context_length_exceeded", "model": "gpt-4.1"}])
    cfg["upstreams"] = {
        "openai": {
            "prefix": "/v1",
            "endpoints": [origin.url + "/v1", origin2.url + "/v1"],
            "failover": {"retries": 0, "retry_on": ["connect", "reset", "400", "503"]},
            "fallbacks": cfg["upstreams"]["openai"]["fallbacks"],
        }
    }
    p = await make_proxy(cfg)
    for o in (origin, origin2):
        o.model_failures["gpt-4o-mini"] = CTX
    results = [await post(p.url, chat()) for _ in range(40)]  # far past what the budget allows retries
    assert [s for s, _ in results] == [200] * 40
    assert {orjson.loads(b)["model"] for _, b in results} == {"gpt-4.1"}
    seen = models_seen(origin) + models_seen(origin2)
    assert seen.count("gpt-4o-mini") == 40 and seen.count("gpt-4.1") == 40  # never the old model twice
    assert p.proxy.metrics.budget_exhausted.values == {} and p.proxy.metrics.failovers.values == {}


async def test_a_streamed_upload_passes_the_error_through(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = with_fallbacks(origin.url, [{"on": "context_length_exceeded", "model": "gpt-4.1"}])
    cfg["limits"] = {"replay_body": "1KiB"}  # a body past it streams through: it cannot be sent again
    p = await make_proxy(cfg)
    origin.model_failures["gpt-4o-mini"] = CTX
    long = chat(messages=[{"role": "user", "content": "x" * 8000}])
    status, body = await post(p.url, long)
    assert status == 400 and orjson.loads(body)["error"]["code"] == "context_length_exceeded"
    assert models_seen(origin) == ["gpt-4o-mini"] and fallbacks_counted(p) == {}
    status, body = await post(p.url, chat())  # a small one is held: it falls back
    assert status == 200 and orjson.loads(body)["model"] == "gpt-4.1"


async def test_no_fallbacks_no_filter(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(with_fallbacks(origin.url, [{"on": 400, "model": "gpt-4.1"}]))
    chains = p.proxy.listeners[0].engine.pipeline.chains
    assert [type(f).__name__ for f in chains["openai"].filters] == ["UsageMeter", "Fallbacks"]
    assert [type(f).__name__ for f in chains["anthropic"].filters] == ["UsageMeter"]
    assert chains["anthropic"].answer == ()


# -- config ---------------------------------------------------------------------------------


def config_errors(fallbacks: object, provider: str = "openai") -> tuple[str, ...]:
    upstream = {"prefix": "/v1", "provider": provider, "endpoints": ["https://api.example.com/v1"]}
    with pytest.raises(ConfigError) as info:
        load_dict({"upstreams": {"u": {**upstream, "fallbacks": fallbacks}}}, env={})
    return info.value.errors


def test_config_errors_name_the_key_path() -> None:
    assert config_errors({"on": 400}) == (
        "upstreams.u.fallbacks: expected a list of {on: <error code or status>, model: <model>}, got a mapping",
    )
    errors = config_errors(
        [
            {"on": "context_length_exceeded", "model": "gpt-4.1"},
            {"on": "context_length_exceeded"},
            {"model": "gpt-4.1"},
            {"on": 200, "model": "a"},
            {"on": "two words", "model": "a"},
            {"on": 400, "model": "a", "from": "a"},
            {"on": 400, "model": 4},
            {"on": 400, "model": "b", "form": "c"},
            "gpt-4.1",
            {"on": "context_length_exceeded", "model": "gpt-4.1"},
            {"on": True, "model": "a"},
        ]
    )
    assert [e.split(": ", 1)[0] for e in errors] == [
        "upstreams.u.fallbacks[1].model",
        "upstreams.u.fallbacks[2].on",
        "upstreams.u.fallbacks[3].on",
        "upstreams.u.fallbacks[4].on",
        "upstreams.u.fallbacks[5].model",
        "upstreams.u.fallbacks[6].model",
        "upstreams.u.fallbacks[7].form",
        "upstreams.u.fallbacks[8]",
        "upstreams.u.fallbacks[9]",
        "upstreams.u.fallbacks[10].on",
    ]
    assert errors[0].startswith("upstreams.u.fallbacks[1].model: required")
    assert errors[2] == "upstreams.u.fallbacks[3].on: 200 is not a status 400-599 (only error answers are rerouted)"
    assert "is the model it falls back from" in errors[4] and "did you mean 'from'" in errors[6]
    assert errors[8].endswith("the same fallback as upstreams.u.fallbacks[0]")
    # A Gemini model goes into the URL's path.
    assert config_errors([{"on": "NOT_FOUND", "model": "a/b"}], "gemini") == (
        "upstreams.u.fallbacks[0].model: 'a/b' is not a model name (1-200 characters: letters, digits, _ . -)",
    )


def test_config_yaml_on_key_and_statuses(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `on:` key as true: it is still `on`. Statuses as numbers or strings."""
    f = tmp_path / "c.yaml"
    f.write_text(
        "upstreams:\n  openai:\n    prefix: /v1\n    endpoints: [https://api.openai.com/v1]\n    fallbacks:\n"
        "      - {on: context_length_exceeded, model: gpt-4.1}\n"
        "      - {on: 503, model: gpt-4o, from: gpt-4.1}\n"
        "      - {on: '529', model: gpt-4o}\n"
    )
    (upstream,) = load_file(str(f)).upstreams
    assert [(x.on, x.model, x.from_model, x.status) for x in upstream.fallbacks] == [
        ("context_length_exceeded", "gpt-4.1", None, None),
        ("503", "gpt-4o", "gpt-4.1", 503),
        ("529", "gpt-4o", None, 529),
    ]


def test_error_codes_of_each_provider() -> None:
    openai_ = b'{"error": {"message": "m", "type": "invalid_request_error", "code": "context_length_exceeded"}}'
    assert error_codes(openai_) == {"invalid_request_error", "context_length_exceeded"}
    assert error_codes(b'{"type": "error", "error": {"type": "not_found_error", "message": "m"}}') == {
        "not_found_error"
    }
    gemini = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"reason": "RATE_LIMIT_EXCEEDED"}]}}
    assert error_codes(orjson.dumps([gemini])) == {"resource_exhausted", "rate_limit_exceeded"}
    azure = {"error": {"code": "content_filter", "innererror": {"code": "ResponsibleAIPolicyViolation"}}}
    assert error_codes(orjson.dumps(azure)) == {"content_filter", "responsibleaipolicyviolation"}
    assert error_codes(b"<html>502 Bad Gateway</html>") == frozenset()

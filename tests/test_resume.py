"""Mid-stream resume (`failover.resume: on`): an Anthropic stream broken after commit goes on
from another endpoint, and the official SDK assembles exactly the answer, once; wherever it
cannot, the client gets the in-band error of the original break, as without resume.

Over real sockets: edgeproxy in front of two fake origins; the first breaks the stream
(drop_after_events, stall_after_events), the second answers the prefilled request with the
rest of the reply.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from edgeproxy.config import ConfigError, load_dict
from edgeproxy.filters.prefill import Received, Splice, continue_request
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import proxy_config
from tests.fakes.origin import FakeOrigin, reply_for

PROMPT = "tell me how a broken stream goes on from another endpoint, without repeating itself"
FULL = reply_for(PROMPT)
# Words of 4 characters and 20 events: every delta ends in a space, the prefill's trailing
# whitespace (which the API refuses) is cut and must not come twice.
SPACED = "".join(f"w{i:02d} " for i in range(20))
MESSAGES = "/anthropic/v1/messages"


def anthropic_config(urls: list[str], lines: list[str] | None = None, **failover: Any) -> dict[str, Any]:
    """The anthropic upstream on ``urls``, the first preferred (priority), and failover keys."""
    cfg = proxy_config("", failover=failover)
    if lines:
        cfg["lines"] = {name: {} for name in lines}
    eps = [{"url": url, "priority": i + 1} for i, url in enumerate(urls)]
    cfg["upstreams"] = {"anthropic": {"prefix": "/anthropic", "provider": "anthropic", "endpoints": eps}}
    return cfg


def breaking(origin: FakeOrigin, events: int = 20, after: int = 10, times: int = 0) -> None:
    """``origin`` streams ``events`` text deltas and drops after ``after`` frames (3 come
    before the first delta: message_start, content_block_start, ping)."""
    origin.events = events
    origin.drop_after_events = after
    origin.drop_times = times


async def sdk_stream(url: str, prompt: str = PROMPT) -> tuple[str, anthropic.types.Message]:
    client = anthropic.AsyncAnthropic(base_url=url + "/anthropic", api_key="k", max_retries=0)
    try:
        async with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": prompt}]
        ) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
        return text, final
    finally:
        await client.close()


async def raw_stream(url: str, prompt: str = PROMPT) -> list[bytes]:
    """The events of a streamed Messages request, as bytes."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True}
    body["messages"] = [{"role": "user", "content": prompt}]
    async with aiohttp.ClientSession() as s, s.post(url + MESSAGES, json=body) as r:
        assert r.status == 200
        data = await r.read()
    return [e for e in data.split(b"\n\n") if e]


def error_of(events: list[bytes]) -> dict[str, Any]:
    last = events[-1]
    assert last.startswith(b"event: error\ndata: "), last
    return orjson.loads(last.split(b"data: ", 1)[1])  # type: ignore[no-any-return]


def tokens(text: str) -> int:
    return len(text) // 4 + 1  # (the fake origin's count)


# -- it resumes ------------------------------------------------------------------------------


async def test_a_dropped_stream_goes_on_from_the_other_endpoint(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin)
    origin2.events = 20
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        text, final = await sdk_stream(p.url)
        await asyncio.sleep(0.05)  # the log flushes on the next loop turn
    assert text == FULL  # nothing repeated, nothing missing
    assert final.content[0].text == FULL and len(final.content) == 1  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    # the usage covers the whole answer: what came before the break and the continuation
    assert abs(final.usage.output_tokens - tokens(FULL)) <= 2
    assert final.usage.input_tokens == tokens(PROMPT)  # the client's prompt, not the prefilled one
    sent = origin2.requests[-1].json()
    received = FULL[: len(sent["messages"][-1]["content"][0]["text"])]
    assert sent["messages"][:-1] == [{"role": "user", "content": PROMPT}]
    assert sent["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": received}]}
    assert 0 < len(received) < len(FULL) and sent["max_tokens"] < 200
    assert len(origin.requests) == 1 and origin.streams_dropped == 1
    assert p.proxy.metrics.resumes.values == {("anthropic", "ok"): 1}
    assert not p.proxy.metrics.stream_errors.values
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["resume"] == "ok" and record["error"] is None and record["status"] == 200
    assert [(a["endpoint"], a["outcome"]) for a in record["attempt_log"]] == [
        ("127.0.0.1", "ok"),
        ("127.0.0.1", "reset_after_commit"),
        ("127.0.0.1", "ok"),
    ]


async def test_the_whitespace_the_prefill_cannot_end_with_is_not_sent_twice(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    origin.reply = origin2.reply = SPACED
    breaking(origin, after=9)
    origin2.events = 20
    text, final = await sdk_stream(p.url)
    assert text == SPACED
    prefill = origin2.requests[-1].json()["messages"][-1]["content"][0]["text"]
    assert prefill == SPACED[:24].rstrip()  # 6 deltas of "wNN " came, sent back without the last space
    assert abs(final.usage.output_tokens - tokens(SPACED)) <= 2


@pytest.mark.parametrize("after", [1, 2, 3, 4, 22, 23])
async def test_a_break_anywhere_before_the_end_resumes_exactly(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any, after: int
) -> None:
    """After message_start only, after the block's start, after the ping, after one delta,
    after all deltas but one, after every delta (3 frames come before the first delta)."""
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin, after=after)
    origin2.events = 20
    text, final = await sdk_stream(p.url)
    assert text == FULL
    assert [b.type for b in final.content] == ["text"] and final.stop_reason == "end_turn"
    assert p.proxy.metrics.resumes.values == {("anthropic", "ok"): 1}


async def test_a_break_after_the_blocks_end_goes_on_in_a_new_block(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """The client has the block's content_block_stop: the continuation's text is a block of
    its own, numbered after it (here empty: the fake had nothing more to say)."""
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin, after=24)
    origin2.events = 20
    text, final = await sdk_stream(p.url)
    assert text == FULL
    assert [b.text for b in final.content] == [FULL, ""]  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"


async def test_a_stalled_stream_goes_on_from_the_other_endpoint(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on", stream_idle_timeout="500ms"))
    origin.events = origin2.events = 20
    origin.stall_after_events = 12
    text, _ = await sdk_stream(p.url)
    assert text == FULL
    await origin.wait_disconnects(1)  # the stalled stream's connection was closed
    assert p.proxy.metrics.resumes.values == {("anthropic", "ok"): 1}


async def test_another_endpoint_is_preferred_to_another_line_of_the_broken_one(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    # Both lines of the first endpoint come before the second endpoint in the plan (priority);
    # the first endpoint drops every stream, so only the other endpoint can finish it.
    p = await make_proxy(anthropic_config([origin.url, origin2.url], lines=["a", "b"], resume="on"))
    breaking(origin)
    origin2.events = 20
    text, _ = await sdk_stream(p.url)
    assert text == FULL
    assert len(origin.requests) == 1 and len(origin2.requests) == 1


async def test_with_one_endpoint_another_line_will_do(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(anthropic_config([origin.url], lines=["a", "b"], resume="on"))
    breaking(origin, times=1)  # the first stream only
    text, _ = await sdk_stream(p.url)
    assert text == FULL
    assert len(origin.requests) == 2 and origin.requests[-1].json()["messages"][-1]["role"] == "assistant"


async def test_resume_from_a_global_switch_with_env_and_yaml_words(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    cfg = anthropic_config([origin.url, origin2.url])
    cfg["failover"] = {"resume": "${RESUME}"}
    p = await make_proxy(cfg, env={"RESUME": "on"})
    breaking(origin)
    origin2.events = 20
    assert (await sdk_stream(p.url))[0] == FULL


# -- it does not, and the client gets the original break's error ----------------------------


async def original_error(origin: FakeOrigin, make_proxy: Any) -> dict[str, Any]:
    """What a client gets today when the stream drops (one endpoint, resume off)."""
    p = await make_proxy(anthropic_config([origin.url]))
    breaking(origin)
    return error_of(await raw_stream(p.url))


async def test_resume_off_is_todays_in_band_error(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(anthropic_config([origin.url, origin2.url]))
    breaking(origin)
    events = await raw_stream(p.url)
    assert len(events) == 11  # the 10 frames the origin sent, then the error
    assert error_of(events)["error"]["type"] == "api_error"
    assert "upstream stream broke" in error_of(events)["error"]["message"]
    assert not origin2.requests
    chain = p.proxy.listeners[0].engine.pipeline.chains["anthropic"]
    assert "Resume" not in repr(chain)  # off: not on the chain at all


async def test_a_refused_prefill_ends_with_the_original_error(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    expected = await original_error(origin, make_proxy)
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin)
    origin2.refuse_prefill = True
    events = await raw_stream(p.url)
    assert error_of(events) == expected  # never the prefill's 400
    assert b"prefill" not in b"".join(events)
    assert len(events) == 11
    assert origin2.requests[-1].json()["messages"][-1]["role"] == "assistant"
    assert p.proxy.metrics.resumes.values == {("anthropic", "refused"): 1}
    assert p.proxy.metrics.stream_errors.values == {("anthropic", "reset"): 1}


async def test_the_sdk_sees_the_original_error_when_the_prefill_is_refused(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin)
    origin2.refuse_prefill = True
    with pytest.raises(anthropic.APIStatusError) as err:
        await sdk_stream(p.url)
    assert "upstream stream broke" in str(err.value) and "prefill" not in str(err.value)


async def test_nowhere_else_to_go_ends_with_the_original_error(origin: FakeOrigin, make_proxy: Any) -> None:
    expected = await original_error(origin, make_proxy)
    p = await make_proxy(anthropic_config([origin.url], resume="on"))
    breaking(origin)
    assert error_of(await raw_stream(p.url)) == expected
    assert len(origin.requests) == 2  # (one for the expected error, one here: never a third)
    assert p.proxy.metrics.resumes.values == {("anthropic", "unavailable"): 1}


async def test_a_continuation_that_gets_no_answer_ends_with_the_original_error(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    expected = await original_error(origin, make_proxy)
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on", stream_first_byte_timeout="300ms"))
    breaking(origin)
    origin2.latency = 5.0
    assert error_of(await raw_stream(p.url)) == expected
    assert p.proxy.metrics.resumes.values == {("anthropic", "unavailable"): 1}


async def test_a_second_break_is_not_resumed(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    """At most one resume per request: the continuation's own break ends the stream."""
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin)
    breaking(origin2, after=8)
    events = await raw_stream(p.url)
    assert error_of(events)["error"]["type"] == "api_error"
    deltas = [e for e in events if e.startswith(b"event: content_block_delta")]
    text = "".join(orjson.loads(e.split(b"data: ", 1)[1])["delta"]["text"] for e in deltas)
    assert FULL.startswith(text) and len(text) < len(FULL)  # what came, once, in order
    assert len(origin2.requests) == 1


async def test_an_openai_stream_is_not_resumed(origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any) -> None:
    cfg = proxy_config("", failover={"resume": True})
    cfg["upstreams"] = {
        "openai": {
            "prefix": "/v1",
            "endpoints": [{"url": origin.url + "/v1"}, {"url": origin2.url + "/v1", "priority": 2}],
        }
    }
    p = await make_proxy(cfg)
    origin.events = 20
    origin.drop_after_events = 10
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=body) as r:
        data = await r.read()
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 11 and b"[DONE]" not in data
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_reset"
    assert not origin2.requests and not p.proxy.metrics.resumes.values


async def test_a_client_that_leaves_during_the_continuation_releases_everything(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    p = await make_proxy(anthropic_config([origin.url, origin2.url], resume="on"))
    breaking(origin)
    origin2.latency = 5.0  # the continuation waits for its headers
    body = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True}
    body["messages"] = [{"role": "user", "content": PROMPT}]
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + MESSAGES, json=body) as r:
            await origin2.wait_requests(1, timeout=3)
            r.close()  # the connection goes, while edgeproxy waits for the continuation
    await origin2.wait_disconnects(1, timeout=3)  # the continuation's connection was closed
    engine = p.proxy.listeners[0].engine
    for _ in range(100):
        if not engine.inflight:
            break
        await asyncio.sleep(0.02)
    assert engine.inflight == 0
    assert all(path.inflight == 0 for path in p.proxy.state.paths.values())
    assert p.proxy.metrics.active_streams.values.get(("anthropic",), 0) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not p.proxy.metrics.resumes.values  # (not known: the client left first)


# -- the pieces, without sockets -------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


START = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 5}}}


def block(i: int, kind: str = "text") -> dict[str, Any]:
    return {"type": "content_block_start", "index": i, "content_block": {"type": kind, kind: ""}}


def delta(i: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": text}}


def test_the_tap_keeps_escaped_text_exactly() -> None:
    tap = Received()
    tricky = ['say "hi"\\', "\n\ttab ", "日本語 😀", 'end \\"', "data: x"]
    tap(sse(START, block(0), *(delta(0, t) for t in tricky)))
    assert tap.live and tap.texts() == ["".join(tricky)] and tap.deltas == len(tricky) and tap.input == 15
    # not compact JSON: parsed whole, the same text
    tap(b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
        b'"delta": {"type": "text_delta", "text": "!"}}\n\n')  # fmt: skip
    assert tap.texts() == ["".join(tricky) + "!"]


@pytest.mark.parametrize(
    "events",
    [
        [START, block(0, "thinking")],
        [START, block(0), delta(0, "a"), {"type": "content_block_stop", "index": 0}, block(1, "tool_use")],
        [START, block(0), delta(0, "a"), {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 1}}],
        [START, {"type": "error", "error": {"type": "overloaded_error"}}],
    ],
)
def test_what_cannot_be_continued(events: list[dict[str, Any]]) -> None:
    tap = Received()
    tap(sse(*events))
    assert not tap.live


def test_the_continuation_follows_on_in_the_clients_blocks() -> None:
    tap = Received()
    tap(sse(START, block(0), delta(0, "one "), {"type": "content_block_stop", "index": 0}, block(1), delta(1, "two ")))
    made = continue_request(
        orjson.dumps({"messages": [{"role": "user", "content": "q"}], "stream": True}), tap.texts(), 2
    )
    assert made is not None
    body, cut = made
    assert cut == " "
    assert orjson.loads(body)["messages"][-1]["content"] == [
        {"type": "text", "text": "one "},
        {"type": "text", "text": "two"},
    ]
    splice = Splice(tap, cut)
    cont_start = {"type": "message_start", "message": {"usage": {"input_tokens": 13, "cache_read_input_tokens": 5}}}
    out = splice.process(
        sse(
            cont_start,
            block(0),
            delta(0, " three"),
            {"type": "content_block_stop", "index": 0},
            block(1, "tool_use"),
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 4, "input_tokens": 13}},
            {"type": "message_stop"},
        )
    )
    got = [orjson.loads(e.split(b"data: ", 1)[1]) for e in out.split(b"\n\n") if e]
    assert got == [
        delta(1, "three"),
        {"type": "content_block_stop", "index": 1},
        block(2, "tool_use"),
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 4 + 3}},
        {"type": "message_stop"},
    ]


def test_a_clients_own_prefill_is_extended() -> None:
    body = {
        "stream": True,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{"}],
    }
    made = continue_request(orjson.dumps(body), ['"a": 1'], 3)
    assert made is not None
    doc = orjson.loads(made[0])
    assert doc["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": '{"a": 1'}]}
    assert doc["max_tokens"] == 47 and len(doc["messages"]) == 2


@pytest.mark.parametrize(("value", "on"), [(True, True), ("on", True), ("yes", True), (False, False), ("off", False)])
def test_the_switch_takes_yaml_words(value: object, on: bool) -> None:
    assert load_dict({"failover": {"resume": value}}, env={}).failover.resume is on


def test_a_wrong_switch_is_named_by_its_key_path() -> None:
    cfg = anthropic_config(["https://api.anthropic.com"], resume="sometimes")
    cfg["upstreams"]["anthropic"]["failover"] = {"resume": 1}
    with pytest.raises(ConfigError) as err:
        load_dict(cfg, env={})
    assert sorted(err.value.errors) == [
        "failover.resume: expected on or off, got 'sometimes'",
        "upstreams.anthropic.failover.resume: expected on or off, got an integer",
    ]
    assert load_dict(proxy_config("http://x"), env={}).failover.resume is False  # off unless asked

"""Usage metering: tokens per upstream, model and key, from the responses themselves."""

from __future__ import annotations

import re
from typing import Any

import anthropic
import openai

from edgeproxy.config import key_id
from edgeproxy.filters.usage import StreamTap, from_body, from_stream
from tests.fakes.origin import FakeOrigin
from tests.test_keys import KEYS, keyed, metrics

HI = [{"role": "user", "content": "hello there, how are you today?"}]


def test_usage_is_found_at_the_end_even_when_nested() -> None:
    body = (
        b'{"id":"x","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"message":'
        b'{"content":"a \\"usage\\": {\\"prompt_tokens\\": 999} trap"}}],"usage":{"prompt_tokens":12,'
        b'"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":0},'
        b'"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp"}'
    )
    used = from_body(body)
    assert used is not None and (used.model, used.input, used.output) == ("gpt-4o-2024-08-06", 12, 5)
    assert from_body(b'{"object":"list","data":[]}') is None


def test_anthropic_stream_adds_message_start_and_message_delta() -> None:
    tap = StreamTap()
    tap(
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x",'
        b'"usage":{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":1}}}\n\n'
    )
    for _ in range(10):
        tap(b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n')
    tap(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":42}}\n\n')
    tap(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    used = from_stream(tap)
    assert used is not None and (used.model, used.input, used.output) == ("claude-x", 125, 42)


def _tokens(text: str, model: str, key: str, kind: str) -> float:
    labels = f'key="{re.escape(key)}",model="{re.escape(model)}",type="{kind}"'
    m = re.search(rf'edgeproxy_tokens_total{{{labels},upstream="\w+"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


async def test_tokens_are_metered_per_model_and_key(origin: FakeOrigin, make_proxy: Any) -> None:
    p = await make_proxy(keyed(origin, KEYS[:1]))
    kid = key_id(KEYS[0])
    oa = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=p.url + "/anthropic", api_key="x", max_retries=0)
    try:
        r = await oa.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        assert r.usage is not None
        want_in, want_out = r.usage.prompt_tokens, r.usage.completion_tokens
        stream = await oa.chat.completions.create(
            model="gpt-4o",
            messages=HI,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass
        m = await an.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=HI)  # type: ignore[arg-type]
        async with an.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=HI) as s:  # type: ignore[arg-type]
            final = await s.get_final_message()
    finally:
        await oa.close()
        await an.close()
    text = await metrics(p)
    assert _tokens(text, "gpt-4o", kid, "input") == 2 * want_in
    assert _tokens(text, "gpt-4o", kid, "output") == 2 * want_out
    assert _tokens(text, "claude-sonnet-4-5", kid, "input") == m.usage.input_tokens + final.usage.input_tokens
    assert _tokens(text, "claude-sonnet-4-5", kid, "output") == m.usage.output_tokens + final.usage.output_tokens
    assert KEYS[0] not in text


async def test_client_keys_are_metered_too(origin: FakeOrigin, make_proxy: Any) -> None:
    cfg = keyed(origin, KEYS[:1])
    del cfg["upstreams"]["openai"]["endpoints"][0]["keys"]
    p = await make_proxy(cfg)
    oa = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-client-own", max_retries=0)
    try:
        r = await oa.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    finally:
        await oa.close()
    assert r.usage is not None
    assert _tokens(await metrics(p), "gpt-4o-mini", "client", "output") == r.usage.completion_tokens


async def test_a_local_tpm_budget_is_drained_by_usage(origin: FakeOrigin, make_proxy: Any) -> None:
    # 20 tokens per minute: the first answer's usage spends them all; the next request waits
    # (queue_timeout 0: gets a 429) instead of going to the origin.
    p = await make_proxy(keyed(origin, [{"key": KEYS[0], "tpm": 20}], queue_timeout=0))
    oa = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0)
    try:
        await oa.chat.completions.create(model="gpt-4o", messages=HI * 10)  # type: ignore[arg-type]
        try:
            await oa.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
            raise AssertionError("expected a 429")
        except openai.RateLimitError as err:
            assert float(err.response.headers["retry-after-ms"]) > 1000
    finally:
        await oa.close()
    assert len(origin.requests) == 1

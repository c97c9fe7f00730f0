"""The fake origin is real enough for the official SDKs, used directly (no proxy)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes.origin import FakeOrigin

MSG: Any = [{"role": "user", "content": "hello world"}]
REPLY = "echo: hello world"


def oai(origin: FakeOrigin, timeout: float = 5) -> openai.OpenAI:
    return openai.OpenAI(base_url=origin.url + "/v1", api_key="sk-test", max_retries=0, timeout=timeout)


def aoai(origin: FakeOrigin, timeout: float = 5) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=origin.url + "/v1", api_key="sk-test", max_retries=0, timeout=timeout)


def aant(origin: FakeOrigin, timeout: float = 5) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=origin.url, api_key="ak-test", max_retries=0, timeout=timeout)


@pytest.mark.asyncio
async def test_openai_sync_nonstream_and_stream(origin: FakeOrigin) -> None:
    def run() -> tuple[openai.types.chat.ChatCompletion, list[str]]:
        with oai(origin) as client:
            resp = client.chat.completions.create(model="gpt-test", messages=MSG)
            stream = client.chat.completions.create(model="gpt-test", messages=MSG, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            return resp, pieces

    resp, pieces = await asyncio.to_thread(run)
    assert resp.model == "gpt-test"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert "".join(pieces) == REPLY
    assert origin.streams_completed == 1
    assert [r.path for r in origin.requests] == ["/v1/chat/completions"] * 2
    assert origin.requests[0].headers["Authorization"] == "Bearer sk-test"
    assert origin.requests[0].json()["model"] == "gpt-test"


@pytest.mark.asyncio
async def test_openai_async_stream_with_usage(origin: FakeOrigin) -> None:
    origin.events = 7
    async with aoai(origin) as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len(chunks) == 1 + 7 + 1 + 1  # role, content x events, finish, usage
    ts = [c.model_extra["x_origin_ts"] for c in chunks]  # type: ignore[index]
    assert ts == sorted(ts) and abs(ts[0] - time.time()) < 5


@pytest.mark.asyncio
async def test_anthropic_async_nonstream_and_stream(origin: FakeOrigin) -> None:
    async with aant(origin) as client:
        msg = await client.messages.create(model="claude-test", max_tokens=64, messages=MSG)
        async with client.messages.stream(model="claude-test", max_tokens=64, messages=MSG) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert msg.model == "claude-test" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == REPLY
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens > 0
    assert text == REPLY
    assert final.stop_reason == "end_turn" and final.content[0].text == REPLY  # type: ignore[union-attr]
    h = origin.requests[0].headers  # anthropic SDK 2.x sends the key as a Bearer token
    assert h.get("x-api-key") == "ak-test" or h.get("Authorization") == "Bearer ak-test"
    assert origin.streams_completed == 1


@pytest.mark.asyncio
async def test_failures_surface_as_sdk_errors(origin: FakeOrigin) -> None:
    origin.fail_status = 500
    origin.retry_after = "1"
    async with aoai(origin) as oc, aant(origin) as ac:
        with pytest.raises(openai.InternalServerError) as oe:
            await oc.chat.completions.create(model="m", messages=MSG)
        assert oe.value.status_code == 500 and oe.value.type == "server_error"
        assert oe.value.response.headers["retry-after"] == "1"
        with pytest.raises(anthropic.InternalServerError) as ae:
            await ac.messages.create(model="m", max_tokens=8, messages=MSG)
        assert ae.value.status_code == 500
        assert ae.value.body["error"]["type"] == "api_error"  # type: ignore[index]

        # fail only the next request, then back to normal
        origin.fail_status, origin.fail_times = 429, 1
        with pytest.raises(openai.RateLimitError):
            await oc.chat.completions.create(model="m", messages=MSG)
        assert (await oc.chat.completions.create(model="m", messages=MSG)).choices[0].message.content == REPLY

        origin.require_key = "right"
        with pytest.raises(openai.AuthenticationError):
            await oc.chat.completions.create(model="m", messages=MSG)
        with pytest.raises(anthropic.AuthenticationError):
            await ac.messages.create(model="m", max_tokens=8, messages=MSG)


@pytest.mark.asyncio
async def test_client_disconnect_mid_stream_is_counted(origin: FakeOrigin) -> None:
    origin.events = 50
    origin.event_interval = 5.0  # the next event is far away: the disconnect must be noticed while sleeping
    async with aoai(origin) as client:
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
        await stream.__anext__()  # role chunk
        assert origin.active_streams == 1
        await stream.close()
        await origin.wait_disconnects(1, timeout=1.0)
    assert origin.stream_disconnects == 1 and origin.stream_disconnected_event.is_set()
    assert origin.streams_completed == 0
    await origin.wait_idle()


@pytest.mark.asyncio
async def test_drop_and_stall(origin: FakeOrigin) -> None:
    origin.drop_after_events = 3
    async with aoai(origin) as client:
        got = []
        with pytest.raises(openai.APIConnectionError):
            async for c in await client.chat.completions.create(model="m", messages=MSG, stream=True):
                got.append(c)
        assert len(got) == 3 and origin.streams_dropped == 1

    origin.drop_after_events = None
    origin.stall_after_events = 2
    async with aoai(origin, timeout=0.3) as client:
        got = []
        with pytest.raises(openai.APITimeoutError):
            async for c in await client.chat.completions.create(model="m", messages=MSG, stream=True):
                got.append(c)
        assert len(got) == 2
    await origin.wait_disconnects(1, timeout=1.0)
    assert origin.streams_completed == 0


@pytest.mark.asyncio
async def test_capacity_serves_so_many_at_once_and_the_rest_in_turn(origin: FakeOrigin) -> None:
    origin.capacity, origin.latency = 2, 0.2
    async with aoai(origin) as client:
        t0 = time.monotonic()
        await asyncio.gather(*(client.chat.completions.create(model="m", messages=MSG) for _ in range(5)))
        took = time.monotonic() - t0
    assert origin.max_serving == 2 and origin.serving == 0
    assert took >= 0.55  # three turns of 0.2 s: 5 requests, 2 at a time

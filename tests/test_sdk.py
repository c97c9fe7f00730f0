"""The official SDKs through edgeproxy get exactly what they get going direct."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import RunningProxy
from tests.fakes.origin import FakeOrigin

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 你好 `code`"}]


def _chat(base_url: str, stream: bool) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    try:
        if not stream:
            r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            return {
                "text": r.choices[0].message.content,
                "model": r.model,
                "usage": r.usage.model_dump() if r.usage else None,
            }
        parts: list[str] = []
        usage = None
        with client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        ) as s:
            for chunk in s:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage.model_dump()
        return {"text": "".join(parts), "chunks": len(parts), "usage": usage}
    finally:
        client.close()


async def _achat(base_url: str, stream: bool) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    try:
        if not stream:
            r = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            return {"text": r.choices[0].message.content, "model": r.model}
        parts = []
        async for chunk in await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts), "chunks": len(parts)}
    finally:
        await client.close()


def _messages(base_url: str, stream: bool) -> dict[str, Any]:
    client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0)
    try:
        if not stream:
            r = client.messages.create(
                model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
            )
            return {"text": r.content[0].text, "stop": r.stop_reason, "usage": r.usage.output_tokens}  # type: ignore[union-attr]
        with client.messages.stream(
            model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        return {"text": text, "stop": final.stop_reason}
    finally:
        client.close()


async def _amessages(base_url: str, stream: bool) -> dict[str, Any]:
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0)
    try:
        if not stream:
            r = await client.messages.create(
                model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
            )
            return {"text": r.content[0].text, "stop": r.stop_reason}  # type: ignore[union-attr]
        async with client.messages.stream(
            model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
        ) as s:
            text = "".join([t async for t in s.text_stream])
        return {"text": text}
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sync_same_as_direct(origin: FakeOrigin, proxy: RunningProxy, stream: bool) -> None:
    direct = await asyncio.to_thread(_chat, origin.url + "/v1", stream)
    proxied = await asyncio.to_thread(_chat, proxy.url + "/v1", stream)
    assert proxied == direct
    assert "hello 你好" in proxied["text"]


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_async_same_as_direct(origin: FakeOrigin, proxy: RunningProxy, stream: bool) -> None:
    origin.events = 20
    direct = await _achat(origin.url + "/v1", stream)
    proxied = await _achat(proxy.url + "/v1", stream)
    assert proxied == direct
    if stream:
        assert proxied["chunks"] == 20


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_sync_same_as_direct(origin: FakeOrigin, proxy: RunningProxy, stream: bool) -> None:
    direct = await asyncio.to_thread(_messages, origin.url, stream)
    proxied = await asyncio.to_thread(_messages, proxy.url + "/anthropic", stream)
    assert proxied == direct
    assert proxied["text"]


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_async_same_as_direct(origin: FakeOrigin, proxy: RunningProxy, stream: bool) -> None:
    direct = await _amessages(origin.url, stream)
    proxied = await _amessages(proxy.url + "/anthropic", stream)
    assert proxied == direct


async def test_sdk_sees_origin_errors_unchanged(origin: FakeOrigin, proxy: RunningProxy) -> None:
    origin.fail_status = 400
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    await client.close()
    assert "fake origin failure (400)" in str(err.value)
    assert len(origin.requests) == 1  # a 400 is never retried


async def test_sdk_gets_provider_shaped_error_when_origin_is_down(make_proxy: Any) -> None:
    from tests.conftest import free_port, proxy_config

    dead = f"http://127.0.0.1:{free_port()}"
    p = await make_proxy(proxy_config(dead))
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    await client.close()
    assert err.value.status_code == 502
    assert err.value.response.headers["x-edgeproxy-error"] == "connect"
    assert "connection refused" in str(err.value)

    aclient = anthropic.AsyncAnthropic(base_url=p.url + "/anthropic", api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as aerr:
        await aclient.messages.create(
            model="claude-opus-4-6", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    await aclient.close()
    assert aerr.value.status_code == 502
    assert aerr.value.body["type"] == "error"  # type: ignore[index]

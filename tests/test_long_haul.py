"""The long haul: a black-holed line left at once, endpoints behind a private CA, and honest
logs for clients that hang up as soon as they have their answer. Real sockets throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import proxy_config
from tests.fakes.origin import FakeOrigin

STREAM = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def read_until_done_then_hang_up(url: str) -> bytes:
    """What an SDK does: read events until [DONE], then close the connection at once."""
    got = b""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        resp = await s.post(url + "/v1/chat/completions", json=STREAM)
        async for line in resp.content:
            got += line
            if line.startswith(b"data: [DONE]"):
                break
        resp.close()  # hang up before the body's last chunk
    return got


async def test_a_stream_delivered_whole_is_logged_with_its_status_when_the_client_hangs_up(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.hold_after_end = 1.0  # [DONE] goes out; the body ends a second later
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        got = await read_until_done_then_hang_up(p.url)
        assert b"data: [DONE]" in got
        await origin.wait_for(lambda: origin.stream_disconnects >= 1, 3.0, "the origin saw the stream end")
        await asyncio.sleep(0.1)  # the log flushes on the next loop turn
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["status"] == 200 and record["error"] is None  # not 499 client_disconnected


async def test_a_client_that_leaves_mid_stream_is_still_logged_499(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.events, origin.event_interval = 50, 0.05
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            resp = await s.post(p.url + "/v1/chat/completions", json=STREAM)
            await resp.content.readline()
            resp.close()  # gone after the first event
        await origin.wait_for(lambda: origin.stream_disconnects >= 1, 3.0, "the origin saw the client go")
        await asyncio.sleep(0.1)
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["status"] == 499 and record["error"] == "client_disconnected"

"""The user-space border (tests/fakes/border.py) against an echo server: delay, bandwidth, the
round trip a new connection costs, the black hole."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.fakes.border import HEADERS, MSS, Border


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    t = time.monotonic()
    writer.write(data)
    await reader.readexactly(len(data))
    return time.monotonic() - t


async def test_round_trip_bandwidth_and_the_cost_of_a_new_connection(echo_port: int) -> None:
    border = Border(rate=2e6, rtt=0.1)
    port = border.add_port("127.0.0.1", echo_port)
    await border.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = await _roundtrip(reader, writer, b"x")  # the handshake's round trip, then the echo's
        assert 0.2 <= first < 0.26, first
        assert 0.1 <= await _roundtrip(reader, writer, b"y") < 0.13
        # 50 KB each way at 2 Mbit/s: serialised up, then down (the echo starts with the first segment)
        size = 50_000
        took = await _roundtrip(reader, writer, b"z" * size)
        wire = (size + (size // MSS + 1) * HEADERS) * 8 / 2e6
        assert wire + 0.1 <= took < wire + 0.1 + 0.06, (took, wire)
        got = border.counters(port)
        assert (got["up"], got["down"], got["connections"]) == (size + 2, size + 2, 1)
        assert got["segments_up"] >= size // MSS + 3
        writer.close()
    finally:
        await border.stop()


async def test_connections_share_the_link(echo_port: int) -> None:
    """Two connections sending 25 KB at once take as long as one sending 50 KB."""
    border = Border(rate=2e6, rtt=0.02)
    a, b = border.add_port("127.0.0.1", echo_port), border.add_port("127.0.0.1", echo_port)
    await border.start()
    try:
        conns = [await asyncio.open_connection("127.0.0.1", p) for p in (a, b)]
        for r, w in conns:
            await _roundtrip(r, w, b".")
        took = await asyncio.gather(*(_roundtrip(r, w, b"s" * 25_000) for r, w in conns))
        wire = 50_000 * 8 / 2e6
        assert max(took) >= wire, took
        for _, w in conns:
            w.close()
    finally:
        await border.stop()


async def test_many_new_connections_one_after_another(echo_port: int) -> None:
    """Each new connection's first bytes wait out the handshake's round trip, then cross: none is
    left behind by a timer that fires a little early (uvloop rounds to milliseconds)."""
    border = Border(rate=10e6, rtt=0.01)
    port = border.add_port("127.0.0.1", echo_port)
    await border.start()
    try:
        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(_roundtrip(reader, writer, b"hello"), 1.0) >= 0.02
            writer.close()
    finally:
        await border.stop()


async def test_black_hole_freezes_open_connections_and_new_ones_hang(echo_port: int) -> None:
    border = Border(rate=10e6, rtt=0.02)
    port = border.add_port("127.0.0.1", echo_port)
    await border.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _roundtrip(reader, writer, b"warm")
        border.set_blackhole(True)
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        # a new connection: the SYN goes unanswered (connect() hangs), as in a real black hole
        sock = socket.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 0.5)
        sock.close()
        border.set_blackhole(False)
        assert await asyncio.wait_for(reader.readexactly(4), 1.0) == b"held"
        assert await _roundtrip(reader, writer, b"again") < 0.1
        r2, w2 = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        assert await asyncio.wait_for(_roundtrip(r2, w2, b"new"), 1.0) >= 0.04
        w2.close()
        writer.close()
    finally:
        await border.stop()

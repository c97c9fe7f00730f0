"""The line simulator (tests/fakes/linesim.py) against a tiny echo server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.linesim import LineSim


class EchoServer:
    """Echoes everything; on EOF from the client, closes.  Counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


class SinkServer:
    """Records (monotonic time, total bytes so far) for every chunk received."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrivals: list[tuple[float, int]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.data += data
                self.arrivals.append((time.monotonic(), len(self.data)))
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    e = EchoServer()
    await e.start()
    yield e
    await e.stop()


@pytest.fixture(params=["loop", "thread"])
async def sim(echo: EchoServer, request: pytest.FixtureRequest) -> AsyncIterator[LineSim]:
    """On the test's event loop, or in a thread of its own (uvloop; knobs then set from another thread)."""
    s = LineSim("127.0.0.1", echo.port)
    if request.param == "thread":
        s.start_in_thread()
        yield s
        s.stop_thread()
    else:
        await s.start()
        yield s
        await s.stop()


async def connect(sim: LineSim, source: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local_addr = (source, 0) if source else None
    return await asyncio.open_connection("127.0.0.1", sim.port, local_addr=local_addr)


async def echo_rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"ping") -> float:
    t0 = time.monotonic()
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 2)
    assert got == payload
    return time.monotonic() - t0


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def test_pass_through_counts_bytes_and_half_close(sim: LineSim, echo: EchoServer) -> None:
    assert sim.address == f"127.0.0.1:{sim.port}"
    reader, writer = await connect(sim)
    payload = os.urandom(200_000)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 2) == payload
    assert sim.bytes_up == len(payload)
    assert sim.bytes_down == len(payload)
    assert sim.connections_total == 1
    assert sim.connections_open == 1
    assert echo.connections == 1

    # half-close travels to the target, whose close comes back as EOF
    writer.write(b"last")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b"last"
    await close(writer)
    await sim.wait_for(lambda: sim.connections_open == 0)
    assert sim.bytes_up == sim.bytes_down == len(payload) + 4

    sim.reset_counters()
    assert (sim.connections_total, sim.bytes_up, sim.bytes_down) == (0, 0, 0)


async def test_delay_adds_two_delays_to_round_trip(sim: LineSim) -> None:
    reader, writer = await connect(sim)
    assert await echo_rtt(reader, writer) < 0.05
    sim.delay = 0.05  # applies to new data on the open connection
    rtt = await echo_rtt(reader, writer)
    assert 0.1 <= rtt <= 0.15, rtt
    sim.delay = 0.0
    assert await echo_rtt(reader, writer) < 0.05
    await close(writer)


async def test_delay_by_source(sim: LineSim) -> None:
    sim.delay_by_source = {"127.0.0.2": 0.08}
    r1, w1 = await connect(sim)
    r2, w2 = await connect(sim, source="127.0.0.2")
    fast = await echo_rtt(r1, w1)
    slow = await echo_rtt(r2, w2)
    assert fast < 0.05, fast
    assert 0.16 <= slow <= 0.21, slow
    await close(w1)
    await close(w2)


async def test_blackhole(sim: LineSim, echo: EchoServer) -> None:
    r_old, w_old = await connect(sim)
    await echo_rtt(r_old, w_old)
    sim.set_mode("blackhole")
    assert sim.mode == "blackhole"

    reader, writer = await connect(sim)  # the handshake completes
    writer.write(b"hello")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    assert echo.connections == 1  # never connected to the target

    # the open connection is frozen, not broken: its data comes through once the line is back
    w_old.write(b"held")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(r_old.readexactly(4), 0.1)
    sim.set_mode("pass")
    assert await asyncio.wait_for(r_old.readexactly(4), 1) == b"held"

    # connections accepted during the blackhole are reset when it ends
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 1) == b""
    await close(writer)
    await close(w_old)


async def test_reset(sim: LineSim) -> None:
    reader, writer = await connect(sim)
    await echo_rtt(reader, writer)
    t0 = time.monotonic()
    sim.set_mode("reset")
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 1) == b""
    assert time.monotonic() - t0 < 0.5
    await close(writer)

    # new connections are reset at once
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        reader, writer = await connect(sim)
        with contextlib.suppress(ConnectionResetError):
            writer.write(b"x")
            assert await asyncio.wait_for(reader.read(), 1) == b""
        await close(writer)
    assert time.monotonic() - t0 < 0.5
    await sim.wait_for(lambda: sim.connections_open == 0)


async def test_refuse_then_listen_again_on_same_port(sim: LineSim) -> None:
    port = sim.port
    reader, writer = await connect(sim)
    sim.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        await connect(sim)
    assert await echo_rtt(reader, writer) < 0.05  # open connections keep working
    sim.set_mode("pass")
    assert sim.port == port
    r2, w2 = await connect(sim)
    assert await echo_rtt(r2, w2) < 0.05
    await close(writer)
    await close(w2)


async def test_target_refused_closes_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound, not listening: refuses
        async with LineSim("127.0.0.1", dead_port) as sim:
            reader, writer = await connect(sim)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 1) == b""
            await close(writer)


async def test_delayed_stream_keeps_order_and_pipelines() -> None:
    sink = SinkServer()
    await sink.start()
    delay = 0.1
    sim = LineSim("127.0.0.1", sink.port, delay=delay)
    await sim.start()
    try:
        _, writer = await connect(sim)
        chunks = [f"chunk-{i:03d};".encode() for i in range(50)]
        t_first = time.monotonic()
        t_last = t_first
        for i, chunk in enumerate(chunks):
            if i:
                await asyncio.sleep(0.005)
            t_last = time.monotonic()
            writer.write(chunk)
        expected = b"".join(chunks)
        await sim.wait_for(lambda: len(sink.data) >= len(expected), 3)
        assert bytes(sink.data) == expected
        assert sink.arrivals[0][0] - t_first >= delay
        t_arrived = sink.arrivals[-1][0]
        assert delay <= t_arrived - t_last <= delay + 0.05, t_arrived - t_last
        assert len(sink.arrivals) > 10  # released as they come, not in one lump
        await close(writer)
    finally:
        await sim.stop()
        await sink.stop()


async def test_in_thread_knobs_from_another_thread(echo: EchoServer) -> None:
    sim = LineSim("127.0.0.1", echo.port).start_in_thread()
    try:
        reader, writer = await connect(sim)
        assert await echo_rtt(reader, writer) < 0.05
        sim.delay = 0.03
        rtt = await echo_rtt(reader, writer)
        assert 0.06 <= rtt <= 0.11, rtt
        sim.set_mode("refuse")
        with pytest.raises(ConnectionRefusedError):
            await connect(sim)
        sim.set_mode("pass")
        r2, w2 = await connect(sim)
        assert await echo_rtt(r2, w2) >= 0.06
        await close(w2)
        await close(writer)
    finally:
        sim.stop_thread()


async def test_cli(echo: EchoServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "tests.fakes.linesim", "--listen-port", str(port)]
    cmd += ["--target", f"127.0.0.1:{echo.port}", "--delay", "0.02"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 5)
        assert f"127.0.0.1:{port}".encode() in line
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rtt = await echo_rtt(reader, writer)
        assert 0.04 <= rtt <= 0.09, rtt
        await close(writer)
    finally:
        proc.terminate()
        proc.wait(5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()

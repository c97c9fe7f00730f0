"""The demo's world, all in-process on 127.0.0.1: a fake OpenAI origin, simulated lines in
front of it (delay, bandwidth, black hole), edgeproxy over two of them; for the edge scene an
edge edgeproxy next to the origin and a sidecar with `via` lines to it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from ..config import load_dict
from ..ops.server import Proxy

__all__ = ["FakeOrigin", "Line", "free_port", "start_edge", "start_proxy", "start_sidecar"]

# -- the fake origin -----------------------------------------------------------------------


class FakeOrigin:
    """A tiny OpenAI look-alike. Completions answer after ``think`` seconds (a model's time to
    first token); streams send one chunk per piece of the answer, ``gap`` apart, then
    ``[DONE]``. The answer is ``WORDS``, or what ``answer(body)`` makes of the request (the
    same body, the same answer). ``x-demo-host`` echoes the Host edgeproxy asked for, which
    names the line that carried the request."""

    WORDS: Final = ("Hello", " from", " the", " demo", " origin", ".")

    def __init__(
        self, think: float = 0.15, gap: float = 0.04, answer: Callable[[dict[str, Any]], Sequence[str]] | None = None
    ) -> None:
        self.think, self.gap, self.answer = think, gap, answer
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = {"x-demo-host": request.host}
        base = {"id": f"chatcmpl-demo{next(self._ids)}", "created": int(time.time()), "model": body.get("model")}
        words = self.WORDS if self.answer is None else tuple(self.answer(body))
        await asyncio.sleep(self.think)
        if not body.get("stream"):
            text = "".join(words)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            usage = {"prompt_tokens": 8, "completion_tokens": len(words), "total_tokens": 8 + len(words)}
            doc = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(doc, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, word in enumerate((*words, None)):
            delta = {} if word is None else {"content": word} if i else {"role": "assistant", "content": word}
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if word is None else None}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(self.gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# -- a simulated line ----------------------------------------------------------------------


class Line:
    """A simulated network line: a TCP relay to ``target_port`` that delays each direction by
    ``delay`` (one way: the RTT grows by twice that), or, ``dead``, a black hole that accepts
    connections and forwards nothing either way: no reset, no FIN, the far end just stops
    answering (a dead route, a crashed NAT). Only data is delayed: the TCP handshake with
    the relay is immediate, as with a middlebox near the host.

    With ``bandwidth`` (bits per second, each way) a direction is one link shared by all the
    connections over the line: a chunk waits for the link to be free, takes its size over the
    bandwidth to cross, then ``delay`` to arrive. ``bytes_up`` / ``bytes_down`` count what
    crossed (to the target / back), probes and headers included."""

    def __init__(self, name: str, target_port: int, rtt: float, bandwidth: float | None = None) -> None:
        self.name, self.target_port = name, target_port
        self.delay = rtt / 2
        self.bandwidth = bandwidth
        self.dead = False
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._free_at = {True: 0.0, False: 0.0}  # by direction (up?): when the link is free again
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @property
    def rtt(self) -> float:
        return 2 * self.delay

    @rtt.setter
    def rtt(self, value: float) -> None:
        self.delay = value / 2

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.dead:  # a new connection into the black hole: swallowed, never answered
                while await reader.read(65536):
                    pass
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            for w in (writer, upstream):
                with contextlib.suppress(OSError, AttributeError):
                    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(self._pipe(reader, upstream, True), self._pipe(up_reader, writer, False))
        except (OSError, asyncio.CancelledError):
            pass  # ended here, not raised: asyncio's start_server callback would log a cancelled task
        finally:
            self._conns.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    end.close()

    def _crossed(self, arrived: float, size: int, up: bool) -> float:
        """When a chunk of ``size`` bytes read at ``arrived`` has crossed the link (before
        the delay): at once without a bandwidth, else after the chunks ahead of it."""
        if self.bandwidth is None or not size:
            return arrived
        done = max(arrived, self._free_at[up]) + size * 8 / self.bandwidth
        self._free_at[up] = done
        return done

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        """Copy src to dst; each chunk leaves ``delay`` after it crossed the link (in order,
        but not one after the other: a chunk 1 ms behind another leaves 1 ms after it)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self.dead:
                    continue  # what was on the wire when the line died is lost too
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            last = 0.0
            while True:
                if (backlog := self._free_at[up] - time.monotonic()) > 0.5:
                    await asyncio.sleep(backlog - 0.5)  # the link is busy: read no further ahead
                data = await src.read(65536)
                if not self.dead:
                    last = max(last, self._crossed(time.monotonic(), len(data), up) + self.delay)
                    queue.put_nowait((last, data))
                if not data:
                    break
            if not self.dead:
                await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender


async def start_proxy(port_a: int, port_b: int, probe_interval: float) -> tuple[Proxy, int]:
    """edgeproxy on a free port of 127.0.0.1, with one ``openai`` upstream of two endpoints:
    line A (edgeproxy's line ``a``) at ``port_a``, line B (``b``) at ``port_b``. Returns the
    started proxy and its port."""

    def config(port: int) -> dict[str, Any]:
        return {
            "listen": f"127.0.0.1:{port}",
            "lines": {"a": {}, "b": {}},
            "upstreams": {
                "openai": {
                    "prefix": "/v1",
                    "endpoints": [
                        {"url": f"http://127.0.0.1:{port_a}/v1", "lines": ["a"]},
                        {"url": f"http://127.0.0.1:{port_b}/v1", "lines": ["b"]},
                    ],
                }
            },
            "probe": {"interval": f"{probe_interval:g}s", "timeout": "500ms"},
        }

    return await _start(config)


async def start_edge(origin_port: int, token: str) -> tuple[Proxy, int]:
    """An edge: edgeproxy next to the origin, whose listener takes hop requests with ``token``
    and serves one ``openai`` endpoint, the origin (over its default line)."""

    def config(port: int) -> dict[str, Any]:
        return {
            "listen": {"address": f"127.0.0.1:{port}", "tokens": [token]},
            "upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": f"http://127.0.0.1:{origin_port}/v1"}]}},
        }

    return await _start(config)


async def start_sidecar(origin_port: int, vias: dict[str, int], token: str, probe_interval: float) -> tuple[Proxy, int]:
    """A sidecar: edgeproxy whose only lines are `via` lines (name -> the port that leads to an
    edge), brotli-compressed, for one ``openai`` endpoint, the origin."""

    def config(port: int) -> dict[str, Any]:
        return {
            "listen": f"127.0.0.1:{port}",
            "lines": {
                name: {"via": f"http://127.0.0.1:{via}", "token": token, "compress": "br"} for name, via in vias.items()
            },
            "upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": f"http://127.0.0.1:{origin_port}/v1"}]}},
            "probe": {"interval": f"{probe_interval:g}s"},
        }

    return await _start(config)


async def _start(config: Callable[[int], dict[str, Any]]) -> tuple[Proxy, int]:
    """edgeproxy with ``config(port)`` on a free port of 127.0.0.1 (no admin listener, no
    access log); the started proxy and its port."""
    for attempt in range(5):
        port = free_port()
        cfg = {"admin": {"listen": "off"}, "log": {"access": "off"}, "drain_timeout": "1s", **config(port)}
        proxy = Proxy(load_dict(cfg, env={}, source="edgeproxy demo"))
        try:
            await proxy.start()
        except OSError:  # the free port was taken meanwhile: take another
            if attempt == 4:
                raise
            continue
        return proxy, port
    raise AssertionError("not reached: the fifth failure raised")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

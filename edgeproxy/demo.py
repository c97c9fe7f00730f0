"""``edgeproxy demo``: route choice and failover, live, on this machine alone.

No network, no API key, about 30 s. In one (uv)loop, in-process:

* a tiny fake OpenAI origin (``FakeOrigin``) on 127.0.0.1;
* two simulated lines (``Line``), TCP relays in front of the origin that add a one-way delay
  to each direction, or turn into a black hole (accept, forward nothing);
* edgeproxy itself (``Proxy``) with one ``openai`` upstream of two endpoints, one per line,
  probing every second.

A little traffic (10 completions a second, a stream now and then) goes through edgeproxy
while a script degrades, restores and then kills line A; the terminal shows each line's RTT as
edgeproxy measures it, which line carries the traffic, and what happened. Everything it
started is closed at the end, on Ctrl-C too.

One limit the script steps around rather than hides: a stream whose first event already
reached the client cannot move to another line when its line dies (the client has part of the
answer); edgeproxy ends it with an in-band error after ``failover.stream_idle_timeout``. The
demo starts no stream in the moment before line A dies, so that every request in flight then
is one that can still fail over.

Run: ``edgeproxy demo`` or ``python -m edgeproxy.demo [--color auto|always|never]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import aiohttp
import orjson
import uvloop
from aiohttp import web

from .cli import add_demo_arguments
from .config import load_dict
from .ops.server import Proxy

__all__ = ["FakeOrigin", "Line", "main"]

RTT_A: Final = 0.020
RTT_B: Final = 0.060
RTT_A_DEGRADED: Final = 0.120
PROBE_INTERVAL: Final = 1.0
RATE: Final = 10.0  # completions per second
STREAM_EVERY: Final = 15  # one request in this many is a stream
REFRESH: Final = 0.5  # seconds between screen refreshes
TICK: Final = 0.05  # seconds between looks at the proxy's state
MOVE_LIMIT: Final = 10.0  # a phase waits at most this long for what it expects
DWELL: Final = 1.5  # and stays this long after it happened: the req/s window (1 s) shows the move
CLIENT_TIMEOUT: Final = 20.0
# (caption, seconds at duration_scale=1)
PHASES: Final = (
    ("both lines up, A 20 ms RTT, B 60 ms -> traffic takes A", 6.0),
    ("line A degrades to 120 ms RTT -> traffic should move to B", 7.0),
    ("line A recovers to 20 ms -> traffic should come back to A", 7.0),
    ("line A dies (black hole) -> requests in flight answered via B", 8.0),
)


# -- the fake origin -----------------------------------------------------------------------


class FakeOrigin:
    """A tiny OpenAI look-alike. Completions answer after ``think`` seconds (a model's time to
    first token); streams send a few chunks then ``[DONE]``. ``x-demo-host`` echoes the Host
    edgeproxy asked for, which names the line that carried the request."""

    WORDS: Final = ("Hello", " from", " the", " demo", " origin", ".")

    def __init__(self, think: float = 0.15, gap: float = 0.04) -> None:
        self.think, self.gap = think, gap
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
        await asyncio.sleep(self.think)
        if not body.get("stream"):
            text = "".join(self.WORDS)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            usage = {"prompt_tokens": 8, "completion_tokens": len(self.WORDS), "total_tokens": 8 + len(self.WORDS)}
            doc = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(doc, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, word in enumerate((*self.WORDS, None)):
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
    """A simulated network line: a TCP relay to the origin that delays each direction by
    ``delay`` (one way: the RTT grows by twice that), or, ``dead``, a black hole that accepts
    connections and forwards nothing either way: no reset, no FIN, the far end just stops
    answering (a dead route, a crashed NAT). Only data is delayed: the TCP handshake with
    the relay is immediate, as with a middlebox near the host."""

    def __init__(self, name: str, target_port: int, rtt: float) -> None:
        self.name, self.target_port = name, target_port
        self.delay = rtt / 2
        self.dead = False
        self.port = 0
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
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # ended here, not raised: asyncio's start_server callback would log a cancelled task
        finally:
            self._conns.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    end.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy src to dst; each chunk leaves ``delay`` after it arrived (in order, but not
        one after the other: a chunk 1 ms behind another leaves 1 ms after it)."""
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
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            last = 0.0
            while True:
                data = await src.read(65536)
                if not self.dead:
                    last = max(last, time.monotonic() + self.delay)
                    queue.put_nowait((last, data))
                if not data:
                    break
            if not self.dead:
                await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender


# -- the demo ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    started: float
    stream: bool
    done_at: float | None = None
    ok: bool = False
    line: str | None = None  # which simulated line answered (from x-demo-host)


@dataclass
class _Event:
    at: float
    text: str
    style: str = ""


@dataclass
class _Results:
    requests: int = 0
    streams: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    on_a_at_start: bool = False
    move_to_b: float | None = None  # seconds after A degraded
    back_to_a: float | None = None  # seconds after A recovered
    death_first_failover: float | None = None  # seconds after A died
    death_move_to_b: float | None = None
    at_death: int = 0
    at_death_ok: int = 0
    at_death_via_b: int = 0
    at_death_slowest: float | None = None
    failovers: dict[str, float] = field(default_factory=dict)
    rescues: float = 0.0
    switches: int = 0
    interrupted: bool = False

    def passed(self) -> bool:
        return (
            not self.interrupted
            and self.errors == 0
            and self.on_a_at_start
            and self.move_to_b is not None
            and self.back_to_a is not None
            and self.death_move_to_b is not None
            and self.at_death_ok == self.at_death
        )


# ANSI styles: bold, dim, red, green, yellow, cyan
_STYLES: Final = {"b": "1", "d": "2", "r": "31", "g": "32", "y": "33", "c": "36", "rb": "1;31", "gb": "1;32"}
Segment = tuple[str, str]  # (text, style key or "")


class _Screen:
    """Draws blocks of lines: redrawn in place on a terminal, one after another otherwise."""

    def __init__(self, out: TextIO, color: bool, live: bool) -> None:
        self.out, self.color, self.live = out, color, live
        self._drawn = 0

    def _fmt(self, line: list[Segment], width: int | None) -> str:
        parts, used = [], 0
        for text, style in line:
            if width is not None:
                text = text[: max(0, width - used)]
            used += len(text)
            code = _STYLES.get(style) if self.color else None
            parts.append(f"\x1b[{code}m{text}\x1b[0m" if code and text else text)
        return "".join(parts)

    def draw(self, block: list[list[Segment]]) -> None:
        if self.live:
            width = shutil.get_terminal_size((100, 30)).columns - 1
            # up to the first line drawn last time, erase to the end; the first time, hide the cursor
            head = f"\r\x1b[{self._drawn}A\x1b[J" if self._drawn else "\x1b[?25l"
            self.out.write(head + "".join(self._fmt(ln, width) + "\n" for ln in block))
            self._drawn = len(block)
        else:
            self.out.write("".join(self._fmt(ln, None) + "\n" for ln in block) + "\n")
        self.out.flush()

    def print(self, lines: list[list[Segment]]) -> None:
        """Lines that stay (not redrawn)."""
        self._drawn = 0
        self.out.write("".join(self._fmt(ln, None) + "\n" for ln in lines))
        self.out.flush()

    def close(self) -> None:
        if self.live:
            self.out.write("\x1b[?25h")
            self.out.flush()


class _LogEvents(logging.Handler):
    """edgeproxy's own log lines (a path up or down, an ejection) become demo events."""

    def __init__(self, demo: _Demo, level: int) -> None:
        super().__init__(level)
        self.demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.demo.on_log(record)
        except Exception:  # a display problem must not break the proxy's logging
            self.handleError(record)


class _Demo:
    def __init__(self, screen: _Screen, scale: float) -> None:
        self.screen, self.scale = screen, scale
        self.t0 = time.monotonic()
        self.origin = FakeOrigin()
        self.lines: dict[str, Line] = {}
        self.proxy: Proxy | None = None
        self.session: aiohttp.ClientSession | None = None
        self.url = ""
        self.by_port: dict[str, str] = {}  # "127.0.0.1:port" -> "A" / "B"
        self.labels: dict[str, str] = {}  # edgeproxy's path label -> "line A"
        self.events: list[_Event] = []
        self.results = _Results()
        self.phase = (1, PHASES[0][0])
        self.active: set[_Request] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.streams_paused = False
        self.preferred: str | None = None
        self.preferred_since = 0.0
        self.history: deque[tuple[float, dict[str, int]]] = deque()
        self.seen_failovers: dict[str, float] = {}
        self.seen_rescues = 0.0
        self.death_at: float | None = None

    # -- helpers ---------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str, style: str = "") -> None:
        self.events.append(_Event(self.now(), text, style))

    def on_log(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.name.startswith("edgeproxy") and record.levelno < logging.WARNING:
            if not text.startswith("path "):
                return  # "listening on", "now prefers" (the demo says that itself)...
            text = text[len("path ") :]
        for label, name in self.labels.items():
            text = text.replace(label, name)
        text = text.splitlines()[0] if text else text
        style = "r" if " is down" in text or record.levelno >= logging.WARNING else "d"
        self.event(f"edgeproxy: {text}", style)

    def line_of(self, line_name: str | None) -> str | None:
        """edgeproxy's line name ('a') -> the demo's ('A')."""
        return None if line_name is None else line_name.upper()

    # -- set-up and tear-down ----------------------------------------------------------------
    async def start(self) -> None:
        origin_port = await self.origin.start()
        for name, rtt in (("A", RTT_A), ("B", RTT_B)):
            line = Line(name, origin_port, rtt)
            self.lines[name] = line
            await line.start()
            self.by_port[f"127.0.0.1:{line.port}"] = name
        for attempt in range(5):
            port = _free_port()
            cfg = {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": "off"},
                "lines": {"a": {}, "b": {}},
                "upstreams": {
                    "openai": {
                        "prefix": "/v1",
                        "endpoints": [
                            {"url": f"http://127.0.0.1:{self.lines['A'].port}/v1", "lines": ["a"]},
                            {"url": f"http://127.0.0.1:{self.lines['B'].port}/v1", "lines": ["b"]},
                        ],
                    }
                },
                "probe": {"interval": f"{PROBE_INTERVAL:g}s", "timeout": "500ms"},
                "log": {"access": "off"},
                "drain_timeout": "1s",
            }
            proxy = Proxy(load_dict(cfg, env={}, source="edgeproxy demo"))
            try:
                await proxy.start()
            except OSError:  # the free port was taken meanwhile: take another
                if attempt == 4:
                    raise
                continue
            self.proxy = proxy
            break
        assert self.proxy is not None
        for path in self.proxy.state.paths.values():
            self.labels[path.label] = f"line {path.line.name.upper()}"
        self.url = f"http://127.0.0.1:{port}/v1"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT))

    async def stop(self) -> None:
        """Close everything this demo opened, whatever state it is in."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        steps: list[Callable[[], Any]] = []
        if self.session is not None:
            steps.append(self.session.close)
        if self.proxy is not None:
            proxy = self.proxy
            steps.append(lambda: proxy.stop(0.5))
        steps += [line.stop for line in self.lines.values()]
        steps.append(self.origin.stop)
        for step in steps:
            with contextlib.suppress(Exception):
                await step()

    # -- the client ------------------------------------------------------------------------
    def spawn(self, stream: bool) -> None:
        task = asyncio.get_running_loop().create_task(self.request(stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def request(self, stream: bool) -> None:
        assert self.session is not None
        req = _Request(time.monotonic(), stream)
        self.active.add(req)
        self.results.requests += 1
        self.results.streams += stream
        body = {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        error = None
        try:
            async with self.session.post(
                self.url + "/chat/completions", json=body, headers={"Authorization": "Bearer demo"}
            ) as r:
                data = await r.read()
                req.line = self.by_port.get(r.headers.get("x-demo-host", ""))
                if r.status != 200:
                    error = f"HTTP {r.status} {r.headers.get('x-edgeproxy-error', '')} {data[:80]!r}"
                elif stream and (not data.rstrip().endswith(b"data: [DONE]") or b'"error"' in data):
                    error = f"stream ended without [DONE] or with an error: {data[-80:]!r}"
                elif not stream and b'"chat.completion"' not in data:
                    error = f"unexpected answer {data[:80]!r}"
        except Exception as exc:  # whatever it is, the client saw an error
            error = f"{type(exc).__name__}: {exc}"
        req.done_at = time.monotonic()
        req.ok = error is None
        self.active.discard(req)
        if error is None:
            self.results.ok += 1
        else:
            self.results.errors += 1
            if len(self.results.error_samples) < 5:
                self.results.error_samples.append(error)
            self.event(f"client error: {error}", "rb")

    async def traffic(self) -> None:
        n = 0
        while True:
            n += 1
            self.spawn(stream=n % STREAM_EVERY == 0 and not self.streams_paused)
            await asyncio.sleep(1 / RATE)

    # -- watching edgeproxy ----------------------------------------------------------------
    def paths(self) -> dict[str, dict[str, Any]]:
        assert self.proxy is not None
        upstream = self.proxy.status()["upstreams"][0]
        return {str(self.line_of(p["line"])): p for p in sorted(upstream["paths"], key=lambda p: p["line"])}

    def look(self) -> None:
        """Note what changed since the last look (every TICK)."""
        assert self.proxy is not None
        status = self.proxy.status()["upstreams"][0]
        now = self.now()
        preferred = self.line_of(status["preferred"])
        if preferred != self.preferred:
            if self.preferred is not None:
                self.event(f"traffic moves: line {self.preferred} -> line {preferred}", "gb")
            self.preferred, self.preferred_since = preferred, now
        self.history.append((now, {str(self.line_of(p["line"])): p["requests"] for p in status["paths"]}))
        while len(self.history) > 2 and self.history[1][0] <= now - 1.0:
            self.history.popleft()
        m = self.proxy.metrics
        failovers = {labels[1]: v for labels, v in m.failovers.values.items()}
        new = {k: v - self.seen_failovers.get(k, 0.0) for k, v in failovers.items()}
        new = {k: v for k, v in new.items() if v > 0}
        if new:
            what = ", ".join(f"{v:g} x {k}" for k, v in sorted(new.items()))
            self.event(f"edgeproxy failed over {sum(new.values()):g} request(s) to the other line ({what})", "y")
            self.seen_failovers = failovers
            if self.death_at is not None and self.results.death_first_failover is None:
                self.results.death_first_failover = time.monotonic() - self.death_at
        rescues = sum(m.rescues.values.values())
        if rescues > self.seen_rescues:
            n = rescues - self.seen_rescues
            self.event(f"edgeproxy rescued {n:g} request(s) waiting on a line its probe found dead", "y")
            self.seen_rescues = rescues

    def rates(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {}
        (t1, first), (t2, last) = self.history[0], self.history[-1]
        span = max(t2 - t1, 1e-6)
        return {k: (v - first.get(k, 0)) / span for k, v in last.items()}

    def block(self) -> list[list[Segment]]:
        n, caption = self.phase
        rates = self.rates()
        busiest = max(rates, key=lambda k: rates[k]) if rates and max(rates.values()) > 0 else None
        out: list[list[Segment]] = [
            [(f"[{n}/5]", "c"), (f" {self.now():5.1f}s  ", "d"), (caption, "c")],
            [("  line  simulated  edgeproxy's SRTT  state      req/s", "d")],
        ]
        for name, p in self.paths().items():
            line = self.lines[name]
            sim = "dead" if line.dead else f"{line.rtt * 1000:.0f} ms"
            srtt = "-" if p["srtt_ms"] is None else f"{p['srtt_ms']:.1f} ms"
            state = p["state"]
            rate = rates.get(name, 0.0)
            row: list[Segment] = [
                (f"  {name:<4}  ", "b"),
                (f"{sim:<9}", "r" if line.dead else ""),
                (f"  {srtt:>16}  ", ""),
                (f"{state:<9}", "g" if state == "up" else "r" if state in ("down", "ejected") else "y"),
                (f"  {rate:5.1f}", ""),
            ]
            if name == busiest:
                row.append(("  <= traffic", "gb"))
            out.append(row)
        r = self.results
        failovers = sum(self.seen_failovers.values())
        out.append(
            [
                (f"  client: {r.requests} requests, {len(self.active)} in flight, ", ""),
                (f"{r.errors} errors", "rb" if r.errors else "g"),
                (f"   edgeproxy: {failovers:g} failovers, {self.seen_rescues:g} rescues", ""),
            ]
        )
        for ev in self.events[-6:]:
            out.append([(f"  {ev.at:5.1f}s  ", "d"), (ev.text, ev.style)])
        return out

    async def display(self) -> None:
        next_draw = 0.0
        while True:
            self.look()
            if time.monotonic() >= next_draw:
                self.screen.draw(self.block())
                next_draw = time.monotonic() + REFRESH
            await asyncio.sleep(TICK)

    # -- the script --------------------------------------------------------------------------
    def announce(self, n: int) -> None:
        caption = PHASES[n - 1][0]
        self.phase = (n, caption)
        self.event(f"phase {n}: {caption.split(' ->')[0]}", "c")

    async def run_phase(self, n: int, expect: Callable[[], bool] | None) -> None:
        """Phase n for its scaled time, and until ``expect()`` held for DWELL (at most
        MOVE_LIMIT, whatever the scale: probes run at their own pace)."""
        seconds = PHASES[n - 1][1]
        start = time.monotonic()
        minimum, limit = seconds * self.scale, max(seconds * self.scale, MOVE_LIMIT)
        held_since: float | None = None
        while (elapsed := time.monotonic() - start) < limit:
            ok = expect is None or expect()
            held_since = (held_since or time.monotonic()) if ok else None
            if elapsed >= minimum and held_since is not None and time.monotonic() - held_since >= DWELL:
                return
            await asyncio.sleep(TICK)
        if expect is not None and not expect():
            self.event(f"phase {n}: what was expected did not happen within {limit:g}s", "rb")

    async def script(self) -> None:
        r = self.results
        a = self.lines["A"]

        def on(name: str) -> Callable[[], bool]:
            return lambda: self.preferred == name

        def measured() -> bool:
            return self.preferred == "A" and all(p["srtt_ms"] is not None for p in self.paths().values())

        self.announce(1)
        await self.run_phase(1, measured)
        r.on_a_at_start = measured()

        self.announce(2)
        a.rtt = RTT_A_DEGRADED
        changed = time.monotonic()
        await self.run_phase(2, on("B"))
        if self.preferred == "B":
            r.move_to_b = self.t0 + self.preferred_since - changed

        self.announce(3)
        a.rtt = RTT_A
        changed = time.monotonic()
        await self.run_phase(3, on("A"))
        if self.preferred == "A":
            r.back_to_a = self.t0 + self.preferred_since - changed

        # Kill A while requests wait on it: no stream already flowing (those cannot move), a
        # burst of fresh requests (streams included) just sent.
        self.announce(4)
        self.streams_paused = True
        deadline = time.monotonic() + 2.0
        while any(q.stream for q in self.active) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for stream in (False, True, False, True, False):
            self.spawn(stream)
        await asyncio.sleep(0.03)
        a.dead = True
        self.death_at = time.monotonic()
        at_death = set(self.active)
        self.streams_paused = False
        self.event(f"line A dies (black hole) with {len(at_death)} requests in flight", "rb")
        await self.run_phase(4, lambda: self.preferred == "B" and not (at_death & self.active))
        if self.preferred == "B":
            r.death_move_to_b = self.t0 + self.preferred_since - self.death_at
        r.at_death = len(at_death)
        r.at_death_ok = sum(q.ok for q in at_death)
        r.at_death_via_b = sum(q.line == "B" for q in at_death)
        done = [q.done_at - self.death_at for q in at_death if q.done_at is not None]
        r.at_death_slowest = max(done) if done else None

    async def run(self) -> None:
        await self.start()
        assert self.proxy is not None
        self.screen.print(
            [
                [("edgeproxy demo", "b"), (": two simulated lines to a fake OpenAI origin, all on this machine", "")],
                [(f"  origin     http://127.0.0.1:{self.origin.port}  (fake OpenAI, answers in 150 ms)", "d")],
                [(f"  line A     127.0.0.1:{self.lines['A'].port} -> origin, {RTT_A * 1000:.0f} ms RTT", "d")],
                [(f"  line B     127.0.0.1:{self.lines['B'].port} -> origin, {RTT_B * 1000:.0f} ms RTT", "d")],
                [(f"  edgeproxy  {self.url}  (probes every {PROBE_INTERVAL:g} s; try it while the demo runs)", "d")],
                [(f"  traffic    {RATE:g} completions/s, one in {STREAM_EVERY} a stream", "d")],
                [],
            ]
        )
        loop = asyncio.get_running_loop()
        display, traffic = loop.create_task(self.display()), loop.create_task(self.traffic())
        self.tasks |= {display, traffic}
        await self.script()
        traffic.cancel()
        # let the requests still out finish (each is bounded by CLIENT_TIMEOUT)
        deadline = time.monotonic() + 3.0
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(TICK)
        display.cancel()
        self.look()
        self.screen.draw(self.block())
        m = self.proxy.metrics
        self.results.failovers = {k[1]: v for k, v in m.failovers.values.items()}
        self.results.rescues = sum(m.rescues.values.values())
        self.results.switches = int(sum(m.switches.values.values()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


def _summary(r: _Results) -> list[list[Segment]]:
    ok: Segment = ("yes", "g")
    no: Segment = ("NO", "rb")
    reasons = ", ".join(f"{v:g} {k}" for k, v in sorted(r.failovers.items())) or "none"
    out: list[list[Segment]] = [
        [("", "")],
        [("[5/5] summary", "c")],
        [
            (f"  client requests       {r.requests} ({r.streams} streams): {r.ok} answered, ", ""),
            (f"{r.errors} errors", "rb" if r.errors else "gb"),
        ],
        [("  traffic on A at start ", ""), ok if r.on_a_at_start else no],
        [("  A degraded: moved to B after ", ""), (_secs(r.move_to_b), "" if r.move_to_b is not None else "rb")],
        [("  A recovered: back to A after ", ""), (_secs(r.back_to_a), "" if r.back_to_a is not None else "rb")],
        [
            (f"  A died with {r.at_death} requests in flight: {r.at_death_ok} answered", ""),
            (f" ({r.at_death_via_b} via B)", ""),
            (f", the last {_secs(r.at_death_slowest)} after the death", ""),
        ],
        [
            (f"  first failover {_secs(r.death_first_failover)} after the death; ", ""),
            (f"traffic on B after {_secs(r.death_move_to_b)}", "" if r.death_move_to_b is not None else "rb"),
        ],
        [(f"  edgeproxy counted     failovers: {reasons}; rescues: {r.rescues:g}; route switches: {r.switches}", "")],
    ]
    for sample in r.error_samples:
        out.append([(f"  client error: {sample}", "r")])
    if r.interrupted:
        out.append([("  interrupted", "y")])
    else:
        out.append([("  result: ", "b"), ("OK", "gb") if r.passed() else ("edgeproxy did not do what it should", "rb")])
    return out


async def _main(screen: _Screen, scale: float) -> _Results:
    demo = _Demo(screen, scale)
    handlers = [(logging.getLogger("edgeproxy"), _LogEvents(demo, logging.INFO))]
    handlers.append((logging.getLogger(), _LogEvents(demo, logging.WARNING)))
    ep = logging.getLogger("edgeproxy")
    saved = ep.level, ep.propagate
    ep.setLevel(logging.INFO)
    ep.propagate = False
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        await demo.run()
    except asyncio.CancelledError:
        demo.results.interrupted = True
        raise
    finally:
        try:
            await demo.stop()
        finally:
            for logger, handler in handlers:
                logger.removeHandler(handler)
            ep.setLevel(saved[0])
            ep.propagate = saved[1]
    return demo.results


def main(
    args: argparse.Namespace | None = None,
    *,
    duration_scale: float = 1.0,
    out: TextIO = sys.stdout,
    color: bool | None = None,
) -> int:
    """Run the demo. 0: edgeproxy did what the script expects; 1: it did not (the summary
    says what); 130: interrupted. ``args`` may carry ``color`` (auto/always/never) and
    ``duration_scale``; the keyword arguments win when given."""
    if color is None and args is not None and getattr(args, "color", "auto") in ("always", "never"):
        color = args.color == "always"
    if duration_scale == 1.0 and args is not None and getattr(args, "duration_scale", None):
        duration_scale = float(args.duration_scale)
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    if color is None:
        color = is_tty and os.environ.get("NO_COLOR", "") == "" and os.environ.get("TERM") != "dumb"
    screen = _Screen(out, color, live=is_tty)
    results: _Results | None = None
    try:
        results = uvloop.run(_main(screen, duration_scale))
    except KeyboardInterrupt:
        results = None
    except OSError as exc:  # cannot bind on 127.0.0.1, out of file descriptors...
        out.write(f"\nedgeproxy demo: cannot run: {exc}\n")
        return 1
    finally:
        screen.close()
    if results is None:
        out.write("\ninterrupted: everything the demo started is closed\n")
        out.flush()
        return 130
    screen.print(_summary(results))
    return 0 if results.passed() else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m edgeproxy.demo", description=__doc__.splitlines()[0])
    add_demo_arguments(_parser)
    sys.exit(main(_parser.parse_args()))

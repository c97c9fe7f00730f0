"""The demo's script: a little traffic through edgeproxy while line A degrades, recovers
and dies, and what edgeproxy makes of it, as its status and metrics show."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import aiohttp

from ..ops.server import Proxy
from .results import Event, Request, Results, recent, summary
from .screen import Screen, Segment, keep_drawn, state_style
from .world import FakeOrigin, Line, start_proxy

__all__ = ["PHASES", "Demo"]

RTT_A: Final = 0.020
RTT_B: Final = 0.060
RTT_A_DEGRADED: Final = 0.120
PROBE_INTERVAL: Final = 1.0
RATE: Final = 10.0  # completions per second
STREAM_EVERY: Final = 15  # one request in this many is a stream
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


class Demo:
    """One run of the demo: its world, its client, what it saw, and the script."""

    def __init__(self, screen: Screen, scale: float) -> None:
        self.screen, self.scale = screen, scale
        self.t0 = time.monotonic()
        self.origin = FakeOrigin()
        self.lines: dict[str, Line] = {}
        self.proxy: Proxy | None = None
        self.session: aiohttp.ClientSession | None = None
        self.url = ""
        self.by_port: dict[str, str] = {}  # "127.0.0.1:port" -> "A" / "B"
        self.labels: dict[str, str] = {}  # edgeproxy's path label -> "line A"
        self.events: list[Event] = []
        self.results = Results()
        self.phase = (1, PHASES[0][0])
        self.active: set[Request] = set()
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
        self.events.append(Event(self.now(), text, style))

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
        self.proxy, port = await start_proxy(self.lines["A"].port, self.lines["B"].port, PROBE_INTERVAL)
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
        req = Request(time.monotonic(), stream)
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
                (f"{state:<9}", state_style(state)),
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
        return out + recent(self.events)

    async def display(self) -> None:
        await keep_drawn(self.screen, self.look, self.block, TICK)

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

    def summary(self) -> list[list[Segment]]:
        return summary(self.results)

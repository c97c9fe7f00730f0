"""The demo's edge scene: an app on one side of a border, its API on the other; edgeproxy as
a sidecar next to the app with two `via` lines to an edge next to the API.

The border is simulated (``world.Line``: 90 ms each way and 1 Mbit/s each way, 100 ms on the
second line). One conversation goes twice at once, turn by turn: straight across the border
(the app's own way), and through the sidecar; the demo shows each turn's time to first token
and the bytes that crossed the border. Then a few conversations go through the sidecar while
the line carrying them turns into a black hole (new connections hang, open ones freeze), and
the demo shows how long edgeproxy took to leave it, measured.

Like the lines scene, the black hole comes while the requests on that line wait for their
first token, not in the middle of an answer: a stream that has begun cannot move to another
line (the app has part of the answer); edgeproxy would end it with an in-band error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson

from ..ops.server import Proxy
from .conversation import ANSWER_WORDS, Conversation, answer_for
from .results import EdgeResults, Event, Turn, TurnRow, edge_summary, kb, recent
from .screen import Screen, Segment, keep_drawn, state_style
from .world import FakeOrigin, Line, start_edge, start_sidecar

if TYPE_CHECKING:
    from ..routing.lines import Path

__all__ = ["EdgeDemo"]

ONE_WAY: Final = 0.090  # seconds, each way, across the border (direct and line 1)
ONE_WAY_2: Final = 0.100  # line 2: a little longer, so that line 1 carries the traffic first
BANDWIDTH: Final = 1_000_000  # bits per second, each way
THINK: Final = 0.2  # the origin's time to first token
GAP: Final = 0.004  # between streamed words
TURNS: Final = 5
PROBE_INTERVAL: Final = 1.0
TALKERS: Final = 4  # conversations through the sidecar while line 1 dies
AFTER_LEFT: Final = 1.5  # seconds the scene goes on once border 1 is left (and what was on it answered)
PAUSE: Final = 0.2  # between a conversation's answer and its next question
TICK: Final = 0.02
CLIENT_TIMEOUT: Final = 30.0
PHASES: Final = (
    f"one {TURNS}-turn conversation, sent twice at once: across the border directly, and via edgeproxy",
    f"{TALKERS} conversations via edgeproxy; then border 1 becomes a black hole (new connections hang,"
    " open ones freeze)",
)


class EdgeDemo:
    """One run of the edge scene: its world, its client, what it saw, and the script."""

    def __init__(self, screen: Screen, scale: float) -> None:
        self.screen, self.scale = screen, scale
        self.t0 = time.monotonic()
        self.token = secrets.token_hex(16)
        self.origin = FakeOrigin(think=THINK, gap=GAP, answer=answer_for)
        self.borders: dict[str, Line] = {}  # "b1", "b2" (the sidecar's via lines), "direct"
        self.edge: Proxy | None = None
        self.sidecar: Proxy | None = None
        self.session: aiohttp.ClientSession | None = None
        self.edge_port = 0
        self.urls = {"direct": "", "via": ""}
        self.labels: dict[str, str] = {}  # the sidecar's path label -> "border 1"
        self.events: list[Event] = []
        self.results = EdgeResults()
        self.active: set[Turn] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.hole_at: float | None = None
        self.left_at: float | None = None
        self.seen_failovers: dict[str, float] = {}
        self.seen_rescues = 0.0

    # -- helpers ---------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str, style: str = "") -> None:
        self.events.append(Event(self.now(), text, style))

    def path(self, line: str) -> Path:
        assert self.sidecar is not None
        return next(p for p in self.sidecar.state.paths.values() if p.line.name == line)

    def on_log(self, record: logging.LogRecord) -> None:
        """The sidecar's path events are shown (and time the black hole's end); the edge's
        own path to the origin is not part of the story."""
        text = record.getMessage()
        label = next((lb for lb in self.labels if lb in text), None)
        if label is None and record.levelno < logging.WARNING:
            return
        if label is not None:
            text = text.removeprefix("path ").replace(label, self.labels[label])
            if (
                self.labels[label] == "border 1"
                and " is down" in text
                and self.hole_at is not None
                and self.left_at is None
            ):
                self.note_left(text.partition(": ")[2])
        text = text.splitlines()[0] if text else text
        style = "r" if " is down" in text or record.levelno >= logging.WARNING else "d"
        self.event(f"edgeproxy: {text}", style)

    def note_left(self, why: str) -> None:
        assert self.hole_at is not None
        self.left_at = time.monotonic()
        r = self.results
        r.left_after = self.left_at - self.hole_at
        r.left_why = re.sub(r"(\d+\.\d\d)\d+", r"\1", why) or "marked down"  # 0.551863s: 0.55s
        r.requests_on_hole_before_left = self.path("b1").requests - r.requests_on_hole_at_hole
        r.requests_on_hole_at_left = self.path("b1").requests

    # -- set-up and tear-down ----------------------------------------------------------------
    async def start(self) -> None:
        origin_port = await self.origin.start()
        self.edge, self.edge_port = await start_edge(origin_port, self.token)
        for name, target, one_way in (
            ("b1", self.edge_port, ONE_WAY),
            ("b2", self.edge_port, ONE_WAY_2),
            ("direct", origin_port, ONE_WAY),
        ):
            self.borders[name] = line = Line(name, target, 2 * one_way, BANDWIDTH)
            await line.start()
        vias = {name: self.borders[name].port for name in ("b1", "b2")}
        self.sidecar, port = await start_sidecar(origin_port, vias, self.token, PROBE_INTERVAL)
        for p in self.sidecar.state.paths.values():
            self.labels[p.label] = f"border {p.line.name[1:]}"
        self.urls = {
            "direct": f"http://127.0.0.1:{self.borders['direct'].port}/v1",
            "via": f"http://127.0.0.1:{port}/v1",
        }
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT))
        # The sidecar's lines measured once before the first question (as they would be on a
        # sidecar that has run for a while).
        deadline = time.monotonic() + 5.0
        while not all(p.health.last_probe_ok for p in self.sidecar.state.paths.values()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(TICK)

    async def stop(self) -> None:
        """Close everything this scene opened, whatever state it is in."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        steps: list[Callable[[], Any]] = []
        if self.session is not None:
            steps.append(self.session.close)
        for proxy in (self.sidecar, self.edge):
            if proxy is not None:
                steps.append(functools.partial(proxy.stop, 0.5))
        steps += [line.stop for line in self.borders.values()]
        steps.append(self.origin.stop)
        for step in steps:
            with contextlib.suppress(Exception):
                await step()

    # -- the client ------------------------------------------------------------------------
    async def turn(self, conv: Conversation, way: str) -> Turn:
        """One turn of ``conv``, streamed, ``way`` "direct" or "via"; the answer joins the history."""
        assert self.session is not None
        body = conv.ask()
        t = Turn(way, time.monotonic(), len(body))
        self.active.add(t)
        self.results.requests += 1
        words: list[str] = []
        error = None
        try:
            headers = {"Authorization": "Bearer demo", "Content-Type": "application/json"}
            async with self.session.post(self.urls[way] + "/chat/completions", data=body, headers=headers) as r:
                if r.status != 200:
                    data = await r.read()
                    error = f"HTTP {r.status} {r.headers.get('x-edgeproxy-error', '')} {data[:80]!r}"
                else:
                    done = False
                    async for line in r.content:
                        if not line.startswith(b"data: "):
                            continue
                        payload = line[6:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = orjson.loads(payload)
                        if "error" in chunk:
                            error = f"in-band error: {payload[:80]!r}"
                            break
                        if t.first_token is None:
                            t.first_token = time.monotonic()
                        for choice in chunk.get("choices", ()):
                            words.append(choice.get("delta", {}).get("content") or "")
                    if error is None and (not done or len(words) < ANSWER_WORDS):
                        error = f"stream ended early, after {len(words)} words"
        except Exception as exc:  # whatever it is, the client saw an error
            error = f"{type(exc).__name__}: {exc}"
        t.done_at = time.monotonic()
        self.active.discard(t)
        conv.answered("".join(words))
        if error is None:
            t.ok = True
            self.results.ok += 1
        else:
            self.results.errors += 1
            if len(self.results.error_samples) < 5:
                self.results.error_samples.append(error)
            self.event(f"client error: {error}", "rb")
        return t

    def crossed(self) -> dict[str, int]:
        """Bytes across the border so far: up and down, direct and via (both lines)."""
        b = self.borders
        return {
            "up direct": b["direct"].bytes_up,
            "down direct": b["direct"].bytes_down,
            "up via": b["b1"].bytes_up + b["b2"].bytes_up,
            "down via": b["b1"].bytes_down + b["b2"].bytes_down,
        }

    # -- phase 1: direct vs via ----------------------------------------------------------------
    async def compare(self) -> None:
        r = self.results
        self.screen.print(
            [
                [("[edge 1/3] ", "c"), (PHASES[0], "c")],
                [("  turn  request   first token: direct   via edgeproxy   border bytes up: direct      via", "d")],
            ]
        )
        direct, via = Conversation(1), Conversation(1)
        for n in range(1, TURNS + 1):
            before = self.crossed()
            d, v = await asyncio.gather(self.turn(direct, "direct"), self.turn(via, "via"))
            r.before_hole.append(v)
            after = self.crossed()
            row = TurnRow(n, d.size, d.ttft(), v.ttft(), *(after[k] - before[k] for k in after))
            r.turns.append(row)
            self.screen.print(
                [
                    [
                        (f"  {n:4}  {kb(row.size):>7}   ", ""),
                        (f"{_secs(row.ttft_direct):>19}", ""),
                        (f"{_secs(row.ttft_via):>16}", "g"),
                        (f"   {kb(row.up_direct):>22}", ""),
                        (f" {kb(row.up_via):>8}", "g"),
                    ]
                ]
            )
        totals = {k: sum(getattr(row, k.replace(" ", "_")) for row in r.turns) for k in self.crossed()}
        r.up_direct, r.up_via = totals["up direct"], totals["up via"]
        r.down_direct, r.down_via = totals["down direct"], totals["down via"]
        self.screen.print(
            [
                [
                    (f"  in all: up {kb(r.up_direct)} direct, ", ""),
                    (f"{kb(r.up_via)} via edgeproxy", "g"),
                    (f"; down {kb(r.down_direct)} direct, ", ""),
                    (f"{kb(r.down_via)} via edgeproxy", "g"),
                ],
                [],
            ]
        )

    # -- phase 2: a black hole ------------------------------------------------------------------
    async def talk(self, conv: Conversation, gate: asyncio.Event) -> None:
        while True:
            await gate.wait()
            t = await self.turn(conv, "via")
            (self.results.before_hole if self.hole_at is None else self.results.after_hole).append(t)
            await asyncio.sleep(PAUSE)

    async def black_hole(self) -> None:
        r = self.results
        loop = asyncio.get_running_loop()
        gates = [asyncio.Event() for _ in range(TALKERS)]
        for i, gate in enumerate(gates):
            task = loop.create_task(self.talk(Conversation(10 + i), gate))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        for gate in gates[:2]:
            gate.set()
            await asyncio.sleep(0.15)
        await asyncio.sleep(max(1.5 * self.scale, 0.5))
        # Between answers: the two conversations ask their next question at once, and line 1
        # goes dark while they wait for the first token.
        for gate in gates:
            gate.clear()
        deadline = time.monotonic() + 5.0
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(PAUSE)
        for gate in gates[:2]:
            gate.set()
        await asyncio.sleep(0.05)
        b1 = self.path("b1")
        assert self.sidecar is not None
        self.borders["b1"].dead = True
        self.hole_at = r.hole_at = time.monotonic()
        r.rescues_before_hole = self.seen_rescues = sum(self.sidecar.metrics.rescues.values.values())
        r.on_hole_at_hole = b1.inflight
        r.requests_on_hole_at_hole = b1.requests
        self.event(f"border 1 is a black hole, {b1.inflight} requests waiting on it", "rb")
        # Requests keep coming: the other conversations join, one every 0.2 s.
        for gate in gates[2:]:
            await asyncio.sleep(0.2)
            gate.set()
        # Until everything sent before the line was left is answered, and requests sent since
        # have had time to show what they pay.
        hole_at = self.hole_at
        deadline = hole_at + 15.0
        while (now := time.monotonic()) < deadline:
            left_at = self.left_at
            settled = left_at is not None and not any(t.started <= left_at for t in self.active)
            if settled and left_at is not None and now - left_at >= AFTER_LEFT:
                break
            await asyncio.sleep(TICK)
        for gate in gates:
            gate.clear()
        deadline = time.monotonic() + 5.0
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(TICK)
        assert self.sidecar is not None
        if self.left_at is not None:
            r.requests_on_hole_after_left = b1.requests - r.requests_on_hole_at_left
        r.rescues = sum(self.sidecar.metrics.rescues.values.values()) - r.rescues_before_hole
        r.failovers = sum(self.sidecar.metrics.failovers.values.values())
        r.hole_state = b1.health.state

    # -- watching the sidecar ------------------------------------------------------------------
    def look(self) -> None:
        if self.sidecar is None:
            return
        b1 = self.path("b1")
        if self.hole_at is not None and self.left_at is None and b1.health.state != "up":
            self.note_left(f"{b1.health.state} ({b1.health.last_error})")  # not logged as down: ejected
        m = self.sidecar.metrics
        failovers = {labels[1]: v for labels, v in m.failovers.values.items()}
        new = {k: v - self.seen_failovers.get(k, 0.0) for k, v in failovers.items()}
        new = {k: v for k, v in new.items() if v > 0}
        if new:
            what = ", ".join(f"{v:g} x {k}" for k, v in sorted(new.items()))
            self.event(f"edgeproxy failed over {sum(new.values()):g} request(s) to the other line ({what})", "y")
            self.seen_failovers = failovers
        rescues = sum(m.rescues.values.values())
        r = self.results
        if self.hole_at is not None and r.first_move_after is None and rescues > r.rescues_before_hole:
            r.first_move_after = time.monotonic() - self.hole_at
        if rescues > self.seen_rescues:
            n = rescues - self.seen_rescues
            self.event(f"edgeproxy re-sent {n:g} request(s) waiting on a line its probe found dead", "y")
            self.seen_rescues = rescues

    def block(self) -> list[list[Segment]]:
        assert self.sidecar is not None
        preferred = self.sidecar.status()["upstreams"][0]["preferred"]
        if self.hole_at is None:
            caption = PHASES[1]
        else:
            caption = f"border 1 became a black hole {time.monotonic() - self.hole_at:.1f} s ago"
        out: list[list[Segment]] = [
            [("[edge 2/3]", "c"), (f" {self.now():5.1f}s  ", "d"), (caption, "c")],
            [("  line      simulated         edgeproxy's SRTT  state     waiting  requests", "d")],
        ]
        for name in ("b1", "b2"):
            line, p = self.borders[name], self.path(name)
            sim = "black hole" if line.dead else f"{line.delay * 1000:.0f} ms each way"
            srtt = "-" if p.estimator.srtt is None else f"{p.estimator.srtt * 1000:.1f} ms"
            state = p.health.state
            row: list[Segment] = [
                (f"  border {name[1]}  ", "b"),
                (f"{sim:<16}", "r" if line.dead else ""),
                (f"  {srtt:>16}  ", ""),
                (f"{state:<8}", state_style(state)),
                (f"  {p.inflight:7}  {p.requests:8}", ""),
            ]
            if name == preferred:
                row.append(("  <= traffic", "gb"))
            out.append(row)
        r = self.results
        out.append(
            [
                (f"  client: {r.requests} requests, {len(self.active)} in flight, ", ""),
                (f"{r.errors} errors", "rb" if r.errors else "g"),
            ]
        )
        return out + recent(self.events)

    async def display(self) -> None:
        await keep_drawn(self.screen, self.look, self.block, TICK)

    # -- the scene -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.start()
        b, v = self.borders, self.urls["via"]
        border = f"{ONE_WAY * 1000:.0f} ms each way, {BANDWIDTH / 1e6:g} Mbit/s each way"
        world = [
            f"origin     http://127.0.0.1:{self.origin.port}  (fake OpenAI: first token after {THINK * 1000:.0f} ms,"
            f" {ANSWER_WORDS}-word answers streamed a word per event)",
            f"edge       127.0.0.1:{self.edge_port}  edgeproxy next to the origin, a listener with a token",
            f"border 1   127.0.0.1:{b['b1'].port} -> edge, {border}",
            f"border 2   127.0.0.1:{b['b2'].port} -> edge, {ONE_WAY_2 * 1000:.0f} ms each way, same bandwidth",
            f"direct     127.0.0.1:{b['direct'].port} -> origin, {border}: the app's own way across",
            f"sidecar    {v}  edgeproxy next to the app: `via` lines over borders 1 and 2 (compress: br),"
            f" probes every {PROBE_INTERVAL:g} s",
            "(plain HTTP on this machine; across a real border, give the edge `tls` and the lines its `ca`)",
        ]
        title: list[Segment] = [("edgeproxy demo, the edge hop", "b"), (": an app abroad, its API across a border", "")]
        self.screen.print([title, *([(f"  {text}", "d")] for text in world), []])
        await self.compare()
        loop = asyncio.get_running_loop()
        display = loop.create_task(self.display())
        self.tasks.add(display)
        await self.black_hole()
        display.cancel()
        self.look()
        self.screen.draw(self.block())

    def summary(self) -> list[list[Segment]]:
        return edge_summary(self.results)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"

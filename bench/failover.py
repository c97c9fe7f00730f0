"""Failover under load: what each fault costs the client, measured through a running edgeproxy.

A steady load runs through edgeproxy (a subprocess) the whole time: small non-stream chat
requests, open loop (each starts on its schedule, ``--rate`` per second, whatever the ones
before it are doing, so requests in flight when a fault hits are measured honestly), plus
``--streams`` open SSE streams (60 frames each: role chunk, 57 content chunks, finish chunk,
[DONE]; one every 0.1 s; a stream that ends is restarted). Every client request carries its
own x-request-id, which edgeproxy forwards: the origins record it, so the attempts the origins
saw are counted per client request, and edgeproxy's access log (attempt_log) joins in.

Two setups, each with its own edgeproxy (probe interval 1 s, probe timeout 500 ms: bench
settings; edgeproxy's default interval is 5 s):

  lines     one fake origin (a thread of this process); two LineSims (threads) in front of it
            as the two endpoints of the openai upstream, each on its own direct line so that
            /-/status "preferred" and the metrics tell them apart: "near" (no delay, preferred)
            and "far" (+10 ms one-way, +20 ms RTT, as tests/test_failover.py's `lines`).
            Faults on the preferred line: refuse (open connections keep working: only new
            connections fail), reset+refuse (open connections reset, new ones refused: a proxy
            process that died), reset, blackhole; after each, back to pass and the time until
            the line is preferred again and takes traffic is measured.
  endpoints two fake origins (threads) as two endpoints, lines "a" and "b"; failover
            first_byte_timeout 2 s and stream_idle_timeout 2 s (bench settings; defaults are
            300 s and 60 s); pool.max_per_path default (256). The preferred endpoint (first in
            /-/status paths) is read before each fault and that one is faulted: 503, 429 +
            Retry-After: 2, silent with probes answered (completions answer after 30 s, the
            models list at once: only first_byte_timeout can tell), silent (the fake's latency
            knob as is: probes hang too), stream cut after 40 frames and stream stall after 20
            frames (both endpoints; then one normal request and stream must succeed), 400
            context_length_exceeded, and a context-length fallback: both origins answer the load's
            model (gpt-4o-mini) 400 context_length_exceeded, and the upstream's
            `fallbacks: [{on: context_length_exceeded, model: gpt-4.1}]` must turn every one of
            those into gpt-4.1's answer.

A third, "resume": its own edgeproxy with `failover.resume: on` in front of two fake origins as
the endpoints of an anthropic upstream (priority 1 and 2); ``--streams`` Anthropic streams
start at once, the preferred origin cuts every one after 40 frames and the other is sent the
continuation (an assistant prefill). Each stream must end with message_stop and exactly the
reply's text, one block (nothing repeated, nothing missing), the final usage covering it, and
no client error; the added silence at the splice is reported (it includes the
continuation's first events, which the fake origin paces like any).

Per fault: client-visible errors (non-200, exceptions, broken streams: no [DONE] and no
in-band error; in-band errors on streams the fault cut after commit are listed apart, they are
the honest outcome), added latency p50/p99 of the requests the fault hit (in flight at the
fault or started in its first second) against the same load's requests in the seconds before
it, the time until every affected request was answered, the attempts the origin(s) saw per
client request, and edgeproxy's own counters (/metrics deltas: failovers, rescues, ejections).

Issue 13 rows (one model failing at the primary: 503, 429; a flapping primary, N runs at once;
a silent primary over two lines with the default config; stale keep-alive replays of POSTs):
bench/failover_models.py, run after these; --models-only runs them alone, --no-models skips them.

Usage: .venv/bin/python bench/failover.py [--quick] [--rate R] [--streams N] [--keep] [--models-only]
(full: 200 req/s + 50 streams, about 1.5 min; --quick: 100 req/s + 20 streams at 0.05 s, about 1 min)
Output: a table with MET/MISSED per target, details, a noise note, and as the last line one
JSON object {"bench": "failover", ...}. Exit status 0 whatever the targets say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import failover_models
import orjson
import uvloop

sys.path.insert(0, str(c.ROOT))
from tests.fakes.linesim import LineSim
from tests.fakes.origin import PROBE_AGENT, FakeOrigin, ModelFailure, reply_for

EDGE_PY = c.EDGE_PY
PROMPT = [{"role": "user", "content": "failover bench"}]
FALLBACK_MODEL = "gpt-4.1"  # the endpoints setup's fallback for context_length_exceeded
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": PROMPT}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": PROMPT}).encode()
FRAMES = 60  # per stream, [DONE] included
CONTENT_EVENTS = FRAMES - 3  # the origin adds a role chunk, a finish chunk and [DONE]
CUT_AFTER, STALL_AFTER = 40, 20
FAR_DELAY = 0.010  # one-way, seconds
PROBE_INTERVAL, PROBE_TIMEOUT = 1.0, 0.5
FIRST_BYTE_TIMEOUT, STREAM_IDLE_TIMEOUT = 2.0, 2.0
AFFECT_S = 1.0  # requests started this long after a fault count as hit by it (with those in flight)
SAMPLE_EVERY = 0.05
Res = dict[str, Any]


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def pctl(values: list[float], p: float) -> float | None:
    return c.pct(sorted(values), p) if values else None


# --------------------------------------------------------------------------- the fakes


class Origin(FakeOrigin):
    """The fake origin, plus ``spare_probes``: its ``latency`` knob then spares edgeproxy's probes.

    FakeOrigin answers probes without ``fail_status`` (``probes_affected`` False), but its
    ``latency`` applies to every answer, the probes' models list included: latency=30 silences the
    whole origin, which the prober sees at once. ``spare_probes`` gives the other case, an origin
    whose completions hang while its models list answers at once (only first_byte_timeout helps).
    """

    spare_probes = False

    async def _latency(self, request: Any) -> int:
        if self.spare_probes and request.headers.get("User-Agent") == PROBE_AGENT:
            return 0  # FakeOrigin's "_OK"
        return await super()._latency(request)


# --------------------------------------------------------------------------- the load


_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def model_of(data: bytes) -> str | None:
    """The answer's own model (near the start of a body or a stream chunk)."""
    m = _MODEL.search(data, 0, 1024)
    return m.group(1).decode() if m is not None else None


class Req:
    __slots__ = ("body", "exc", "kind", "model", "rid", "status", "t0", "t_end")

    def __init__(self, rid: str, t0: float) -> None:
        self.rid = rid
        self.t0 = t0  # scheduled start (open loop: lateness of the client counts too)
        self.t_end: float | None = None
        self.status: int | None = None
        self.exc: str | None = None
        self.body = b""  # kept for non-200 answers
        self.kind: str | None = None  # x-edgeproxy-error
        self.model: str | None = None  # the model that answered (200s)

    @property
    def latency(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t0

    def ok(self) -> bool:
        return self.status == 200 and self.exc is None


class Stream:
    __slots__ = ("body", "code", "done", "exc", "frames", "model", "rid", "status", "t0", "t_end", "t_err", "t_head")

    def __init__(self, rid: str, t0: float) -> None:
        self.rid = rid
        self.t0 = t0
        self.t_head: float | None = None
        self.t_end: float | None = None
        self.status: int | None = None
        self.frames: list[float] = []  # arrival time of every data frame ([DONE] included, the error not)
        self.done = False
        self.t_err: float | None = None  # the in-band error event
        self.code: str | None = None
        self.exc: str | None = None
        self.body = b""
        self.model: str | None = None  # the model of its first chunk

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "exc" if self.exc else "cancelled"
        if self.status != 200:
            return "status"
        if self.done:
            return "done"
        if self.t_err is not None:
            return "inband"
        return "broken"

    @property
    def t_commit(self) -> float | None:
        return self.frames[0] if self.frames else self.t_err

    def frames_by(self, t: float) -> int:
        return sum(1 for f in self.frames if f <= t)


class Load:
    """Open-loop non-stream requests at ``rate``/s plus ``streams`` streams kept open."""

    def __init__(self, url: str, rate: float, streams: int, stream_s: float, prefix: str) -> None:
        self.url = url + "/v1/chat/completions"
        self.rate = rate
        self.n_streams = streams
        self.stream_s = stream_s
        self.prefix = prefix
        self.reqs: list[Req] = []
        self.streams: list[Stream] = []
        self._n = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[Any]] = []
        self.session: aiohttp.ClientSession | None = None

    def _rid(self) -> str:
        self._n += 1
        return f"{self.prefix}-{self._n:07d}"

    def _headers(self, rid: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": "Bearer sk-failover-bench", "x-request-id": rid}

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        self.session = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None))
        loop = asyncio.get_running_loop()
        self._main.append(loop.create_task(self._ticker()))
        for i in range(self.n_streams):
            self._main.append(loop.create_task(self._stream_worker(i)))

    async def _ticker(self) -> None:
        period = 1.0 / self.rate
        next_t = time.monotonic()
        while not self._stopping:
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(self._one(next_t))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_t += period

    async def _one(self, t0: float, record: bool = True) -> Req:
        r = Req(self._rid(), t0)
        if record:
            self.reqs.append(r)
        assert self.session is not None
        try:
            async with self.session.post(
                self.url, data=CHAT, headers=self._headers(r.rid), timeout=aiohttp.ClientTimeout(total=40)
            ) as resp:
                body = await resp.read()
                r.status = resp.status
                if resp.status != 200:
                    r.body = body[:4000]
                    r.kind = resp.headers.get("x-edgeproxy-error")
                else:
                    r.model = model_of(body)
        except Exception as e:
            r.exc = type(e).__name__
        r.t_end = time.monotonic()
        return r

    async def _stream_worker(self, i: int) -> None:
        await asyncio.sleep(i * self.stream_s / max(1, self.n_streams))
        rng = random.Random(i)
        while not self._stopping:
            st = await self._stream_once()
            if st.outcome != "done":
                # Not a tight loop on a failed start; and after a fault cut many streams at once,
                # restart them spread over a stream's length, or they would all end (and be in
                # flight on the same line) together at the next fault.
                await asyncio.sleep(rng.uniform(0.3, max(0.3, self.stream_s)))

    async def _stream_once(self, record: bool = True) -> Stream:
        st = Stream(self._rid(), time.monotonic())
        if record:
            self.streams.append(st)
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=40)
        try:
            async with self.session.post(self.url, data=STREAM, headers=self._headers(st.rid), timeout=timeout) as resp:
                st.t_head = time.monotonic()
                st.status = resp.status
                if resp.status != 200:
                    st.body = (await resp.read())[:4000]
                    return st
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.monotonic()
                    if line.startswith(b'data: {"error"'):
                        st.t_err = now
                        with contextlib.suppress(Exception):
                            st.code = orjson.loads(line[6:])["error"].get("code")
                    else:
                        st.frames.append(now)
                        if line.startswith(b"data: [DONE]"):
                            st.done = True
                        elif st.model is None:
                            st.model = model_of(line)
        except asyncio.CancelledError:
            st.exc = st.exc or "cancelled"
            raise
        except Exception as e:
            st.exc = type(e).__name__
        finally:
            st.t_end = time.monotonic()
        return st

    def pending_before(self, t: float) -> int:
        return sum(1 for r in self.reqs if r.t0 < t and r.t_end is None)

    async def drain(self, t: float, timeout: float) -> None:
        """Until every non-stream request started before ``t`` has ended (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.pending_before(t) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self, stream_wait: float) -> None:
        """No new requests or streams; wait for the open ones (streams up to ``stream_wait``)."""
        self._stopping = True
        t = time.monotonic()
        await self.drain(t, 45)
        _, pending = await asyncio.wait(self._main, timeout=stream_wait)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._main, *self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


# --------------------------------------------------------------------------- edgeproxy admin


WATCHED = (
    "edgeproxy_failovers_total",
    "edgeproxy_rescues_total",
    "edgeproxy_ejections_total",
    "edgeproxy_attempts_total",
    "edgeproxy_stream_errors_total",
    "edgeproxy_retry_budget_exhausted_total",
    "edgeproxy_probes_total",
    "edgeproxy_route_switches_total",
    "edgeproxy_hedges_total",
    "edgeproxy_fallbacks_total",
)
# the label that matters for each watched metric (upstream is always openai here)
KEY_LABELS = {
    "edgeproxy_failovers_total": ("reason",),
    "edgeproxy_rescues_total": ("line",),
    "edgeproxy_ejections_total": ("line",),
    "edgeproxy_attempts_total": ("line", "outcome"),
    "edgeproxy_stream_errors_total": ("reason",),
    "edgeproxy_probes_total": ("line", "result"),
    "edgeproxy_fallbacks_total": ("on", "model"),
}


class Admin(c.AdminClient):
    async def metrics(self) -> dict[str, float]:
        """Watched counters as {"name{label=value,...}": value} (upstream openai only)."""
        out: dict[str, float] = {}
        for full, labels, value in await self.samples():
            if full not in WATCHED or labels.get("upstream") not in (None, "openai"):
                continue
            name = full.removeprefix("edgeproxy_").removesuffix("_total")
            keys = KEY_LABELS.get(full, ())
            key = name + ("{" + ",".join(labels.get(k, "") for k in keys) + "}" if keys else "")
            out[key] = out.get(key, 0.0) + value
        return out


def metric_delta(m0: dict[str, float], m1: dict[str, float]) -> dict[str, int]:
    return {k: int(v - m0.get(k, 0.0)) for k, v in sorted(m1.items()) if v - m0.get(k, 0.0)}


class Sample:
    __slots__ = ("inflight", "order", "pref", "requests", "states", "t")

    def __init__(self, t: float, up: dict[str, Any]) -> None:
        self.t = t
        paths = up.get("paths") or []
        self.order = [p.get("line") for p in paths]  # try order: the first takes the traffic
        self.pref = up.get("preferred") if isinstance(up.get("preferred"), str) else (self.order or [None])[0]
        self.requests = {p.get("line"): int(p.get("requests") or 0) for p in paths}
        self.states = {p.get("line"): p.get("state") for p in paths}
        self.inflight = {p.get("line"): int(p.get("inflight") or 0) for p in paths}


class Monitor:
    """Samples /-/status every 50 ms: preferred line, try order, per-path requests and state."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.history: list[Sample] = []
        self.errors = 0
        self._tick = asyncio.Event()

    @property
    def last(self) -> Sample | None:
        return self.history[-1] if self.history else None

    async def run(self) -> None:
        next_t = time.monotonic()
        while True:
            try:
                up = await self.admin.upstream()
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                self.errors += 1
            else:
                self.history.append(Sample(time.monotonic(), up))
                self._tick.set()
                self._tick = asyncio.Event()
            next_t += SAMPLE_EVERY
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            next_t = max(next_t, time.monotonic())

    async def fresh(self) -> Sample:
        await self._tick.wait()
        assert self.last is not None
        return self.last

    async def wait(self, cond: Callable[[Sample], bool], timeout: float) -> float | None:
        """Time of the first sample (from now on) where cond holds; None after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                s = await asyncio.wait_for(self.fresh(), max(0.01, deadline - time.monotonic()))
                if cond(s):
                    return s.t
        return None

    def window(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.history if t0 <= s.t <= t1]


def all_up(s: Sample) -> bool:
    return all(v == "up" for v in s.states.values())


# --------------------------------------------------------------------------- origins' view


class Arrivals:
    """Client requests as the fake origins saw them: (origin name, x-request-id, monotonic time)."""

    def __init__(self, origins: dict[str, Origin]) -> None:
        self.origins = origins
        self.offset = time.time() - time.monotonic()
        self.seen: list[tuple[str, str, float]] = []

    async def collect(self) -> None:
        old = {}
        for name, o in self.origins.items():
            old[name], o.requests = o.requests, []
        await asyncio.sleep(0.05)  # an append racing the swap lands in the old list meanwhile
        for name, lst in old.items():
            for r in lst:
                self.seen.append((name, r.headers.get("x-request-id", ""), r.time - self.offset))

    def by_rid(self) -> dict[str, list[tuple[str, float]]]:
        out: dict[str, list[tuple[str, float]]] = {}
        for name, rid, t in self.seen:
            out.setdefault(rid, []).append((name, t))
        return out


def read_access(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                out[str(rec.get("request_id"))] = rec
    return out


# --------------------------------------------------------------------------- phases


class Phase:
    """One fault: when it was injected and cleared, and the counters around it."""

    def __init__(self, name: str, setup: str, target: str) -> None:
        self.name = name
        self.setup = setup
        self.target = target  # the faulted line / endpoint (line name)
        self.t_pre = self.t_fault = self.t_clear = self.t_end = 0.0
        self.t_recovered: float | None = None  # preferred back on the faulted line (lines setup)
        self.t_traffic: float | None = None  # its request counter moving again
        self.m0: dict[str, float] = {}
        self.m1: dict[str, float] = {}
        self.counts0: dict[str, int] = {}
        self.counts1: dict[str, int] = {}
        self.extra: dict[str, Any] = {}
        self.left = False  # the faulted line lost the preference during the fault


class Setup:
    """One edgeproxy with its load, monitor and fakes; runs faults one after the other."""

    def __init__(self, a: argparse.Namespace, name: str, procs: c.Procs, tmp: Path) -> None:
        self.a = a
        self.name = name
        self.procs = procs
        self.tmp = tmp
        self.origins: dict[str, Origin] = {}  # by name
        self.sims: dict[str, LineSim] = {}  # by line
        self.by_line: dict[str, Origin] = {}  # endpoints setup: the origin on each line
        self.phases: list[Phase] = []
        self.port = c.free_port()
        self.admin_port = c.free_port()
        self.log = tmp / f"edgeproxy-{name}.log"
        self.access = tmp / f"access-{name}.log"
        self.proc: c.Popen | None = None
        self.load: Load
        self.mon: Monitor
        self.admin: Admin
        self.arrivals: Arrivals
        self.t_start = 0.0
        self.start_pref: str | None = None
        self.access_log: dict[str, dict[str, Any]] = {}

    def origin(self) -> Origin:
        o = Origin()
        o.events = CONTENT_EVENTS
        o.event_interval = self.a.event_interval
        o.record = True
        o.start_in_thread()
        return o

    def config(self) -> str:
        head = (
            f"listen: 127.0.0.1:{self.port}\nadmin: {{listen: 127.0.0.1:{self.admin_port}}}\nlog: {{access: json}}\n"
            f"probe: {{interval: {PROBE_INTERVAL:g}s, timeout: {round(PROBE_TIMEOUT * 1000)}ms}}\n"
            "drain_timeout: 1s\n"
        )
        if self.name == "lines":
            o = self.origins["origin"]
            self.sims["near"] = LineSim("127.0.0.1", o.port).start_in_thread()
            self.sims["far"] = LineSim("127.0.0.1", o.port, delay=FAR_DELAY).start_in_thread()
            eps = ", ".join(f'{{url: "http://{s.address}/v1", lines: [{ln}]}}' for ln, s in self.sims.items())
            return (
                head + f"lines: {{near: {{}}, far: {{}}}}\nupstreams: {{openai: {{prefix: /v1, endpoints: [{eps}]}}}}\n"
            )
        eps = ", ".join(f'{{url: "{o.url}/v1", lines: [{ln}]}}' for ln, o in self.by_line.items())
        fallbacks = f"[{{on: context_length_exceeded, model: {FALLBACK_MODEL}}}]"
        return (
            head
            + f"failover: {{first_byte_timeout: {FIRST_BYTE_TIMEOUT:g}s, "
            + f"stream_idle_timeout: {STREAM_IDLE_TIMEOUT:g}s}}\n"
            + "lines: {a: {}, b: {}}\n"
            + f"upstreams: {{openai: {{prefix: /v1, endpoints: [{eps}], fallbacks: {fallbacks}}}}}\n"
        )

    async def run(self, faults: list[tuple[str, Callable[[Setup, Phase], Awaitable[None]]]]) -> None:
        if self.name == "lines":
            self.origins["origin"] = self.origin()
        else:
            self.origins["A"] = self.origin()
            self.origins["B"] = self.origin()
            self.by_line = {"a": self.origins["A"], "b": self.origins["B"]}
        cfg = self.tmp / f"edgeproxy-{self.name}.yaml"
        cfg.write_text(self.config())
        argv = [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)]
        self.proc = self.procs.start(f"edgeproxy-{self.name}", argv, log=self.log, stdout=self.access)
        await asyncio.to_thread(c.wait_http, f"http://127.0.0.1:{self.admin_port}/-/ready", self.proc)
        await asyncio.to_thread(c.wait_port, self.port, self.proc)
        self.arrivals = Arrivals(self.origins)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            self.admin = Admin(s, self.admin_port)
            self.mon = Monitor(self.admin)
            mt = asyncio.get_running_loop().create_task(self.mon.run())
            self.load = Load(f"http://127.0.0.1:{self.port}", self.a.rate, self.a.streams, self.a.stream_s, self.name)
            try:
                # both paths measured and up, then the load warms up (streams spread out)
                await self.mon.wait(lambda s: all_up(s) and len(s.states) == 2, 10)
                if self.name == "lines":
                    await self.mon.wait(lambda s: s.pref == "near", 5)
                self.start_pref = (await self.mon.fresh()).pref
                self.t_start = time.monotonic()
                await self.load.start()
                await asyncio.sleep(self.a.warm)
                for name, fn in faults:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"edgeproxy ({self.name}) exited with {self.proc.returncode}")
                    await fn(self, Phase(name, self.name, ""))
                    await self.arrivals.collect()
            finally:
                await self.load.stop(self.a.stream_s + 3)
                await self.arrivals.collect()
                mt.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await mt
        self.procs.stop(self.proc)
        for sim in self.sims.values():
            sim.stop_thread()
        for o in self.origins.values():
            o.stop_thread()

    # -- the skeleton every fault follows ---------------------------------------------------
    async def fault(
        self,
        ph: Phase,
        inject: Callable[[str], Awaitable[None]],
        clear: Callable[[str], Awaitable[None]],
        seconds: float,
        recover: Callable[[Phase], Awaitable[None]] | None = None,
    ) -> None:
        ph.t_pre = time.monotonic()
        await asyncio.sleep(self.a.pre)
        s = await self.mon.fresh()
        ph.target = s.pref or "?"
        ph.m0 = await self.admin.metrics()
        ph.counts0 = {n: o.request_count for n, o in self.origins.items()}
        ph.t_fault = time.monotonic()
        await inject(ph.target)
        ph.extra["inject_s"] = round(time.monotonic() - ph.t_fault, 4)
        await asyncio.sleep(seconds)
        ph.t_clear = time.monotonic()
        await clear(ph.target)
        ph.left = any(x.pref != ph.target for x in self.mon.window(ph.t_fault, ph.t_clear))
        if recover is not None:
            await recover(ph)
        await self.load.drain(ph.t_clear, 40)
        # settle: every path up again (an ejection or cool-down served) before the next fault
        await self.mon.wait(all_up, 8)
        ph.m1 = await self.admin.metrics()
        ph.counts1 = {n: o.request_count for n, o in self.origins.items()}
        ph.t_end = time.monotonic()
        self.phases.append(ph)

    async def check_healthy(self, ph: Phase) -> None:
        """Right after the fault is cleared: one normal request and one normal stream (kept apart from the load)."""
        r, st = await asyncio.gather(
            self.load._one(time.monotonic(), record=False), self.load._stream_once(record=False)
        )
        ph.extra["after"] = {"request": r.status if r.exc is None else r.exc, "stream": st.outcome,
                             "stream_frames": len(st.frames)}  # fmt: skip

    async def recover_line(self, ph: Phase) -> None:
        """After a line fault: when is the faulted line preferred again, when does traffic return."""
        s0 = await self.mon.fresh()
        r0 = s0.requests.get(ph.target, 0)
        ph.t_recovered = await self.mon.wait(lambda s: s.pref == ph.target and all_up(s), 6 * PROBE_INTERVAL)
        if ph.t_recovered is not None:
            t = await self.mon.wait(lambda s: s.requests.get(ph.target, 0) - r0 >= 10, 3)
            ph.t_traffic = t
        if ph.t_recovered is not None and s0.pref == ph.target and all_up(s0) and not ph.left:
            ph.t_recovered = ph.t_traffic = ph.t_clear  # never left


# --------------------------------------------------------------------------- the faults


def line_fault(mode: str) -> Callable[[Setup, Phase], Awaitable[None]]:
    async def run(su: Setup, ph: Phase) -> None:
        async def inject(line: str) -> None:
            for m in mode.split("+"):  # "reset+refuse": drop the open connections, then refuse new ones
                await asyncio.to_thread(su.sims[line].set_mode, m)

        async def clear(line: str) -> None:
            await asyncio.to_thread(su.sims[line].set_mode, "pass")

        await su.fault(ph, inject, clear, su.a.fault_s, su.recover_line)

    return run


def knob_fault(
    seconds_attr: str, apply: Callable[[FakeOrigin], None], undo: Callable[[FakeOrigin], None], both: bool = False
) -> Callable[[Setup, Phase], Awaitable[None]]:
    """A fault set on the preferred endpoint's origin (``both``: on every origin; then checked healthy after)."""

    async def run(su: Setup, ph: Phase) -> None:
        def targets(line: str) -> list[FakeOrigin]:
            return list(su.origins.values()) if both else [su.by_line[line]]

        async def inject(line: str) -> None:
            for o in targets(line):
                apply(o)
            if ph.name == "400":  # the origin's own answer, direct, to compare bytes with
                o = su.by_line[line]
                async with (
                    aiohttp.ClientSession() as s,
                    s.post(
                        o.url + "/v1/chat/completions",
                        data=CHAT,
                        headers={"Content-Type": "application/json", "x-request-id": "direct-400"},
                    ) as r,
                ):
                    ph.extra["direct_status"] = r.status
                    ph.extra["direct_body"] = await r.read()

        async def clear(line: str) -> None:
            for o in targets(line):
                undo(o)

        await su.fault(ph, inject, clear, getattr(su.a, seconds_attr), su.check_healthy if both else None)

    return run


def set_fail(status: int, retry_after: str | None = None) -> Callable[[FakeOrigin], None]:
    def apply(o: FakeOrigin) -> None:
        o.retry_after = retry_after
        o.fail_times = 0
        o.fail_status = status

    return apply


def unset_fail(o: FakeOrigin) -> None:
    o.fail_status = None
    o.retry_after = None


def set_silent(spare_probes: bool | None) -> Callable[[FakeOrigin], None]:
    """latency 30 s (None: back to 0); spare_probes: the models list still answers at once."""

    def apply(o: FakeOrigin) -> None:
        o.spare_probes = bool(spare_probes)  # type: ignore[attr-defined]
        o.latency = 0.0 if spare_probes is None else 30.0

    return apply


def set_attr(name: str, value: Any) -> Callable[[FakeOrigin], None]:
    def apply(o: FakeOrigin) -> None:
        setattr(o, name, value)

    return apply


LINE_FAULTS = [
    ("refuse", line_fault("refuse")),
    ("reset+refuse", line_fault("reset+refuse")),
    ("reset", line_fault("reset")),
    ("blackhole", line_fault("blackhole")),
]
ENDPOINT_FAULTS = [
    ("503", knob_fault("fault_s", set_fail(503), unset_fail)),
    ("429", knob_fault("fault_s", set_fail(429, "2"), unset_fail)),
    ("silent-probes-ok", knob_fault("fault_s", set_silent(True), set_silent(None))),
    ("silent", knob_fault("fault_s", set_silent(False), set_silent(None))),
    (
        "cut",
        knob_fault(
            "stream_fault_s", set_attr("drop_after_events", CUT_AFTER), set_attr("drop_after_events", None), True
        ),
    ),
    (
        "stall",
        knob_fault(
            "stream_fault_s", set_attr("stall_after_events", STALL_AFTER), set_attr("stall_after_events", None), True
        ),
    ),
    ("400", knob_fault("short_fault_s", set_fail(400), unset_fail)),
    (
        "fallback",
        knob_fault(
            "short_fault_s",
            set_attr("model_failures", {"gpt-4o-mini": ModelFailure(status=400, code="context_length_exceeded")}),
            set_attr("model_failures", {}),
            True,
        ),
    ),
]


# --------------------------------------------------------------------------- analysis


class View:
    """What one phase did to the client and the origins."""

    def __init__(self, su: Setup, ph: Phase, nxt: Phase | None, arrivals: dict[str, list[tuple[str, float]]]) -> None:
        self.su, self.ph = su, ph
        end = nxt.t_pre if nxt is not None else float("inf")
        self.t_next_fault = nxt.t_fault if nxt is not None else float("inf")
        tf = ph.t_fault
        # requests started in this phase's span, or in flight when the fault came
        self.reqs = [r for r in su.load.reqs if tf <= r.t0 < end or (r.t0 < tf and (r.t_end or 1e18) > tf)]
        self.baseline = [
            r.latency for r in su.load.reqs if tf - su.a.pre <= r.t0 and r.t_end is not None and r.t_end < tf and r.ok()
        ]
        self.inflight = [r for r in self.reqs if r.t0 < tf]
        self.affected = [r for r in self.reqs if r.t0 < tf + AFFECT_S and r.t0 < ph.t_clear]
        self.during = [r for r in self.reqs if r.t0 < ph.t_clear]
        # streams: alive during the fault, and this is the last fault they lived through
        self.streams = [st for st in su.load.streams if stream_phase(su, st) is ph]
        self.arr = arrivals

    def n(self, rid: str, origin: str | None = None, t0: float = -1e18, t1: float = 1e18) -> int:
        """Arrivals of client request ``rid`` (at ``origin``, between t0 and t1)."""
        return sum(1 for o, t in self.arr.get(rid, ()) if (origin is None or o == origin) and t0 <= t <= t1)

    def target_origin(self) -> tuple[str, str]:
        target = self.su.by_line[self.ph.target]
        name = next(n for n, o in self.su.origins.items() if o is target)
        return name, next(n for n in self.su.origins if n != name)

    def lat_ms(self, rs: list[Req]) -> list[float]:
        return [r.latency * 1000 for r in rs if r.latency is not None]

    def added(self) -> tuple[float | None, float | None, int]:
        base = [x * 1000 for x in self.baseline if x is not None]
        hit = self.lat_ms(self.affected)
        if not base or not hit:
            return None, None, len(hit)
        p50h, p99h, p50b, p99b = pctl(hit, 50), pctl(hit, 99), pctl(base, 50), pctl(base, 99)
        assert p50h is not None and p99h is not None and p50b is not None and p99b is not None
        return p50h - p50b, p99h - p99b, len(hit)

    def answered_by(self) -> float | None:
        """Longest any affected request waited since the fault (or since it started, if later)."""
        tf, tc = self.ph.t_fault, self.ph.t_clear
        waits = [r.t_end - max(r.t0, tf) for r in self.reqs if r.t0 < tc and r.t_end is not None]
        for st in self.streams:  # stream starts before commit: the fault may hold them too
            if st.t0 < tc and (st.t_commit is None or st.t_commit > tf) and st.t0 < tc:
                t = st.t_commit or st.t_end
                if t is not None:
                    waits.append(t - max(st.t0, tf))
        return max(waits) if waits else None

    def req_errors(self, expected_status: int | None = None) -> Counter[str]:
        out: Counter[str] = Counter()
        for r in self.reqs:
            if r.exc:
                out[r.exc] += 1
            elif r.status != 200 and r.status != expected_status:
                out[f"{r.status} {r.kind or 'origin'}"] += 1
        return out

    def stream_outcomes(self) -> Counter[str]:
        return Counter(st.outcome for st in self.streams)

    def attempts(self, rids: list[str]) -> dict[str, Any]:
        per: Counter[str] = Counter()
        twice = 0
        total = 0
        sample = []
        for rid in rids:
            cnt = Counter(o for o, _ in self.arr.get(rid, ()))
            for name, n in cnt.items():
                per[name] += n
                total += n
                if n > 1:
                    twice += 1
                    if len(sample) < 4:
                        acc = self.su.access_log.get(rid, {})
                        sample.append({"rid": rid, "origin": name, "arrivals_s": [round(t - self.ph.t_fault, 3)
                                       for o, t in self.arr[rid] if o == name], "status": acc.get("status"),
                                       "error": acc.get("error"), "attempt_log": acc.get("attempt_log"),
                                       "duration_ms": acc.get("duration_ms")})  # fmt: skip
        return {
            "client_requests": len(rids),
            "origin_attempts": dict(per),
            "total": total,
            "sent_twice_same_origin": twice,
            "sent_twice_sample": sample,
        }

    def rids(self) -> list[str]:
        return [r.rid for r in self.during] + [st.rid for st in self.streams if st.t0 < self.ph.t_clear]

    def access_summary(self, rids: list[str]) -> dict[str, int]:
        acc = self.su.access_log
        out: Counter[str] = Counter()
        for rid in rids:
            rec = acc.get(rid)
            if rec is None:
                out["not in access log"] += 1
                continue
            log = rec.get("attempt_log")
            if log:
                out[" > ".join(f"{x.get('line')}:{x.get('outcome')}" for x in log)] += 1
            else:
                out[f"{rec.get('line')}:{rec.get('status')}"] += 1
        return dict(out.most_common(8))


def stream_phase(su: Setup, st: Stream) -> Phase | None:
    hit = None
    for ph in su.phases:
        if st.t0 < ph.t_clear and (st.t_end or 1e18) > ph.t_fault:
            hit = ph
    return hit


def unexpected_stream_errors(v: View, expect_cut: bool, cut_before_commit_ok: bool = False) -> tuple[Counter[str], int]:
    """Streams that failed without the fault excusing it, and the in-band cuts it does excuse."""
    bad: Counter[str] = Counter()
    cut = 0
    tf = v.ph.t_fault
    for st in v.streams:
        o = st.outcome
        if o in ("done", "cancelled"):
            continue
        committed_before = st.t_commit is not None and st.t_commit <= tf + 0.005
        if o == "inband" and (expect_cut or (committed_before and cut_before_commit_ok)):
            cut += 1
            continue
        bad[o if o != "status" else f"stream {st.status}"] += 1
    return bad, cut


def analyse(su: Setup, res: Res) -> list[list[Any]]:
    rows: list[list[Any]] = []
    arrivals = su.arrivals.by_rid()
    su.access_log = read_access(su.access)
    for i, ph in enumerate(su.phases):
        nxt = su.phases[i + 1] if i + 1 < len(su.phases) else None
        v = View(su, ph, nxt, arrivals)
        d: Res = {
            "setup": su.name,
            "target": ph.target,
            "fault_s": round(ph.t_clear - ph.t_fault, 2),
            "requests": len(v.reqs),
            "in_flight_at_fault": len(v.inflight),
            "streams": len(v.streams),
            "stream_outcomes": dict(v.stream_outcomes()),
            "metrics": metric_delta(ph.m0, ph.m1),
            "origin_request_count_delta": {n: ph.counts1.get(n, 0) - ph.counts0.get(n, 0) for n in ph.counts1},
        }
        p50, p99, n_hit = v.added()
        d["added_ms"] = {"p50": p50 and round(p50, 2), "p99": p99 and round(p99, 2), "n": n_hit}
        base = [x * 1000 for x in v.baseline if x is not None]
        d["baseline_ms"] = {"p50": fmt(pctl(base, 50), 2), "p99": fmt(pctl(base, 99), 2), "n": len(base)}
        hit = v.lat_ms(v.affected)
        d["affected_ms"] = {
            "p50": fmt(pctl(hit, 50), 2),
            "p99": fmt(pctl(hit, 99), 2),
            "max": fmt(max(hit, default=None), 2),
        }
        inf = v.lat_ms(v.inflight)
        d["in_flight_ms"] = {"n": len(inf), "max": fmt(max(inf, default=None), 2)}
        dur = v.lat_ms(v.during)
        d["whole_fault_ms"] = {"p50": fmt(pctl(dur, 50), 2), "p99": fmt(pctl(dur, 99), 2), "n": len(dur)}
        ab = v.answered_by()
        d["answered_by_s"] = ab and round(ab, 3)
        att = v.attempts(v.rids())
        d["attempts"] = att
        d["access_log"] = v.access_summary([r.rid for r in v.affected])
        row = FAULT_ROWS[ph.name](v, d)
        res.setdefault("faults", {})[ph.name] = d
        rows.append(row)
    return rows


def err_text(errs: Counter[str], cut: int = 0, cut_label: str = "cut in flight") -> str:
    n = sum(errs.values())
    s = f"{n} errors" + (f" {dict(errs)}" if n else "")
    if cut:
        s += f" (+{cut} streams {cut_label}: in-band error, expected)"
    return s


def attempts_text(v: View, d: Res) -> str:
    att = d["attempts"]
    per = ", ".join(f"{k} {n}" for k, n in sorted(att["origin_attempts"].items()))
    return f"origin saw {att['total']} for {att['client_requests']} req ({per}); {att['sent_twice_same_origin']} twice"


def edge_counts(v: View, d: Res) -> str:
    """edgeproxy's own view of the fault: failed attempts on the faulted line, failovers, rescues, ejections."""
    m = d["metrics"]
    line = v.ph.target
    failed = {
        k.split(",", 1)[1][:-1]: n for k, n in m.items() if k.startswith(f"attempts{{{line},") and ",ok}" not in k
    }
    fo = sum(n for k, n in m.items() if k.startswith("failovers{"))
    out = f"{line} failed attempts {failed or 0}, failovers {fo}"
    for k in ("rescues", "ejections", "retry_budget_exhausted"):
        n = sum(x for kk, x in m.items() if kk.startswith(k + "{"))
        if n:
            out += f", {k} {n}"
    return out


def row_refuse(v: View, d: Res) -> list[Any]:
    return _row_line(v, d, 50.0, cuts_open=False)  # refuse: open connections keep working


def row_reset_refuse(v: View, d: Res) -> list[Any]:
    return _row_line(v, d, 50.0, cuts_open=True)  # open connections dropped (streams cut), new ones refused


def row_reset(v: View, d: Res) -> list[Any]:
    return _row_line(v, d, 100.0, cuts_open=True)  # reset: streams open on the line are cut


def _row_line(v: View, d: Res, limit: float, cuts_open: bool) -> list[Any]:
    errs = v.req_errors()
    sbad, cut = unexpected_stream_errors(v, expect_cut=False, cut_before_commit_ok=cuts_open)
    errs.update(sbad)
    n = sum(errs.values())
    p99 = d["added_ms"]["p99"]
    d["errors"] = dict(errs)
    d["streams_cut_in_flight"] = cut
    d["met"] = n == 0 and p99 is not None and p99 < limit
    return [
        f"line {v.ph.name} ({v.ph.target})",
        err_text(errs, cut),
        f"{fmt(d['added_ms']['p50'])} / {fmt(p99)} (n {d['added_ms']['n']})",
        fmt(d["answered_by_s"], 3),
        edge_counts(v, d) + "; " + attempts_text(v, d),
        f"0 errors; added p99 < {limit:g} ms",
        mark(d["met"]),
    ]


def row_blackhole(v: View, d: Res) -> list[Any]:
    errs = v.req_errors()
    sbad, cut = unexpected_stream_errors(v, expect_cut=False)  # open streams freeze, then resume
    errs.update(sbad)
    # streams committed on the black-holed line before it went dark freeze until it comes back
    tf = v.ph.t_fault
    gaps = []
    for st in v.streams:
        if st.t_commit is not None and st.t_commit <= tf:
            ts = [t for t in st.frames if t > tf - 1]
            gaps.append(max((b - a for a, b in itertools.pairwise(ts)), default=0.0))
    frozen = [g for g in gaps if g > 0.5]
    d["committed_streams_frozen"] = {"n": len(frozen), "of": len(gaps), "max_gap_s": round(max(frozen, default=0), 2)}
    ab = d["answered_by_s"]
    d["errors"] = dict(errs)
    d["met"] = sum(errs.values()) == 0 and ab is not None and ab <= 1.0
    return [
        f"line blackhole ({v.ph.target})",
        err_text(errs, cut),
        f"{fmt(d['added_ms']['p50'])} / {fmt(d['added_ms']['p99'])} (n {d['added_ms']['n']})",
        fmt(ab, 3),
        edge_counts(v, d) + "; " + attempts_text(v, d),
        "0 errors; all answered <= 1 s after the fault",
        mark(d["met"]),
    ]


def row_503(v: View, d: Res) -> list[Any]:
    errs = v.req_errors()
    sbad, _ = unexpected_stream_errors(v, expect_cut=False)
    errs.update(sbad)
    name, _ = v.target_origin()
    rids = v.rids()
    on_target = [v.n(r, name, v.ph.t_fault, v.ph.t_clear + 0.1) for r in rids]
    hits = sum(on_target)
    d["target_origin"] = name
    d["target_attempts"] = hits
    d["target_attempts_per_request"] = round(hits / max(1, len(rids)), 4)
    d["max_attempts_one_request_on_target"] = max(on_target, default=0)
    bound = max(10, 0.05 * len(rids))
    d["errors"] = dict(errs)
    d["met"] = sum(errs.values()) == 0 and hits <= bound and max(on_target, default=0) <= 1
    return [
        f"endpoint 503 ({name})",
        err_text(errs),
        f"{fmt(d['added_ms']['p50'])} / {fmt(d['added_ms']['p99'])} (n {d['added_ms']['n']})",
        fmt(d["answered_by_s"], 3),
        f"{name} got {hits} attempts / {len(rids)} req ({100 * hits / max(1, len(rids)):.1f}%); " + attempts_text(v, d),
        f"0 errors; {name} attempts <= max(10, 5% of req), <= 1 per req",
        mark(d["met"]),
    ]


def row_429(v: View, d: Res) -> list[Any]:
    errs = v.req_errors()
    sbad, _ = unexpected_stream_errors(v, expect_cut=False)
    errs.update(sbad)
    name, _ = v.target_origin()
    times = sorted(t for n, _, t in v.su.arrivals.seen if n == name and v.ph.t_fault <= t <= v.ph.t_clear + 0.5)
    first = times[0] if times else None
    in2 = [round(t - first, 3) for t in times if first is not None and first < t < first + 2.0]
    inner = [x for x in in2 if 0.1 <= x <= 1.9]
    again = next((round(t - first, 3) for t in times if first is not None and t >= first + 1.9), None)
    d["target_origin"] = name
    d["arrivals_in_2s_after_first_429"] = len(in2)
    d["their_offsets_s"] = in2[:20]
    d["target_requests_again_after_s"] = again
    d["target_arrivals_during_fault"] = len(times)
    d["errors"] = dict(errs)
    d["met"] = sum(errs.values()) == 0 and first is not None and not inner
    return [
        f"endpoint 429 Retry-After 2 ({name})",
        err_text(errs),
        f"{fmt(d['added_ms']['p50'])} / {fmt(d['added_ms']['p99'])} (n {d['added_ms']['n']})",
        fmt(d["answered_by_s"], 3),
        f"{name} got {len(in2)} req in the 2 s after its first 429 "
        f"(at +{', +'.join(f'{x:g}' for x in in2[:5]) or '-'} s); "
        + (f"next at +{again:.2f} s; " if again is not None else "no more during the fault; ")
        + attempts_text(v, d),
        f"0 errors; {name} gets nothing 0.1-1.9 s after the first 429",
        mark(d["met"]),
    ]


def row_silent(v: View, d: Res) -> list[Any]:
    errs = v.req_errors()
    sbad, _ = unexpected_stream_errors(v, expect_cut=False)
    errs.update(sbad)
    name, other = v.target_origin()
    tf, tc = v.ph.t_fault + 0.002, v.ph.t_clear
    hit = [r for r in v.reqs if v.n(r.rid, name, tf, tc)]  # reached the silent origin while it was silent
    hit_st = [st for st in v.streams if v.n(st.rid, name, tf, tc)]
    lat = [r.latency for r in hit if r.latency is not None]
    lat += [st.t_commit - st.t0 for st in hit_st if st.t_commit is not None]
    per_req = [v.n(x, name) for x in [r.rid for r in hit] + [st.rid for st in hit_st]]
    via_other = sum(1 for x in [r.rid for r in hit] + [st.rid for st in hit_st] if v.n(x, other))
    times = sorted(t for n, _, t in v.su.arrivals.seen if n == name and v.ph.t_fault <= t <= v.ph.t_clear)
    n_all = len(v.during) + sum(1 for st in v.streams if st.t0 < v.ph.t_clear)
    d["target_origin"] = name
    d["hit_silent"] = {"requests": len(hit), "streams": len(hit_st), "of_started_during_fault": n_all}
    d["hit_latency_s"] = {
        "min": fmt(min(lat, default=None), 3),
        "p50": fmt(pctl(lat, 50), 3),
        "max": fmt(max(lat, default=None), 3),
    }
    d["silent_arrivals_per_hit_request_max"] = max(per_req, default=0)
    d["answered_via_other"] = via_other
    d["silent_got_traffic_until_s"] = round(times[-1] - v.ph.t_fault, 3) if times else None
    win = v.su.mon.window(v.ph.t_fault, v.ph.t_clear + FIRST_BYTE_TIMEOUT)
    d["max_inflight_on_silent_path"] = max((x.inflight.get(v.ph.target, 0) for x in win), default=None)
    d["errors"] = dict(errs)
    ok_lat = bool(lat) and max(lat) <= FIRST_BYTE_TIMEOUT + 0.5
    d["met"] = sum(errs.values()) == 0 and ok_lat and max(per_req, default=0) <= 1 and via_other == len(per_req)
    return [
        f"endpoint silent{', probes answered' if v.ph.name == 'silent-probes-ok' else ', probes too'} ({name})",
        err_text(errs),
        f"{fmt(d['added_ms']['p50'])} / {fmt(d['added_ms']['p99'])} (n {d['added_ms']['n']})",
        fmt(d["answered_by_s"], 3),
        f"{len(hit) + len(hit_st)} of {n_all} req hit {name} (max {max(per_req, default=0)} each), answered in "
        f"{d['hit_latency_s']['min']}-{d['hit_latency_s']['max']} s, {via_other} via {other}; {name} got traffic "
        f"until +{fmt(d['silent_got_traffic_until_s'], 2)} s (max in flight there {d['max_inflight_on_silent_path']}); "
        + edge_counts(v, d),
        f"answered via other by first_byte_timeout {FIRST_BYTE_TIMEOUT:g} s (+0.5); silent tried once per req",
        mark(d["met"]),
    ]


def _row_stream(v: View, d: Res, k: int, code: str, what: str) -> list[Any]:
    errs = v.req_errors()
    tf = v.ph.t_fault
    bad: Counter[str] = Counter()
    exact = wrong = done_then_err = 0
    gaps: list[float] = []
    codes: Counter[str] = Counter()
    for st in v.streams:
        o = st.outcome
        if o == "done":
            if st.t_err is not None:  # the origin cut the body after its [DONE]: not a broken stream
                done_then_err += 1
            continue
        if o != "inband":
            bad[o if o != "status" else f"stream {st.status}"] += 1
            continue
        codes[str(st.code)] += 1
        if st.frames_by(tf - 0.05) < k - 1:  # reached the fault point under the fault: exactly k frames
            if len(st.frames) == k:
                exact += 1
            else:
                wrong += 1
        if st.frames and st.t_err is not None:
            gaps.append(st.t_err - st.frames[-1])
    errs.update(bad)
    # healthy after: streams started after the fault was cleared end with [DONE], requests get 200
    check = v.ph.extra.get("after", {})
    after_req = [r for r in v.reqs if r.t0 > v.ph.t_clear]
    after_ok = sum(1 for r in after_req if r.ok())
    healthy = check.get("request") == 200 and check.get("stream") == "done" and after_ok == len(after_req)
    d["done_then_inband_error"] = done_then_err
    d["streams_exact_frames"] = exact
    d["streams_wrong_frames"] = wrong
    d["inband_codes"] = dict(codes)
    d["error_after_last_frame_s"] = {
        "min": fmt(min(gaps, default=None), 3),
        "p50": fmt(pctl(gaps, 50), 3),
        "max": fmt(max(gaps, default=None), 3),
    }
    d["healthy_after"] = {**check, "load_requests_ok": after_ok, "load_requests": len(after_req)}
    d["errors"] = dict(errs)
    met = sum(errs.values()) == 0 and wrong == 0 and exact > 0 and healthy and set(codes) <= {code}
    if what == "stall":
        met = met and bool(gaps) and STREAM_IDLE_TIMEOUT - 0.05 <= min(gaps) and max(gaps) <= STREAM_IDLE_TIMEOUT + 0.5
    d["met"] = met
    gap_txt = (
        f"; error {d['error_after_last_frame_s']['min']}-{d['error_after_last_frame_s']['max']} s after last frame"
    )
    return [
        f"stream {what} after {k} frames (both endpoints)",
        err_text(errs),
        "-",
        "-",
        f"{exact} streams exactly {k} frames + in-band error, {wrong} other; codes {dict(codes)}"
        + (gap_txt if what == "stall" else "")
        + (f"; {done_then_err} got [DONE] then an error event" if done_then_err else "")
        + f"; after: request {check.get('request')}, stream {check.get('stream')} ({check.get('stream_frames')} "
        f"frames), load {after_ok}/{len(after_req)} req 200",
        f"{k} frames, in-band error, no [DONE]"
        + (f" at stream_idle_timeout {STREAM_IDLE_TIMEOUT:g}s" if what == "stall" else "")
        + "; healthy after",
        mark(d["met"]),
    ]


def row_cut(v: View, d: Res) -> list[Any]:
    return _row_stream(v, d, CUT_AFTER, "upstream_reset", "cut")


def row_stall(v: View, d: Res) -> list[Any]:
    return _row_stream(v, d, STALL_AFTER, "upstream_timeout", "stall")


def row_400(v: View, d: Res) -> list[Any]:
    name, _ = v.target_origin()
    direct = v.ph.extra.get("direct_body", b"")
    got400 = [r for r in v.reqs if r.status == 400]
    got400_st = [st for st in v.streams if st.status == 400]
    rids = [r.rid for r in got400] + [st.rid for st in got400_st]
    att = [v.n(x) for x in rids]
    not_one = sum(1 for n in att if n != 1)
    bodies = Counter(r.body == direct for r in got400) + Counter(st.body == direct for st in got400_st)
    core = [r for r in v.reqs if v.ph.t_fault + 0.05 < r.t0 < v.ph.t_clear - 0.05]
    core_not400 = sum(1 for r in core if r.status != 400)
    other = sum(1 for r in v.reqs if r.status not in (200, 400) or r.exc)
    d["target_origin"] = name
    d["direct"] = {"status": v.ph.extra.get("direct_status"), "body": direct.decode("utf-8", "replace")[:300]}
    d["answered_400"] = len(rids)
    d["not_exactly_one_attempt"] = not_one
    d["attempts_of_400s"] = dict(Counter(att))
    d["body_identical"] = bodies.get(True, 0)
    d["body_different"] = bodies.get(False, 0)
    d["started_in_fault_not_400"] = core_not400
    d["other_errors"] = other
    d["met"] = bool(rids) and not_one == 0 and bodies.get(False, 0) == 0 and core_not400 == 0 and other == 0
    return [
        f"endpoint 400 context_length_exceeded ({name})",
        f"{len(rids)} x 400 (expected); {other} other errors",
        "-",
        "-",
        f"attempts per 400: {dict(Counter(att))}; body identical to direct: {bodies.get(True, 0)}/{len(rids)}",
        "exactly 1 attempt; body unchanged",
        mark(d["met"]),
    ]


def row_fallback(v: View, d: Res) -> list[Any]:
    """Both origins refuse the load's model with context_length_exceeded: every request and
    stream started during the fault gets the fallback model's answer, and no client error."""
    errs = v.req_errors()
    sbad, _ = unexpected_stream_errors(v, expect_cut=False)
    errs.update(sbad)
    t0, t1 = v.ph.t_fault + 0.05, v.ph.t_clear - 0.05
    core = [r for r in v.reqs if t0 < r.t0 < t1]
    core_st = [st for st in v.streams if t0 < st.t0 < t1]
    models = Counter(str(r.model) for r in core) + Counter(str(st.model) for st in core_st)
    answered = sum(1 for r in core if r.ok()) + sum(1 for st in core_st if st.outcome == "done")
    from_fallback = sum(1 for r in core if r.ok() and r.model == FALLBACK_MODEL) + sum(
        1 for st in core_st if st.outcome == "done" and st.model == FALLBACK_MODEL
    )
    att = Counter(v.n(x) for x in [r.rid for r in core] + [st.rid for st in core_st])
    counted = sum(n for k, n in d["metrics"].items() if k.startswith("fallbacks{"))
    n = len(core) + len(core_st)
    d["requests_in_fault"] = len(core)
    d["streams_in_fault"] = len(core_st)
    d["answer_models"] = dict(models)
    d["from_fallback_model"] = from_fallback
    d["origin_attempts_per_request"] = dict(att)
    d["fallbacks_counted"] = counted
    d["errors"] = dict(errs)
    d["met"] = sum(errs.values()) == 0 and n > 0 and from_fallback == answered == n
    return [
        f"context-length fallback (-> {FALLBACK_MODEL})",
        f"{len(core)} req + {len(core_st)} streams; " + err_text(errs),
        f"{fmt(d['added_ms']['p50'])} / {fmt(d['added_ms']['p99'])} (n {d['added_ms']['n']})",
        fmt(d["answered_by_s"], 3),
        f"from {FALLBACK_MODEL}: {from_fallback}/{n}; origin attempts per req {dict(att)}; "
        f"edgeproxy_fallbacks_total +{counted}",
        f"0 errors; every answer from {FALLBACK_MODEL}",
        mark(d["met"]),
    ]


FAULT_ROWS: dict[str, Callable[[View, Res], list[Any]]] = {
    "refuse": row_refuse,
    "reset+refuse": row_reset_refuse,
    "reset": row_reset,
    "blackhole": row_blackhole,
    "503": row_503,
    "429": row_429,
    "silent": row_silent,
    "silent-probes-ok": row_silent,
    "cut": row_cut,
    "stall": row_stall,
    "400": row_400,
    "fallback": row_fallback,
}


def recovery_row(su: Setup, res: Res) -> list[Any]:
    runs = []
    for ph in su.phases:
        rec = None if ph.t_recovered is None else ph.t_recovered - ph.t_clear
        tr = None if ph.t_traffic is None else ph.t_traffic - ph.t_clear
        runs.append({"after": ph.name, "left_during_fault": ph.left, "preferred_again_s": rec and round(rec, 3),
                     "traffic_again_s": tr and round(tr, 3)})  # fmt: skip
    worst = [max(r["preferred_again_s"] or 0, r["traffic_again_s"] or 0) for r in runs]
    ok = all(r["preferred_again_s"] is not None and r["traffic_again_s"] is not None for r in runs)
    met = ok and max(worst, default=0) <= 3 * PROBE_INTERVAL
    res["recovery"] = {"runs": runs, "met": met, "probe_interval_s": PROBE_INTERVAL}
    txt = "; ".join(
        f"after {r['after']}: "
        + (
            "never left"
            if not r["left_during_fault"]
            else f"pref {fmt(r['preferred_again_s'], 2)} s, traffic {fmt(r['traffic_again_s'], 2)} s"
        )
        for r in runs
    )
    return ["line recovers (back to pass)", "-", "-", "-", txt, "traffic back <= 3 probe intervals (3 s)", mark(met)]


# --------------------------------------------------------------------------- resume


class Spliced:
    """One Anthropic stream as the client assembled it."""

    __slots__ = ("blocks", "done", "error", "exc", "gap", "index_error", "output", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        self.blocks: list[str] = []  # text per content block, by the indices the client saw
        self.index_error = False  # a delta for a block never started, or a start out of order
        self.done = False  # message_stop
        self.error: str | None = None  # an in-band error event
        self.exc: str | None = None
        self.output: int | None = None  # the final message_delta's output_tokens
        self.gap = 0.0  # the longest silence between two events (the splice)


async def spliced_stream(s: aiohttp.ClientSession, port: int, prompt: str, rid: str) -> Spliced:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": True}
    body["messages"] = [{"role": "user", "content": prompt}]
    st = Spliced()
    last = None
    try:
        async with s.post(
            f"http://127.0.0.1:{port}/anthropic/v1/messages",
            json=body,
            headers={"x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01", "x-request-id": rid},
        ) as r:
            st.status = r.status
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.monotonic()
                st.gap = max(st.gap, now - last) if last is not None else 0.0
                last = now
                ev = orjson.loads(line[6:])
                kind = ev.get("type")
                if kind == "content_block_start":
                    st.index_error |= ev["index"] != len(st.blocks)
                    st.blocks.append("")
                elif kind == "content_block_delta":
                    i = ev["index"]
                    if i >= len(st.blocks):
                        st.index_error = True
                        continue
                    st.blocks[i] += ev["delta"].get("text", "")
                elif kind == "message_delta":
                    st.output = ev.get("usage", {}).get("output_tokens")
                elif kind == "message_stop":
                    st.done = True
                elif kind == "error":
                    st.error = ev.get("error", {}).get("type")
    except Exception as e:
        st.exc = type(e).__name__
    return st


async def resume_bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> list[Any]:
    """The "resume" row: ``a.streams`` Anthropic streams at once through an edgeproxy with
    failover.resume on and two endpoints; the preferred one (A, priority 1) cuts every stream
    after CUT_AFTER frames, the other (B) is sent the continuation. Each stream must end with
    message_stop and exactly the reply's text (nothing repeated, nothing missing), usage
    covering it, and no client error."""
    origins = {"A": Origin(), "B": Origin()}
    for o in origins.values():
        o.events = CONTENT_EVENTS
        o.event_interval = a.event_interval
        o.start_in_thread()
    origins["A"].drop_after_events = CUT_AFTER
    port, admin_port = c.free_port(), c.free_port()
    access, log = tmp / "access-resume.log", tmp / "edgeproxy-resume.log"
    eps = ", ".join(f'{{url: "{o.url}", priority: {i + 1}}}' for i, o in enumerate(origins.values()))
    cfg = tmp / "edgeproxy-resume.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin_port}}}\nlog: {{access: json}}\n"
        f"probe: {{interval: {PROBE_INTERVAL:g}s, timeout: {round(PROBE_TIMEOUT * 1000)}ms}}\ndrain_timeout: 1s\n"
        f"failover: {{resume: on, stream_idle_timeout: {STREAM_IDLE_TIMEOUT:g}s}}\n"
        f"upstreams: {{anthropic: {{prefix: /anthropic, provider: anthropic, endpoints: [{eps}]}}}}\n"
    )
    proc = procs.start("edgeproxy-resume", [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=log, stdout=access)
    n = a.streams
    prompts = [f"resume bench {i:04d}: " + "a stream that breaks and goes on " * 4 for i in range(n)]
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(c.wait_http, f"http://127.0.0.1:{admin_port}/-/ready", proc)
        await asyncio.to_thread(c.wait_port, port, proc)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
            got = await asyncio.gather(*(spliced_stream(s, port, p, f"resume-{i:04d}") for i, p in enumerate(prompts)))
            samples = list(await c.AdminClient(s, admin_port).samples())
        await asyncio.sleep(0.2)  # the access log's last lines
    finally:
        procs.stop(proc)
        for o in origins.values():
            o.stop_thread()
    took = time.monotonic() - t0
    resumes = {lb.get("result", ""): int(v) for name, lb, v in samples if name == "edgeproxy_resumes_total"}
    logged = Counter(str(rec.get("resume")) for rid, rec in read_access(access).items() if rid.startswith("resume-"))
    errors: Counter[str] = Counter()
    exact = repeated = missing = usage_ok = 0
    gaps = []
    for st, prompt in zip(got, prompts, strict=True):
        want = reply_for(prompt)
        text = "".join(st.blocks)
        if st.exc or st.status != 200:
            errors[st.exc or f"status {st.status}"] += 1
        elif st.error or not st.done or st.index_error:
            errors[f"in-band {st.error}" if st.error else "index" if st.index_error else "no message_stop"] += 1
        if text == want and len(st.blocks) == 1:
            exact += 1
        elif len(text) > len(want) or (text != want and want in text):
            repeated += 1
        else:
            missing += 1
        usage_ok += st.output is not None and abs(st.output - (len(want) // 4 + 1)) <= 2
        gaps.append(st.gap * 1000 - a.event_interval * 1000)
    n_err = sum(errors.values())
    met = n_err == 0 and exact == n and resumes.get("ok") == n and usage_ok == n
    d = {
        "streams": n,
        "seconds": round(took, 2),
        "errors": dict(errors),
        "exact": exact,
        "repeated": repeated,
        "missing": missing,
        "usage_covers_text": usage_ok,
        "splice_added_ms": {"p50": fmt(pctl(gaps, 50)), "p99": fmt(pctl(gaps, 99))},
        "resumes_total": resumes,
        "access_log_resume": dict(logged),
        "cut_by_A": origins["A"].streams_dropped,
        "prefilled_at_B": sum(1 for r in origins["B"].requests if r.json()["messages"][-1]["role"] == "assistant"),
        "edgeproxy_log_problems": log_problems(log)[:6],
        "met": met,
    }
    res["resume"] = d
    return [
        f"resume: anthropic streams cut after {CUT_AFTER} frames (failover.resume on)",
        err_text(errors),
        f"{d['splice_added_ms']['p50']} / {d['splice_added_ms']['p99']} (splice, n {n})",
        fmt(took, 3),
        f"{exact}/{n} streams complete with the exact text ({repeated} repeated, {missing} missing); "
        f"usage covers it {usage_ok}/{n}; A cut {d['cut_by_A']}, B continued {d['prefilled_at_B']} prefilled; "
        f"resumes_total {resumes}; access log resume {dict(logged)}",
        "every stream completes, text exact (no repeat, no gap), usage covers it; 0 client errors",
        mark(met),
    ]


# --------------------------------------------------------------------------- run


def load_summary(su: Setup) -> Res:
    lat = [r.latency * 1000 for r in su.load.reqs if r.latency is not None]
    return {
        "requests": len(su.load.reqs),
        "statuses": dict(Counter(str(r.status if r.exc is None else r.exc) for r in su.load.reqs)),
        "streams": len(su.load.streams),
        "stream_outcomes": dict(Counter(st.outcome for st in su.load.streams)),
        "latency_ms": {k: round(v, 2) for k, v in c.summarize(lat).items() if k != "n"},
        "seconds": round(time.monotonic() - su.t_start, 1),
        "preferred_at_start": su.start_pref,
        "status_sample_errors": su.mon.errors,
    }


def outside_faults(su: Setup) -> Res:
    """Errors on requests and streams no fault window explains (baselines, recoveries)."""
    spans = [(ph.t_fault, ph.t_end) for ph in su.phases]

    def inside(t0: float, t1: float | None) -> bool:
        return any(t0 < b and (t1 or 1e18) > a for a, b in spans)

    bad: Counter[str] = Counter()
    for r in su.load.reqs:
        if not r.ok() and not inside(r.t0, r.t_end):
            bad[str(r.exc or r.status)] += 1
    for st in su.load.streams:
        if st.outcome not in ("done", "cancelled") and stream_phase(su, st) is None and not inside(st.t0, st.t_end):
            bad["stream " + st.outcome] += 1
    return dict(bad)


def log_problems(path: Path) -> list[str]:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()
        return [ln[:300] for ln in lines if any(w in ln for w in ("WARNING", "ERROR", "Traceback"))]
    return []


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name, faults in (("lines", LINE_FAULTS), ("endpoints", ENDPOINT_FAULTS)):
        su = Setup(a, name, procs, tmp)
        t = time.monotonic()
        try:
            await su.run(faults)
        except Exception as e:
            res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            rows.append([f"{name} setup", f"ERROR {type(e).__name__}: {e}", "-", "-", "-", "-", "MISSED"])
            with contextlib.suppress(Exception):
                if su.proc is not None:
                    procs.stop(su.proc)
            for s in su.sims.values():
                s.stop_thread()
            for o in su.origins.values():
                o.stop_thread()
            if not su.phases:
                continue
        rows += analyse(su, res)
        if name == "lines":
            rows.append(recovery_row(su, res))
        res.setdefault("setups", {})[name] = {
            "load": load_summary(su),
            "errors_outside_faults": outside_faults(su),
            "seconds": round(time.monotonic() - t, 1),
            "edgeproxy_log_problems": log_problems(su.log)[:12],
            "edgeproxy_log_problem_lines": len(log_problems(su.log)),
        }
    try:
        rows.append(await resume_bench(a, tmp, procs, res))
    except Exception as e:
        res.setdefault("errors", []).append(f"resume: {type(e).__name__}: {e}")
        rows.append(["resume", f"ERROR {type(e).__name__}: {e}", "-", "-", "-", "-", "MISSED"])
    return rows


def details(res: Res) -> None:
    print()
    for name, d in res.get("faults", {}).items():
        print(
            f"{name}: target {d['setup']}/{d['target']}, {d['fault_s']} s; {d['requests']} req "
            f"({d['in_flight_at_fault']} in flight at the fault), {d['streams']} streams {d['stream_outcomes']}; "
            f"latency ms before p50/p99 {d['baseline_ms']['p50']}/{d['baseline_ms']['p99']}, hit "
            f"{d['affected_ms']['p50']}/{d['affected_ms']['p99']} (max {d['affected_ms']['max']}), whole fault "
            f"{d['whole_fault_ms']['p50']}/{d['whole_fault_ms']['p99']}; answered by +{d['answered_by_s']} s"
        )
        print(f"    metrics delta: {d['metrics']}")
        print(f"    origin request_count delta {d['origin_request_count_delta']}; attempts {d['attempts']}")
        print(f"    access log (hit requests): {d['access_log']}")
        extra = {k: v for k, v in d.items() if k not in _SHOWN}
        if extra:
            print(f"    {extra}")
    for name, s in res.get("setups", {}).items():
        ld = s["load"]
        print(
            f"setup {name}: {ld['requests']} req {ld['statuses']}, {ld['streams']} streams {ld['stream_outcomes']}, "
            f"latency ms {ld['latency_ms']}; errors outside fault windows: {s['errors_outside_faults'] or 0}; "
            f"{s['seconds']} s; edgeproxy stderr warnings/errors: {s['edgeproxy_log_problem_lines']}"
        )
        for ln in s["edgeproxy_log_problems"][:6]:
            print("    ", ln)
    if "resume" in res:
        print(f"resume: {res['resume']}")
    for e in res.get("errors", []):
        print("ERROR", e)


_SHOWN = {
    "setup", "target", "fault_s", "requests", "in_flight_at_fault", "streams", "stream_outcomes", "metrics",
    "origin_request_count_delta", "added_ms", "baseline_ms", "affected_ms", "in_flight_ms", "whole_fault_ms",
    "answered_by_s", "attempts", "access_log", "met",
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 90 s, lower load)")
    ap.add_argument("--rate", type=float, help="non-stream requests/s (default 200; quick 100)")
    ap.add_argument("--streams", type=int, help="open streams (default 50; quick 20)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (edgeproxy logs, access logs, configs)")
    failover_models.add_args(ap)  # --models-only, --no-models, --flap-runs, --model-rate
    a = ap.parse_args()
    q = a.quick
    a.rate = a.rate or (100.0 if q else 200.0)
    a.streams = a.streams if a.streams is not None else (20 if q else 50)
    a.event_interval = 0.05 if q else 0.1
    a.stream_s = FRAMES * a.event_interval
    a.warm = 1.5 if q else 2.0
    a.pre = 1.5 if q else 2.5
    a.fault_s = 2.0 if q else 3.0
    a.short_fault_s = 1.5 if q else 2.0
    # long enough for a stream restarted at the fault to reach the cut (40 frames) / stall (20 + idle timeout)
    a.stream_fault_s = CUT_AFTER * a.event_interval + 0.8
    c.raise_nofile()
    rev = subprocess.run(["git", "-C", str(c.ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    sys.setswitchinterval(0.0005)  # threads (origins, simulators) share the GIL with the load client
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(
        f"failover: {a.rate:g} req/s open loop + {a.streams} streams ({FRAMES} frames at {a.event_interval:g} s); "
        f"probe.interval {PROBE_INTERVAL:g} s, probe.timeout {PROBE_TIMEOUT * 1000:g} ms (bench settings; default "
        f"5 s / 1 s); endpoints setup: failover.first_byte_timeout {FIRST_BYTE_TIMEOUT:g} s, stream_idle_timeout "
        f"{STREAM_IDLE_TIMEOUT:g} s (defaults 300 s / 60 s); far line +{FAR_DELAY * 1000:g} ms one-way "
        f"(+{2 * FAR_DELAY * 1000:g} ms RTT). edgeproxy {rev.stdout.strip()}. Shared machine; loadavg before {la0}",
        flush=True,
    )
    res: Res = dict(bench="failover", quick=q, rate=a.rate, streams=a.streams, frames=FRAMES,
                    event_interval_s=a.event_interval, probe_interval_s=PROBE_INTERVAL, probe_timeout_s=PROBE_TIMEOUT,
                    first_byte_timeout_s=FIRST_BYTE_TIMEOUT, stream_idle_timeout_s=STREAM_IDLE_TIMEOUT,
                    far_one_way_ms=FAR_DELAY * 1000, affect_window_s=AFFECT_S, loadavg_before=la0,
                    background=bg, revision=rev.stdout.strip() or None)  # fmt: skip
    t0 = time.monotonic()
    rows: list[list[Any]] = []
    with contextlib.ExitStack() as stack:
        td = (
            tempfile.mkdtemp(prefix="bench-failover-")
            if a.keep
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-failover-"))
        )
        procs = stack.enter_context(c.Procs())
        rows = [] if a.models_only else uvloop.run(bench(a, Path(td), procs, res))
        rows += uvloop.run(failover_models.bench(a, Path(td), procs, res))
    if a.keep:
        print(f"kept: {td}")
        res["kept_dir"] = td
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    print()
    c.print_table(
        ["fault", "client errors", "added p50/p99 ms", "all answered s", "attempts / detail", "target", "result"], rows
    )
    details(res)
    failover_models.details(res)
    print(
        f"added latency: requests in flight at the fault or started in its first {AFFECT_S:g} s, minus the same "
        f"percentile of the requests in the {a.pre:g} s before it; 'all answered': the longest any request (or "
        "stream start) waited after the fault. Errors count non-200, exceptions and streams that ended without "
        "[DONE] and without an in-band error; in-band errors on streams a line fault cut after commit are listed "
        "apart (nothing else is honest once a stream started)."
    )
    print(
        c.noise_note(
            bg,
            la0,
            la1,
            "Shared machine; the load client, the fake origins and the line simulators share one"
            " Python process (GIL) beside edgeproxy.",
        )
    )
    print(f"elapsed {res['elapsed_s']} s")
    res["targets"] = {k: v.get("met") for k, v in res.get("faults", {}).items()}
    res["targets"]["recovery"] = res.get("recovery", {}).get("met")
    res["targets"]["resume"] = res.get("resume", {}).get("met")
    res["targets"].update(failover_models.targets(res))
    for d in res.get("faults", {}).values():
        d.pop("direct_body", None)
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

"""Config reload and shutdown under load, measured on a running edgeproxy (a subprocess).

Setup (all started here, all stopped at the end, on error and Ctrl-C too): one fake origin and
two LineSims in front of it, all threads of this process; edgeproxy as a subprocess with its
admin listener on (/metrics: edgeproxy_reloads_total{result}, edgeproxy_config_generation) and
the JSON access log on (stdout, to a file in the temp dir). Its one upstream (openai) has:

  A  endpoint http://<LineSim A>/v1, priority 1: in both configs, takes all the traffic;
  B  endpoint http://<LineSim B>/v1, priority 2: only in "config 1". B is a second endpoint
     (on the same direct line), not a second line: it gets a path of its own, warmed and
     probed on the reload that adds it, and takes no traffic while A is up. Removing it drains
     and closes that path.

Both configs have ``pool: {warm: 0}`` and ``probe: {interval: 30s}``: the pool on A then holds
exactly what the load needs, so a new connection on LineSim A is either the load growing (a
burst needing one more connection) or a reload touching a path it should not. With warm > 0
the warm-keeper opens spare connections whenever the load varies (a burst uses up the idle
ones), which is not a reload effect and would hide one; with the default 5 s probe interval a
probe finding no idle connection would open one. A probe on A at start, then none for ~30 s:
the measured phases end before that. Each LineSim counts the connections it accepted
(``connections_total``): what the origin sees per path.

Phases:
  1. load: open loop, --rate small chat completions per second (each starts on its schedule,
     whatever the others are doing) plus --streams SSE streams kept open (the origin sends
     --events content chunks every --event-interval s: 3 s streams; a stream that ends is
     restarted at once; starts staggered over one stream length). aiohttp client, connector
     limit 1000 (the proxy's pool still grows to the concurrency the load needs).
     Warm-up: at least 3 s and until A's connections_total has not moved for 1 s.
  2. control: the same load, no reloads, for about as long as the reload phase takes: A's new
     connections here are the noise floor.
  3. reloads: --reloads times, rewrite the YAML (write + rename) alternating config 1 (A+B) and
     config 2 (A), SIGHUP, wait until edgeproxy_config_generation has gone up (polled every
     10 ms; the reload time is SIGHUP -> the bump seen there, and also SIGHUP -> edgeproxy's own
     "reloaded" log line), then 0.3 s. Then 2 s more load, and a second control as long as the
     reload phase (the pool keeps growing a little after warm-up, so the control before is
     the pessimistic noise floor, this one the settled one); stop the load (streams finish).
     Targets: no failed request (non-200 or exception), no broken stream (anything but status
     200, every frame, [DONE] and no error event), every reload ok, no new connection on A.
     Each new connection on A (LineSim A sampled every 20 ms) is set against edgeproxy's own
     requests in flight, rebuilt from its access log (end time - duration_ms): with warm 0 the
     pool grows only when a request finds no idle connection, i.e. at a new high of requests in
     flight. Also: the latency of the requests that started in the 50 ms after each SIGHUP, and
     after the same instants of the control (a reload's pause of the event loop shows there).
  4. invalid file: config 1 with endpoint B's priority "high", SIGHUP. Targets: requests and a
     stream still succeed on the old config (generation unchanged), edgeproxy's stderr has the
     key path (upstreams.openai.endpoints[1].priority), edgeproxy_reloads_total{result="failed"}
     +1.
  5. SIGTERM: 50 streams of 5 s (47 content chunks every 0.1 s), all committed (first event
     read), then SIGTERM. Targets: all 50 end intact with [DONE]; exit code 0 (drain_timeout
     20 s). Also reported: time to exit, and whether a new connection 0.3 s after SIGTERM is
     refused.

Usage: .venv/bin/python bench/reload.py [--quick] [--rate R] [--streams N] [--reloads K]
                                        [--headroom N] [--keep]
(full: 200 req/s + 100 streams, 20 reloads, about 40 s; --quick: 100 req/s + 40 streams,
10 reloads, about 30 s). --headroom N: after the warm-up, N extra streams at once (one round)
leave N spare connections in A's pool, so the load's own bursts no longer grow it and a new
connection on A would be the reload's doing (not the issue's setup: off by default). --keep
keeps the temp dir (config, edgeproxy's stderr log, access log).
Output: a table with MET/MISSED per target, details, a noise note, and as the last line one
JSON object {"bench": "reload", ...}. Exit status 0 whatever the targets say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import uvloop

sys.path.insert(0, str(c.ROOT))
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin

EDGE_PY = c.EDGE_PY
PROMPT = [{"role": "user", "content": "reload bench"}]
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": PROMPT}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": PROMPT}).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-reload-bench"}
RELOAD_GAP = 0.3  # s between a generation bump and the next SIGHUP
TAIL_S = 2.0  # load kept after the last reload
WARMUP_MIN, WARMUP_STABLE, WARMUP_MAX = 3.0, 1.0, 20.0
TERM_STREAMS, TERM_EVENTS, TERM_INTERVAL = 50, 47, 0.1  # 50 frames, ~4.9 s
DRAIN_TIMEOUT = 20
INVALID_KEY = "upstreams.openai.endpoints[1].priority"
Res = dict[str, Any]


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


# --------------------------------------------------------------------------- the load


class Req:
    __slots__ = ("exc", "kind", "status", "t0", "t_end", "t_start")

    def __init__(self, t0: float) -> None:
        self.t0 = t0  # scheduled start
        self.t_start = time.monotonic()  # actual start (the ticker may be late)
        self.t_end: float | None = None
        self.status: int | None = None
        self.exc: str | None = None
        self.kind: str | None = None  # x-edgeproxy-error

    def ok(self) -> bool:
        return self.status == 200 and self.exc is None


class Stream:
    __slots__ = ("done", "error_event", "exc", "frames", "status", "t0", "t_end", "t_first")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.t_first: float | None = None  # first data frame (commit)
        self.t_end: float | None = None
        self.status: int | None = None
        self.frames = 0  # data frames, [DONE] included, error events not
        self.done = False
        self.error_event = False
        self.exc: str | None = None

    def outcome(self, frames: int) -> str:
        if self.exc == "cancelled":
            return "cancelled"
        if self.status is None:
            return f"exc {self.exc}"
        if self.status != 200:
            return f"status {self.status}"
        if self.error_event:
            return "error event"
        if self.exc:
            return f"cut ({self.exc})"
        if not self.done:
            return "no [DONE]"
        if self.frames != frames:
            return f"{self.frames}/{frames} frames"
        return "intact"


async def read_stream(
    session: aiohttp.ClientSession, url: str, st: Stream, on_commit: Callable[[], None] | None = None
) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
    try:
        async with session.post(url, data=STREAM, headers=HEADERS, timeout=timeout) as resp:
            st.status = resp.status
            if resp.status != 200:
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b'data: {"error"'):
                    st.error_event = True
                    continue
                st.frames += 1
                if st.t_first is None:
                    st.t_first = time.monotonic()
                    if on_commit is not None:
                        on_commit()
                if line.startswith(b"data: [DONE]"):
                    st.done = True
    except asyncio.CancelledError:
        st.exc = "cancelled"
        raise
    except Exception as e:
        st.exc = type(e).__name__
    finally:
        st.t_end = time.monotonic()


class Load:
    """Open-loop non-stream requests at ``rate``/s plus ``streams`` streams kept open."""

    def __init__(self, url: str, rate: float, streams: int, stream_s: float) -> None:
        self.url = url + "/v1/chat/completions"
        self.rate = rate
        self.n_streams = streams
        self.stream_s = stream_s
        self.reqs: list[Req] = []
        self.streams: list[Stream] = []
        self.open_streams = 0  # committed and not ended
        self.max_late = 0.0  # how late the ticker started a request, worst case (client saturation)
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[Any]] = []
        self._ticker_task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=1000)
        self.session = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None))
        loop = asyncio.get_running_loop()
        self._ticker_task = loop.create_task(self._ticker())
        for i in range(self.n_streams):
            self._main.append(loop.create_task(self._stream_worker(i)))

    async def _ticker(self) -> None:
        period = 1.0 / self.rate
        next_t = time.monotonic()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_late = max(self.max_late, -delay)
            task = loop.create_task(self._one(next_t))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_t += period

    async def _one(self, t0: float) -> None:
        r = Req(t0)
        self.reqs.append(r)
        assert self.session is not None
        try:
            async with self.session.post(
                self.url, data=CHAT, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                await resp.read()
                r.status = resp.status
                r.kind = resp.headers.get("x-edgeproxy-error")
        except Exception as e:
            r.exc = type(e).__name__
        r.t_end = time.monotonic()

    def _committed(self) -> None:
        self.open_streams += 1

    async def _stream_worker(self, i: int) -> None:
        await asyncio.sleep(i * self.stream_s / max(1, self.n_streams))
        assert self.session is not None
        while not self._stopping:
            st = Stream(time.monotonic())
            self.streams.append(st)
            try:
                await read_stream(self.session, self.url, st, self._committed)
            finally:
                if st.t_first is not None:
                    self.open_streams -= 1
            if not st.done:  # a failed start or a broken stream: no tight loop
                await asyncio.sleep(0.5)

    async def stop(self, stream_wait: float) -> None:
        """No new requests or streams; wait for the ones open (streams up to ``stream_wait``)."""
        self._stopping = True
        if self._ticker_task is not None:
            await self._ticker_task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=35)
        _, pending = await asyncio.wait(self._main, timeout=stream_wait)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._main, *self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


def req_summary(reqs: list[Req], t0: float = -1e18, t1: float = 1e18) -> dict[str, Any]:
    """Requests that overlapped [t0, t1]."""
    rs = [r for r in reqs if r.t0 <= t1 and (r.t_end is None or r.t_end >= t0)]
    bad: Counter[str] = Counter()
    for r in rs:
        if not r.ok():
            bad[r.exc or f"{r.status} {r.kind or ''}".strip()] += 1
    lat = [1000 * (r.t_end - r.t0) for r in rs if r.t_end is not None and r.ok()]
    s = c.summarize(lat)
    return {
        "sent": len(rs),
        "ok": sum(1 for r in rs if r.ok()),
        "failed": sum(bad.values()),
        "failures": dict(bad),
        "latency_ms": {k: round(v, 1) for k, v in s.items() if k != "n"},
    }


def stream_summary(streams: list[Stream], frames: int, t0: float = -1e18, t1: float = 1e18) -> dict[str, Any]:
    """Streams that overlapped [t0, t1] (cancelled ones: stopped by the benchmark at the very end)."""
    ss = [s for s in streams if s.t0 <= t1 and (s.t_end is None or s.t_end >= t0)]
    out = Counter(s.outcome(frames) for s in ss)
    broken = {k: v for k, v in out.items() if k not in ("intact", "cancelled")}
    return {
        "streams": len(ss),
        "intact": out["intact"],
        "broken": sum(broken.values()),
        "broken_by": broken,
        "cancelled": out["cancelled"],
    }


def edge_inflight(access: Path, offset: float) -> list[tuple[float, int, int]]:
    """Requests in flight inside edgeproxy, from its access log (a record's time is its end, minus
    duration_ms its start), on this process's monotonic clock (``offset`` = time.time() - monotonic):
    [(time, in flight, of which streams)] after each start / end."""
    ev: list[tuple[float, int, int]] = []
    with contextlib.suppress(OSError), open(access, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                end = rec["time"] - offset
                s = 1 if rec.get("streamed") else 0
                ev += [(end - rec["duration_ms"] / 1000, 1, s), (end, -1, -s)]
    ev.sort()  # at the same instant an end sorts before a start
    out, n, ns = [], 0, 0
    for t, d, s in ev:
        n, ns = n + d, ns + s
        out.append((t, n, ns))
    return out


def peak(conc: list[tuple[float, int, int]], t0: float, t1: float) -> tuple[int, int]:
    """Highest in flight within [t0, t1], and how many of those were streams."""
    return max(((n, ns) for t, n, ns in conc if t0 <= t <= t1), default=(0, 0))


def after_marks(reqs: list[Req], conc: list[tuple[float, int, int]], marks: list[float]) -> dict[str, Any]:
    """Latency of the requests that started in the 50 ms after each mark; in-flight peak in the 100 ms after."""
    lat = [
        1000 * (r.t_end - r.t_start)
        for r in reqs
        if r.t_end is not None and any(m <= r.t_start < m + 0.05 for m in marks)
    ]
    s = c.summarize(lat)
    peaks = [peak(conc, m, m + 0.1)[0] for m in marks]
    return {
        "requests": int(s["n"]),
        "latency_ms": {k: round(v, 1) for k, v in s.items() if k != "n"},
        "inflight_peak_max": max(peaks, default=0),
        "inflight_peak_mean": round(sum(peaks) / max(1, len(peaks)), 1),
    }


def explain(
    new_a: list[tuple[float, int]],
    conc: list[tuple[float, int, int]],
    marks: list[tuple[float, float | None]],
    t_load: float,
    phases: list[tuple[str, float, float]],
) -> list[dict[str, Any]]:
    """Each time A's connections_total moved after warm-up (sampled every 20 ms): the latest SIGHUP
    before it, and whether edgeproxy's requests in flight just then (the 60 ms before the sample) set
    a new high since the load started. With warm 0 the pool grows only when a request finds no
    idle connection, i.e. at a new high of requests in flight (probes aside)."""
    out = []
    for t, n in new_a:
        phase = next((name for name, t0, t1 in phases if t0 <= t <= t1), None)
        if phase is None:
            continue
        before = [(i, m) for i, m in enumerate(marks) if m[0] <= t]
        high_before = peak(conc, t_load - 1, t - 0.06)[0]
        now, streams = peak(conc, t - 0.06, t)
        row: dict[str, Any] = {
            "phase": phase,
            "new": n,
            "inflight": now,
            "of_which_streams": streams,
            "previous_high": high_before,
            "new_high": now > high_before,
        }
        if before:
            i, (t_hup, t_bump) = before[-1]
            row["after_sighup"] = f"#{i + 1} +{1000 * (t - t_hup):.0f} ms"
            row["during_reload"] = t_bump is None or t - 0.02 <= t_bump
        out.append(row)
    return out


# --------------------------------------------------------------------------- edgeproxy admin


class Admin(c.AdminClient):
    async def metrics(self) -> dict[str, int]:
        """reloads ok / failed and the config generation."""
        out = {"reloads_ok": 0, "reloads_failed": 0, "generation": 0}
        for name, labels, value in await self.samples():
            if name == "edgeproxy_reloads_total":
                out["reloads_" + labels.get("result", "?")] = int(value)
            elif name == "edgeproxy_config_generation":
                out["generation"] = int(value)
        return out

    async def paths(self) -> list[dict[str, Any]]:
        st = await self.status()
        return [p for u in st["upstreams"] for p in u["paths"]]

    async def wait(self, key: str, value: int, timeout: float) -> tuple[float | None, dict[str, int]]:
        """Poll /metrics every 10 ms until ``key`` >= value: (monotonic time seen, metrics)."""
        deadline = time.monotonic() + timeout
        m: dict[str, int] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                m = await self.metrics()
                if m.get(key, 0) >= value:
                    return time.monotonic(), m
            await asyncio.sleep(0.01)
        return None, m


# --------------------------------------------------------------------------- configs


def config_text(port: int, admin: int, a: str, b: str | None, b_priority: Any = 2) -> str:
    eps = f'      - {{url: "http://{a}/v1"}}\n'
    if b is not None:
        eps += f'      - {{url: "http://{b}/v1", priority: {b_priority}}}\n'
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"admin: {{listen: 127.0.0.1:{admin}}}\n"
        "log: {access: json}\n"
        "upstreams:\n  openai:\n    prefix: /v1\n    endpoints:\n" + eps + "pool: {warm: 0}\n"
        "probe: {interval: 30s, timeout: 1s}\n"
        f"drain_timeout: {DRAIN_TIMEOUT}s\n"
    )


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_LOGLINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: (.*)$")
_RELOADED = re.compile(r"^reloaded \S+ \(generation (\d+)\): (.*)$")


def log_lines(log: Path) -> list[tuple[float, str]]:
    """(epoch seconds, message) of every line of edgeproxy's stderr log that has a timestamp."""
    out = []
    with contextlib.suppress(OSError):
        for ln in log.read_text(errors="replace").splitlines():
            m = _LOGLINE.match(ln)
            if m:
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                out.append((t, m.group(3)))
    return out


def reload_log(log: Path) -> dict[int, tuple[float, str]]:
    """generation -> (epoch seconds, what changed) from edgeproxy's "reloaded" lines."""
    out: dict[int, tuple[float, str]] = {}
    for t, msg in log_lines(log):
        m = _RELOADED.match(msg)
        if m:
            out[int(m.group(1))] = (t, m.group(2))
    return out


class ConnWatch:
    """Samples LineSim A's and B's connections_total / connections_open every 20 ms."""

    def __init__(self, a: LineSim, b: LineSim) -> None:
        self.a, self.b = a, b
        self.new_a: list[tuple[float, int]] = []  # (time, new connections) each time A's total moved
        self.max_open_a = 0
        self._last = a.connections_total

    async def run(self) -> None:
        while True:
            n = self.a.connections_total
            if n != self._last:
                self.new_a.append((time.monotonic(), n - self._last))
                self._last = n
            self.max_open_a = max(self.max_open_a, self.a.connections_open)
            await asyncio.sleep(0.02)

    def times(self, t0: float, t1: float) -> list[str]:
        """When A's total moved within [t0, t1]: "s_into_the_window(+new)"."""
        return [f"{t - t0:.2f}(+{n})" for t, n in self.new_a if t0 <= t <= t1]

    async def stable(self, min_s: float, stable_s: float, max_s: float) -> float:
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            last = self.new_a[-1][0] if self.new_a else t0
            if now - t0 >= min_s and now - last >= stable_s:
                return now - t0
            if now - t0 >= max_s:
                return now - t0
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the bench


async def bench(
    a: argparse.Namespace, tmp: Path, procs: c.Procs, origin: FakeOrigin, sa: LineSim, sb: LineSim, res: Res
) -> list[list[Any]]:
    rows: list[list[Any]] = []
    port, admin_port = c.free_port(), c.free_port()
    cfg = tmp / "edgeproxy.yaml"
    one = config_text(port, admin_port, sa.address, sb.address)  # config 1: A + B (priority 2)
    two = config_text(port, admin_port, sa.address, None)  # config 2: A only
    write_atomic(cfg, two)
    res["configs"] = {"1": one, "2": two}
    log = tmp / "edgeproxy.log"
    p = procs.start(
        "edgeproxy", [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=log, stdout=tmp / "access.log"
    )
    await asyncio.to_thread(c.wait_http, f"http://127.0.0.1:{admin_port}/-/ready", p)
    await asyncio.to_thread(c.wait_port, port, p)
    url = f"http://127.0.0.1:{port}"
    frames = a.events + 3
    stream_s = (a.events + 2) * a.event_interval  # frames - 1 intervals
    cpu0 = c.cpu_seconds(p.pid), time.process_time()
    offset = time.time() - time.monotonic()  # access log times (epoch) -> this process's monotonic clock

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        admin = Admin(s, admin_port)
        watch = ConnWatch(sa, sb)
        wt = asyncio.get_running_loop().create_task(watch.run())
        load = Load(url, a.rate, a.streams, stream_s)
        try:
            # -- 1 warm-up ----------------------------------------------------------------
            t_load = time.monotonic()
            await load.start()
            res["warmup_s"] = round(await watch.stable(WARMUP_MIN, WARMUP_STABLE, WARMUP_MAX), 2)
            if a.headroom:
                # --headroom N: N more streams at once, one round: A's pool then has N spare connections
                assert load.session is not None
                extra = [Stream(time.monotonic()) for _ in range(a.headroom)]
                await asyncio.gather(*(read_stream(load.session, load.url, st) for st in extra))
                res["headroom"] = {"streams": a.headroom, "intact": sum(st.outcome(frames) == "intact" for st in extra)}
                res["warmup_s"] += round(await watch.stable(WARMUP_STABLE, WARMUP_STABLE, WARMUP_MAX), 2)
            res["a_connections_after_warmup"] = sa.connections_total
            # -- 2 control ----------------------------------------------------------------
            control_s = a.reloads * (RELOAD_GAP + 0.02)  # a reload itself takes 5-40 ms
            tc0, ca0, cb0 = time.monotonic(), sa.connections_total, sb.connections_total
            open_c = []
            while time.monotonic() - tc0 < control_s:
                open_c.append(load.open_streams)
                await asyncio.sleep(0.1)
            tc1, ca1, cb1 = time.monotonic(), sa.connections_total, sb.connections_total
            res["control"] = {
                "seconds": round(tc1 - tc0, 2),
                "a_new_connections": ca1 - ca0,
                "b_new_connections": cb1 - cb0,
                "open_streams_min": min(open_c),
                "a_new_connection_times_s": watch.times(tc0, tc1),
            }
            # -- 3 reloads ----------------------------------------------------------------
            m0 = await admin.metrics()
            gen = m0["generation"]
            reloads: list[dict[str, Any]] = []
            marks: list[tuple[float, float | None]] = []  # (SIGHUP, bump seen) per reload
            tr0, ra0, rb0 = time.monotonic(), sa.connections_total, sb.connections_total
            for i in range(a.reloads):
                with_b = i % 2 == 0
                write_atomic(cfg, one if with_b else two)
                a0, b0, open0 = sa.connections_total, sb.connections_total, load.open_streams
                wall, t0 = time.time(), time.monotonic()
                p.send_signal(signal.SIGHUP)
                t_seen, m = await admin.wait("generation", gen + 1, timeout=10)
                ok = t_seen is not None
                if ok:
                    gen += 1
                marks.append((t0, t_seen))
                reloads.append(
                    {
                        "n": i + 1,
                        "config": 1 if with_b else 2,
                        "wall": wall,
                        "ok": ok,
                        "generation": m.get("generation"),
                        "seconds": None if t_seen is None else round(t_seen - t0, 4),
                        "open_streams": open0,
                        "a_new": sa.connections_total - a0,
                        "b_new": sb.connections_total - b0,
                    }
                )
                await asyncio.sleep(RELOAD_GAP)
            tr1, ra1, rb1 = time.monotonic(), sa.connections_total, sb.connections_total
            await asyncio.sleep(TAIL_S)
            tt1, ta1 = time.monotonic(), sa.connections_total
            # a second control, as long as the reload phase, once the pool has settled further
            while time.monotonic() - tt1 < tr1 - tr0:
                await asyncio.sleep(0.05)
            tc2, ca2 = time.monotonic(), sa.connections_total
            res["control_after"] = {
                "seconds": round(tc2 - tt1, 2),
                "a_new_connections": ca2 - ta1,
                "a_new_connection_times_s": watch.times(tt1, tc2),
            }
            m1 = await admin.metrics()
            paths_after = await admin.paths()
            # stop the load: streams finish
            t_stop = time.monotonic()
            await load.stop(stream_s + 10)
            res["load_stop_s"] = round(time.monotonic() - t_stop, 2)
            t_load_end = time.monotonic()
            res["a_connections_end_of_load"] = sa.connections_total
            cpu1 = c.cpu_seconds(p.pid), time.process_time()
            # -- results of 1-3 ------------------------------------------------------------
            by_gen = reload_log(log)
            for r in reloads:
                lg = by_gen.get(r["generation"]) if r["ok"] else None
                r["log_seconds"] = None if lg is None else round(lg[0] - r["wall"], 3)
                r["log"] = None if lg is None else lg[1]
                r.pop("wall")
            secs = [r["seconds"] for r in reloads if r["seconds"] is not None]
            log_secs = [r["log_seconds"] for r in reloads if r["log_seconds"] is not None]
            new_a_times = watch.times(tr0, tr1)
            conc = edge_inflight(tmp / "access.log", offset)
            res["edgeproxy_inflight_peak"] = {
                "warmup": peak(conc, t_load - 1, tc0)[0],
                "control": peak(conc, tc0, tc1)[0],
                "reloads": peak(conc, tr0, tr1)[0],
                "tail": peak(conc, tr1, tt1)[0],
                "control_after": peak(conc, tt1, tc2)[0],
            }
            phases = [("control", tc0, tc1), ("reloads", tr0, tr1), ("tail", tr1, tt1), ("control_after", tt1, tc2)]
            res["a_new_explained"] = explain(watch.new_a, conc, marks, t_load, phases)
            during = [x for x in res["a_new_explained"] if x["phase"] == "reloads"]
            # right after each SIGHUP vs the same instants in the control (same cadence): latency of the
            # requests that started in the next 50 ms, and the client's in-flight peak in the next 100 ms
            ctrl_marks = [tc0 + k * (tr1 - tr0) / a.reloads for k in range(a.reloads)]
            res["after_sighup"] = {
                "reloads": after_marks(load.reqs, conc, [m[0] for m in marks]),
                "control": after_marks(load.reqs, conc, ctrl_marks),
            }
            res["reloads"] = {
                "count": a.reloads,
                "ok": sum(r["ok"] for r in reloads),
                "failed": a.reloads - sum(r["ok"] for r in reloads),
                "metrics_ok_delta": m1["reloads_ok"] - m0["reloads_ok"],
                "metrics_failed_delta": m1["reloads_failed"] - m0["reloads_failed"],
                "generation_before": m0["generation"],
                "generation_after": m1["generation"],
                "seconds": round(tr1 - tr0, 2),
                "a_new_connections": ra1 - ra0,
                "a_new_connection_times_s": new_a_times,
                "a_new_connections_tail": ta1 - ra1,
                "b_new_connections": rb1 - rb0,
                "time_ms": {k: round(1000 * v, 1) for k, v in c.summarize(secs, (50,)).items() if k != "n"},
                "log_time_ms": {k: round(1000 * v, 1) for k, v in c.summarize(log_secs, (50,)).items() if k != "n"},
                # by kind: adding B waits for B's first probe; removing it does not wait
                "time_ms_by_config": {
                    f"{cf} ({'adds B' if cf == 1 else 'removes B'})": {
                        k: round(1000 * v, 1)
                        for k, v in c.summarize(
                            [r["seconds"] for r in reloads if r["config"] == cf and r["ok"]], (50,)
                        ).items()
                        if k != "n"
                    }
                    for cf in (1, 2)
                },
                "open_streams_at_sighup_min": min(r["open_streams"] for r in reloads),
                "summaries": dict(Counter(r["log"] for r in reloads if r["log"])),
                "each": reloads,
            }
            res["paths_after"] = [
                {
                    k: pa.get(k)
                    for k in ("endpoint", "priority", "state", "active", "idle", "requests", "last_probe_s_ago")
                }
                for pa in paths_after
            ]
            res["a_max_open_connections"] = watch.max_open_a
            res["load"] = {
                "rate_target": a.rate,
                "streams_target": a.streams,
                "stream_s": stream_s,
                "seconds": round(t_load_end - t_load, 1),
                "requests_per_s": round(len(load.reqs) / max(1e-9, t_stop - t_load), 1),
                "ticker_max_late_ms": round(1000 * load.max_late, 1),
                "all": {"requests": req_summary(load.reqs), "streams": stream_summary(load.streams, frames)},
                "control": {
                    "requests": req_summary(load.reqs, tc0, tc1),
                    "streams": stream_summary(load.streams, frames, tc0, tc1),
                },
                "reloads": {
                    "requests": req_summary(load.reqs, tr0, tt1),
                    "streams": stream_summary(load.streams, frames, tr0, tt1),
                },
                "control_after": {
                    "requests": req_summary(load.reqs, tt1, tc2),
                    "streams": stream_summary(load.streams, frames, tt1, tc2),
                },
                "cpu_s": {"edgeproxy": round(cpu1[0] - cpu0[0], 1), "bench_process": round(cpu1[1] - cpu0[1], 1)},
            }
            res["origin"] = {
                "streams_completed": origin.streams_completed,
                "stream_disconnects": origin.stream_disconnects,
            }
            rq, st, rl = res["load"]["all"]["requests"], res["load"]["all"]["streams"], res["reloads"]
            rows += [
                [
                    f"requests ({a.rate:g}/s open loop, whole run)",
                    f"{rq['sent']} sent, {rq['ok']} ok, {rq['failed']} failed"
                    + (f" {rq['failures']}" if rq["failed"] else ""),
                    "0 failed",
                    mark(rq["sent"] > 0 and rq["failed"] == 0),
                ],
                [
                    f"streams ({a.streams} open, {stream_s:g} s each, whole run)",
                    f"{st['intact']} intact, {st['broken']} broken" + (f" {st['broken_by']}" if st["broken"] else ""),
                    "0 broken",
                    mark(st["intact"] > 0 and st["broken"] == 0),
                ],
                [
                    f"reloads (SIGHUP, alternating config 1/2, {RELOAD_GAP:g} s apart)",
                    f"{rl['ok']}/{rl['count']} ok (metrics: ok +{rl['metrics_ok_delta']}, "
                    f"failed +{rl['metrics_failed_delta']}; generation {rl['generation_before']}->"
                    f"{rl['generation_after']})",
                    f"{rl['count']} ok",
                    mark(rl["ok"] == rl["count"] and rl["metrics_failed_delta"] == 0),
                ],
                [
                    "new connections on A (unchanged path) during reloads",
                    f"{rl['a_new_connections']} in {rl['seconds']:g} s "
                    f"(no reloads: control before {res['control']['a_new_connections']} in "
                    f"{res['control']['seconds']:g} s, 2 s tail {rl['a_new_connections_tail']}, control after "
                    f"{res['control_after']['a_new_connections']} in {res['control_after']['seconds']:g} s)"
                    + (
                        f"; of those during reloads {sum(x['new'] for x in during if x['new_high'])} at a new high of "
                        f"edgeproxy's in-flight requests, {sum(x['new'] for x in during if x.get('during_reload'))} "
                        "between a SIGHUP and its generation bump"
                        if during
                        else ""
                    ),
                    "0",
                    mark(rl["a_new_connections"] == 0),
                ],
                [
                    "reload time, SIGHUP -> generation bump on /metrics",
                    f"p50 {fmt(rl['time_ms'].get('p50'))} ms, max {fmt(rl['time_ms'].get('max'))} ms "
                    f"(log line: p50 {fmt(rl['log_time_ms'].get('p50'))}, max {fmt(rl['log_time_ms'].get('max'))} ms)",
                    "-",
                    "info",
                ],
            ]
            if procs.died():
                raise RuntimeError("; ".join(procs.died()))

            # -- 4 invalid file -----------------------------------------------------------
            rows += await invalid_phase(a, s, admin, p, cfg, log, url, one, sa, sb, frames, res)
            # -- 5 SIGTERM ------------------------------------------------------------------
            rows += await sigterm_phase(p, url, origin, log, res)
        finally:
            wt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wt
            if not load._stopping:
                await load.stop(1)
    return rows


async def invalid_phase(
    a: argparse.Namespace,
    s: aiohttp.ClientSession,
    admin: Admin,
    p: c.Popen,
    cfg: Path,
    log: Path,
    url: str,
    one: str,
    sa: LineSim,
    sb: LineSim,
    frames: int,
    res: Res,
) -> list[list[Any]]:
    bad = one.replace("priority: 2}", "priority: high}")
    assert bad != one
    m0 = await admin.metrics()
    log_off = log.stat().st_size
    paths0 = [pa["endpoint"] for pa in await admin.paths()]
    write_atomic(cfg, bad)
    t0 = time.monotonic()
    p.send_signal(signal.SIGHUP)
    t_seen, _ = await admin.wait("reloads_failed", m0["reloads_failed"] + 1, timeout=10)
    await asyncio.sleep(0.1)
    with open(log, "rb") as f:
        f.seek(log_off)
        err = f.read().decode(errors="replace")
    # the old config serves: requests and a stream, on the paths it had
    statuses: Counter[str] = Counter()
    for _ in range(20):
        try:
            async with s.post(url + "/v1/chat/completions", data=CHAT, headers=HEADERS) as r:
                await r.read()
                statuses[str(r.status)] += 1
        except Exception as e:
            statuses[type(e).__name__] += 1
    st = Stream(time.monotonic())
    await read_stream(s, url + "/v1/chat/completions", st)
    m2 = await admin.metrics()
    paths1 = [pa["endpoint"] for pa in await admin.paths()]
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    inv = {
        "error_key": INVALID_KEY,
        "failed_seen_ms": None if t_seen is None else round(1000 * (t_seen - t0), 1),
        "reloads_failed_delta": m2["reloads_failed"] - m0["reloads_failed"],
        "reloads_ok_delta": m2["reloads_ok"] - m0["reloads_ok"],
        "generation_before": m0["generation"],
        "generation_after": m2["generation"],
        "paths_before": paths0,
        "paths_after": paths1,
        "requests": dict(statuses),
        "stream": st.outcome(frames),
        "stderr": err_lines[:8],
        "key_path_logged": INVALID_KEY in err,
        "previous_config_logged": "still serving the previous config" in err,
    }
    serves = (
        statuses == Counter({"200": 20})
        and inv["stream"] == "intact"
        and m2["generation"] == m0["generation"]
        and paths1 == paths0
    )
    inv["met"] = {
        "old_config_serves": serves,
        "key_path_logged": inv["key_path_logged"],
        "failed_metric_up": inv["reloads_failed_delta"] == 1 and inv["reloads_ok_delta"] == 0,
    }
    res["invalid"] = inv
    return [
        [
            "invalid file + SIGHUP: old config serves",
            f"{statuses['200']}/20 requests 200, stream {inv['stream']}; generation {m0['generation']}->"
            f"{m2['generation']}; paths {len(paths0)}->{len(paths1)}",
            "all ok, nothing changed",
            mark(serves),
        ],
        [
            "invalid file: error logged with its key path",
            f"{INVALID_KEY!r} {'in' if inv['key_path_logged'] else 'NOT in'} edgeproxy's stderr",
            "logged",
            mark(inv["key_path_logged"]),
        ],
        [
            "invalid file: edgeproxy_reloads_total{result=failed}",
            f"+{inv['reloads_failed_delta']} (ok +{inv['reloads_ok_delta']}; seen after "
            f"{fmt(inv['failed_seen_ms'])} ms)",
            "+1",
            mark(inv["met"]["failed_metric_up"]),
        ],
    ]


async def sigterm_phase(p: c.Popen, url: str, origin: FakeOrigin, log: Path, res: Res) -> list[list[Any]]:
    origin.events, origin.event_interval = TERM_EVENTS, TERM_INTERVAL
    frames = TERM_EVENTS + 3
    curl = url + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        streams = [Stream(time.monotonic()) for _ in range(TERM_STREAMS)]
        events = [asyncio.Event() for _ in streams]
        tasks = [asyncio.create_task(read_stream(s, curl, st, ev.set)) for st, ev in zip(streams, events, strict=True)]
        committed = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wait_for(ev.wait(), 15) for ev in events), return_exceptions=True), 20
        )
        n_committed = sum(1 for x in committed if not isinstance(x, BaseException))
        t_term, wall_term = time.monotonic(), time.time()
        p.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # a new client connection during the drain
        try:
            async with aiohttp.ClientSession() as s2, s2.post(curl, data=CHAT, headers=HEADERS) as r:
                await r.read()
                new_conn = f"answered {r.status}"
        except aiohttp.ClientConnectorError:
            new_conn = "refused"
        except Exception as e:
            new_conn = type(e).__name__
        await asyncio.gather(*tasks, return_exceptions=True)
    t_last = max((st.t_end or t_term) for st in streams)
    try:
        rc: int | None = await asyncio.to_thread(p.wait, DRAIN_TIMEOUT + 10)
    except Exception:
        rc = None
    t_exit = time.monotonic()
    t_stopped = next((t for t, msg in log_lines(log) if msg == "stopped"), None)
    out = Counter(st.outcome(frames) for st in streams)
    term = {
        "streams": TERM_STREAMS,
        "stream_s": round((TERM_EVENTS + 2) * TERM_INTERVAL, 1),
        "committed_at_sigterm": n_committed,
        "outcomes": dict(out),
        "intact": out["intact"],
        "exit_code": rc,
        "exit_s": round(t_exit - t_term, 2),  # includes up to 20 ms of polling in Popen.wait
        "last_stream_end_s": round(t_last - t_term, 2),
        "exit_after_last_stream_s": round(t_exit - t_last, 2),
        "log_stopped_s": None if t_stopped is None else round(t_stopped - wall_term, 3),  # edgeproxy's "stopped"
        "new_connection_during_drain": new_conn,
        "met": {"streams": out["intact"] == TERM_STREAMS, "exit_0": rc == 0},
    }
    res["sigterm"] = term
    return [
        [
            f"SIGTERM with {TERM_STREAMS} streams open ({term['stream_s']:g} s each)",
            f"{out['intact']}/{TERM_STREAMS} intact with [DONE]"
            + ("" if out["intact"] == TERM_STREAMS else f" {dict(out)}"),
            f"{TERM_STREAMS} intact",
            mark(term["met"]["streams"]),
        ],
        [
            "SIGTERM: exit",
            f"exit code {rc}, {term['exit_s']:g} s after SIGTERM ({term['exit_after_last_stream_s']:g} s after "
            f"the last stream ended; log 'stopped' at {fmt(term['log_stopped_s'], 2)} s); "
            f"new connection during drain: {new_conn}",
            "exit 0",
            mark(term["met"]["exit_0"]),
        ],
    ]


# --------------------------------------------------------------------------- report


def details(res: Res) -> None:
    print()
    ld = res.get("load", {})
    if ld:
        print(
            f"load: {ld['seconds']} s, {ld['requests_per_s']} req/s achieved (target {ld['rate_target']:g}), "
            f"ticker at most {ld['ticker_max_late_ms']} ms late; {ld['streams_target']} streams of "
            f"{ld['stream_s']:g} s; CPU over the load: edgeproxy {ld['cpu_s']['edgeproxy']} s, this process "
            f"(client + origin + LineSims) {ld['cpu_s']['bench_process']} s"
        )
        for name in ("control", "reloads", "control_after"):
            rq, st = ld[name]["requests"], ld[name]["streams"]
            print(
                f"  {name:13} window: requests {rq['sent']} ({rq['ok']} ok, {rq['failed']} failed "
                f"{rq['failures'] or ''}), latency ms {rq['latency_ms']}; streams {st['streams']} "
                f"({st['intact']} intact, {st['broken']} broken {st['broken_by'] or ''})"
            )
        cancelled = ld["all"]["streams"]["cancelled"]
        if cancelled:
            print(f"  {cancelled} streams cancelled when the load stopped (not counted as broken)")
    print(
        f"warm-up {res.get('warmup_s')} s; A connections: {res.get('a_connections_after_warmup')} after warm-up, "
        f"{res.get('a_connections_end_of_load')} at the end of the load; at most {res.get('a_max_open_connections')} "
        "open at once"
    )
    rl = res.get("reloads")
    if rl:
        ctl = res["control"]
        print(
            f"reloads: {rl['count']} in {rl['seconds']} s; open streams at SIGHUP >= {rl['open_streams_at_sighup_min']}"
            f" (control: >= {ctl['open_streams_min']}); B new connections {rl['b_new_connections']} "
            f"(control {ctl['b_new_connections']}); A's new connections at s(+n) into the phase: "
            f"{rl['a_new_connection_times_s'] or 'none'} (control before: {ctl['a_new_connection_times_s'] or 'none'}; "
            f"after: {res['control_after']['a_new_connection_times_s'] or 'none'})"
        )
        print(f"  reload time by kind (SIGHUP -> bump on /metrics, polled every 10 ms): {rl['time_ms_by_config']}")
        print(f"  edgeproxy's requests in flight (its access log), peak per phase: {res['edgeproxy_inflight_peak']}")
        ar, ac = res["after_sighup"]["reloads"], res["after_sighup"]["control"]
        print(
            f"  requests started <= 50 ms after a SIGHUP: {ar['requests']}, latency ms {ar['latency_ms']}; "
            f"in-flight peak in the 100 ms after: max {ar['inflight_peak_max']}, mean {ar['inflight_peak_mean']}\n"
            f"  the same at the same instants of the control before: {ac['requests']}, latency ms "
            f"{ac['latency_ms']}; in-flight peak max {ac['inflight_peak_max']}, mean {ac['inflight_peak_mean']}"
        )
        for row in res.get("a_new_explained", []):
            print(f"  A +{row['new']} connection(s) after warm-up: {row}")
        for summary, n in rl["summaries"].items():
            print(f"  {n} x reloaded: {summary}")
        for r in rl["each"]:
            if not r["ok"] or r["a_new"]:
                print(f"  reload #{r['n']}: {r}")
    for pa in res.get("paths_after", []):
        print(f"  path after reloads: {pa}")
    inv = res.get("invalid")
    if inv:
        print(f"invalid file: requests {inv['requests']}, stream {inv['stream']}; edgeproxy's stderr:")
        for ln in inv["stderr"]:
            print("   ", ln[:200])
    o = res.get("origin")
    if o:
        print(f"origin (before SIGTERM phase): streams completed {o['streams_completed']}, "
              f"disconnected mid-stream {o['stream_disconnects']}")  # fmt: skip
    f = res.get("findings")
    if f:
        c.print_findings(f)
    for e in res.get("errors", []):
        print("ERROR", e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s): 100 req/s, 40 streams, 10 reloads")
    ap.add_argument("--rate", type=float, help="requests/s, open loop (default 200; quick 100)")
    ap.add_argument("--streams", type=int, help="streams kept open (default 100; quick 40)")
    ap.add_argument("--reloads", type=int, help="reloads (default 20; quick 10)")
    ap.add_argument("--events", type=int, default=60, help="content chunks per stream (default 60)")
    ap.add_argument("--event-interval", type=float, default=0.05, help="s between stream events (default 0.05)")
    ap.add_argument(
        "--headroom",
        type=int,
        default=0,
        help="after the warm-up, N extra streams at once (one round), so A's pool has N spare connections "
        "and load variance rarely grows it: isolates a reload effect further (default 0: the issue's setup)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, edgeproxy's logs)")
    a = ap.parse_args()
    a.rate = a.rate or (100.0 if a.quick else 200.0)
    a.streams = a.streams or (40 if a.quick else 100)
    a.reloads = a.reloads or (10 if a.quick else 20)
    sys.setswitchinterval(0.001)  # origin, LineSims and client share this process's GIL
    c.raise_nofile()
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(
        f"reload: {a.rate:g} req/s + {a.streams} streams ({a.events} events every {a.event_interval:g} s), "
        f"{a.reloads} reloads; loadavg before {la0}\n"
        "config 1: endpoint A (LineSim A) + endpoint B (LineSim B, priority 2: probed, no traffic); config 2: A "
        "only; both pool.warm 0 and probe.interval 30s, so A's pool holds only what the load needs (warm > 0 "
        "would open spare connections as the load varies, not a reload effect; see --help)",
        flush=True,
    )
    res: Res = dict(bench="reload", quick=a.quick, rate=a.rate, streams=a.streams, reloads_target=a.reloads,
                    headroom=a.headroom, events=a.events, event_interval=a.event_interval, loadavg_before=la0,
                    background=bg)  # fmt: skip
    rows: list[list[Any]] = []
    t_start = time.monotonic()
    td = tempfile.mkdtemp(prefix="bench-reload-")
    with c.Procs() as procs:
        tmp = Path(td)
        origin = FakeOrigin()
        origin.record = False
        origin.events, origin.event_interval = a.events, a.event_interval
        origin.start_in_thread()
        sa = LineSim("127.0.0.1", origin.port).start_in_thread()
        sb = LineSim("127.0.0.1", origin.port).start_in_thread()
        try:
            rows = uvloop.run(bench(a, tmp, procs, origin, sa, sb, res))
        except Exception as e:
            res.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        finally:
            for x in (sb, sa, origin):
                x.stop_thread()
            res["findings"] = c.edgeproxy_findings(tmp)
    if a.keep:
        print(f"kept: {td} (edgeproxy.yaml, edgeproxy.log: stderr, access.log: the JSON access log)")
    else:
        shutil.rmtree(td, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    print()
    c.print_table(["target", "measured", "target value", "result"], rows)
    details(res)
    print(c.noise_note(bg, la0, la1, "Shared machine: other work may run beside the benchmark."))
    inv, term = res.get("invalid", {}).get("met", {}), res.get("sigterm", {}).get("met", {})
    ld, rl = res.get("load", {}).get("all", {}), res.get("reloads", {})
    res["targets"] = {
        "no_failed_requests": ld.get("requests", {}).get("failed") == 0 if ld else None,
        "no_broken_streams": ld.get("streams", {}).get("broken") == 0 if ld else None,
        "all_reloads_ok": rl.get("ok") == rl.get("count") if rl else None,
        "no_new_connections_on_a": rl.get("a_new_connections") == 0 if rl else None,
        "invalid_old_config_serves": inv.get("old_config_serves"),
        "invalid_key_path_logged": inv.get("key_path_logged"),
        "invalid_failed_metric_up": inv.get("failed_metric_up"),
        "sigterm_streams_intact": term.get("streams"),
        "sigterm_exit_0": term.get("exit_0"),
    }
    res.pop("configs", None)
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

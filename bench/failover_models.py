"""Failover that knows models and errors (issue 13): bench rows, run by bench/failover.py.

Every row runs its own edgeproxy (a subprocess) with edgeproxy's DEFAULT failover and probe
settings: no `failover` or `probe` section (probe interval 5 s, timeout 1 s; first_byte_timeout
300 s, stream_first_byte_timeout 30 s; ejection origin_errors 5, local_failures 3, base_time 2 s,
max_time 5 s); only `drain_timeout: 1s`, so that it stops fast. The fake origins run in this
process, on the bench's event loop: the primary P at 127.0.0.1 (priority 1, line "primary"), the
fallback F at 127.0.0.4 (priority 2, line "fallback"), so that attempt_log, the metrics (endpoint
label) and /-/status tell them apart. Every client request carries its own x-request-id, which
edgeproxy forwards and the origins record: who saw each client request, and when, is counted.

Rows:
  model 503     load of two models (X gpt-4o-mini, Y gpt-4o; --model-rate req/s each, non-stream,
                plus 2 streams each, restarted); X answers 503 at P for 5 s. 0 client errors; after
                its first origin_errors (5) 503s, X reaches P only as the half-open trial of each
                ejection (>= base_time apart); >= 99% of Y's requests answered by P.
  model 429     the same, X answers 429 Retry-After: 2 at P for 5 s: 0 client errors; after every
                429, no X request reaches P 0.1-1.9 s later; >= 99% of Y's by P.
  flap          --flap-runs runs at once (an edgeproxy and a P/F pair each): one request every 4 s;
                P down 60 s (every answer 503, the models list too: probes fail), then healthy;
                30 s more. Per run: first request answered by P within 10 s of the recovery,
                0 client errors (F serves meanwhile). The outage starts at a random phase of the
                4 s request clock, so the runs sample the delay between recovery and next request.
  flap, completions only   the same runs with the probes still answered (only completions 503):
                the model's ejection (back-off capped at ejection.max_time 5 s) must run out.
  silent, 2 lines  P reachable over two lines (bind 127.0.0.2 / 127.0.0.3), F over a third;
                P accepts X's requests and never answers (probes answered). 3 concurrent streams,
                then 2 sequential: each gets F's stream within 35 s (stream_first_byte_timeout
                30 s), P saw each request once (not once per line), 0 client errors. Then one more:
                X is ejected at P by then (5 timeouts), it goes to F at once (informative).
  stale         P is a raw HTTP/1.1 server that answers a connection's first request, and reads a
                POST arriving on a reused connection in full, then closes without answering.
                Sequential POSTs without Idempotency-Key: P never sees one twice (the client gets
                F's answer or an honest error); with an Idempotency-Key: re-sent to P on a fresh
                connection, each re-send in attempt_log and edgeproxy_attempts_total as
                stale_connection. Target: 0 silent duplicates.

Run alone: .venv/bin/python bench/failover.py --models-only [--quick]
(--quick: 3 flap runs of each kind instead of 10; the long rows run concurrently, about 2.5 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import orjson

sys.path.insert(0, str(c.ROOT))
from tests.fakes.origin import FakeOrigin, ModelFailure

Res = dict[str, Any]
X, Y = "gpt-4o-mini", "gpt-4o"
P_HOST, F_HOST = "127.0.0.1", "127.0.0.4"
PROMPT = [{"role": "user", "content": "failover models bench"}]
ORIGIN_ERRORS, BASE_TIME, MAX_TIME = 5, 2.0, 5.0  # edgeproxy's default failover.ejection
STREAM_FIRST_BYTE = 30.0  # edgeproxy's default failover.stream_first_byte_timeout
WARM, FAULT_S, AFTER_S = 3.0, 5.0, 6.0
FLAP_PERIOD, FLAP_PRE, FLAP_OUTAGE, FLAP_POST, FLAP_TARGET = 4.0, 8.0, 60.0, 30.0, 10.0
SILENT_TARGET = 35.0
STALE_N = 10
WATCH = {
    "edgeproxy_attempts_total",
    "edgeproxy_failovers_total",
    "edgeproxy_ejections_total",
    "edgeproxy_restores_total",
    "edgeproxy_rescues_total",
    "edgeproxy_retry_budget_exhausted_total",
}
# wall clock (the origins' Recorded.time) to monotonic
OFFSET = time.time() - time.monotonic()


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("issue 13 rows (bench/failover_models.py)")
    g.add_argument("--models-only", action="store_true", help="run only the issue 13 rows")
    g.add_argument("--no-models", action="store_true", help="skip the issue 13 rows")
    g.add_argument("--flap-runs", type=int, help="concurrent runs per flapping variant (default 10; quick 3)")
    g.add_argument("--model-rate", type=float, default=20.0, help="req/s per model in the model rows (default 20)")


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def pctl(values: list[float], p: float) -> float | None:
    return c.pct(sorted(values), p) if values else None


# --------------------------------------------------------------------------- client


class Call:
    """One client request as the client saw it."""

    __slots__ = (
        "body",
        "done",
        "exc",
        "frames",
        "inband",
        "kind",
        "model",
        "rid",
        "status",
        "stream",
        "t0",
        "t_end",
        "t_first",
    )

    def __init__(self, rid: str, model: str, stream: bool, t0: float) -> None:
        self.rid, self.model, self.stream, self.t0 = rid, model, stream, t0
        self.t_end: float | None = None
        self.t_first: float | None = None  # first SSE frame (streams) or the whole answer
        self.status: int | None = None
        self.kind: str | None = None  # x-edgeproxy-error
        self.exc: str | None = None
        self.body = b""
        self.done = False
        self.inband: str | None = None
        self.frames = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.exc is None and (self.done or not self.stream)

    @property
    def latency(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t0

    def what(self) -> str:
        if self.exc:
            return self.exc
        if self.status != 200:
            return f"{self.status} {self.kind or 'origin'}"
        if self.stream and not self.done:
            return f"stream {'in-band ' + str(self.inband) if self.inband else 'broken'}"
        return "ok"


async def call(
    session: aiohttp.ClientSession,
    url: str,
    rid: str,
    model: str,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    t0: float | None = None,
    timeout: float = 70.0,
) -> Call:
    r = Call(rid, model, stream, time.monotonic() if t0 is None else t0)
    doc: dict[str, Any] = {"model": model, "messages": PROMPT}
    if stream:
        doc["stream"] = True
    h = {"Content-Type": "application/json", "Authorization": "Bearer sk-models-bench", "x-request-id": rid}
    h.update(headers or {})
    try:
        async with session.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(doc),
            headers=h,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            r.status = resp.status
            r.kind = resp.headers.get("x-edgeproxy-error")
            if resp.status != 200 or not stream:
                data = await resp.read()
                r.t_first = time.monotonic()
                if resp.status != 200:
                    r.body = data[:300]
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    if r.t_first is None:
                        r.t_first = time.monotonic()
                    if line.startswith(b"data: [DONE]"):
                        r.done = True
                    elif line.startswith(b'data: {"error"'):
                        with contextlib.suppress(Exception):
                            r.inband = str(orjson.loads(line[6:])["error"].get("code"))
                    else:
                        r.frames += 1
    except Exception as e:
        r.exc = type(e).__name__
    r.t_end = time.monotonic()
    return r


# --------------------------------------------------------------------------- edgeproxy


class Edge:
    """One edgeproxy (default failover and probe settings) in front of the given endpoints."""

    def __init__(self, procs: c.Procs, tmp: Path, tag: str, endpoints: list[Res], lines: Res) -> None:
        self.procs, self.tag = procs, tag
        self.port, self.admin_port = c.free_port(), c.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.cfg = tmp / f"edgeproxy-{tag}.yaml"  # JSON is YAML
        self.log = tmp / f"edgeproxy-{tag}.log"
        self.access = tmp / f"access-{tag}.log"
        self.config: Res = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "log": {"access": "json"},
            "drain_timeout": "1s",
            "lines": lines,
            "upstreams": {"openai": {"prefix": "/v1", "endpoints": endpoints}},
        }
        self.proc: c.Popen | None = None

    async def start(self, s: aiohttp.ClientSession, paths: int, timeout: float = 40.0) -> None:
        """Started, ready, and every one of ``paths`` probed up."""
        self.cfg.write_text(json.dumps(self.config, indent=1))
        argv = [c.EDGE_PY, "-m", "edgeproxy", "run", "-c", str(self.cfg)]
        self.proc = proc = self.procs.start(f"edgeproxy-{self.tag}", argv, log=self.log, stdout=self.access)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"edgeproxy {self.tag} exited with {proc.returncode}: {self.problems()[:3]}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError, StopIteration):
                up = await self.upstream(s)
                if len(up["paths"]) == paths and all(p["state"] == "up" for p in up["paths"]):
                    await asyncio.sleep(0.2)  # (the admin that answered must be this process's)
                    if proc.poll() is None:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"edgeproxy {self.tag}: paths not up after {timeout:g} s")

    async def upstream(self, s: aiohttp.ClientSession) -> Res:
        async with s.get(self.admin + "/-/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
            st = await r.json(content_type=None)
        return next(u for u in st["upstreams"] if u["name"] == "openai")

    async def counters(self, s: aiohttp.ClientSession) -> dict[str, float]:
        """Watched counters as {"name{label=value,...}": value} (the upstream label left out)."""
        async with s.get(self.admin + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
        out: dict[str, float] = {}
        for name, labels, value in c.metric_samples(text):
            if name in WATCH:
                short = name.removeprefix("edgeproxy_").removesuffix("_total")
                lab = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "upstream")
                out[f"{short}{{{lab}}}"] = out.get(f"{short}{{{lab}}}", 0.0) + value
        return out

    def access_log(self) -> dict[str, Res]:
        out: dict[str, Res] = {}
        with contextlib.suppress(OSError), open(self.access, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    out[str(rec.get("request_id"))] = rec
        return out

    def problems(self) -> list[str]:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").splitlines()
            return [ln[:240] for ln in lines if any(w in ln for w in ("ERROR", "Traceback", "CRITICAL"))]
        return []

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)


def delta(m0: dict[str, float], m1: dict[str, float]) -> dict[str, int]:
    return {k: int(v - m0.get(k, 0.0)) for k, v in sorted(m1.items()) if v - m0.get(k, 0.0)}


def two_endpoints(p: str, f: str) -> tuple[list[Res], Res]:
    eps = [
        {"url": p + "/v1", "priority": 1, "lines": ["primary"]},
        {"url": f + "/v1", "priority": 2, "lines": ["fallback"]},
    ]
    return eps, {"primary": {}, "fallback": {}}


async def origin(host: str) -> FakeOrigin:
    o = FakeOrigin(host=host)
    o.events, o.event_interval = 20, 0.05  # a stream: 22 frames over ~1 s
    await o.start()
    return o


def arrivals(origins: dict[str, FakeOrigin]) -> dict[str, list[tuple[str, float]]]:
    """Client request id -> [(origin name, monotonic arrival)], in arrival order."""
    out: dict[str, list[tuple[str, float]]] = {}
    for name, o in origins.items():
        for r in o.requests:
            out.setdefault(r.headers.get("x-request-id", ""), []).append((name, r.time - OFFSET))
    for lst in out.values():
        lst.sort(key=lambda x: x[1])
    return out


def trail(rec: Res | None) -> str:
    """An access log record's attempts: "line:outcome > line:outcome"."""
    if rec is None:
        return "not in access log"
    log = rec.get("attempt_log")
    if log:
        return " > ".join(f"{x.get('line')}:{x.get('outcome')}" for x in log)
    return f"{rec.get('line')}:{rec.get('status')}"


# --------------------------------------------------------------------------- rows 1, 2: one model fails


class TwoModelLoad:
    """Open-loop non-stream requests at ``rate``/s per model, plus ``streams`` streams per model."""

    def __init__(self, s: aiohttp.ClientSession, url: str, rate: float, streams: int, tag: str) -> None:
        self.s, self.url, self.rate, self.n_streams, self.tag = s, url, rate, streams, tag
        self.calls: list[Call] = []
        self._n = 0
        self._stop = False
        self._main: list[asyncio.Task[Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def rid(self, model: str) -> str:
        self._n += 1
        return f"{self.tag}-{'x' if model == X else 'y'}-{self._n:06d}"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for model in (X, Y):
            self._main.append(loop.create_task(self._ticker(model)))
            for i in range(self.n_streams):
                self._main.append(loop.create_task(self._streams(model, i)))

    async def _one(self, model: str, t0: float, stream: bool = False) -> None:
        r = await call(self.s, self.url, self.rid(model), model, stream, t0=t0)
        self.calls.append(r)

    async def _ticker(self, model: str) -> None:
        period = 1.0 / self.rate
        next_t = time.monotonic() + (period / 2 if model == Y else 0.0)
        while not self._stop:
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            task = asyncio.get_running_loop().create_task(self._one(model, next_t))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_t += period

    async def _streams(self, model: str, i: int) -> None:
        await asyncio.sleep(0.5 * i)
        while not self._stop:
            await self._one(model, time.monotonic(), stream=True)
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.wait(self._main, timeout=10)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=40)
        for t in self._main:
            t.cancel()
        await asyncio.gather(*self._main, *self._tasks, return_exceptions=True)


async def model_fault(a: argparse.Namespace, tmp: Path, procs: c.Procs, status: int) -> Res:
    """X answers ``status`` at P for FAULT_S while Y is served; the whole record of it."""
    p, f = await origin(P_HOST), await origin(F_HOST)
    eps, lines = two_endpoints(p.url, f.url)
    edge = Edge(procs, tmp, f"model{status}", eps, lines)
    out: Res = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await edge.start(s, 2)
            load = TwoModelLoad(s, edge.url, a.model_rate, 2, f"m{status}")
            load.start()
            await asyncio.sleep(WARM)
            m0 = await edge.counters(s)
            out["t_fault"] = time.monotonic()
            p.model_failures[X] = ModelFailure(status=status, retry_after="2" if status == 429 else None)
            await asyncio.sleep(FAULT_S)
            out["t_clear"] = time.monotonic()
            del p.model_failures[X]
            await asyncio.sleep(AFTER_S)
            await load.stop()
            out["metrics"] = delta(m0, await edge.counters(s))
        out["calls"] = load.calls
        out["arrivals"] = arrivals({"P": p, "F": f})
        out["access"] = edge.access_log()
        out["problems"] = edge.problems()
    finally:
        edge.stop()
        await p.stop()
        await f.stop()
    return out


def _model_common(run: Res, d: Res) -> tuple[list[Call], list[float], Counter[str]]:
    """Errors, Y's share on P, X's answers during the fault; the X arrival times at P in the fault."""
    calls: list[Call] = run["calls"]
    arr = run["arrivals"]
    tf, tc = run["t_fault"], run["t_clear"]
    errs = Counter(r.what() for r in calls if not r.ok)
    ys = [r for r in calls if r.model == Y]
    y_on_p = sum(1 for r in ys if r.ok and [o for o, _ in arr.get(r.rid, [])] == ["P"])
    xs = [r for r in calls if r.model == X]
    x_rids = {r.rid for r in xs}
    x_at_p = sorted(t for rid in x_rids for o, t in arr.get(rid, []) if o == "P" and tf <= t <= tc)
    back = min((t for rid in x_rids for o, t in arr.get(rid, []) if o == "P" and t > tc), default=None)
    x_fault = [r for r in xs if tf <= r.t0 < tc]
    by = Counter("".join(o for o, _ in arr.get(r.rid, [])) or "none" for r in x_fault)
    base = [r.latency * 1000 for r in xs if tf - 2 <= r.t0 < tf and not r.stream and r.latency is not None]
    hit = [r.latency * 1000 for r in x_fault if not r.stream and r.latency is not None]
    d.update(
        requests=sum(1 for r in calls if not r.stream),
        streams=sum(1 for r in calls if r.stream),
        errors=dict(errs),
        error_samples=[
            {
                "rid": r.rid,
                "what": r.what(),
                "body": r.body.decode("utf-8", "replace")[:200],
                "trail": trail(run["access"].get(r.rid)),
            }
            for r in calls
            if not r.ok
        ][:4],
        y_requests=len(ys),
        y_answered_by_primary_only=y_on_p,
        y_primary_pct=round(100 * y_on_p / max(1, len(ys)), 2),
        x_in_fault=len(x_fault),
        x_in_fault_seen_by=dict(by),
        x_at_primary_in_fault_s=[round(t - tf, 3) for t in x_at_p],
        x_back_on_primary_after_clear_s=None if back is None else round(back - tc, 3),
        x_ms_before={"p50": fmt(pctl(base, 50)), "p99": fmt(pctl(base, 99))},
        x_ms_in_fault={"p50": fmt(pctl(hit, 50)), "p99": fmt(pctl(hit, 99)), "max": fmt(max(hit, default=None))},
        metrics=run["metrics"],
        trails_x_in_fault=dict(Counter(trail(run["access"].get(r.rid)) for r in x_fault).most_common(5)),
        edgeproxy_log_problems=run["problems"][:5],
    )
    return calls, x_at_p, errs


def row_model_503(run: Res, res: Res) -> list[Any]:
    d: Res = {"fault_s": round(run["t_clear"] - run["t_fault"], 2)}
    _, x_at_p, errs = _model_common(run, d)
    first, later = x_at_p[:ORIGIN_ERRORS], x_at_p[ORIGIN_ERRORS - 1 :]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(later)]
    trials_only = len(first) == ORIGIN_ERRORS and all(g >= BASE_TIME - 0.1 for g in gaps)
    d["gaps_after_5th_s"] = gaps
    y_ok = d["y_primary_pct"] >= 99.0
    d["met"] = not errs and trials_only and y_ok
    res.setdefault("models", {})["model-503"] = d
    n_req = d["requests"] + d["streams"]
    return [
        f"model 503 at primary (X {X}, 5 s; Y {Y} served)",
        f"{sum(errs.values())} errors / {n_req} req" + (f" {dict(errs)}" if errs else ""),
        f"X {d['x_ms_in_fault']['p50']}/{d['x_ms_in_fault']['p99']} (before {d['x_ms_before']['p50']}/"
        f"{d['x_ms_before']['p99']})",
        f"{d['x_ms_in_fault']['max']} ms",
        f"X at P in fault: {len(x_at_p)} at +{', +'.join(f'{t:.2f}' for t in d['x_at_primary_in_fault_s'][:9])} s "
        f"(gaps after the 5th {gaps}); X in fault by {d['x_in_fault_seen_by']}; X back on P "
        f"+{fmt(d['x_back_on_primary_after_clear_s'], 2)} s after clear; Y {d['y_answered_by_primary_only']}/"
        f"{d['y_requests']} by P only ({d['y_primary_pct']}%)",
        f"0 errors; after {ORIGIN_ERRORS} 503s X at P only as trials (>= {BASE_TIME - 0.1:g} s apart); Y >= 99% on P",
        mark(d["met"]),
    ]


def row_model_429(run: Res, res: Res) -> list[Any]:
    d: Res = {"fault_s": round(run["t_clear"] - run["t_fault"], 2)}
    _, x_at_p, errs = _model_common(run, d)
    inside = [round(b - a, 3) for a in x_at_p for b in x_at_p if a + 0.1 <= b <= a + 1.9]
    d["x_at_primary_0.1_1.9_s_after_a_429"] = inside
    y_ok = d["y_primary_pct"] >= 99.0
    d["met"] = not errs and bool(x_at_p) and not inside and y_ok
    res.setdefault("models", {})["model-429"] = d
    n_req = d["requests"] + d["streams"]
    return [
        "model 429 Retry-After 2 at primary (X, 5 s; Y served)",
        f"{sum(errs.values())} errors / {n_req} req" + (f" {dict(errs)}" if errs else ""),
        f"X {d['x_ms_in_fault']['p50']}/{d['x_ms_in_fault']['p99']} (before {d['x_ms_before']['p50']}/"
        f"{d['x_ms_before']['p99']})",
        f"{d['x_ms_in_fault']['max']} ms",
        f"X at P in fault (each got 429): at +{', +'.join(f'{t:.2f}' for t in d['x_at_primary_in_fault_s'][:9])} s; "
        f"{len(inside)} X at P 0.1-1.9 s after a 429; X in fault by {d['x_in_fault_seen_by']}; X back on P "
        f"+{fmt(d['x_back_on_primary_after_clear_s'], 2)} s after clear; Y {d['y_answered_by_primary_only']}/"
        f"{d['y_requests']} by P only ({d['y_primary_pct']}%)",
        "0 errors; no X at P 0.1-1.9 s after its 429; Y >= 99% on P",
        mark(d["met"]),
    ]


# --------------------------------------------------------------------------- row 3: a flapping primary


async def flap_run(
    procs: c.Procs, tmp: Path, s: aiohttp.ClientSession, gate: asyncio.Semaphore, variant: str, i: int, seed: int
) -> Res:
    """One run: requests every FLAP_PERIOD; P down FLAP_OUTAGE (probes too unless completions-only)."""
    rng = random.Random(seed)
    p, f = await origin(P_HOST), await origin(F_HOST)
    eps, lines = two_endpoints(p.url, f.url)
    edge = Edge(procs, tmp, f"flap-{variant}-{i}", eps, lines)
    d: Res = {"run": i}
    calls: list[Call] = []
    samples: list[tuple[float, bool]] = []  # (t, P usable for X per /-/status)
    tasks: set[asyncio.Task[Any]] = set()
    stop = asyncio.Event()

    async def ticker() -> None:
        n = 0
        next_t = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            n += 1

            async def one(rid: str, t0: float) -> None:
                calls.append(await call(s, edge.url, rid, X, t0=t0))

            task = asyncio.get_running_loop().create_task(one(f"flap-{variant}-{i}-{n:03d}", next_t))
            tasks.add(task)
            next_t += FLAP_PERIOD

    async def sampler() -> None:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError, StopIteration):
                up = await edge.upstream(s)
                path = next(x for x in up["paths"] if x["line"] == "primary")
                held = any(o["endpoint"].startswith(p.url) and "for_s" in o for o in up.get("origins", []))
                samples.append((time.monotonic(), path["state"] == "up" and not held))
            await asyncio.sleep(0.5)

    try:
        async with gate:  # a few edgeproxies start at a time (2 cores)
            await edge.start(s, 2)
        t_start = time.monotonic()
        main = [asyncio.get_running_loop().create_task(x()) for x in (ticker, sampler)]
        await asyncio.sleep(FLAP_PRE + rng.uniform(0, FLAP_PERIOD))
        t_out = time.monotonic()
        p.fail_status, p.probes_affected = 503, variant == "probes"
        await asyncio.sleep(FLAP_OUTAGE)
        t_rec = time.monotonic()
        p.fail_status, p.probes_affected = None, False
        await asyncio.sleep(FLAP_POST)
        stop.set()
        await asyncio.gather(*main, return_exceptions=True)
        if tasks:
            await asyncio.wait(tasks, timeout=40)
        arr = arrivals({"P": p, "F": f})
        acc = edge.access_log()
        errs = Counter(r.what() for r in calls if not r.ok)
        back = min((t for r in calls for o, t in arr.get(r.rid, []) if o == "P" and t >= t_rec), default=None)
        usable = next((t for t, ok in samples if t >= t_rec and ok), None)
        during = [r for r in calls if t_out <= r.t0 < t_rec]
        after = sorted((r for r in calls if r.t0 >= t_rec), key=lambda r: r.t0)
        to_f_after = 0
        for r in after:
            if "P" in {o for o, _ in arr.get(r.rid, [])}:
                break
            to_f_after += 1
        p_hits = sum(1 for r in during for o, _ in arr.get(r.rid, []) if o == "P")
        d.update(
            requests=len(calls),
            errors=dict(errs),
            outage_started_s=round(t_out - t_start, 2),
            back_on_primary_s=None if back is None else round(back - t_rec, 2),
            primary_usable_again_s=None if usable is None else round(usable - t_rec, 2),
            after_recovery_to_fallback_first=to_f_after,
            outage_requests=len(during),
            outage_answered_by_fallback=sum(1 for r in during if r.ok and arr.get(r.rid, [("", 0)])[-1][0] == "F"),
            outage_primary_attempts=p_hits,
            trails_first_after=[trail(acc.get(r.rid)) for r in after[: to_f_after + 1]],
            log_problems=edge.problems()[:3],
        )
        d["met"] = not errs and back is not None and back - t_rec <= FLAP_TARGET
    except Exception as e:
        d.update(error=f"{type(e).__name__}: {e}", met=False)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        edge.stop()
        await p.stop()
        await f.stop()
    return d


def row_flap(variant: str, runs: list[Res], res: Res) -> list[Any]:
    met = sum(1 for r in runs if r.get("met"))
    backs = [r["back_on_primary_s"] for r in runs if r.get("back_on_primary_s") is not None]
    usable = [r["primary_usable_again_s"] for r in runs if r.get("primary_usable_again_s") is not None]
    errs: Counter[str] = Counter()
    for r in runs:
        errs.update(r.get("errors", {}))
    n_req = sum(r.get("requests", 0) for r in runs)
    failed = [r.get("error") for r in runs if r.get("error")]
    d = {"runs": runs, "met_runs": met, "of": len(runs), "met": met == len(runs) and bool(runs)}
    res.setdefault("models", {})[f"flap-{variant}"] = d
    name = (
        "flapping primary: down 60 s, probes 503 too"
        if variant == "probes"
        else "flapping primary: completions-only 503 60 s"
    )
    p_hits = [r.get("outage_primary_attempts") for r in runs]
    return [
        f"{name} ({len(runs)} runs at once)",
        f"{sum(errs.values())} errors / {n_req} req" + (f" {dict(errs)}" if errs else ""),
        "-",
        f"back {fmt(min(backs, default=None))}-{fmt(max(backs, default=None))} s",
        f"{met}/{len(runs)} runs MET; traffic back on P after recovery per run: {backs} s (median "
        f"{fmt(statistics.median(backs) if backs else None)}); P usable again (/-/status, 0.5 s samples): "
        f"{usable} s; P attempts during the outage per run {p_hits}" + (f"; run errors {failed}" if failed else ""),
        f"each run: back on P <= {FLAP_TARGET:g} s after recovery, 0 errors; {len(runs)}/{len(runs)}",
        mark(d["met"]),
    ]


# --------------------------------------------------------------------------- row 4: silent origin, two lines


async def silent_lines(procs: c.Procs, tmp: Path) -> Res:
    p, f = await origin(P_HOST), await origin(F_HOST)
    p.model_failures[X] = ModelFailure(silent=True)  # accepts X, never answers; the models list answers
    eps = [
        {"url": p.url + "/v1", "priority": 1, "lines": ["a", "b"]},
        {"url": f.url + "/v1", "priority": 2, "lines": ["fallback"]},
    ]
    lines = {"a": {"bind": "127.0.0.2"}, "b": {"bind": "127.0.0.3"}, "fallback": {}}
    edge = Edge(procs, tmp, "silent-lines", eps, lines)
    d: Res = {}
    try:
        async with aiohttp.ClientSession() as s:
            await edge.start(s, 3)
            m0 = await edge.counters(s)
            calls = list(await asyncio.gather(*(call(s, edge.url, f"silent-c{k}", X, True) for k in range(3))))
            for k in range(2):
                calls.append(await call(s, edge.url, f"silent-s{k}", X, True))
            after = await call(s, edge.url, "silent-after", X, True)
            d["metrics"] = delta(m0, await edge.counters(s))
        arr = arrivals({"P": p, "F": f})
        acc = edge.access_log()
        per = []
        for r in calls:
            seen = [o for o, _ in arr.get(r.rid, [])]
            per.append(
                {
                    "rid": r.rid,
                    "what": r.what(),
                    "first_frame_s": None if r.t_first is None else round(r.t_first - r.t0, 2),
                    "p_copies": seen.count("P"),
                    "f_copies": seen.count("F"),
                    "trail": trail(acc.get(r.rid)),
                }
            )
        seen = [o for o, _ in arr.get(after.rid, [])]
        d.update(
            requests=per,
            after={
                "what": after.what(),
                "first_frame_s": None if after.t_first is None else round(after.t_first - after.t0, 2),
                "p_copies": seen.count("P"),
                "trail": trail(acc.get(after.rid)),
            },
            log_problems=edge.problems()[:3],
        )
    except Exception as e:
        d.update(error=f"{type(e).__name__}: {e}")
    finally:
        edge.stop()
        await p.stop()
        await f.stop()
    return d


def row_silent(d: Res, res: Res) -> list[Any]:
    per = d.get("requests", [])
    errs = Counter(x["what"] for x in per if x["what"] != "ok")
    times = [x["first_frame_s"] for x in per if x["first_frame_s"] is not None]
    once = all(x["p_copies"] == 1 for x in per)
    d["met"] = bool(per) and not errs and len(times) == len(per) and max(times) <= SILENT_TARGET and once
    res.setdefault("models", {})["silent-two-lines"] = d
    aft = d.get("after", {})
    return [
        "silent primary over 2 lines, DEFAULT config (3 concurrent + 2 sequential streams)",
        f"{sum(errs.values())} errors / {len(per)} req"
        + (f" {dict(errs)}" if errs else "")
        + (f" ERROR {d['error']}" if "error" in d else ""),
        "-",
        f"{fmt(max(times, default=None), 2)} s",
        f"F's stream after {times} s; P copies per request {[x['p_copies'] for x in per]}; attempts "
        f"{dict(Counter(x['trail'] for x in per))}; then one more: {aft.get('what')} in "
        f"{aft.get('first_frame_s')} s, P copies {aft.get('p_copies')} ({aft.get('trail')})",
        f"F's stream <= {SILENT_TARGET:g} s; P waited on once per request; 0 errors",
        mark(d["met"]),
    ]


# --------------------------------------------------------------------------- row 5: stale keep-alive connections


class StaleOrigin:
    """A raw HTTP/1.1 origin: answers GETs (the probes' models list) and the first request of a
    connection; a POST arriving on a connection that already served a request is read in full,
    recorded, and the connection closed without an answer (a keep-alive race the origin lost)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.server: asyncio.Server | None = None
        self.seen: list[Res] = []  # POSTs: rid, idempotency key, connection, its request number, answered
        self._conns = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn, n = self._conns, 0
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                first, *rest = head.decode("latin-1").split("\r\n")
                method, target = first.split(" ")[:2]
                hdr = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in rest if ln)}
                body = b""
                if "content-length" in hdr:
                    body = await reader.readexactly(int(hdr["content-length"]))
                elif hdr.get("transfer-encoding", "").lower() == "chunked":
                    while True:  # (no trailers)
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                n += 1
                if method == "POST":
                    close = n > 1
                    self.seen.append(
                        {
                            "rid": hdr.get("x-request-id"),
                            "key": hdr.get("idempotency-key"),
                            "conn": conn,
                            "n": n,
                            "answered": not close,
                            "t": time.monotonic(),
                        }
                    )
                    if close:
                        writer.close()  # read in full, then gone without a word
                        return
                    model = (orjson.loads(body) or {}).get("model", X) if body[:1] == b"{" else X
                    out = orjson.dumps(
                        {
                            "id": f"chatcmpl-stale{conn}-{n}",
                            "object": "chat.completion",
                            "created": 1_700_000_000,
                            "model": model,
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                        }
                    )
                elif target.startswith("/v1/models"):
                    out = orjson.dumps({"object": "list", "data": [{"id": X, "object": "model", "owned_by": "x"}]})
                else:
                    out = b'{"error": {"message": "not found", "type": "invalid_request_error"}}'
                status = "200 OK" if method == "POST" or target.startswith("/v1/models") else "404 Not Found"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(out)}\r\n"
                    f"x-request-id: stale-{conn}-{n}\r\n\r\n".encode()
                    + out
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


async def stale(procs: c.Procs, tmp: Path) -> Res:
    p = StaleOrigin(P_HOST)
    await p.start()
    f = await origin(F_HOST)
    eps, lines = two_endpoints(p.url, f.url)
    edge = Edge(procs, tmp, "stale", eps, lines)
    d: Res = {}
    try:
        async with aiohttp.ClientSession() as s:
            await edge.start(s, 2)
            m0 = await edge.counters(s)
            plain: list[Call] = []
            keyed: list[Call] = []
            for k in range(STALE_N):
                plain.append(await call(s, edge.url, f"stale-plain-{k:02d}", X))
                await asyncio.sleep(0.1)
            for k in range(STALE_N):
                keyed.append(await call(s, edge.url, f"stale-keyed-{k:02d}", X, headers={"Idempotency-Key": f"ik-{k}"}))
                await asyncio.sleep(0.1)
            d["metrics"] = delta(m0, await edge.counters(s))
        acc = edge.access_log()
        f_seen = Counter(r.headers.get("x-request-id", "") for r in f.requests)

        def one(r: Call) -> Res:
            mine = [x for x in p.seen if x["rid"] == r.rid]
            rec = acc.get(r.rid) or {}
            log = rec.get("attempt_log") or []
            return {
                "rid": r.rid,
                "what": r.what(),
                "kind": r.kind,
                "p_copies": len(mine),
                "p_closed": sum(1 for x in mine if not x["answered"]),
                "f_copies": f_seen.get(r.rid, 0),
                "keys": sorted({str(x["key"]) for x in mine}),
                "stale_noted": sum(1 for x in log if x.get("outcome") == "stale_connection"),
                "trail": trail(rec or None),
            }

        d["plain"] = [one(r) for r in plain]
        d["keyed"] = [one(r) for r in keyed]
        d["log_problems"] = edge.problems()[:3]
    except Exception as e:
        d.update(error=f"{type(e).__name__}: {e}")
    finally:
        edge.stop()
        await p.stop()
        await f.stop()
    return d


def row_stale(d: Res, res: Res) -> list[Any]:
    plain, keyed = d.get("plain", []), d.get("keyed", [])
    # no Idempotency-Key: never twice at P; the client gets F's answer or our own error (not an exception)
    plain_dup = [x["rid"] for x in plain if x["p_copies"] > 1]
    plain_hit = [x for x in plain if x["p_closed"]]
    plain_bad = [x for x in plain if x["what"] != "ok" and not x["kind"]]
    # with one: every copy past the first noted as stale_connection, and counted
    keyed_hit = [x for x in keyed if x["p_closed"]]
    keyed_silent = [x["rid"] for x in keyed if x["p_copies"] - 1 > x["stale_noted"]]
    counted = sum(v for k, v in d.get("metrics", {}).items() if "outcome=stale_connection" in k)
    noted = sum(x["stale_noted"] for x in keyed + plain)
    resent = sum(max(0, x["p_copies"] - 1) for x in keyed)
    errs = Counter(x["what"] for x in plain + keyed if x["what"] != "ok")
    silent = len(plain_dup) + len(keyed_silent) + max(0, resent - counted)
    d.update(
        plain_sent_twice=plain_dup,
        keyed_silent=keyed_silent,
        stale_counted=counted,
        stale_noted=noted,
        keyed_resent=resent,
        silent_duplicates=silent,
    )
    d["met"] = (
        "error" not in d
        and bool(plain_hit)
        and bool(keyed_hit)
        and silent == 0
        and not plain_bad
        and all(x["what"] == "ok" for x in keyed)
        and counted == noted == resent
    )
    res.setdefault("models", {})["stale-connection"] = d
    plain_out = Counter(("F answered" if x["f_copies"] and x["what"] == "ok" else x["what"]) for x in plain_hit)
    return [
        f"stale keep-alive: POST read in full, then closed ({STALE_N} without + {STALE_N} with Idempotency-Key)",
        f"{sum(errs.values())} errors / {len(plain) + len(keyed)} req"
        + (f" {dict(errs)}" if errs else "")
        + (f" ERROR {d['error']}" if "error" in d else ""),
        "-",
        "-",
        f"no key: {len(plain_hit)} closed after a full read -> {dict(plain_out)}, P copies per req max "
        f"{max((x['p_copies'] for x in plain), default=0)}, trails {dict(Counter(x['trail'] for x in plain_hit))}; "
        f"keyed: {len(keyed_hit)} closed, {resent} re-sent to P (same key), attempt_log stale_connection {noted}, "
        f"edgeproxy_attempts_total{{outcome=stale_connection}} +{counted}; silent duplicates {silent}",
        "no key: never twice at P (F or an honest error); keyed: re-sent, each one visible; 0 silent duplicates",
        mark(d["met"]),
    ]


# --------------------------------------------------------------------------- run


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> list[list[Any]]:
    """The issue 13 rows: the two load rows one after the other, then the long ones at once."""
    if getattr(a, "no_models", False):
        return []
    runs = a.flap_runs or (3 if a.quick else 10)
    res["models_settings"] = {
        "config": "edgeproxy defaults (no failover/probe sections; drain_timeout 1s)",
        "model_rate_per_model": a.model_rate,
        "streams_per_model": 2,
        "flap_runs": runs,
        "flap_period_s": FLAP_PERIOD,
        "flap_outage_s": FLAP_OUTAGE,
    }
    rows: list[list[Any]] = []
    t0 = time.monotonic()
    for status, fn in ((503, row_model_503), (429, row_model_429)):
        try:
            rows.append(fn(await model_fault(a, tmp, procs, status), res))
        except Exception as e:
            res.setdefault("errors", []).append(f"model {status}: {type(e).__name__}: {e}")
            rows.append([f"model {status}", f"ERROR {type(e).__name__}: {e}", "-", "-", "-", "-", "MISSED"])
    print(
        f"models: load rows done in {time.monotonic() - t0:.0f} s; flapping ({runs} runs x 2), silent and stale "
        f"rows at once, about {FLAP_PRE + FLAP_OUTAGE + FLAP_POST + 15:.0f} s",
        flush=True,
    )
    gate = asyncio.Semaphore(4)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        seeds = random.Random(13)
        flaps = {
            v: [
                asyncio.ensure_future(flap_run(procs, tmp, s, gate, v, i, seeds.randrange(1 << 30)))
                for i in range(runs)
            ]
            for v in ("probes", "completions")
        }
        silent_t = asyncio.ensure_future(silent_lines(procs, tmp))
        stale_t = asyncio.ensure_future(stale(procs, tmp))
        flap_res = {v: list(await asyncio.gather(*ts)) for v, ts in flaps.items()}
        silent_res, stale_res = await silent_t, await stale_t
    rows.append(row_flap("probes", flap_res["probes"], res))
    rows.append(row_flap("completions", flap_res["completions"], res))
    rows.append(row_silent(silent_res, res))
    rows.append(row_stale(stale_res, res))
    res["models_elapsed_s"] = round(time.monotonic() - t0, 1)
    return rows


def targets(res: Res) -> dict[str, bool | None]:
    return {f"models/{k}": v.get("met") for k, v in res.get("models", {}).items()}


def details(res: Res) -> None:
    m = res.get("models", {})
    if not m:
        return
    print()
    for name in ("model-503", "model-429"):
        d = m.get(name)
        if d:
            print(
                f"{name}: {d['requests']} req + {d['streams']} streams, errors {d['errors'] or 0}; X in fault "
                f"{d['x_in_fault']} (seen by {d['x_in_fault_seen_by']}), trails {d['trails_x_in_fault']}"
            )
            print(f"    metrics delta: {d['metrics']}")
            for e in d["error_samples"]:
                print(f"    error: {e}")
    for v in ("probes", "completions"):
        d = m.get(f"flap-{v}")
        if d:
            print(f"flap-{v}: {d['met_runs']}/{d['of']} runs MET")
            for r in d["runs"]:
                print(
                    f"    run {r['run']}: "
                    + ", ".join(
                        f"{k} {r[k]}"
                        for k in (
                            "requests",
                            "errors",
                            "outage_started_s",
                            "outage_primary_attempts",
                            "outage_answered_by_fallback",
                            "primary_usable_again_s",
                            "back_on_primary_s",
                            "after_recovery_to_fallback_first",
                            "trails_first_after",
                            "error",
                            "log_problems",
                        )
                        if r.get(k) not in (None, [], {})
                    )
                )
    d = m.get("silent-two-lines")
    if d:
        print(f"silent-two-lines: metrics delta {d.get('metrics')}")
        for r in d.get("requests", []):
            print(f"    {r}")
        print(f"    then: {d.get('after')}")
    d = m.get("stale-connection")
    if d:
        print(f"stale-connection: metrics delta {d.get('metrics')}")
        for r in d.get("plain", []) + d.get("keyed", []):
            print(f"    {r}")

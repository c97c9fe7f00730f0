"""Admission control (issue 15): weighted endpoints, priorities under overload, an endpoint down and back.

Starts three fake origins (`tests.fakes.origin`, each its own process) and three edgeproxies on free
loopback ports, access log (JSON, to a file) and metrics on:
  * origins A (127.0.0.1) and B (127.0.0.2), `--latency 0.01`, each answering with its own reply
    text (`--reply origin-A` / `origin-B`), so the client sees in every answer which origin served it
    (the access log's `endpoint` field is counted too, as a cross-check: the hosts differ);
  * origin C, `--capacity 64 --latency 0.5`: it serves at most 64 requests at once, in 0.5 s each
    (128 req/s at most); the others wait at the origin in arrival order;
  * edge-weights: upstream /v1 -> A (weight 80), B (weight 20), `probe: {interval: 1s}`;
  * edge-admission: /v1 -> C with `admission: {max_inflight: 64, queue: 10000, queue_timeout: 30s}`;
  * edge-none: /v1 -> C without admission (the baseline: every request goes to the origin at once);
  * edge-tight: /v1 -> C with a short queue, `admission: {max_inflight: 64, queue: 64, queue_timeout: 1s}`.

(a) Weights: 2,000 small chat requests (quick: 1,000), 16 at a time (aiohttp, keep-alive), through
    edge-weights; who served each. Target: A's share 80 % +- 3 points.
(b) Overload: closed loop, 256 clients (4x the origin's 64), each sending its next request as soon as
    the previous one is answered, non-streaming; the n-th request of the run gets priority by n mod 10
    (1 high, 3 normal, 6 low: arrivals are exactly 10/30/60 %) in `x-edgeproxy-priority`. Variants
    edge-admission and edge-none, alternating in rounds (2 x 12 s each; quick 1 x 8 s), same origin.
    The clients start over 2 s (64 per service time): with a fixed service time, clients that all
    start in the same millisecond keep the origin's 64 places freeing in one burst every 0.5 s, and
    a high request that comes just after a burst waits a whole service time whatever the queue
    does (`--burst` shows it). Per priority, for requests sent after those 2 s: wait = client
    latency - 0.5 s (the origin's service time), p50/p99/max, and the access log's queue_ms; for
    every request: answers, 503s (with / without Retry-After), other errors, lost (no answer,
    a connection error, or a 503 without Retry-After); edgeproxy RSS before / peak / after, CPU;
    the admission metrics (queue depth sampled every 0.5 s, refusals, wait histogram count).
    Targets (admission): high p99 wait <= 1/10 of low's p99 wait; low answered > 0 and no request
    waited past queue_timeout + 1 s; 0 lost; RSS peak growth <= 50 MB. edge-none is the baseline.
(b2) Refusals: the same load for 8 s (quick 4 s) against edge-tight, `admission: {max_inflight: 64,
    queue: 64, queue_timeout: 1s}`. Target: every refusal a 503 with `x-edgeproxy-error: overloaded`
    and Retry-After, 0 lost, no wait past queue_timeout + 1 s.
(c) Endpoint down: open loop, 50 req/s for 30 s (quick 20 s) through edge-weights; origin A (weight
    80) is SIGKILLed at 8 s (quick 5 s) and started again on the same port at 18 s (quick 11 s).
    Split per 2 s window (by send time), client errors, A's path state from /-/status (polled every
    0.25 s). Recovery = from A listening again to the first request from which A served 80 % +- 5
    points of the requests sent in the next 2 s. Targets: 0 client errors; recovery <= 10 s.

Usage: .venv/bin/python bench/admission.py [--quick] [--burst] [--no-feature]   (full ~1.7 min, quick ~50 s)
`--no-feature` leaves out the `weight` and `admission` keys (for a build without issue 15: both
overload variants then run the same config). Output: tables, targets PASS/MISS, a noise note, and as
the last line one JSON object {"bench": "admission", ...}. Exit status 0 whatever the targets say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import orjson
import uvloop

PRIOS = ("high", "normal", "low")
MIX = ("high",) + ("normal",) * 3 + ("low",) * 6  # the n-th request of a run gets MIX[n % 10]
SERVICE = 0.5  # origin C's fixed service time (s)
CAPACITY = 64
CLIENTS = 4 * CAPACITY
QUEUE_TIMEOUT = 30.0
TIGHT_QUEUE, TIGHT_TIMEOUT = 64, 1.0  # (b2): a short queue, so that edgeproxy refuses
CHAT_PATH = "/v1/chat/completions"
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "admission bench"}]})
JSON_CT = {"Content-Type": "application/json"}
PRIO_HEADERS = {p: {**JSON_CT, "x-edgeproxy-priority": p} for p in PRIOS}
Res = dict[str, Any]


# --------------------------------------------------------------------------- processes


def start_origin(procs: c.Procs, tmp: Path, name: str, host: str, port: int, *extra: str) -> c.Popen:
    argv = [c.PY, "-m", "tests.fakes.origin", "--host", host, "--port", str(port), *extra]
    p = procs.start(name, argv, log=tmp / f"{name}.log")
    wait_listening(host, port, p)
    return p


def wait_listening(host: str, port: int, proc: c.Popen, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def start_edge(procs: c.Procs, tmp: Path, name: str, body: str) -> dict[str, Any]:
    """edgeproxy with ``body`` (its upstreams etc.) after listen/admin/log. Its files in tmp/name."""
    d = tmp / name
    d.mkdir()
    port, admin = c.free_port(), c.free_port()
    cfg = d / "edgeproxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}\nlog: {{access: json}}\n"
        f"drain_timeout: 2s\n{body}"
    )
    p = procs.start(name, [c.EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=d / "edgeproxy.log",
                    stdout=d / "access.log")  # fmt: skip
    try:
        c.wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
        c.wait_port(port, p)
    except RuntimeError:
        print(f"{name} did not start; its config:\n{cfg.read_text()}\nits stderr:")
        print((d / "edgeproxy.log").read_text(errors="replace")[-3000:])
        raise
    return {"name": name, "proc": p, "port": port, "admin": admin, "dir": d, "url": f"http://127.0.0.1:{port}"}


def weights_body(a_url: str, b_url: str, feature: bool) -> str:
    wa, wb = (", weight: 80", ", weight: 20") if feature else ("", "")
    return (
        "probe: {interval: 1s}\n"
        "upstreams:\n  openai:\n    prefix: /v1\n    endpoints:\n"
        f'      - {{url: "{a_url}/v1"{wa}}}\n      - {{url: "{b_url}/v1"{wb}}}\n'
    )


def overload_body(origin: str, admission: bool, queue: int = 10000, timeout: float = QUEUE_TIMEOUT) -> str:
    adm = (
        f"    admission: {{max_inflight: {CAPACITY}, queue: {queue}, queue_timeout: {timeout:g}s}}\n"
        if admission
        else ""
    )
    return (
        f'upstreams:\n  openai:\n    prefix: /v1\n{adm}    endpoints: [{{url: "{origin}/v1"}}]\n'
        "pool: {max_per_path: 512}\n"
    )


def read_access(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(orjson.loads(line))
    return out


def ms(v: float | None) -> float | None:
    return None if v is None or v != v else round(1000 * v, 1)


# --------------------------------------------------------------------------- client


def who(body: bytes) -> str:
    if b"origin-A" in body:
        return "A"
    if b"origin-B" in body:
        return "B"
    return "?"


async def split_post(s: aiohttp.ClientSession, url: str) -> tuple[int | str, str]:
    """(status or 'exc:Name', 'A' | 'B' | '?') for one small chat request."""
    try:
        async with s.post(url, data=CHAT, headers=JSON_CT) as r:
            body = await r.read()
            return r.status, who(body)
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return f"exc:{type(e).__name__}", "?"


class Sampler:
    """RSS of some pids (peak) and, optionally, an admin's admission queue depth (max per priority),
    every ``every`` s while running."""

    def __init__(self, s: aiohttp.ClientSession, pids: dict[str, int], admin: int | None, every: float = 0.5) -> None:
        self.s, self.pids, self.admin, self.every = s, pids, admin, every
        self.peak: dict[str, float] = {}
        self.depth_max: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                r = c.rss_mb(pid)
                if r is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), r)
            if self.admin is not None:
                with contextlib.suppress(Exception):
                    async with self.s.get(f"http://127.0.0.1:{self.admin}/metrics") as r:
                        text = await r.text()
                    for n, lab, v in c.metric_samples(text):
                        if n == "edgeproxy_admission_queue_depth":
                            p = lab.get("priority", "?")
                            self.depth_max[p] = max(self.depth_max[p], int(v))
            await asyncio.sleep(self.every)

    def __enter__(self) -> Sampler:
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task:
            self.task.cancel()


# --------------------------------------------------------------------------- (a) weights


async def part_weights(edge: dict[str, Any], n: int, conc: int, a_host: str) -> Res:
    url = edge["url"] + CHAT_PATH
    before = len(read_access(edge["dir"] / "access.log"))
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    left = [n]
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                st, w = await split_post(s, url)
                statuses[str(st)] += 1
                if st == 200:
                    counts[w] += 1

        await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.5)  # the access log's last lines
    recs = [r for r in read_access(edge["dir"] / "access.log")[before:] if r.get("path") == CHAT_PATH]
    log_counts = Counter("A" if r.get("endpoint") and a_host in str(r.get("endpoint")) else "B" for r in recs)
    served = counts["A"] + counts["B"]
    share_a = 100 * counts["A"] / served if served else float("nan")
    return {
        "requests": n,
        "concurrency": conc,
        "elapsed_s": round(elapsed, 2),
        "req_per_s": round(n / elapsed, 1),
        "served": dict(counts),
        "statuses": dict(statuses),
        "share_a_pct": round(share_a, 2),
        "access_log_endpoint": dict(log_counts),
        "access_log_records": len(recs),
    }


# --------------------------------------------------------------------------- (b) overload

# A record per answer: (priority, start offset s, latency s, status or 'exc:...', has Retry-After,
# x-edgeproxy-error)
Rec = tuple[str, float, float, int | str, bool, str | None]


async def closed_loop(
    url: str, clients: int, duration: float, timeout: float, ramp: float
) -> tuple[list[Rec], float, float, float]:
    """``clients`` closed-loop clients for ``duration`` s, client i starting at i * ramp / clients;
    each finishes its last request. Returns (records, seconds until the last answer, client CPU
    seconds, time.time() at the start)."""
    recs: list[Rec] = []
    counter = itertools.count()
    cpu0 = time.process_time()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        t0, t0_wall = time.monotonic(), time.time()
        end = t0 + duration

        async def client(i: int) -> None:
            mono = time.monotonic
            await asyncio.sleep(i * ramp / clients)
            while mono() < end:
                prio = MIX[next(counter) % 10]
                started = mono()
                ra: str | None = None
                xerr: str | None = None
                try:
                    async with s.post(url, data=CHAT, headers=PRIO_HEADERS[prio]) as r:
                        await r.read()
                        st: int | str = r.status
                        if st != 200:
                            ra, xerr = r.headers.get("Retry-After"), r.headers.get("x-edgeproxy-error")
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    st = f"exc:{type(e).__name__}"
                recs.append((prio, started - t0, mono() - started, st, ra is not None, xerr))
                if st != 200:  # do not spin on refusals: back off as a client would (Retry-After, at most 1 s)
                    back = 0.5
                    with contextlib.suppress(TypeError, ValueError):
                        back = min(1.0, float(ra))  # type: ignore[arg-type]
                    await asyncio.sleep(back)

        await asyncio.gather(*(client(i) for i in range(clients)))
        last = time.monotonic() - t0
    return recs, last, time.process_time() - cpu0, t0_wall


def overload_stats(
    recs: list[Rec], access: list[dict[str, Any]], ramp: float, windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """Per priority. Counts: every request. Waits and queue_ms: requests sent after the ramp (``windows``:
    the wall-clock spans after each round's ramp, to pick the access log's records by their start)."""
    per: dict[str, Any] = {}
    by_prio_log: dict[str, list[dict[str, Any]]] = {p: [] for p in PRIOS}
    for r in access:
        if r.get("path") == CHAT_PATH:
            by_prio_log.setdefault(str(r.get("priority")), []).append(r)

    def steady(x: dict[str, Any]) -> bool:
        t = float(x.get("time", 0)) - float(x.get("duration_ms") or 0) / 1000
        return any(w0 <= t < w1 for w0, w1 in windows)

    for p in PRIOS:
        rows = [r for r in recs if r[0] == p]
        ok = [r[2] - SERVICE for r in rows if r[3] == 200 and r[1] >= ramp]
        r503 = [r for r in rows if r[3] == 503]
        other = [r for r in rows if r[3] not in (200, 503) and not str(r[3]).startswith("exc:")]
        exc = [r for r in rows if str(r[3]).startswith("exc:")]
        w = c.summarize(ok)
        logged = by_prio_log.get(p, [])
        qms = [float(x["queue_ms"]) for x in logged if x.get("queue_ms") is not None and steady(x)]
        q = c.summarize(qms)
        per[p] = {
            "sent": len(rows),
            "answered": sum(1 for r in rows if r[3] == 200),
            "waits_measured": len(ok),
            "wait_p50_ms": ms(w["p50"]),
            "wait_p99_ms": ms(w["p99"]),
            "wait_max_ms": ms(w["max"]),
            # the longest wait of any request: an answer's latency less the service time, a refusal's whole
            "wait_longest_s": round(max((r[2] - SERVICE if r[3] == 200 else r[2] for r in rows), default=0.0), 3),
            "r503": len(r503),
            "r503_with_retry_after": sum(1 for r in r503 if r[4]),
            "r503_overloaded": sum(1 for r in r503 if r[5] == "overloaded"),
            "other_errors": len(other),
            "other_statuses": dict(Counter(str(r[3]) for r in other)),
            "conn_errors": dict(Counter(str(r[3]) for r in exc)),
            "lost": len(exc) + sum(1 for r in r503 if not r[4]),
            "log_records": len(logged),
            "queue_ms_p50": round(q["p50"], 1) if qms else None,
            "queue_ms_p99": round(q["p99"], 1) if qms else None,
            "queue_ms_max": round(q["max"], 1) if qms else None,
        }
    unlabeled = {k: len(v) for k, v in by_prio_log.items() if k not in PRIOS}
    if unlabeled:
        per["log_other_priority"] = unlabeled
    return per


async def admission_metrics(s: aiohttp.ClientSession, admin: int) -> dict[str, Any]:
    out: dict[str, Any] = {"refused": {}, "wait_count": {}, "wait_sum_s": {}, "queue_depth": {}}
    with contextlib.suppress(Exception):
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
        for n, lab, v in c.metric_samples(text):
            p = lab.get("priority", "?")
            if n.startswith("edgeproxy_admission_refused"):
                out["refused"][f"{p}:{lab.get('reason')}"] = v
            elif n == "edgeproxy_admission_wait_seconds_count":
                out["wait_count"][p] = v
            elif n == "edgeproxy_admission_wait_seconds_sum":
                out["wait_sum_s"][p] = round(v, 2)
            elif n == "edgeproxy_admission_queue_depth":
                out["queue_depth"][p] = v
    return out


async def part_overload(edges: dict[str, dict[str, Any]], a: argparse.Namespace) -> Res:
    names = list(edges)
    recs: dict[str, list[Rec]] = {n: [] for n in names}
    rss0 = {n: c.rss_mb(e["proc"].pid) for n, e in edges.items()}
    cpu0 = {n: c.cpu_seconds(e["proc"].pid) for n, e in edges.items()}
    info: dict[str, dict[str, Any]] = {n: {"rounds": [], "client_cpu_s": 0.0, "depth_max": Counter()} for n in names}
    windows: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    peak: dict[str, float] = {}
    async with aiohttp.ClientSession() as ms_:
        for rnd in range(a.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for n in order:
                e = edges[n]
                with Sampler(ms_, {n: e["proc"].pid}, e["admin"]) as smp:
                    rr, last, ccpu, t0w = await closed_loop(
                        e["url"] + CHAT_PATH, CLIENTS, a.load_s, QUEUE_TIMEOUT + 5, a.ramp
                    )
                windows[n].append((t0w + a.ramp, t0w + a.load_s + 1.0))
                for k, v in smp.peak.items():
                    peak[k] = max(peak.get(k, 0.0), v)
                for k, v in smp.depth_max.items():
                    info[n]["depth_max"][k] = max(info[n]["depth_max"][k], v)
                recs[n] += rr
                info[n]["client_cpu_s"] += ccpu
                ok = sum(1 for r in rr if r[3] == 200)
                info[n]["rounds"].append({"round": rnd + 1, "answers": ok, "until_last_s": round(last, 2)})
                print(f"  overload round {rnd + 1} {n}: {len(rr)} requests, {ok} answered 200, "
                      f"{ok / last:.0f} answers/s, last answer at {last:.1f} s", flush=True)  # fmt: skip
                await asyncio.sleep(0.3)
        await asyncio.sleep(0.7)
        out: Res = {}
        for n, e in edges.items():
            pid = e["proc"].pid
            access = read_access(e["dir"] / "access.log")
            st = overload_stats(recs[n], access, a.ramp, windows[n])
            out[n] = {
                "per_priority": st,
                "throughput_per_s": round(
                    sum(1 for r in recs[n] if r[3] == 200) / sum(x["until_last_s"] for x in info[n]["rounds"]), 1
                ),
                "rss_before_mb": rss0[n],
                "rss_peak_mb": peak.get(n),
                "rss_after_mb": c.rss_mb(pid),
                "edge_cpu_s": round(c.cpu_seconds(pid) - cpu0[n], 2),
                "client_cpu_s": round(info[n]["client_cpu_s"], 2),
                "rounds": info[n]["rounds"],
                "queue_depth_max": dict(info[n]["depth_max"]),
                "metrics": await admission_metrics(ms_, e["admin"]),
            }
    return out


async def part_refusals(edge: dict[str, Any], a: argparse.Namespace) -> Res:
    """(b2): the same load against a short queue, so that edgeproxy refuses: every refusal must be a
    503 overloaded with Retry-After, and nobody may wait past queue_timeout + 1 s."""
    rr, last, _, t0w = await closed_loop(edge["url"] + CHAT_PATH, CLIENTS, a.tight_s, TIGHT_TIMEOUT + 5, a.ramp)
    await asyncio.sleep(0.7)
    access = read_access(edge["dir"] / "access.log")
    async with aiohttp.ClientSession() as s:
        metrics = await admission_metrics(s, edge["admin"])
    return {
        "per_priority": overload_stats(rr, access, a.ramp, [(t0w + a.ramp, t0w + a.tight_s + 1.0)]),
        "until_last_s": round(last, 2),
        "throughput_per_s": round(sum(1 for r in rr if r[3] == 200) / last, 1),
        "x_edgeproxy_error": dict(Counter(f"{r[3]} {r[5]}" for r in rr if r[3] != 200)),
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- (c) endpoint down


async def part_down(edge: dict[str, Any], origin_a: dict[str, Any], procs: c.Procs, a: argparse.Namespace) -> Res:
    url = edge["url"] + CHAT_PATH
    rate, dur, t_kill, t_back = a.down_rate, a.down_s, a.kill_at, a.back_at
    rows: list[tuple[float, int | str, str]] = []  # (send offset, status, who)
    marks: dict[str, float] = {}
    states: list[tuple[float, str]] = []  # (offset, A's path state) on change
    port_a = str(origin_a["port"])
    before = len(read_access(edge["dir"] / "access.log"))

    def kill() -> None:
        p = origin_a["proc"]
        p.kill()
        p.wait()

    def restart() -> None:
        origin_a["proc"] = start_origin(procs, origin_a["tmp"], "origin-A2", origin_a["host"], origin_a["port"],
                                        *origin_a["extra"])  # fmt: skip

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=20)) as s:  # fmt: skip
        t0 = time.monotonic()

        async def one(off: float) -> None:
            st, w = await split_post(s, url)
            rows.append((off, st, w))

        async def events() -> None:
            await asyncio.sleep(max(0.0, t0 + t_kill - time.monotonic()))
            marks["kill"] = time.monotonic() - t0
            await asyncio.to_thread(kill)
            await asyncio.sleep(max(0.0, t0 + t_back - time.monotonic()))
            marks["restart_spawn"] = time.monotonic() - t0
            await asyncio.to_thread(restart)
            marks["restart_listening"] = time.monotonic() - t0

        async def poll_state() -> None:
            last = None
            while True:
                with contextlib.suppress(Exception):
                    async with s.get(f"http://127.0.0.1:{edge['admin']}/-/status") as r:
                        stj = await r.json(content_type=None)
                    for u in stj.get("upstreams", []):
                        for p in u.get("paths", []):
                            if f":{port_a}" in str(p.get("endpoint")):
                                state = str(p.get("state"))
                                if state != last:
                                    states.append((round(time.monotonic() - t0, 2), state))
                                    last = state
                await asyncio.sleep(0.25)

        ev = asyncio.ensure_future(events())
        poller = asyncio.ensure_future(poll_state())
        tasks = []
        for i in range(int(rate * dur)):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.ensure_future(one(time.monotonic() - t0)))
        await asyncio.gather(*tasks)
        await ev
        poller.cancel()
    await asyncio.sleep(0.5)
    recs = [r for r in read_access(edge["dir"] / "access.log")[before:] if r.get("path") == CHAT_PATH]
    retried = sum(1 for r in recs if (r.get("attempts") or 1) > 1)

    rows.sort()
    windows = []
    for w0 in range(0, int(dur), 2):
        sel = [r for r in rows if w0 <= r[0] < w0 + 2]
        na = sum(1 for r in sel if r[1] == 200 and r[2] == "A")
        nb = sum(1 for r in sel if r[1] == 200 and r[2] == "B")
        err = sum(1 for r in sel if r[1] != 200)
        note = []
        if w0 <= marks.get("kill", -9) < w0 + 2:
            note.append("A killed")
        if w0 <= marks.get("restart_listening", -9) < w0 + 2:
            note.append("A back")
        windows.append({"t": w0, "sent": len(sel), "A": na, "B": nb, "errors": err,
                        "share_a_pct": round(100 * na / (na + nb), 1) if na + nb else None,
                        "note": ", ".join(note)})  # fmt: skip
    back = marks.get("restart_listening")
    recovery = None
    if back is not None:
        after = [r for r in rows if r[0] >= back]
        for i, r in enumerate(after):
            if r[0] + 2.0 > dur:
                break
            sel = [x for x in after[i:] if x[0] < r[0] + 2.0 and x[1] == 200]
            if sel and abs(100 * sum(1 for x in sel if x[2] == "A") / len(sel) - 80) <= 5:
                recovery = round(r[0] - back, 2)
                break
    up_after = next((t for t, s_ in states if back is not None and t >= back and s_ == "up"), None)
    errors = [r for r in rows if r[1] != 200]
    during = [r for r in rows if marks.get("kill", 1e9) <= r[0] < (back or 1e9)]
    return {
        "rate_per_s": rate,
        "duration_s": dur,
        "marks_s": {k: round(v, 2) for k, v in marks.items()},
        "sent": len(rows),
        "client_errors": len(errors),
        "error_kinds": dict(Counter(str(r[1]) for r in errors)),
        "first_errors_at_s": [round(r[0], 2) for r in errors[:10]],
        "served_while_down": dict(Counter(r[2] for r in during if r[1] == 200)),
        "windows": windows,
        "recovery_s": recovery,
        "a_path_states": states,
        "a_up_after_restart_s": round(up_after - back, 2) if up_after is not None and back is not None else None,
        "access_log_records": len(recs),
        "access_log_retried": retried,
    }


# --------------------------------------------------------------------------- main


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> None:
    extra = ["--latency", "0.01"]
    pa, pb, pc = c.free_port(), c.free_port(), c.free_port()
    origin_a = {"host": "127.0.0.1", "port": pa, "tmp": tmp, "extra": [*extra, "--reply", "origin-A"]}
    origin_a["proc"] = start_origin(procs, tmp, "origin-A", "127.0.0.1", pa, *origin_a["extra"])
    start_origin(procs, tmp, "origin-B", "127.0.0.2", pb, *extra, "--reply", "origin-B")
    start_origin(procs, tmp, "origin-C", "127.0.0.1", pc, "--capacity", str(CAPACITY), "--latency", str(SERVICE))
    a_url, b_url, c_url = f"http://127.0.0.1:{pa}", f"http://127.0.0.2:{pb}", f"http://127.0.0.1:{pc}"
    feature = not a.no_feature
    ew = start_edge(procs, tmp, "edge-weights", weights_body(a_url, b_url, feature))
    edges = {
        "admission": start_edge(procs, tmp, "edge-admission", overload_body(c_url, feature)),
        "none": start_edge(procs, tmp, "edge-none", overload_body(c_url, False)),
    }
    tight = start_edge(procs, tmp, "edge-tight", overload_body(c_url, feature, TIGHT_QUEUE, TIGHT_TIMEOUT))
    res["configs"] = {e["name"]: (e["dir"] / "edgeproxy.yaml").read_text() for e in (ew, *edges.values(), tight)}
    await asyncio.sleep(1.5)  # both of edge-weights' paths probed up

    print(f"(a) weights: {a.n_weights} requests, {a.conc} at a time ...", flush=True)
    res["weights"] = await part_weights(ew, a.n_weights, a.conc, "127.0.0.1")
    print(f"  {res['weights']}", flush=True)

    print(f"(b) overload: {CLIENTS} closed-loop clients (starting over {a.ramp:g} s), {a.rounds} round(s) x "
          f"{a.load_s:g} s per variant ...", flush=True)  # fmt: skip
    res["overload"] = await part_overload(edges, a)
    print(f"(b2) refusals: the same load, queue {TIGHT_QUEUE}, queue_timeout {TIGHT_TIMEOUT:g} s, {a.tight_s:g} s ...",
          flush=True)  # fmt: skip
    res["refusals"] = await part_refusals(tight, a)

    print(f"(c) endpoint down: {a.down_rate:g} req/s for {a.down_s:g} s, A killed at {a.kill_at:g} s, "
          f"back at {a.back_at:g} s ...", flush=True)  # fmt: skip
    res["down"] = await part_down(ew, origin_a, procs, a)
    res["died"] = [d for d in procs.died() if not d.startswith("origin-A exited with -9")]
    res["findings"] = {}
    for e in (ew, *edges.values(), tight):
        res["findings"][e["name"]] = findings(e["dir"])


def findings(d: Path) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for rec in read_access(d / "access.log"):
        statuses[str(rec.get("status"))] += 1
        if rec.get("error"):
            errors[str(rec["error"])] += 1
    bad = [line[:300] for line in (d / "edgeproxy.log").read_text(errors="replace").splitlines()
           if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error"))]  # fmt: skip
    return {"statuses": dict(statuses), "errors": dict(errors), "problem_lines": len(bad), "problems": bad[:8]}


def report(res: Res, a: argparse.Namespace) -> list[list[Any]]:
    targets: list[list[Any]] = []
    w = res["weights"]
    print("\n(a) weights 80/20, A on 127.0.0.1, B on 127.0.0.2 (client: the reply text; log: access-log endpoint)")
    served = w["served"]
    tot = (served.get("A", 0) + served.get("B", 0)) or 1
    c.print_table(
        ["endpoint", "weight", "served", "share %", "access log", "req/s"],
        [["A", 80, served.get("A", 0), round(100 * served.get("A", 0) / tot, 1), w["access_log_endpoint"].get("A", 0),
          w["req_per_s"]],
         ["B", 20, served.get("B", 0), round(100 * served.get("B", 0) / tot, 1), w["access_log_endpoint"].get("B", 0),
          ""]],
    )  # fmt: skip
    other = {k: v for k, v in w["statuses"].items() if k != "200"}
    if other:
        print(f"non-200 answers: {other}")
    share = w["share_a_pct"]
    targets.append(["(a) A's share 80 % +- 3 points", f"{share} %", "77-83 %",
                    "PASS" if share == share and abs(share - 80) <= 3 else "MISS"])  # fmt: skip

    ov = res["overload"]
    print(f"\n(b) overload: origin capacity {CAPACITY}, service {SERVICE} s; {CLIENTS} closed-loop clients; "
          f"{a.rounds} x {a.load_s:g} s per variant, clients starting over {a.ramp:g} s. wait = latency - "
          f"{SERVICE} s (ms), and queue_ms: of requests sent after those {a.ramp:g} s ('measured'); "
          "the counts: every request")  # fmt: skip
    rows = []
    for n, r in ov.items():
        for p in PRIOS:
            x = r["per_priority"][p]
            rows.append([n, p, x["sent"], x["answered"], x["waits_measured"], x["wait_p50_ms"], x["wait_p99_ms"],
                         x["wait_max_ms"], x["queue_ms_p50"], x["queue_ms_p99"],
                         f"{x['r503']} ({x['r503_with_retry_after']} RA)", x["other_errors"], x["lost"]])  # fmt: skip
    c.print_table(["variant", "priority", "sent", "answered", "measured", "wait p50", "wait p99", "wait max",
                   "queue_ms p50", "queue_ms p99", "503 (Retry-After)", "other err", "lost"], rows)  # fmt: skip
    print()
    c.print_table(
        ["variant", "answers/s (ramp, drain incl.)", "RSS before MB", "RSS peak MB", "RSS after MB", "edge CPU s",
         "client CPU s", "max queue depth (metric)"],
        [[n, r["throughput_per_s"], r["rss_before_mb"], r["rss_peak_mb"], r["rss_after_mb"], r["edge_cpu_s"],
          r["client_cpu_s"], r["queue_depth_max"] or "-"] for n, r in ov.items()],
    )  # fmt: skip
    m = ov["admission"]["metrics"]
    print(f"admission metrics after: refused {m['refused'] or 0}; wait histogram count {m['wait_count'] or '-'}; "
          f"queue depth now {m['queue_depth'] or '-'}")  # fmt: skip
    for n, r in ov.items():
        for p in PRIOS:
            x = r["per_priority"][p]
            if x["other_statuses"] or x["conn_errors"]:
                print(f"  {n} {p}: other statuses {x['other_statuses']}, connection errors {x['conn_errors']}")
        if "log_other_priority" in r["per_priority"] and n == "admission":
            print(f"  {n}: access-log records without a known priority: {r['per_priority']['log_other_priority']}")
    adm = ov["admission"]["per_priority"]
    hi, lo = adm["high"]["wait_p99_ms"], adm["low"]["wait_p99_ms"]
    ok_ratio = hi is not None and lo is not None and hi <= lo / 10
    targets.append(["(b) admission: high p99 wait <= low p99 wait / 10", f"{hi} ms vs {lo} ms",
                    f"<= {None if lo is None else round(lo / 10, 1)} ms", "PASS" if ok_ratio else "MISS"])  # fmt: skip
    longest = max(adm[p]["wait_longest_s"] for p in PRIOS)
    low_ok = adm["low"]["answered"] > 0 and longest <= QUEUE_TIMEOUT + 1
    targets.append(["(b) admission: low served, no wait past queue_timeout + 1 s",
                    f"low answered {adm['low']['answered']}, longest wait {longest:.2f} s",
                    f"> 0; <= {QUEUE_TIMEOUT + 1:g} s", "PASS" if low_ok else "MISS"])  # fmt: skip
    lost = sum(adm[p]["lost"] for p in PRIOS)
    targets.append(["(b) admission: lost requests", lost, 0, "PASS" if lost == 0 else "MISS"])
    ra = ov["admission"]
    growth = None if ra["rss_peak_mb"] is None or ra["rss_before_mb"] is None else round(
        ra["rss_peak_mb"] - ra["rss_before_mb"], 1)  # fmt: skip
    after_growth = None if ra["rss_after_mb"] is None or ra["rss_before_mb"] is None else round(
        ra["rss_after_mb"] - ra["rss_before_mb"], 1)  # fmt: skip
    targets.append(["(b) admission: RSS peak growth (after - before)", f"{growth} MB ({after_growth} MB)", "<= 50 MB",
                    c.verdict(growth, 50)])  # fmt: skip
    nb = ov["none"]["per_priority"]
    targets.append(["(b) baseline no admission: high p99 / low p99 wait",
                    f"{nb['high']['wait_p99_ms']} ms / {nb['low']['wait_p99_ms']} ms",
                    f"lost {sum(nb[p]['lost'] for p in PRIOS)}", "baseline"])  # fmt: skip

    rf = res["refusals"]
    print(f"\n(b2) refusals: edge-tight, admission {{max_inflight: {CAPACITY}, queue: {TIGHT_QUEUE}, queue_timeout: "
          f"{TIGHT_TIMEOUT:g}s}}, the same 256 clients for {a.tight_s:g} s (a client waits out Retry-After, at most "
          "1 s, after a refusal); waits of the requests sent after the ramp")  # fmt: skip
    c.print_table(["priority", "sent", "answered", "wait p50", "wait p99", "longest wait s", "503", "with Retry-After",
                   "overloaded", "other err", "lost"],
                  [[p, x["sent"], x["answered"], x["wait_p50_ms"], x["wait_p99_ms"], x["wait_longest_s"], x["r503"],
                    x["r503_with_retry_after"], x["r503_overloaded"], x["other_errors"], x["lost"]]
                   for p, x in ((p, rf["per_priority"][p]) for p in PRIOS)])  # fmt: skip
    print(f"answers/s {rf['throughput_per_s']}; non-200 (status x-edgeproxy-error): {rf['x_edgeproxy_error'] or 0}; "
          f"edgeproxy_admission_refused_total: {rf['metrics']['refused'] or 0}")  # fmt: skip
    rp = rf["per_priority"]
    n503 = sum(rp[p]["r503"] for p in PRIOS)
    good = sum(rp[p]["r503_overloaded"] for p in PRIOS)
    bad = sum(rp[p]["lost"] + rp[p]["other_errors"] for p in PRIOS)
    longest_t = max(rp[p]["wait_longest_s"] for p in PRIOS)
    ok_t = n503 > 0 and good == n503 and bad == 0 and longest_t <= TIGHT_TIMEOUT + 1
    targets.append([f"(b2) short queue: 503 overloaded + Retry-After, 0 lost, wait <= {TIGHT_TIMEOUT + 1:g} s",
                    f"{good}/{n503} 503s right, {bad} lost/other, longest {longest_t:.2f} s", "all; 0",
                    "PASS" if ok_t else "MISS"])  # fmt: skip

    d = res["down"]
    mk = d["marks_s"]
    print(f"\n(c) endpoint A (weight 80) down: {d['rate_per_s']:g} req/s open loop; A killed at {mk.get('kill')} s, "
          f"spawned again at {mk.get('restart_spawn')} s, listening at {mk.get('restart_listening')} s")  # fmt: skip
    c.print_table(["window s", "sent", "A", "B", "errors", "A share %", ""],
                  [[f"{x['t']}-{x['t'] + 2}", x["sent"], x["A"], x["B"], x["errors"], x["share_a_pct"], x["note"]]
                   for x in d["windows"]])  # fmt: skip
    print(f"A's path state in /-/status (s: state): {d['a_path_states']}; up {d['a_up_after_restart_s']} s after "
          f"A listened again. Served while A was down: {d['served_while_down']}. Access log: "
          f"{d['access_log_retried']} of {d['access_log_records']} requests took more than one attempt.")  # fmt: skip
    if d["client_errors"]:
        print(f"client errors: {d['error_kinds']} at {d['first_errors_at_s']} s")
    targets.append(["(c) client errors with A down and back", d["client_errors"], 0,
                    "PASS" if d["client_errors"] == 0 else "MISS"])  # fmt: skip
    rec = d["recovery_s"]
    targets.append(["(c) A back to 80 % +- 5 points after its restart", "never" if rec is None else f"{rec} s",
                    "<= 10 s", c.verdict(rec, 10) if rec is not None else "MISS"])  # fmt: skip
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (under 1 min)")
    ap.add_argument("--no-feature", action="store_true", help="no weight / admission keys (a build without issue 15)")
    ap.add_argument("--n-weights", type=int, help="requests of (a) (default 2000; quick 1000)")
    ap.add_argument("--conc", type=int, default=16, help="concurrency of (a)")
    ap.add_argument("--rounds", type=int, help="alternating rounds of (b) (default 2; quick 1)")
    ap.add_argument("--load-s", type=float, help="seconds per variant per round of (b) (default 12; quick 8)")
    ap.add_argument(
        "--burst",
        action="store_true",
        help="(b): start all 256 clients at once instead of over 2 s (slots then free in bursts)",
    )
    ap.add_argument("--down-rate", type=float, default=50.0, help="requests/s of (c)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, access logs)")
    a = ap.parse_args()
    a.n_weights = a.n_weights or (1000 if a.quick else 2000)
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.load_s = a.load_s or (8.0 if a.quick else 12.0)
    a.tight_s = 4.0 if a.quick else 8.0
    a.ramp = 0.0 if a.burst else CLIENTS / CAPACITY * SERVICE  # 64 clients per service time: 2 s
    a.down_s, a.kill_at, a.back_at = (20.0, 5.0, 11.0) if a.quick else (30.0, 8.0, 18.0)
    c.raise_nofile()
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    rev = subprocess.run(["git", "-C", str(c.ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"admission: edgeproxy {rev.stdout.strip()}{' (--no-feature)' if a.no_feature else ''}; loadavg before "
          f"{la0}; background CPU {bg['busy_pct']}% busy, {bg['steal_pct']}% steal", flush=True)  # fmt: skip
    res: Res = {"bench": "admission", "quick": a.quick, "no_feature": a.no_feature, "revision": rev.stdout.strip(),
                "n_weights": a.n_weights, "concurrency_a": a.conc, "rounds": a.rounds, "load_s": a.load_s,
                "ramp_s": a.ramp,
                "clients": CLIENTS, "capacity": CAPACITY, "service_s": SERVICE, "loadavg_before": la0,
                "background": bg}  # fmt: skip
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        td = tempfile.mkdtemp(prefix="bench-admission-") if a.keep else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-admission-"))  # fmt: skip
        procs = stack.enter_context(c.Procs())
        uvloop.run(bench(a, Path(td), procs, res))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    targets = report(res, a)
    print()
    c.print_table(["target", "observed", "limit", "result"], targets)
    res["targets"] = {t[0]: t[3] for t in targets}
    for name, f in res["findings"].items():
        print(f"{name}: access log statuses {f['statuses']}; errors {f['errors'] or 0}; "
              f"stderr warnings/errors {f['problem_lines']}")  # fmt: skip
        for line in f["problems"][:5]:
            print("   ", line)
    if res["died"]:
        print(f"processes that died: {res['died']}")
    print(c.noise_note(bg, la0, la1, "Both overload variants ran in the same run, alternating."))
    print(f"elapsed {res['elapsed_s']} s")
    if a.keep:
        print(f"kept: {td}")
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

"""Streaming (SSE) delay added by edgeproxy with N concurrent streams, and its memory while holding them.

The fake origin (tests.fakes.origin) streams M content events per request at 50 events/s, each
stamped with ``x_origin_ts`` (time.time() when written). One uvloop + aiohttp client process opens
N streams at once (starts staggered over --stagger s) and records, per event,
arrival time - x_origin_ts. Runs direct (client -> origin), through edgeproxy and through the bare
reference proxy (bench/bare_proxy.py), alternating, in the same run: the client and the origin share
the 2 cores with the proxy and add delay of their own, which is why "direct" is the baseline and
ADDED = proxied - direct (per percentile).

    .venv/bin/python bench/sse.py [--quick] [--streams N] [--events M]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import uvloop

BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True})
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
Res = dict[str, Any]
TS = re.compile(rb'"x_origin_ts":\s*([0-9.eE+-]+)')


class Phase:
    """What one pass of N streams saw."""

    def __init__(self) -> None:
        self.delays: list[float] = []  # ms, per event
        self.events = 0
        self.intact = 0
        self.open = 0
        self.max_open = 0
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()


async def one_stream(session: aiohttp.ClientSession, url: str, start_at: float, expected: int, ph: Phase) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    events, done, delays, clock = 0, False, ph.delays, time.time
    try:
        async with session.post(url, data=BODY, headers=HEADERS) as r:
            ph.statuses[r.status] += 1
            if r.status != 200:
                await r.read()
                return
            ph.open += 1
            try:
                buf = b""
                async for chunk in r.content.iter_any():
                    now = clock()
                    parts = (buf + chunk).split(b"\n\n")
                    buf = parts.pop()
                    for ev in parts:
                        if ev.startswith(b"data: {"):
                            m = TS.search(ev)
                            if m:
                                delays.append((now - float(m.group(1))) * 1000)
                                events += 1
                        elif ev.startswith(b"data: [DONE]"):
                            done = True
            finally:
                ph.open -= 1
    except Exception as exc:
        ph.errors[type(exc).__name__] += 1
    ph.events += events
    ph.intact += done and events == expected


async def run_phase(url: str, n: int, stagger: float, expected: int, timeout: float, pids: dict[str, int]) -> Res:
    """N streams through ``url``; ``pids`` (origin, and the proxy if any) are watched for CPU and RSS."""
    ph, loop = Phase(), asyncio.get_running_loop()
    peak = 0.0
    proxy_pid = next((p for k, p in pids.items() if k != "origin"), None)

    async def sample() -> None:
        nonlocal peak
        while True:
            ph.max_open = max(ph.max_open, ph.open)
            if proxy_pid:
                peak = max(peak, c.rss_mb(proxy_pid) or 0.0)
            await asyncio.sleep(0.1)

    conn = aiohttp.TCPConnector(limit=0)
    cpu0 = {k: c.cpu_seconds(p) for k, p in pids.items()}
    ru0, w0, ov0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), listen_overflows()
    gc.disable()
    sampler = asyncio.create_task(sample())
    try:
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=timeout), auto_decompress=False
        ) as session:
            t0 = loop.time() + 0.1
            await asyncio.gather(*(one_stream(session, url, t0 + i * stagger / n, expected, ph) for i in range(n)))
    finally:
        sampler.cancel()
        gc.enable()
    wall = time.monotonic() - w0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {k: round(100 * (c.cpu_seconds(p) - cpu0[k]) / wall, 1) for k, p in pids.items()}
    cpu["client"] = round(100 * (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall, 1)
    out = {"delays": ph.delays, "events": ph.events, "expected": n * expected, "intact": ph.intact, "streams": n,
           "max_open": ph.max_open, "statuses": dict(ph.statuses), "errors": dict(ph.errors), "wall_s": round(wall, 2),
           "events_per_s": round(ph.events / wall), "cpu_pct": cpu}  # fmt: skip
    out["listen_overflows"] = listen_overflows() - ov0
    if proxy_pid:
        out["rss_peak_mb"] = peak
    return out


def listen_overflows() -> int:
    """Machine-wide TcpExtListenOverflows: connections dropped on a full accept queue (client retries in 1 s)."""
    head, values = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(dict(zip(head, values, strict=True)).get("ListenOverflows", 0))


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to one CPU (sched_setaffinity on a pid covers only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    delays = [d for r in runs for d in r["delays"]]
    m: Res = {"delay_ms": {k: round(v, 2) for k, v in c.summarize(delays).items()}}
    for k in ("events", "expected", "intact", "streams"):
        m[k] = sum(r[k] for r in runs)
    m["runs"] = [{k: v for k, v in r.items() if k != "delays"} for r in runs]
    return m


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: dict[str, Any]) -> None:
    oport = c.free_port()
    reply = ("lorem ipsum dolor sit amet, consectetur adipiscing elit " * (a.events // 10 + 1))[: 4 * a.events]
    origin = c.start_fake_origin(
        procs, tmp, oport, "--events", str(a.events), "--event-interval", str(a.interval), "--reply", reply
    )
    edge, eport, admin = c.start_edgeproxy(procs, tmp, f"http://127.0.0.1:{oport}", pool=max(2048, a.streams * 2))
    await asyncio.sleep(1.0)
    res["edgeproxy_rss_idle_mb"] = c.rss_mb(edge.pid)
    expected = a.events + 2  # role chunk + M content chunks + finish chunk (then [DONE])
    timeout = a.events * a.interval * 5 + 30
    path = "/v1/chat/completions"
    modes = {"direct": (oport, {}), "edgeproxy": (eport, {"edgeproxy": edge.pid})}
    if a.bare:
        bare, bport = c.start_bare(procs, tmp, f"http://127.0.0.1:{oport}")
        modes["bare_proxy"] = (bport, {"bare_proxy": bare.pid})
    if a.pin:  # client + origin on CPU 0, the proxies on CPU 1: the proxy's own delay, without contention
        proxies = [p for _, pids in modes.values() for p in pids.values()]
        for pid, cpu in [(os.getpid(), 0), (origin.pid, 0)] + [(p, 1) for p in proxies]:
            pin(pid, cpu)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(a.repeat):
        for mode, (port, pids) in modes.items():
            print(f"[{rep + 1}/{a.repeat}] {mode}: {a.streams} streams x {a.events} events...", flush=True)
            r = await run_phase(f"http://127.0.0.1:{port}{path}", a.streams, a.stagger, expected, timeout,
                                {"origin": origin.pid} | pids)  # fmt: skip
            runs[mode].append(r)
            print(f"    {r['events']}/{r['expected']} events, {r['intact']}/{a.streams} intact, max open "
                  f"{r['max_open']}, {r['wall_s']} s, {r['events_per_s']} events/s, CPU% {r['cpu_pct']}, "
                  f"statuses {r['statuses']} errors {r['errors'] or 0}, accept-queue overflows "
                  f"{r['listen_overflows']}")  # fmt: skip
            gc.collect()
            await asyncio.sleep(1.0)
    await asyncio.sleep(1.0)
    res["edgeproxy_rss_peak_mb"] = max(r["rss_peak_mb"] for r in runs["edgeproxy"])
    res["edgeproxy_rss_after_mb"] = c.rss_mb(edge.pid)
    res["edgeproxy_after"] = c.edgeproxy_status(admin)
    for mode, rs in runs.items():
        res[mode] = merge(rs)
    res["died"] = procs.died()
    procs.stop(edge)  # so that its logs are complete
    res["edgeproxy_findings"] = c.edgeproxy_findings(tmp)


def cpu_cell(cpu: dict[str, float]) -> str:
    return " ".join(f"{k[0]}{v:.0f}" for k, v in cpu.items())


def report(res: dict[str, Any], bg: dict[str, float], la0: str) -> None:
    d = res["direct"]["delay_ms"]
    for mode in ("edgeproxy", "bare_proxy"):
        if mode in res:
            dm = res[mode]["delay_ms"]
            res[mode]["added_delay_ms"] = {k: round(dm[k] - d[k], 2) for k in ("p50", "p90", "p99", "max")}
    print()
    rows = []
    for mode in ("direct", "edgeproxy", "bare_proxy"):
        if mode not in res:
            continue
        m = res[mode]
        dm, add = m["delay_ms"], m.get("added_delay_ms") or {}
        rows.append([mode, dm["p50"], dm["p90"], dm["p99"], dm["max"], add.get("p50"), add.get("p99"),
                     f"{m['events']}/{m['expected']}", f"{m['intact']}/{m['streams']}",
                     max(r["max_open"] for r in m["runs"]), " ".join(str(r["events_per_s"]) for r in m["runs"]),
                     " | ".join(cpu_cell(r["cpu_pct"]) for r in m["runs"])])  # fmt: skip
    c.print_table(["path", "delay p50 ms", "p90", "p99", "max", "added p50", "added p99", "events",
                   "streams intact", "max open", "events/s per run", "CPU% per run"], rows)  # fmt: skip
    added = res["edgeproxy"]["added_delay_ms"]
    print(f"\nedgeproxy RSS: idle {res['edgeproxy_rss_idle_mb']} MB, peak holding {res['streams']} streams "
          f"{res['edgeproxy_rss_peak_mb']} MB, after {res['edgeproxy_rss_after_mb']} MB")  # fmt: skip
    n = res["streams"]
    print(f"\ntargets (edgeproxy, {n} streams{'' if n >= 1000 else '; the targets are for 1000'}):")
    print(f"  added p50 <= 2 ms:      {added['p50']} ms  {c.verdict(added['p50'], 2)}")
    print(f"  added p99 <= 20 ms:     {added['p99']} ms  {c.verdict(added['p99'], 20)}")
    idle, peak, pr = res["edgeproxy_rss_idle_mb"], res["edgeproxy_rss_peak_mb"], res["edgeproxy"]
    print(f"  RSS idle <= 60 MB:      {idle} MB  {c.verdict(idle, 60)}")
    print(f"  RSS holding <= 200 MB:  {peak} MB  {c.verdict(peak, 200)}")
    ok = c.verdict(pr["intact"], pr["streams"], le=False)
    print(f"  all streams intact:     {pr['intact']}/{pr['streams']}  {ok}")
    if "bare_proxy" in res:
        b, ba = res["bare_proxy"], res["bare_proxy"]["added_delay_ms"]
        print(f"  (bare_proxy reference: added p50 {ba['p50']} ms, p99 {ba['p99']} ms,"
              f" RSS peak {max(r['rss_peak_mb'] for r in b['runs'])} MB)")  # fmt: skip
    after = res["edgeproxy_after"]["listeners"]
    print(f"edgeproxy after the run (leak check): listeners {after}")
    print("CPU% per run: % of one core over the run, o=origin e=edgeproxy b=bare_proxy c=client (200 = both cores).")
    c.print_findings(res["edgeproxy_findings"])
    if res.get("died"):
        print("DIED DURING THE RUN:", res["died"])
    la1 = c.loadavg()
    print("noise:", c.noise_note(bg, la0, la1))
    res.update({"background_cpu": bg, "loadavg_before": la0, "loadavg_after": la1})
    c.final_json(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    ap.add_argument("--streams", type=int, help="concurrent streams (default 1000; quick 200)")
    ap.add_argument("--events", type=int, default=100, help="content events per stream")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between events (origin)")
    ap.add_argument("--stagger", type=float, default=0.5, help="stream starts spread over this many seconds")
    ap.add_argument("--repeat", type=int, help="rounds of direct/edgeproxy/bare, alternating (default 2; quick 1)")
    ap.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare_proxy reference")
    ap.add_argument("--pin", action="store_true", help="pin client+origin to CPU 0 and the proxy to CPU 1")
    a = ap.parse_args()
    a.streams = a.streams or (200 if a.quick else 1000)
    a.repeat = a.repeat or (1 if a.quick else 2)
    nofile = c.raise_nofile()
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(f"sse: loadavg before {la0}; background CPU {bg['busy_pct']}% busy, {bg['steal_pct']}% steal;", end="")
    print(f" RLIMIT_NOFILE {nofile}")
    res: Res = dict(bench="sse", quick=a.quick, streams=a.streams, events=a.events, interval_s=a.interval,
                    stagger_s=a.stagger, repeat=a.repeat, pinned=a.pin, nofile=nofile)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-sse-") as td, c.Procs() as procs:
        uvloop.run(bench(a, Path(td), procs, res))
    report(res, bg, la0)


if __name__ == "__main__":
    c.run_main(main)

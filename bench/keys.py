"""Key pools under per-key rate limits: does a 429 ever reach the client that did not have to?

One fake origin (a thread of this process) limits each of 3 API keys on its own, like the real
APIs: a token bucket of N requests per minute per key, refilled continuously, with OpenAI's
real-shaped x-ratelimit-* headers on every answer, 429 + Retry-After when a key is over, 401
for a revoked key. edgeproxy (a subprocess, one per run) holds the 3 keys in one endpoint's
pool. The load is open loop (each request starts on its schedule whatever the others do):
small non-stream chat requests from aiohttp.

Runs:
  spread     3 keys with full buckets (as after a quiet minute), 2.5 N req/min for --duration s.
  drained    the same load, but every key's bucket starts empty (other apps just used the keys):
             only the refill (N/min per key, 3 N together) carries the 2.5 N, so the pool has
             to follow each key's headroom closely.
             Anchors, same load, straight to the origin without edgeproxy: one key (what an app
             with one key gets) and naive round robin over the 3 keys (client-side rotation).
  revoked    3 keys, full buckets, 1.8 N req/min (two keys' worth: after the revocation two keys
             must carry it all); key #1 is revoked (401) half-way through.
  exhausted  3 keys limited to --exhausted-n req/min each (default 3: one request per 20 s per
             key), empty at start, 1 req/s (over 6x their joint capacity); failover.queue_timeout
             0.5 s: most clients get edgeproxy's 429. Each
             Retry-After (whole seconds) and retry-after-ms is compared with the true wait, the
             time until the origin would admit a request on some key again, read from the fake
             origin's buckets when the 429 arrives.

Targets (issue 7): spread and drained: no 429 reaches the client, each key's share within 20 %
of even; revoked: no client error after the first, the revoked key gets no traffic after its
first 401; exhausted: Retry-After within 20 % of the true wait.

Usage: flock /tmp/bench.lock .venv/bin/python bench/keys.py [--quick] [--n N] [--duration S]
(full: about 2.5 min; --quick: about 1.3 min). Output: a table, a noise note, and as the last
line one JSON object {"bench": "keys", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import uvloop

sys.path.insert(0, str(c.ROOT))
from tests.fakes.origin import FakeOrigin

EDGE_PY = c.EDGE_PY
KEYS = [f"sk-bench-{i}-{'x' * 24}" for i in range(3)]
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "keys bench"}]}).encode()
Res = dict[str, Any]


def start_edgeproxy(procs: c.Procs, tmp: Path, origin: str, name: str, queue_timeout: float) -> tuple[int, int]:
    port, admin = c.free_port(), c.free_port()
    cfg = tmp / f"edgeproxy-{name}.yaml"
    keys = ", ".join(f'{{key: "{k}", id: key{i}}}' for i, k in enumerate(KEYS))
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}\nlog: {{access: json}}\n"
        f'upstreams:\n  openai:\n    prefix: /v1\n    endpoints: [{{url: "{origin}/v1", keys: [{keys}]}}]\n'
        f"failover: {{queue_timeout: {queue_timeout}s}}\ndrain_timeout: 1s\n"
    )
    p = procs.start(f"edgeproxy-{name}", [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)],
                    log=tmp / f"edgeproxy-{name}.log", stdout=tmp / f"access-{name}.log")  # fmt: skip
    c.wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
    c.wait_port(port, p)
    return port, admin


class Load:
    """Open-loop requests at ``rate``/s for ``duration`` s; every answer is recorded."""

    def __init__(self, origin: FakeOrigin) -> None:
        self.origin = origin
        self.results: list[dict[str, Any]] = []

    async def one(self, s: aiohttp.ClientSession, url: str, key: str | None, t0: float) -> None:
        started = time.monotonic()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        row: dict[str, Any] = {"t": started - t0}
        try:
            async with s.post(url + "/v1/chat/completions", data=CHAT, headers=headers) as r:
                await r.read()
                row["status"] = r.status
                if r.status == 429:
                    row["true_wait"] = self.origin.next_accept_in()
                    row["retry_after"] = r.headers.get("Retry-After")
                    row["retry_after_ms"] = r.headers.get("retry-after-ms")
        except Exception as exc:  # a client error is a result here, not a crash
            row["status"] = f"exc:{type(exc).__name__}"
        row["latency"] = time.monotonic() - started
        self.results.append(row)

    async def run(
        self, url: str, rate: float, duration: float, keys: list[str | None], at: dict[float, Any] | None = None
    ) -> None:
        events = sorted((at or {}).items())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            t0 = time.monotonic()
            tasks = []
            for i in range(int(rate * duration)):
                due = t0 + i / rate
                while events and t0 + events[0][0] <= due:
                    await asyncio.sleep(max(0.0, t0 + events[0][0] - time.monotonic()))
                    events.pop(0)[1]()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                tasks.append(asyncio.ensure_future(self.one(s, url, keys[i % len(keys)], t0)))
            await asyncio.gather(*tasks)


def shares(origin: FakeOrigin) -> dict[str, Any]:
    served = [origin.key_served[k] for k in KEYS]
    total = sum(served) or 1
    even = total / len(KEYS)
    return {
        "served": served,
        "origin_429": [origin.key_limited[k] for k in KEYS],
        "max_dev_pct": round(100 * max(abs(n - even) / even for n in served), 1),
    }


def client_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = [r["status"] for r in rows]
    return {
        "requests": len(rows),
        "ok": statuses.count(200),
        "client_429": statuses.count(429),
        "other_errors": sum(1 for s in statuses if s not in (200, 429)),
        "p50_ms": round(1000 * statistics.median(r["latency"] for r in rows), 1) if rows else None,
        "max_ms": round(1000 * max(r["latency"] for r in rows), 1) if rows else None,
    }


def fresh(origin: FakeOrigin, n: int, drained: bool) -> None:
    origin.reset()
    origin.record = False
    origin.limit_keys(KEYS, requests=n, window=60.0)
    if drained:
        for limit in origin.key_limits.values():
            limit.level = 0.0


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> list[list[Any]]:
    origin = FakeOrigin()
    origin.start_in_thread()
    rows: list[list[Any]] = []
    try:
        rate = 2.5 * a.n / 60
        for name, drained in (("spread", False), ("drained", True)):
            port, _ = start_edgeproxy(procs, tmp, origin.url, name, 2.0)
            fresh(origin, a.n, drained)  # after start-up: its seconds would refill the buckets
            load = Load(origin)
            await load.run(f"http://127.0.0.1:{port}", rate, a.duration, [None])
            r = res[name] = {**client_counts(load.results), **shares(origin)}
            ok = r["client_429"] == 0 and r["other_errors"] == 0 and r["max_dev_pct"] <= 20
            rows.append([f"{name} via edgeproxy", f"2.5 N = {rate * 60:g}/min", r["client_429"], r["other_errors"],
                         "/".join(map(str, r["served"])), r["max_dev_pct"], sum(r["origin_429"]),
                         "PASS" if ok else "MISS"])  # fmt: skip
            print(f"  {name}: {r}", flush=True)
        for name, keys in (("anchor: 1 key direct", [KEYS[0]]), ("anchor: round robin direct", list(KEYS))):
            fresh(origin, a.n, True)
            load = Load(origin)
            await load.run(origin.url, rate, a.anchor_duration, keys)  # type: ignore[arg-type]
            r = res[name] = {**client_counts(load.results), **shares(origin)}
            served = "/".join(map(str, r["served"]))
            rows.append([f"drained, {name}", f"2.5 N = {rate * 60:g}/min", r["client_429"], r["other_errors"],
                         served, r["max_dev_pct"], sum(r["origin_429"]), "anchor"])  # fmt: skip
            print(f"  {name}: {r}", flush=True)

        # revoked: key1 revoked half-way through
        port, _ = start_edgeproxy(procs, tmp, origin.url, "revoked", 2.0)
        fresh(origin, a.n, False)
        load = Load(origin)
        rrate = 1.8 * a.n / 60
        mark: dict[str, Any] = {}

        def revoke() -> None:
            mark["t"] = time.monotonic()
            mark["served_before"] = origin.key_served[KEYS[1]]
            origin.revoked_keys.add(KEYS[1])

        await load.run(f"http://127.0.0.1:{port}", rrate, a.duration, [None], {a.duration / 2: revoke})
        r = res["revoked"] = {**client_counts(load.results), **shares(origin)}
        errs = [x for x in load.results if x["status"] != 200]
        r["errors_after_first"] = max(0, len(errs) - 1)
        r["revoked_key_tries"] = origin.key_refused[KEYS[1]]  # attempts with it after revocation
        r["revoked_key_served_after"] = origin.key_served[KEYS[1]] - mark.get("served_before", 0)
        ok = r["errors_after_first"] == 0 and r["revoked_key_tries"] <= 1
        rows.append(["revoked key1 at half-time", f"1.8 N = {rrate * 60:g}/min", r["client_429"], r["other_errors"],
                     "/".join(map(str, r["served"])), "-", sum(r["origin_429"]),
                     f"{'PASS' if ok else 'MISS'} (tries with key1 after: {r['revoked_key_tries']})"])  # fmt: skip
        print(f"  revoked: {r}", flush=True)

        # exhausted: everything rate-limited; compare Retry-After with the truth
        port, _ = start_edgeproxy(procs, tmp, origin.url, "exhausted", 0.5)
        fresh(origin, a.exhausted_n, True)
        load = Load(origin)
        erate = 1.0
        await load.run(f"http://127.0.0.1:{port}", erate, a.exhausted_duration, [None])
        r = res["exhausted"] = {**client_counts(load.results), **shares(origin)}
        limited = [x for x in load.results if x["status"] == 429 and x.get("retry_after_ms")]
        r["retry_after"] = retry_after_errors(limited)
        within = r["retry_after"]["ms_within_20pct"]
        load_text = f"{erate * 60:g}/min vs {3 * a.exhausted_n}/min"
        rows.append(["all keys exhausted", load_text, r["client_429"], r["other_errors"],
                     "/".join(map(str, r["served"])), "-", sum(r["origin_429"]),
                     f"{'PASS' if within == 1.0 else 'MISS'} (Retry-After within 20 %: ms {within:.0%}, "
                     f"s {r['retry_after']['s_within_20pct']:.0%})"])  # fmt: skip
        print(f"  exhausted: {r}", flush=True)
    finally:
        origin.stop_thread()
    return rows


def retry_after_errors(limited: list[dict[str, Any]]) -> dict[str, Any]:
    """How far the given waits were from the true ones (relative; true waits under 50 ms are
    compared in absolute terms, as a 20 % of nothing is noise)."""

    def err(given: float, true: float) -> float:
        return abs(given - true) / max(true, 0.05)

    ms = [err(float(x["retry_after_ms"]) / 1000, x["true_wait"]) for x in limited]
    s = [err(float(x["retry_after"]), x["true_wait"]) for x in limited]
    trues = sorted(x["true_wait"] for x in limited)
    return {
        "n": len(limited),
        "true_wait_s": {"p50": round(c.pct(trues, 50), 2), "max": round(trues[-1], 2)} if trues else None,
        "ms_err_p50_pct": round(100 * statistics.median(ms), 1) if ms else None,
        "ms_err_max_pct": round(100 * max(ms), 1) if ms else None,
        "ms_within_20pct": sum(e <= 0.2 for e in ms) / len(ms) if ms else float("nan"),
        "s_err_p50_pct": round(100 * statistics.median(s), 1) if s else None,
        "s_within_20pct": sum(e <= 0.2 for e in s) / len(s) if s else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (about 1.3 min)")
    ap.add_argument("--n", type=int, default=120, help="requests per minute per key at the origin (default 120)")
    ap.add_argument("--duration", type=float, help="seconds per edgeproxy run (default 30; quick 15)")
    ap.add_argument("--exhausted-n", type=int, default=3, help="per-key limit in the exhausted run (default 3/min)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, access logs)")
    a = ap.parse_args()
    a.duration = a.duration or (15.0 if a.quick else 30.0)
    a.anchor_duration = a.duration / 2
    a.exhausted_duration = 15.0 if a.quick else 25.0
    rev = subprocess.run(["git", "-C", str(c.ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    sys.setswitchinterval(0.0005)  # the origin thread shares the GIL with the load client
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(
        f"keys: 3 keys at one fake origin, each limited to N = {a.n} req/min (token bucket, refilled continuously, "
        f"OpenAI-shaped headers); {a.duration:g} s per run; edgeproxy {rev.stdout.strip()}; loadavg before {la0}",
        flush=True,
    )
    res: Res = dict(bench="keys", quick=a.quick, n_per_min=a.n, duration_s=a.duration,
                    exhausted_n_per_min=a.exhausted_n, loadavg_before=la0, background=bg,
                    revision=rev.stdout.strip() or None)  # fmt: skip
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        td = tempfile.mkdtemp(prefix="bench-keys-") if a.keep else stack.enter_context(tempfile.TemporaryDirectory())
        procs = stack.enter_context(c.Procs())
        rows = uvloop.run(bench(a, Path(td), procs, res))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    print()
    c.print_table(
        ["run", "load", "429 to client", "other errors", "served per key", "max share dev %", "origin 429s", "result"],
        rows,
    )
    ra = res["exhausted"]["retry_after"]
    print(
        f"exhausted: {ra['n']} 429s from edgeproxy; true wait p50 {ra['true_wait_s']}; retry-after-ms error p50 "
        f"{ra['ms_err_p50_pct']} %, max {ra['ms_err_max_pct']} %; Retry-After (whole seconds, rounded up) error p50 "
        f"{ra['s_err_p50_pct']} %. 'origin 429s' are answers edgeproxy absorbed (it switched keys), not seen by "
        "clients. Shares: requests the origin admitted per key."
    )
    print(c.noise_note(bg, la0, la1, "Anchors ran in the same run; the origin is a thread of the load process."))
    print(f"elapsed {res['elapsed_s']} s")
    if a.keep:
        print(f"kept: {td}")
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

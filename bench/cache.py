"""Response cache and request coalescing (issue 14): what a hit costs, what coalescing saves, Redis dying.

Starts two fake origins (`tests.fakes.origin`: latency 0 ms and 1 s; streams of --events chunks
with an interval so concurrent requests overlap), a redis-server (`--save "" --appendonly no`) and
two edgeproxies on free loopback ports:
  * edge-memory: `cache.store: memory`; upstreams /p0, /p1 (no cache) and /c0, /c1 (`cache: {ttl: 1h}`);
  * edge-redis:  `cache.store: redis://...`; upstreams /c0, /c1 (`cache: {ttl: 1h}`);
(/x0 goes to the 0 ms origin, /x1 to the 1 s one.) Access log (JSON, to a file) and metrics on.

1. Latency and throughput: the same small chat body again and again (every request after the first
   is a hit), variants plain (proxied, no cache) / memory hit / redis hit, alternating in rounds:
   sequential p50/p99 (one keep-alive raw-socket client, as in overhead.py: it costs little), then a
   concurrent pass (--clients, aiohttp with keep-alive) for req/s, and edgeproxy's CPU per request.
   Plain at the 1 s origin: only the concurrent pass, 50 clients.
2. Coalescing: 100 identical requests at once with a fresh key per round (JSON; SSE), per origin and
   store; then 50 + 50 with two credentials. Upstream calls from edgeproxy's
   `edgeproxy_attempts_total` for that upstream (and distinct chatcmpl-fake ids in the answers:
   the origin numbers its answers), answers compared byte for byte, SSE events checked in order.
3. Redis killed (SIGKILL) for 5 s under a steady open-loop stream of requests (repeats and new
   ones) through edge-redis: client errors, cache results while Redis is down, and the time from
   Redis's return to the first hit.

Targets: memory hit p50 <= 1/2 plain p50 (0 ms origin); redis hit p99 <= memory hit p99 + 1 ms;
hits p99 < 5 ms with the 1 s origin; coalescing: exactly 1 upstream call and 100 identical answers,
2 calls and no cross-serving with two tenants; Redis outage: 0 client errors, no hit while it is
down, hits again within 5 s of its return. Exit status 0 whatever the targets say.
Usage: .venv/bin/python bench/cache.py [--quick]   (bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import orjson
import uvloop

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
CHAT_PATH = "/chat/completions"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-a"}
VARIANTS = ("plain", "memory", "redis")
ORIGINS = ("0ms", "1s")


def chat(text: str, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You label support tickets. Answer with one word."},
            {"role": "user", "content": text},
        ],
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


# --------------------------------------------------------------------------- processes


def wait_redis(port: int, proc: c.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not answer PING within 10 s")


def start_edge(procs: c.Procs, tmp: Path, name: str, store: str, ups: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """edgeproxy with one upstream per entry of ``ups`` (name -> (origin url, cached)), prefix /name."""
    d = tmp / name
    d.mkdir()
    port, admin = c.free_port(), c.free_port()
    lines = [f"listen: 127.0.0.1:{port}", f"admin: {{listen: 127.0.0.1:{admin}}}", "log: {access: json}"]
    lines += [f'cache: {{store: "{store}"}}', "upstreams:"]
    for up, (origin, cached) in ups.items():
        extra = ", cache: {ttl: 1h}" if cached else ""
        lines.append(f'  {up}: {{prefix: /{up}, endpoints: [{{url: "{origin}/v1"}}]{extra}}}')
    lines += ["pool: {max_per_path: 2048}", "drain_timeout: 2s", ""]
    (cfg := d / "edgeproxy.yaml").write_text("\n".join(lines))
    p = procs.start(name, [c.PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=d / "edgeproxy.log",
                    stdout=d / "access.log")  # fmt: skip
    c.wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
    c.wait_port(port, p)
    return {"name": name, "proc": p, "port": port, "admin": admin, "dir": d, "url": f"http://127.0.0.1:{port}"}


# --------------------------------------------------------------------------- client


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.s = session

    async def post(self, url: str, body: bytes, headers: dict[str, str] = HEADERS) -> tuple[int, str, bytes, float]:
        """(status, x-edgeproxy-cache, body, seconds); status 0 for a socket error."""
        t0 = time.perf_counter()
        try:
            async with self.s.post(url, data=body, headers=headers) as r:
                data = await r.read()
                return r.status, r.headers.get("x-edgeproxy-cache", "-"), data, time.perf_counter() - t0
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return 0, f"error:{type(e).__name__}", b"", time.perf_counter() - t0

    async def attempts(self, admin: int, upstream: str) -> float:
        async with self.s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
        return sum(v for n, lab, v in c.metric_samples(text)
                   if n.startswith("edgeproxy_attempts") and lab.get("upstream") == upstream)  # fmt: skip

    async def metric(self, admin: int, prefix: str) -> dict[str, float]:
        async with self.s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
        out: Counter[str] = Counter()
        for n, lab, v in c.metric_samples(text):
            if n.startswith(prefix):
                out[",".join(f"{k}={lab[k]}" for k in sorted(lab))] += v
        return dict(out)


# --------------------------------------------------------------------------- 1. latency and throughput


class RawConn:
    """A blocking keep-alive HTTP/1.1 client (as in overhead.py): one prebuilt POST, exactly one response
    read, so the client costs little and the same for every variant. Returns (status, x-edgeproxy-cache)."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        self.req = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        self.req_bytes = self.req.encode() + body
        self.buf = b""

    def _recv(self) -> bytes:
        if not (d := self.s.recv(65536)):
            raise ConnectionError("server closed the connection")
        return d

    def roundtrip(self) -> tuple[int, str]:
        self.s.sendall(self.req_bytes)
        buf = self.buf
        while (i := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head, rest = buf[:i].lower(), buf[i + 4 :]
        j = head.find(b"\r\ncontent-length:")
        if j < 0:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        e = head.find(b"\r\n", j + 2)
        n = int(head[j + 17 : e if e >= 0 else None])
        while len(rest) < n:
            rest += self._recv()
        self.buf = rest[n:]
        k = head.find(b"\r\nx-edgeproxy-cache:")
        cache = "-"
        if k >= 0:
            end = head.find(b"\r\n", k + 2)
            cache = head[k + 20 : end if end >= 0 else None].strip().decode()
        return int(head[9:12]), cache

    def close(self) -> None:
        self.s.close()


def sequential(conn: RawConn, n: int, lat: list[float], res: Counter[str]) -> int:
    errors, clock = 0, time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        st, cache = conn.roundtrip()
        lat.append((clock() - t0) / 1e6)
        res[cache] += 1
        errors += st != 200
    return errors


async def concurrent(cl: Client, url: str, body: bytes, n: int, clients: int, lat: list[float],
                     res: Counter[str]) -> tuple[int, float]:  # fmt: skip
    left, errors = [n], [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            st, cache, _, dt = await cl.post(url, body)
            lat.append(dt * 1000)
            res[cache] += 1
            errors[0] += st != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return errors[0], time.perf_counter() - t0


async def latency_row(cl: Client, edges: dict[str, dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o, origin in enumerate(ORIGINS):
        body = chat(f"Ticket 1 via the {origin} origin: my invoice shows the wrong VAT number.")
        where = {"plain": (edges["memory"], f"/p{o}"), "memory": (edges["memory"], f"/c{o}"),
                 "redis": (edges["redis"], f"/c{o}")}  # fmt: skip
        slow_plain = origin == "1s"
        acc = {v: {"seq": [], "load": [], "res": Counter(), "errors": 0, "secs": 0.0, "n": 0, "cpu": 0.0}
               for v in VARIANTS}  # fmt: skip
        conns: dict[str, RawConn] = {}
        for v, (e, prefix) in where.items():  # warm-up: the first request is the miss that fills the cache
            url = e["url"] + prefix + CHAT_PATH
            if slow_plain and v == "plain":
                await concurrent(cl, url, body, 20, 20, [], Counter())
            else:
                conns[v] = RawConn(e["port"], prefix + CHAT_PATH, body)
                sequential(conns[v], a.warmup, [], Counter())
                await concurrent(cl, url, body, a.warmup, a.clients, [], Counter())
        await asyncio.sleep(0.2)
        print(f"latency @{origin}: {a.rounds} rounds x {len(VARIANTS)} variants...", flush=True)
        for r in range(a.rounds):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for v in order:
                e, prefix = where[v]
                url, x = e["url"] + prefix + CHAT_PATH, acc[v]
                gc.disable()
                try:
                    if v in conns:
                        x["errors"] += sequential(conns[v], a.n_seq // a.rounds, x["seq"], x["res"])
                    n, k = (100, 50) if slow_plain and v == "plain" else (a.n_load // a.rounds, a.clients)
                    cpu0 = c.cpu_seconds(e["proc"].pid)
                    err, secs = await concurrent(cl, url, body, n, k, x["load"], x["res"])
                    x["cpu"] += c.cpu_seconds(e["proc"].pid) - cpu0
                finally:
                    gc.enable()
                x["errors"] += err
                x["secs"] += secs
                x["n"] += n
        for conn in conns.values():
            conn.close()
        rows = {}
        for v, x in acc.items():
            s, ld = c.summarize(x["seq"]), c.summarize(x["load"])
            rows[v] = {
                "seq_ms": {k: round(s[k], 3) for k in ("p50", "p99", "max", "n")} if x["seq"] else None,
                "load_ms": {k: round(ld[k], 3) for k in ("p50", "p99", "max", "n")},
                "clients": 50 if slow_plain and v == "plain" else a.clients,
                "rps": round(x["n"] / x["secs"], 1),
                "edge_cpu_us_per_req": round(1e6 * x["cpu"] / x["n"], 1),
                "edge_cpu_pct": round(100 * x["cpu"] / x["secs"], 1),
                "errors": x["errors"],
                "cache": dict(x["res"]),
            }
        out[origin] = rows
    return out


# --------------------------------------------------------------------------- 2. coalescing


def sse_check(data: bytes, events: int) -> str | None:
    """None if the stream is whole and in order: role chunk, content chunks, finish chunk, [DONE]."""
    frames = [f for f in data.split(b"\n\n") if f.strip()]
    if not frames or frames[-1].strip() != b"data: [DONE]":
        return "no [DONE] at the end"
    objs = [orjson.loads(f[len(b"data: ") :]) for f in frames[:-1]]
    if len(objs) != events + 2:
        return f"{len(objs)} events, expected {events + 2}"
    if objs[0]["choices"][0]["delta"].get("role") != "assistant" or objs[-1]["choices"][0]["finish_reason"] != "stop":
        return "role chunk / finish chunk out of place"
    if len({o["id"] for o in objs}) != 1:
        return "events from two answers"
    return None


def answer_id(data: bytes) -> str:
    i = data.find(b"chatcmpl-fake")
    return data[i : i + 21].decode() if i >= 0 else "?"


async def coalesce_once(cl: Client, edge: dict[str, Any], up: str, kind: str, tenants: int, n: int,
                        events: int) -> dict[str, Any]:  # fmt: skip
    nonce = uuid.uuid4().hex[:12]
    body = chat(f"Classify ticket {nonce}: the app crashes when I upload a photo.", stream=kind == "sse")
    url = edge["url"] + f"/{up}" + CHAT_PATH
    who = [f"Bearer sk-tenant-{'ab'[i % tenants]}" for i in range(n)]
    before = await cl.attempts(edge["admin"], up)
    errs0 = sum((await cl.metric(edge["admin"], "edgeproxy_cache_store_errors")).values())
    results = await asyncio.gather(*(cl.post(url, body, {**HEADERS, "Authorization": w}) for w in who))
    await asyncio.sleep(0.05)
    calls = await cl.attempts(edge["admin"], up) - before
    store_errors = sum((await cl.metric(edge["admin"], "edgeproxy_cache_store_errors")).values()) - errs0
    groups: dict[str, set[bytes]] = {}
    for w, (_st, _cache, data, _dt) in zip(who, results, strict=True):
        groups.setdefault(w, set()).add(data)
    ids = {w: {answer_id(d) for d in g} for w, g in groups.items()}
    bad_sse = [e for r in results if kind == "sse" and r[0] == 200 and (e := sse_check(r[2], events))]
    distinct_ids = {i for s in ids.values() for i in s}
    ok_answers = (all(r[0] == 200 for r in results) and all(len(g) == 1 for g in groups.values())
                  and len(distinct_ids) == tenants and not bad_sse)  # fmt: skip
    return {
        "calls": int(calls),
        "store_errors": int(store_errors),
        "distinct_ids": len(distinct_ids),
        "statuses": dict(Counter(r[0] for r in results)),
        "cache": dict(Counter(r[1] for r in results)),
        "identical_per_tenant": all(len(g) == 1 for g in groups.values()),
        "sse_problems": bad_sse[:3],
        "max_ms": round(max(r[3] for r in results) * 1000, 1),
        "met": ok_answers and calls == tenants,
    }


async def coalesce_row(cl: Client, edges: dict[str, dict[str, Any]], a: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for o, origin in enumerate(ORIGINS):
        for tenants in (1, 2):
            for kind in ("json", "sse"):
                for store in ("memory", "redis"):
                    runs = [await coalesce_once(cl, edges[store], f"c{o}", kind, tenants, a.coalesce, a.events)
                            for _ in range(a.coalesce_rounds)]  # fmt: skip
                    cache: Counter[str] = Counter()
                    for r in runs:
                        cache.update(r["cache"])
                    cells.append({
                        "origin": origin, "tenants": tenants, "kind": kind, "store": store, "runs": runs,
                        "calls": [r["calls"] for r in runs], "ids": [r["distinct_ids"] for r in runs],
                        "cache": dict(cache), "met": all(r["met"] for r in runs),
                        "store_errors": sum(r["store_errors"] for r in runs),
                    })  # fmt: skip
        print(f"coalescing @{origin} done", flush=True)
    return cells


# --------------------------------------------------------------------------- 3. Redis killed


async def outage_row(cl: Client, edge: dict[str, Any], redis: dict[str, Any], procs: c.Procs,
                     a: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    url = edge["url"] + "/c0" + CHAT_PATH
    popular = [chat(f"Outage ticket {i}: where is my parcel?") for i in range(10)]
    rng = random.Random(14)
    recs: list[tuple[float, bool, int, str, float]] = []  # (start, repeat, status, cache, ms)
    tasks: set[asyncio.Task[None]] = set()
    errs0 = await cl.metric(edge["admin"], "edgeproxy_cache_store_errors")
    cpu0 = c.cpu_seconds(edge["proc"].pid)
    t0 = time.monotonic()

    async def one(start: float, repeat: bool, body: bytes) -> None:
        st, cache, _, dt = await cl.post(url, body)
        recs.append((start, repeat, st, cache, dt * 1000))

    def fire(until: float) -> Any:
        async def run() -> None:
            k = 0
            while (now := time.monotonic() - t0) < until:
                repeat = rng.random() < 0.7
                body = rng.choice(popular) if repeat else chat(f"Outage ticket {uuid.uuid4().hex}: new one")
                task = asyncio.ensure_future(one(now, repeat, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
                await asyncio.sleep(max(0.0, t0 + k / a.rate - time.monotonic()))

        return run()

    total = a.before + a.down + a.after
    print(f"redis outage: {a.rate}/s for {total:g}s, redis killed at {a.before:g}s for {a.down:g}s...", flush=True)
    loader = asyncio.ensure_future(fire(total))
    await asyncio.sleep(a.before)
    kill_t = time.monotonic() - t0
    redis["proc"].kill()
    await asyncio.to_thread(redis["proc"].wait)
    await asyncio.sleep(a.down)
    redis["proc"] = procs.start("redis", redis["argv"], log=redis["dir"] / "redis-2.log")
    await asyncio.to_thread(wait_redis, redis["port"], redis["proc"])
    back_t = time.monotonic() - t0
    await loader
    await asyncio.gather(*list(tasks))
    cpu = c.cpu_seconds(edge["proc"].pid) - cpu0
    errs1 = await cl.metric(edge["admin"], "edgeproxy_cache_store_errors")

    def window(lo: float, hi: float) -> dict[str, Any]:
        rs = [r for r in recs if lo <= r[0] < hi]
        lat = c.summarize([r[4] for r in rs])
        return {"n": len(rs), "errors": sum(r[2] != 200 for r in rs), "cache": dict(Counter(r[3] for r in rs)),
                "p50_ms": round(lat["p50"], 2), "p99_ms": round(lat["p99"], 2)}  # fmt: skip

    hits_after = sorted(r[0] for r in recs if r[0] >= back_t and r[3] == "hit")
    late = [r for r in recs if r[0] >= total - 2 and r[1]]
    return {
        "rate": a.rate, "kill_at_s": round(kill_t, 2), "back_at_s": round(back_t, 2),
        "down_s": round(back_t - kill_t, 2),
        "before": window(0, kill_t), "down": window(kill_t, back_t), "after": window(back_t, total + 1),
        "errors": sum(r[2] != 200 for r in recs), "requests": len(recs),
        "recovery_s": round(hits_after[0] - back_t, 2) if hits_after else None,
        "repeat_hit_ratio_last_2s": round(sum(r[3] == "hit" for r in late) / len(late), 3) if late else None,
        "store_errors": {k: v - errs0.get(k, 0) for k, v in errs1.items()},
        "edge_cpu_pct": round(100 * cpu / total, 1),
    }  # fmt: skip


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 1 min)")
    ap.add_argument("--rounds", type=int, help="alternating rounds of the latency row (default 4; quick 2)")
    ap.add_argument("--n-seq", type=int, help="sequential requests per variant (default 3000; quick 600)")
    ap.add_argument("--n-load", type=int, help="concurrent-pass requests per variant (default 6000; quick 1200)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients of the load pass")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--coalesce", type=int, default=100, help="identical requests at once")
    ap.add_argument("--coalesce-rounds", type=int, help="rounds per coalescing cell (default 3; quick 1)")
    ap.add_argument("--events", type=int, default=20, help="content chunks per origin stream")
    ap.add_argument("--rate", type=float, default=200, help="requests/s during the Redis outage row")
    ap.add_argument("--down", type=float, default=5.0, help="seconds Redis stays killed")
    a = ap.parse_args()
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.n_seq = a.n_seq or (600 if a.quick else 3000)
    a.n_load = a.n_load or (1200 if a.quick else 6000)
    a.coalesce_rounds = a.coalesce_rounds or (1 if a.quick else 3)
    a.before, a.after = (2.0, 6.0) if a.quick else (3.0, 8.0)
    c.raise_nofile()
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(f"cache: loadavg before {la0}; background CPU {bg['busy_pct']}% busy, {bg['steal_pct']}% steal")
    res: dict[str, Any] = {"bench": "cache", "quick": a.quick, "rounds": a.rounds, "n_seq": a.n_seq,
                           "n_load": a.n_load, "clients": a.clients, "coalesce": a.coalesce,
                           "coalesce_rounds": a.coalesce_rounds, "events": a.events}  # fmt: skip
    src = subprocess.run([c.PY, "-c", "import edgeproxy; print(edgeproxy.__file__)"], cwd=c.ROOT,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    res["edgeproxy_source"] = src
    print(f"edgeproxy from {src}")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as td, c.Procs() as procs:
        tmp = Path(td)
        o0, o1 = c.free_port(), c.free_port()
        c.start_fake_origin(procs, tmp, o0, "--events", str(a.events), "--event-interval", "0.01")
        c.start_fake_origin(procs, tmp, o1, "--latency", "1", "--events", str(a.events), "--event-interval", "0.025")
        u0, u1 = f"http://127.0.0.1:{o0}", f"http://127.0.0.1:{o1}"
        rport = c.free_port()
        argv = [REDIS, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", td]
        redis = {"argv": argv, "port": rport, "dir": tmp, "proc": procs.start("redis", argv, log=tmp / "redis.log")}
        wait_redis(rport, redis["proc"])
        edges = {
            "memory": start_edge(procs, tmp, "edge-memory", "memory",
                                 {"p0": (u0, False), "c0": (u0, True), "p1": (u1, False), "c1": (u1, True)}),
            "redis": start_edge(procs, tmp, "edge-redis", f"redis://127.0.0.1:{rport}/0",
                                {"c0": (u0, True), "c1": (u1, True)}),
        }  # fmt: skip
        res["origins"] = {"0ms": "--latency 0 --event-interval 0.01", "1s": "--latency 1 --event-interval 0.025"}

        async def run() -> None:
            conn = aiohttp.TCPConnector(limit=0, force_close=False)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
                cl = Client(s)
                res["latency"] = await latency_row(cl, edges, a)
                res["coalescing"] = await coalesce_row(cl, edges, a)
                res["outage"] = await outage_row(cl, edges["redis"], redis, procs, a)

        uvloop.run(run())
        res["died"] = [d for d in procs.died() if not d.startswith("redis")]
        for e in edges.values():
            procs.stop(e["proc"])
        res["findings"] = {}
        for k, e in edges.items():
            for f in ("access.log", "edgeproxy.log"):
                shutil.copy(e["dir"] / f, tmp / f)
            res["findings"][k] = c.edgeproxy_findings(tmp)
    res.update(background_cpu=bg, loadavg_before=la0)
    report(res)


def report(res: dict[str, Any]) -> None:
    lat, co, out = res["latency"], res["coalescing"], res["outage"]
    print("\n1. latency and throughput (same body; every request after the first is a hit)")
    rows = []
    for origin, vs in lat.items():
        for v, r in vs.items():
            s, ld = r["seq_ms"], r["load_ms"]
            rows.append([f"@{origin} {v}", f"{s['p50']:.2f}" if s else None, f"{s['p99']:.2f}" if s else None,
                         f"{ld['p50']:.2f}/{ld['p99']:.2f}", r["clients"], f"{r['rps']:.0f}",
                         r["edge_cpu_us_per_req"], r["edge_cpu_pct"], r["errors"],
                         " ".join(f"{k}:{n}" for k, n in sorted(r["cache"].items()))])  # fmt: skip
    c.print_table(["origin variant", "seq p50 ms", "seq p99 ms", "load p50/p99 ms", "clients", "req/s",
                   "edge CPU µs/req", "edge CPU %", "errors", "x-edgeproxy-cache"], rows)  # fmt: skip

    print(f"\n2. coalescing: {res['coalesce']} identical requests at once, fresh key per round"
          f" ({res['coalesce_rounds']} rounds per cell; tenants 2 = 50 + 50 with two credentials)")  # fmt: skip
    rows = []
    for cell in co:
        probs = [p for r in cell["runs"] for p in r["sse_problems"]]
        ident = all(r["identical_per_tenant"] for r in cell["runs"])
        statuses: Counter[int] = Counter()
        for r in cell["runs"]:
            statuses.update(r["statuses"])
        rows.append([f"@{cell['origin']} {cell['kind']} {cell['store']}", cell["tenants"],
                     ",".join(map(str, cell["calls"])), ",".join(map(str, cell["ids"])),
                     "yes" if ident else "NO", ",".join(f"{k}:{n}" for k, n in sorted(statuses.items())),
                     "; ".join(probs[:1]) or "ok" if cell["kind"] == "sse" else "-",
                     " ".join(f"{k}:{n}" for k, n in sorted(cell["cache"].items())),
                     cell["store_errors"], max(r["max_ms"] for r in cell["runs"]), met(cell["met"])])  # fmt: skip
    c.print_table(["cell", "tenants", "upstream calls", "answer ids", "identical", "statuses", "SSE order",
                   "x-edgeproxy-cache", "store errors", "slowest ms", "target"], rows)  # fmt: skip

    print(f"\n3. Redis killed for {out['down_s']} s under {out['rate']:g} req/s (70 % repeats of 10 bodies, 30 % new)")
    rows = [[w, out[w]["n"], out[w]["errors"], out[w]["p50_ms"], out[w]["p99_ms"],
             " ".join(f"{k}:{n}" for k, n in sorted(out[w]["cache"].items()))]
            for w in ("before", "down", "after")]  # fmt: skip
    c.print_table(["window", "requests", "client errors", "p50 ms", "p99 ms", "x-edgeproxy-cache"], rows)
    print(f"recovery: first hit {out['recovery_s']} s after Redis answered PING again; repeats hit in the last 2 s:"
          f" {out['repeat_hit_ratio_last_2s']}; store errors counted: {out['store_errors']};"
          f" edge CPU {out['edge_cpu_pct']} %")  # fmt: skip

    z, one = lat["0ms"], lat["1s"]
    t = []
    mem_half = z["plain"]["seq_ms"]["p50"] / 2
    t.append(
        (
            "memory hit p50 <= 1/2 plain p50 (@0ms)",
            f"{z['memory']['seq_ms']['p50']:.2f} vs {mem_half:.2f} ms",
            z["memory"]["seq_ms"]["p50"] <= mem_half,
        )
    )
    lim = z["memory"]["seq_ms"]["p99"] + 1
    t.append(
        (
            "redis hit p99 <= memory hit p99 + 1 ms (@0ms)",
            f"{z['redis']['seq_ms']['p99']:.2f} vs {lim:.2f} ms",
            z["redis"]["seq_ms"]["p99"] <= lim,
        )
    )
    worst = max(one["memory"]["seq_ms"]["p99"], one["redis"]["seq_ms"]["p99"])
    t.append(("hits p99 < 5 ms (@1s origin, memory and redis)", f"{worst:.2f} ms", worst < 5))
    for tenants in (1, 2):
        cells = [x for x in co if x["tenants"] == tenants]
        bad = [f"@{x['origin']} {x['kind']} {x['store']}" for x in cells if not x["met"]]
        name = ("1 upstream call, 100 identical answers" if tenants == 1
                else "2 tenants: 2 calls, no cross-serving")  # fmt: skip
        t.append((name, f"{len(cells) - len(bad)}/{len(cells)} cells" + (f" (missed: {', '.join(bad)})" if bad else ""),
                  not bad))  # fmt: skip
    t.append(("redis outage: 0 client errors", str(out["errors"]), out["errors"] == 0))
    down_hits = out["down"]["cache"].get("hit", 0)
    t.append(
        ("redis outage: no hit while down (bypass/miss)", f"{down_hits} hits; {out['down']['cache']}", down_hits == 0)
    )
    rec = out["recovery_s"]
    t.append(("redis back: hits again within 5 s", f"{rec} s", rec is not None and rec <= 5))
    print("\ntargets:")
    c.print_table(["target", "observed", "result"], [[n, o, met(ok)] for n, o, ok in t])
    res["targets"] = {n: ok for n, _, ok in t}
    for k, f in res["findings"].items():
        print(f"{k}: ", end="")
        c.print_findings(f)
    print("(edge-redis logs a warning when Redis goes away and when it is back: expected)")
    if res["died"]:
        print("DIED DURING THE RUN:", res["died"])
    res["loadavg_after"] = c.loadavg()
    print("noise:", c.noise_note(res["background_cpu"], res["loadavg_before"], res["loadavg_after"],
                                 "Variants alternated in rounds in the same run."))  # fmt: skip
    c.final_json(res)


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


if __name__ == "__main__":
    c.run_main(main)

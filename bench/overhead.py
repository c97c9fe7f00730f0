"""Per-request overhead of edgeproxy vs. direct-to-origin and vs. a bare aiohttp proxy.

Origin: nginx returning a fixed ~250-byte chat.completion (the fake origin if nginx is missing).
  * sequential latency: one keep-alive raw-socket client, POST of a ~1 KB chat body;
    the three targets are interleaved in rounds so drift in machine noise hits all alike;
  * throughput: wrk -t1 -c32 (an aiohttp load generator if wrk is missing);
  * edgeproxy's (and the bare proxy's) RSS: idle, after the sequential run, peak under wrk, after.
Usage: .venv/bin/python bench/overhead.py [--quick]   (bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

PATH = "/v1/chat/completions"
_SYSTEM = "You are a careful assistant for a logistics company. Answer briefly and cite the order id. " * 8
BODY = json.dumps(
    {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": _SYSTEM.strip()},
            {"role": "user", "content": "Where is order 48213? It was due on Tuesday and the tracking page is empty. "
             "Please check the warehouse scan history and tell me the expected delivery date."},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "user": "bench-user-0001",
    }
)  # fmt: skip
REPLY_TEXT = "Order 48213 is due Thursday."
REPLY = json.dumps(
    {"id": "chatcmpl-b01", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY_TEXT}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 212, "completion_tokens": 8, "total_tokens": 220}},
    separators=(",", ":"),
)  # fmt: skip


class RawConn:
    """A blocking keep-alive HTTP/1.1 client: sends one prebuilt request, reads exactly one response."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.req = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer sk-bench\r\nContent-Length: {len(BODY)}\r\n\r\n{BODY}"
        ).encode()
        self.buf = b""

    def _recv(self) -> bytes:
        if not (d := self.s.recv(65536)):
            raise ConnectionError("server closed the connection")
        return d

    def roundtrip(self) -> int:
        self.s.sendall(self.req)
        buf = self.buf
        while (i := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head, rest = buf[:i].lower(), buf[i + 4 :]
        if (j := head.find(b"\r\ncontent-length:")) >= 0:
            e = head.find(b"\r\n", j + 2)
            n = int(head[j + 17 : e if e >= 0 else None])
            while len(rest) < n:
                rest += self._recv()
            self.buf = rest[n:]
        elif b"transfer-encoding: chunked" in head:
            while True:
                while (k := rest.find(b"\r\n")) < 0:
                    rest += self._recv()
                size = int(rest[:k].split(b";")[0], 16)
                while len(rest) < k + size + 4:
                    rest += self._recv()
                rest = rest[k + size + 4 :]
                if size == 0:
                    break
            self.buf = rest
        else:
            raise RuntimeError(f"response without length: {head[:200]!r}")
        return int(head[9:12])

    def close(self) -> None:
        self.s.close()


def seq_latency(targets: dict[str, int], warmup: int, n: int, rounds: int) -> dict[str, dict[str, Any]]:
    conns = {name: RawConn(port) for name, port in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    non200 = dict.fromkeys(targets, 0)
    names = list(targets)
    gc.disable()
    try:
        for name in names:
            for _ in range(warmup):
                conns[name].roundtrip()
        per = max(1, n // rounds)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                conn, out, clock = conns[name], samples[name], time.perf_counter_ns
                for _ in range(per):
                    t0 = clock()
                    st = conn.roundtrip()
                    out.append((clock() - t0) / 1000)
                    if st != 200:
                        non200[name] += 1
    finally:
        gc.enable()
        for conn in conns.values():
            conn.close()
    return {name: {**c.summarize(samples[name]), "non200": non200[name]} for name in names}


WRK_LUA = """wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
done = function(s, lat, req)
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"sock_errors":%%d,'
    .. '"p50_ms":%%.3f,"p90_ms":%%.3f,"p99_ms":%%.3f,"max_ms":%%.3f}\\n', s.requests, s.duration, s.errors.status,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout, lat:percentile(50) / 1000,
    lat:percentile(90) / 1000, lat:percentile(99) / 1000, lat.max / 1000))
end
"""


def wrk(port: int, seconds: float, conns: int, lua: Path) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(lua)]
    argv.append(f"http://127.0.0.1:{port}{PATH}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(m.group(1))
    r["rps"] = round(r["requests"] / (r["duration_us"] / 1e6), 1)
    return r


def aio_load(port: int, seconds: float, conns: int) -> dict[str, Any]:
    """Fallback load generator when wrk is missing (it costs far more CPU than wrk: lower ceiling)."""
    import aiohttp
    import uvloop

    async def run() -> dict[str, Any]:
        lat: list[float] = []
        bad = [0]
        url, hdrs = f"http://127.0.0.1:{port}{PATH}", {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
            end = time.monotonic() + seconds

            async def worker() -> None:
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    async with s.post(url, data=BODY, headers=hdrs) as r:
                        await r.read()
                        bad[0] += r.status >= 400
                    lat.append((time.perf_counter() - t0) * 1000)

            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(conns)))
            dur = time.monotonic() - t0
        sm = c.summarize(lat)
        return {"requests": len(lat), "rps": round(len(lat) / dur, 1), "non2xx": bad[0], "sock_errors": 0,
                "p50_ms": sm["p50"], "p90_ms": sm["p90"], "p99_ms": sm["p99"], "max_ms": sm["max"]}  # fmt: skip

    return uvloop.run(run())


def load(port: int, seconds: float, conns: int, lua: Path, pid: int | None) -> dict[str, Any]:
    """One load run; while it runs, sample the proxy's RSS (peak) and CPU share."""
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while pid and not stop.wait(0.1):
            peak[0] = max(peak[0], c.rss_mb(pid) or 0.0)

    t = threading.Thread(target=sample, daemon=True)
    cpu0, w0 = c.cpu_seconds(pid) if pid else 0.0, time.monotonic()
    t.start()
    try:
        r = wrk(port, seconds, conns, lua) if shutil.which("wrk") else aio_load(port, seconds, conns)
    finally:
        stop.set()
        t.join()
    if pid:
        r["proxy_cpu_pct"] = round(100 * (c.cpu_seconds(pid) - cpu0) / (time.monotonic() - w0), 1)
        r["proxy_rss_peak_mb"] = peak[0]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    ap.add_argument("-n", type=int, help="sequential requests per target (default 3000; quick 1000)")
    ap.add_argument("--warmup", type=int, help="sequential warm-up requests per target (default 300; quick 100)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the sequential test")
    ap.add_argument("--duration", type=float, help="wrk seconds per target (default 10; quick 3)")
    ap.add_argument("--connections", type=int, default=32)
    a = ap.parse_args()
    n, warmup = a.n or (1000 if a.quick else 3000), a.warmup or (100 if a.quick else 300)
    dur, warm_dur = a.duration or (3.0 if a.quick else 10.0), 1.0 if a.quick else 2.0
    c.raise_nofile()
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(f"overhead: loadavg before {la0}; background CPU {bg['busy_pct']}% busy, {bg['steal_pct']}% steal")
    res: dict[str, Any] = dict(bench="overhead", quick=a.quick, n=n, warmup=warmup, rounds=a.rounds, wrk_seconds=dur)
    res.update(connections=a.connections, body_bytes=len(BODY), reply_bytes=len(REPLY))
    res["load_tool"] = "wrk" if shutil.which("wrk") else "aiohttp"
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as td, c.Procs() as procs:
        tmp = Path(td)
        oport = c.free_port()
        if Path(c.NGINX).exists():
            c.start_nginx(procs, tmp, oport, REPLY)
            res["origin"] = "nginx"
        else:
            c.start_fake_origin(procs, tmp, oport, "--reply", REPLY_TEXT)
            res["origin"] = "fake (tests.fakes.origin)"
        origin = f"http://127.0.0.1:{oport}"
        edge, eport, admin = c.start_edgeproxy(procs, tmp, origin)
        bare, bport = c.start_bare(procs, tmp, origin)
        targets = {"direct": oport, "edgeproxy": eport, "bare_proxy": bport}
        pids = {"edgeproxy": edge.pid, "bare_proxy": bare.pid}
        time.sleep(1.0)
        rss: dict[str, dict[str, Any]] = {k: {"idle_mb": c.rss_mb(p)} for k, p in pids.items()}
        print(f"origin={res['origin']} at {origin}; sequential {n} requests x 3 targets (+{warmup} warm-up each)...")
        seq = seq_latency(targets, warmup, n, a.rounds)
        for k, p in pids.items():
            rss[k]["after_seq_mb"] = c.rss_mb(p)
        (lua := tmp / "post.lua").write_text(WRK_LUA % BODY)
        thr: dict[str, dict[str, Any]] = {}
        for name, port in targets.items():
            print(f"load {name}: {a.connections} connections, {warm_dur:g}s warm-up + {dur:g}s...", flush=True)
            load(port, warm_dur, a.connections, lua, None)
            thr[name] = load(port, dur, a.connections, lua, pids.get(name))
        time.sleep(1.0)
        for k, p in pids.items():
            rss[k]["after_load_mb"] = c.rss_mb(p)
            rss[k]["peak_load_mb"] = thr[k].pop("proxy_rss_peak_mb")
        res["edgeproxy_after"] = c.edgeproxy_status(admin)
        res["died"] = procs.died()
        procs.stop(edge)  # so that its logs are complete
        res["edgeproxy_findings"] = c.edgeproxy_findings(tmp)
    res.update(seq_us=seq, load=thr, rss_mb=rss, background_cpu=bg, loadavg_before=la0)
    report(res)


def report(res: dict[str, Any]) -> None:
    seq, thr, rss = res["seq_us"], res["load"], res["rss_mb"]
    d = seq["direct"]
    for name, s in seq.items():
        if name != "direct":
            s["added_p50"], s["added_p90"], s["added_p99"] = (round(s[p] - d[p], 1) for p in ("p50", "p90", "p99"))
    print()
    rows = []
    for name, s in seq.items():
        t, r = thr[name], rss.get(name, {})
        mem = f"{r['idle_mb']} / {r['after_load_mb']} (peak {r['peak_load_mb']})" if r else None
        errors = t["non2xx"] + t["sock_errors"] + s["non200"]
        rows.append([name, f"{s['p50']:.0f}", f"{s['p90']:.0f}", f"{s['p99']:.0f}", s.get("added_p50"),
                     s.get("added_p99"), f"{t['rps']:.0f}", f"{t['p50_ms']:.2f}/{t['p99_ms']:.2f}",
                     t.get("proxy_cpu_pct"), errors, mem])  # fmt: skip
    c.print_table(["target", "seq p50 µs", "p90 µs", "p99 µs", "added p50", "added p99", f"req/s @{res['connections']}",
                   "load p50/p99 ms", "proxy CPU%", "errors", "RSS MB idle / after (peak)"], rows)  # fmt: skip
    e, et, b = seq["edgeproxy"], thr["edgeproxy"], seq["bare_proxy"]
    print("\ntargets (edgeproxy):")
    print(f"  added p50 <= 150 µs: {e['added_p50']:.0f} µs  {c.verdict(e['added_p50'], 150)}")
    print(f"  added p99 <= 400 µs: {e['added_p99']:.0f} µs  {c.verdict(e['added_p99'], 400)}")
    print(f"  >= 8000 req/s @32:   {et['rps']:.0f}  {c.verdict(et['rps'], 8000, le=False)}")
    print(f"  (bare_proxy reference: added p50 {b['added_p50']:.0f} µs, p99 {b['added_p99']:.0f} µs,"
          f" {thr['bare_proxy']['rps']:.0f} req/s)")  # fmt: skip
    print("errors = non-2xx + socket errors (wrk) + non-200 (sequential).")
    print("load tool:", res["load_tool"], "(-t1, one thread, sharing the 2 cores with proxy and origin)")
    c.print_findings(res["edgeproxy_findings"])
    if res["edgeproxy_findings"].get("access_statuses", {}).get("499"):
        print("  (499 client_disconnected is expected, up to 2x32: wrk drops its connections mid-request at the end)")
    if res["died"]:
        print("DIED DURING THE RUN:", res["died"])
    res["loadavg_after"] = c.loadavg()
    print("noise:", c.noise_note(res["background_cpu"], res["loadavg_before"], res["loadavg_after"]))
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

"""bench/hostile.py: every attack of the hostile-clients issue against a real edgeproxy.

Starts the fake origin (in this process) and edgeproxy (a subprocess, as `edgeproxy run`),
runs each attack from loopback addresses, and prints a table (attack | expected | observed |
OK/FAIL) and one JSON line. Timeouts are the defaults unless a row says otherwise; the
edgeproxy under attack runs with `limits: {body_timeout: 3s}` and `drain_timeout: 1s` so the
stalled-body and drain rows take seconds, not minutes.

Usage: .venv/bin/python bench/hostile.py [--slow N]      (about 1.5 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    EDGE_PY,
    ROOT,
    background_cpu,
    final_json,
    free_port,
    loadavg,
    noise_note,
    print_table,
    raise_nofile,
    rss_mb,
    wait_http,
)
from tests.fakes.origin import FakeOrigin

TOKEN = "hostile-bench-token-7f3a9c1e5b2d4086"
ADMIN_TOKEN = "hostile-bench-admin-5e1d0c9b8a7f6e24"
KEYS = ["sk-bench-key-0-aaaaaaaaaaaa", "sk-bench-key-1-bbbbbbbbbbbb", "sk-bench-key-2-cccccccccccc"]
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


class Target:
    """The edgeproxy under attack: a subprocess, its ports, and what it was started with."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, admin: int, edge_port: int, conf: Path, cfg: dict[str, Any]
    ) -> None:
        self.proc, self.port, self.admin, self.edge_port = proc, port, admin, edge_port
        self.conf, self.cfg = conf, cfg
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin}"

    def rss(self) -> float:
        return rss_mb(self.proc.pid) or 0.0

    def admin_get(self, path: str) -> bytes:
        request = urllib.request.Request(self.admin_url + path, headers={"x-edgeproxy-token": ADMIN_TOKEN})
        with urllib.request.urlopen(request, timeout=10) as r:
            return bytes(r.read())

    def metric(self, name: str, **labels: str) -> float:
        text = self.admin_get("/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_target(tmp: Path, origin: FakeOrigin) -> Target:
    port, admin, edge_port = free_port(), free_port(), free_port()
    cfg = {
        "listen": [f"127.0.0.1:{port}", {"address": f"127.0.0.1:{edge_port}", "tokens": [TOKEN]}],
        "admin": {"listen": {"address": f"127.0.0.1:{admin}", "tokens": [ADMIN_TOKEN]}},
        "log": {"access": "off"},
        "limits": {"body_timeout": "3s"},
        "drain_timeout": "1s",
        "probe": {"interval": "1s", "timeout": "1s"},
        "lines": {"direct": {}, "isp2": {"bind": "127.0.0.1"}},
        "upstreams": {
            "openai": {"prefix": "/v1", "endpoints": [{"url": origin.url + "/v1", "lines": ["direct"]}]},
            "keyed": {"prefix": "/k", "endpoints": [{"url": origin.url + "/v1", "keys": KEYS, "lines": ["direct"]}]},
        },
    }
    conf = tmp / "edgeproxy.yaml"
    conf.write_bytes(orjson.dumps(cfg))
    err = open(tmp / "edgeproxy.log", "wb")
    proc = subprocess.Popen(
        [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(conf)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
    )
    wait_http(f"http://127.0.0.1:{admin}/-/ready", proc)
    return Target(proc, port, admin, edge_port, conf, cfg)


# -- helpers ---------------------------------------------------------------------------------


async def connect(t: Target, source: str = "127.0.0.1", port: int | None = None) -> tuple[Any, Any]:
    return await asyncio.open_connection("127.0.0.1", port or t.port, local_addr=(source, 0))


async def exchange(t: Target, raw: bytes, port: int | None = None) -> tuple[int, dict[str, str]]:
    """Send ``raw``, read the answer's status line and headers."""
    reader, writer = await connect(t, port=port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        return int(lines[0].split()[1]), headers
    finally:
        writer.close()


def post(path: str, extra: str = "", version: str = "1.1", body: bytes = CHAT) -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def timed_post(t: Target) -> tuple[int, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(t.url + "/v1/chat/completions", data=CHAT, headers={"Authorization": "Bearer k"}) as r:
            await r.read()
            return r.status, (time.monotonic() - started) * 1000


async def closed(reader: asyncio.StreamReader, wait: float) -> bool:
    try:
        while True:
            if not await asyncio.wait_for(reader.read(65536), wait):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


Row = tuple[str, str, str, bool]


# -- the attacks -----------------------------------------------------------------------------


async def slow_heads(t: Target, origin: FakeOrigin, n: int) -> list[Row]:
    """Item 1: n slow sockets from one address (a partial head, a byte every 5 s)."""
    rss0 = t.rss()
    socks = []
    for _ in range(n):
        try:
            socks.append(await connect(t, "127.0.0.2"))
        except OSError:
            break
    for _, w in socks:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    await asyncio.sleep(0.5)
    refused = sum(await asyncio.gather(*(closed(r, 0.2) for r, _ in socks)))
    status, ms = await timed_post(t)
    rss_peak = t.rss()
    started = time.monotonic()

    async def drip() -> None:
        for _ in range(3):
            await asyncio.sleep(5)
            for _, w in socks:
                with contextlib.suppress(Exception):
                    w.write(b"a")

    dripping = asyncio.ensure_future(drip())
    results = await asyncio.gather(*(closed(r, 13.0) for r, _ in socks))
    dripping.cancel()
    took = time.monotonic() - started
    for _, w in socks:
        w.close()
    held = len(socks) - refused
    rows: list[Row] = [
        (
            f"{n} slow heads from 127.0.0.2: a request from 127.0.0.1",
            "200 within 100 ms",
            f"{status} in {ms:.1f} ms",
            status == 200 and ms <= 100,
        ),
        (
            f"{n} slow heads: connections over the per-address cap",
            f"{max(0, n - 1024)} closed at once (max_connections_per_address 1024)",
            f"{refused} closed at once",
            refused >= n - 1024 - 5,
        ),
        (
            "slow heads held: closed after header_timeout (10 s)",
            "all closed by 10 s + 3 s",
            f"{sum(results)}/{len(results)} closed, last at {took:.1f} s, {held} were held",
            all(results),
        ),
        (
            "slow heads: memory",
            "RSS grows < 60 MB",
            f"{rss0:.0f} -> {rss_peak:.0f} MB",
            rss_peak - rss0 < 60,
        ),
    ]
    return rows


async def stalled_bodies(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 2: twenty 15 MiB uploads that stall near their end (buffer_memory 256 MiB)."""
    rss0 = t.rss()
    size = 15 << 20
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * (size - 60) + b'"}]}'
    head = post("/v1/chat/completions", body=body)
    writers, answers = [], []
    for _ in range(20):
        r, w = await connect(t)
        w.write(head[: len(head) - (1 << 20)])  # all but the last MiB
        writers.append((r, w))
    await asyncio.sleep(1.0)
    rss_peak = t.rss()
    for r, _ in writers:
        try:
            line = await asyncio.wait_for(r.readline(), 8)
            answers.append(int(line.split()[1]) if line else 0)
        except (TimeoutError, IndexError, ValueError):
            answers.append(-1)
    for _, w in writers:
        w.close()
    refused = answers.count(503)
    timed_out = answers.count(408)
    return [
        (
            "20 x 15 MiB uploads stalled (buffer_memory 256 MiB)",
            "past 256 MiB: 503 + Retry-After; RSS bounded",
            f"{refused} x 503, RSS {rss0:.0f} -> {rss_peak:.0f} MB",
            refused >= 3 and rss_peak - rss0 < 300,
        ),
        (
            "the stalled uploads held (body_timeout 3 s)",
            "408, connection closed",
            f"{timed_out} x 408 (answers {sorted(set(answers))})",
            timed_out == 20 - refused,
        ),
    ]


async def path_tricks(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 6: dot segments (plain and encoded) and our own headers from a client."""
    before = origin.request_count
    statuses = []
    for path in ("/v1/x/../../admin", "/v1/%2e%2e/admin", "/v1/a%2f..%2fadmin", "/v1/./models"):
        statuses.append((await exchange(t, post(path)))[0])
    reached = origin.request_count - before
    status, _ = await exchange(t, post("/v1/chat/completions", "x-edgeproxy-base: a:1:1\r\nX-Edgeproxy-Probe: 1\r\n"))
    last = origin.requests[-1].headers if origin.requests else {}
    forwarded = [k for k in last if k.lower().startswith("x-edgeproxy-")]
    return [
        ("dot segments, encoded too (4 paths)", "400 each, nothing reaches the origin",
         f"{statuses}, {reached} reached", statuses == [400] * 4 and reached == 0),
        ("client sends x-edgeproxy-* headers", "stripped before the origin",
         f"{status}, origin saw {forwarded or 'none'}", status == 200 and not forwarded),
    ]  # fmt: skip


async def protocol_edges(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 8: HTTP/2 request line, 100 Continue on HTTP/1.0, Server header, token + unknown path."""
    h2, _ = await exchange(t, post("/v1/chat/completions", version="2.0"))
    reader, writer = await connect(t)
    writer.write(post("/v1/chat/completions", "Expect: 100-continue\r\n", "1.0").split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    interim = b""
    with contextlib.suppress(asyncio.TimeoutError):
        interim = await asyncio.wait_for(reader.read(100), 0.5)
    writer.close()
    _, headers = await exchange(t, b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, tok_headers = await exchange(
        t, f"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(), t.edge_port
    )
    return [
        ("HTTP/2.0 request line", "505", str(h2), h2 == 505),
        ("Expect: 100-continue on HTTP/1.0", "no interim 100", repr(interim[:20]), b" 100 " not in interim),
        ("Server header of our own answers", "edgeproxy (no versions)", headers.get("server", "-"),
         headers.get("server") == "edgeproxy"),
        ("our token in Authorization, unknown path", "404 with x-request-id",
         f"{status}, request id {'yes' if tok_headers.get('x-request-id') else 'no'}",
         status == 404 and bool(tok_headers.get("x-request-id"))),
    ]  # fmt: skip


async def edge_codings(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 14: a multi-member gzip hop body."""
    half = len(CHAT) // 2
    body = gzip.compress(CHAT[:half]) + gzip.compress(CHAT[half:])
    raw = (
        f"POST {origin.url}/v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-edgeproxy-token: {TOKEN}\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, _ = await exchange(t, raw, t.edge_port)
    got = origin.requests[-1].body if origin.requests else b""
    return [("multi-member gzip hop body (RFC 1952)", "200, the origin gets it whole",
             f"{status}, {'whole' if got == CHAT else 'not whole'}", status == 200 and got == CHAT)]  # fmt: skip


async def drain_end(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 10: a stream still running when drain_timeout ends (this stops the target)."""
    origin.events, origin.event_interval = 200, 0.05
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(t.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
            await r.content.readline()
            t.proc.terminate()  # (drain_timeout 1 s here; the stream runs 10 s)
            try:
                rest = await asyncio.wait_for(r.read(), 40)
            except (TimeoutError, aiohttp.ClientError):
                rest = b""
    origin.events, origin.event_interval = 5, 0.0
    last = [e for e in rest.split(b"\n\n") if e.strip()][-1:] or [b""]
    ok = b"shutting_down" in last[0] and b"[DONE]" not in rest
    return [("SIGTERM mid-stream, drain_timeout 1 s", "an in-band error event ends it (never a fake [DONE])",
             last[0][:70].decode("latin-1"), ok)]  # fmt: skip


async def browsers(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 5: DNS rebinding, a foreign Origin, a cross-site POST /-/reload."""
    before = origin.request_count
    rebound, _ = await exchange(t, post("/v1/chat/completions").replace(b"Host: 127.0.0.1", b"Host: evil.example"))
    foreign, _ = await exchange(t, post("/v1/chat/completions", "Origin: https://evil.example\r\n"))
    reached = origin.request_count - before
    generation = orjson.loads(t.admin_get("/-/status"))["generation"]
    reload_raw = (
        f"POST /-/reload HTTP/1.1\r\nHost: 127.0.0.1:{t.admin}\r\nSec-Fetch-Site: cross-site\r\n"
        f"x-edgeproxy-token: {ADMIN_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    cross, _ = await exchange(t, reload_raw, t.admin)
    after = orjson.loads(t.admin_get("/-/status"))["generation"]
    return [
        ("DNS rebinding: Host evil.example on a loopback listener", "403, nothing reaches the origin",
         f"{rebound}, {reached} reached", rebound == 403 and reached == 0),
        ("a page from https://evil.example (Origin)", "403", str(foreign), foreign == 403),
        ("cross-site POST /-/reload (even with the admin token)", "403, no reload",
         f"{cross}, generation {generation} -> {after}", cross == 403 and after == generation),
    ]  # fmt: skip


async def guessing(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 7: wrong admin tokens, one connection each; a weak token off loopback."""
    started = time.monotonic()
    answered = 0
    while time.monotonic() - started < 5:
        raw = f"GET /-/status HTTP/1.1\r\nHost: 127.0.0.1\r\nx-edgeproxy-token: guess-{answered}\r\n\r\n".encode()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(exchange(t, raw, t.admin), 5.5 - (time.monotonic() - started))
            answered += 1
    weak = dict(t.cfg, listen={"address": "0.0.0.0:1", "tokens": ["aaaaaaaaaaaaaaaaaaaa"]})
    path = t.conf.with_name("weak.yaml")
    path.write_bytes(orjson.dumps(weak))
    check = subprocess.run(
        [EDGE_PY, "-m", "edgeproxy", "check", "-c", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    named = "listen.tokens[0]" in check.stderr and "aaaaaaaa" not in check.stderr
    return [
        ("wrong admin tokens for 5 s, a connection each", "slowed: a few dozen answers, not thousands",
         f"{answered} answers", answered < 60),
        ("a weak token on a listener off loopback", "check fails naming the key path, not the token",
         f"exit {check.returncode}, {'named' if named else check.stderr.strip()[:60]}",
         check.returncode == 1 and named),
    ]  # fmt: skip


async def restricted_key(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 4: a key refused on one model only (a restricted key) must not be disabled."""
    origin.restricted_keys[KEYS[0]] = {"gpt-4o"}
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.post(t.url + "/k/chat/completions", data=body) as r:
                statuses.append(r.status)
    origin.restricted_keys.clear()
    keys = orjson.loads(t.admin_get("/-/status"))["upstreams"]
    states = [k["state"] for u in keys if u["name"] == "keyed" for pool in u["keys"].values() for k in pool]
    return [("a key refused for one model only, 20 requests", "all served, every key left enabled",
             f"{statuses.count(200)} x 200, keys {states}",
             statuses.count(200) == 20 and "disabled" not in states)]  # fmt: skip


def reload_keeps_sync(t: Target) -> list[Row]:
    """Item 11: adding a line to an endpoint keeps the path that was there."""
    cfg = orjson.loads(orjson.dumps(t.cfg))  # (a copy)
    cfg["upstreams"]["openai"]["endpoints"][0]["lines"] = ["direct", "isp2"]
    t.conf.write_bytes(orjson.dumps(cfg))
    request = urllib.request.Request(
        t.admin_url + "/-/reload", method="POST", data=b"", headers={"x-edgeproxy-token": ADMIN_TOKEN}
    )
    with urllib.request.urlopen(request, timeout=20) as r:
        answer = r.read()
    t.conf.write_bytes(orjson.dumps(t.cfg))
    changes = str(orjson.loads(answer).get("changes", ""))
    return [("reload adding a line to an endpoint", "its existing path kept (pool, RTT, health)",
             changes.split(";")[0], changes.startswith("paths: 2 kept") or "1 kept, 1 new" in changes)]  # fmt: skip


async def reload_keeps(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 11: adding a line to an endpoint keeps the path that was there."""
    return await asyncio.to_thread(reload_keeps_sync, t)


async def probes_uncounted(t: Target, origin: FakeOrigin) -> list[Row]:
    """Item 9: a sidecar's probe answered by this edge is not traffic."""
    before = t.metric("edgeproxy_requests_total")
    raw = (
        f"GET {origin.url}/v1/models HTTP/1.1\r\nHost: x\r\nx-edgeproxy-token: {TOKEN}\r\n"
        f"x-edgeproxy-probe: 1\r\nx-edgeproxy-endpoint: {origin.url}/v1\r\n\r\n"
    ).encode()
    status, _ = await exchange(t, raw, t.edge_port)
    after = t.metric("edgeproxy_requests_total")
    zero = t.metric("edgeproxy_requests_total", status="0")
    return [("a sidecar's probe at the edge", "answered, not counted (never as status 0)",
             f"{status}, requests_total +{after - before:g}, status 0: {zero:g}",
             status == 200 and after == before and zero == 0)]  # fmt: skip


ATTACKS: list[Callable[[Target, FakeOrigin], Awaitable[list[Row]]]] = [
    browsers,
    guessing,
    restricted_key,
    reload_keeps,
    probes_uncounted,
    path_tricks,
    protocol_edges,
    edge_codings,
    stalled_bodies,
]


def spawn(tmp: Path, name: str, cfg: dict[str, Any], **kw: Any) -> subprocess.Popen[bytes]:
    conf = tmp / f"{name}.yaml"
    conf.write_bytes(orjson.dumps(cfg))
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen([EDGE_PY, "-m", "edgeproxy", "run", "-c", str(conf)], cwd=ROOT, **kw)


async def stalled_log_reader(tmp: Path, origin: FakeOrigin) -> list[Row]:
    """Item 3: `edgeproxy run | sleep 300`: nobody reads its logs."""
    port, admin = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"access": "json", "buffer": "64KiB"},
        "upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": origin.url + "/v1"}]}},
    }
    out_r, out_w = os.pipe()
    proc = spawn(tmp, "logs", cfg, stdout=out_w, stderr=out_w)
    os.close(out_w)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/-/ready", proc)
        statuses: list[int] = []
        health: list[float] = []

        async def client(s: aiohttp.ClientSession, n: int) -> None:
            for _ in range(n):
                async with s.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}) as r:
                    await r.read()
                    statuses.append(r.status)

        async def healthy(s: aiohttp.ClientSession) -> None:
            while len(statuses) < 2000:
                started = time.monotonic()
                async with s.get(f"http://127.0.0.1:{admin}/-/healthy") as r:
                    await r.read()
                health.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await asyncio.wait_for(asyncio.gather(healthy(s), *(client(s, 125) for _ in range(16))), 90)
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        lines = [ln for ln in text.splitlines() if ln.startswith("edgeproxy_log_dropped_total")]
        dropped = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
        ok = statuses.count(200) == 2000 and dropped > 0
        return [("nobody reads the logs (edgeproxy run | sleep 300), 2,000 requests",
                 "all served, /-/healthy answers, drops counted",
                 f"{statuses.count(200)} x 200, /-/healthy max {max(health or [0]) * 1000:.0f} ms, {dropped:g} dropped",
                 ok)]  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(out_r)


async def all_down(tmp: Path, origin: FakeOrigin) -> list[Row]:
    """Item 12: every path down: the preferred path must hold still."""
    admin = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"access": "off"},
        "probe": {"interval": "1s", "timeout": "1s"},
        "lines": {"direct": {}, "isp2": {"bind": "127.0.0.2"}, "isp3": {"bind": "127.0.0.3"}},
        "upstreams": {"openai": {"prefix": "/v1", "endpoints": [dead + "/v1", dead + "/v2"]}},
    }
    proc = spawn(tmp, "down", cfg)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/-/ready", proc)
        await asyncio.sleep(3)  # every path found down

        def switches() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/-/status", timeout=5) as r:
                return int(orjson.loads(r.read())["upstreams"][0]["switches"])

        first = await asyncio.to_thread(switches)
        await asyncio.sleep(10)
        moved = await asyncio.to_thread(switches) - first
        return [("every path down, 10 s of 1 s probes (6 paths)", "the preferred path holds still (<= 1 switch)",
                 f"{moved} switches", moved <= 1)]  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)


async def run(slow: int) -> list[Row]:
    origin = FakeOrigin()
    await origin.start()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        t = await asyncio.to_thread(start_target, Path(tmpdir), origin)
        try:
            rows += await slow_heads(t, origin, slow)
            for attack in ATTACKS:
                try:
                    rows += await attack(t, origin)
                except Exception as exc:  # a broken attack is a FAIL row, not a crash
                    rows.append((attack.__name__, "runs", f"{type(exc).__name__}: {exc}"[:120], False))
            alive = t.proc.poll() is None
            rows.append(("edgeproxy after all of the above", "alive, no traceback",
                         "alive" if alive else f"exited {t.proc.returncode}", alive))  # fmt: skip
            rows += await drain_end(t, origin)
            for separate in (stalled_log_reader, all_down):  # each with an edgeproxy of its own
                try:
                    rows += await separate(Path(tmpdir), origin)
                except Exception as exc:
                    rows.append((separate.__name__, "runs", f"{type(exc).__name__}: {exc}"[:120], False))
        finally:
            if t.proc.poll() is None:
                t.proc.kill()
            t.proc.wait()
            log = (Path(tmpdir) / "edgeproxy.log").read_text(errors="replace")
            if "Traceback" in log:
                rows.append(("edgeproxy's log", "no traceback", "a traceback", False))
        await origin.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow", type=int, default=5000, help="slow sockets from one address (default 5000)")
    args = ap.parse_args()
    raise_nofile()
    bg, la_before = background_cpu(), loadavg()
    rows = asyncio.run(run(args.slow))
    table = [[a, e, o, "OK" if ok else "FAIL"] for a, e, o, ok in rows]
    print_table(["attack", "expected", "observed", "result"], table)
    print(noise_note(bg, la_before, loadavg(), "One edgeproxy, attacked from loopback addresses."))
    final_json({"bench": "hostile", "ok": all(r[3] for r in rows), "rows": [
        {"attack": a, "expected": e, "observed": o, "ok": ok} for a, e, o, ok in rows]})  # fmt: skip


if __name__ == "__main__":
    main()

"""What edgeproxy saves across a border: the official OpenAI SDK, direct vs through a sidecar and an edge.

Topology (every process on this machine, loopback; the border is a user-space link model,
tests/fakes/border.py: one-way delay, a per-direction bandwidth shared by the connections of one
border, paced segments, a round trip per new connection, optional jitter and loss-as-delay, and a
black hole that freezes open connections and makes new ones hang):

    direct:  app (openai SDK, TLS) ---------------- border A ----------------> origin (TLS)
    via:     app -> sidecar (plain HTTP, localhost) -- border A --> edge (TLS) -> origin (TLS)

The app is the official ``openai`` SDK (sync and async) in a subprocess of its own (its own event
loop and timing); direct, it verifies the origin's certificate (a throw-away CA made here). The
sidecar (edgeproxy) has one ``via`` line with the line's token, ``compress: br`` and the CA; the
edge (edgeproxy with a TLS listener with tokens) trusts the origin through ``SSL_CERT_FILE``.
The origin (``tests.fakes.origin`` with realistic OpenAI streams, in its own process) answers
streamed chat completions after ``--origin-ttft`` (200 ms: the model's own time to first token)
with a role chunk, ``--tokens`` content chunks one per ``--token-interval`` (10 ms) with real-looking
ids, ``created``, a dated model, ``system_fingerprint``, ``service_tier`` and OpenAI's random
``obfuscation`` padding, a finish chunk, a usage chunk (the SDK callers ask for it) and [DONE].

Workloads, each direct and via edgeproxy ALTERNATING call by call (the order flips every round):

  cold          sync SDK, a new client per call (new TCP + TLS across the border for direct)
  warm-sync     one sync client per side, warmed up; small bodies
  warm-async    one async client per side, warmed up; small bodies
  idle          async, each side's client idle ``--gap`` (6 s) or more between calls: past httpx's 5 s
                keep-alive expiry (the sidecar's pool across the border stays warm: probes, keepalive 60 s)
  conversation  async, 10 turns, each sending the whole history (system prompt, tools, the
                user's prose with pasted code, pytest output and JSON logs, the assistant's
                streamed answers), growing to ~40 KB; the sidecar's line sends conversation
                deltas, compressed
  blackhole     a second sidecar with two ``via`` lines to two edges across two borders; the
                async SDK streams at ``--bh-rate`` (20) requests/s (x-request-id on each, joined
                with the sidecar's access log); after a warm-up (the pools grow to the load) the
                border of the preferred line becomes a black hole for ``--hole`` seconds (8; quick 6),
                at 2 and 10 Mbit/s (quick: 10; at 2 Mbit/s this load alone uses ~2/3 of the line).
                Extra = a request's total time minus the p50 of those that ended before the hole;
                target (issue 16): none that begins more than 1.5 s into the hole pays > 200 ms
                extra, and no client error

TTFT = time from ``create()`` to the first content token the SDK yields; total = to the stream's
end. Bytes are payload bytes across the border (TLS records included), counted by the border
per port, between the first and last measured call (warm-ups excluded); via bytes have the
sidecar's probes (every 5 s) subtracted, estimated from an idle window at start, and the
probe cost is printed apart. "conns/call": new TCP connections across the border per call.

    .venv/bin/python bench/border.py --quick   # 2 Mbit/s (conversation 1, black hole 10), ~2.5 min
    flock /tmp/bench.lock .venv/bin/python bench/border.py   # 1, 2 and 10 Mbit/s, ~12 min

Output: a table per workload and rate, the black-hole row with MET/MISSED, the headline table
(README "What it saves across a border"), a noise note, and as the last line one JSON object
{"bench": "border", ...}. Exit status 0 whatever the target says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import ssl
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import _common as c
import compress as gen  # the text generator of bench/compress.py (prose, code, pytest output, JSON logs)

sys.path.insert(0, str(c.ROOT))
from tests.fakes.border import HEADERS, Border
from tests.fakes.origin import PROBE_AGENT, FakeOrigin

Res = dict[str, Any]
TOKEN = "border-bench-" + "5f1c0e9a7d3b42c8a16e0b9d7f3a2c4e"
API_KEY = "sk-border-bench"
MODEL = "gpt-4o-mini"
SNAPSHOT = "gpt-4o-mini-2024-07-18"
SMALL_SYSTEM = "You are a concise assistant for a support team. Answer in two or three sentences."
TURNS = 10
HOLE_TARGET_S, EXTRA_MS = 1.5, 200.0  # no request that begins later than this into the hole pays more than this
SIDES = ("direct", "via")
PHASES = ("began before the hole", f"first {HOLE_TARGET_S:g} s of the hole", "later in the hole", "after the hole")


# =========================================================================== the origin (its own process)


class BorderOrigin(FakeOrigin):
    """The fake origin with OpenAI-shaped streams: real-looking chunk fields, a role chunk with the
    first token, one token per ``event_interval``, finish + usage + [DONE] together; ``latency``
    (the model's time to first token) spares edgeproxy's probes, as a real models list does."""

    tokens = 60
    fingerprint = "fp_" + "".join(random.Random(7).choices("0123456789abcdef", k=10))

    async def _latency(self, request: Any) -> int:
        if request.headers.get("User-Agent") == PROBE_AGENT:
            return 0  # FakeOrigin's _OK
        return await super()._latency(request)

    async def _chat(self, request: Any, data: dict[str, Any], *args: Any) -> Any:
        if not data.get("stream"):
            return await super()._chat(request, data, *args)
        messages = data.get("messages") or []
        last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        seed = zlib.crc32(str(last.get("content", "")).encode())
        n = min(self.tokens, int(data.get("max_tokens") or self.tokens))  # a shorter answer if asked
        words = tokens_of(gen.answer_text(seed, n * 6))[:n]
        r = random.Random(seed)
        cid = "chatcmpl-" + "".join(r.choices(string.ascii_letters + string.digits, k=29))
        so = data.get("stream_options") or {}
        usage = bool(so.get("include_usage"))
        obfuscate = so.get("include_obfuscation", True)
        head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": SNAPSHOT,
                "service_tier": "default", "system_fingerprint": self.fingerprint}  # fmt: skip

        def event(choices: list[Any], **extra: Any) -> bytes:
            obj = {**head, "choices": choices, **({"usage": None} if usage else {}), **extra}
            if obfuscate:
                obj["obfuscation"] = "".join(r.choices(string.ascii_letters + string.digits, k=r.randint(1, 24)))
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        def delta(d: dict[str, Any], finish: str | None = None) -> list[Any]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        prompt = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict)) // 4 + 1
        frames = [
            event(delta({"role": "assistant", "content": "", "refusal": None})) + event(delta({"content": words[0]}))
        ]
        frames += [event(delta({"content": w})) for w in words[1:]]
        end = event(delta({}, "stop"))
        if usage:
            u = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}  # fmt: skip
            end += event([], usage=u)
        frames.append(end + b"data: [DONE]\n\n")
        return await self._stream(request, [(f, None, b"") for f in frames])


_TOKEN = re.compile(r" ?[A-Za-z]+| ?\d{1,3}| ?[^\sA-Za-z\d]+|\s+")


def tokens_of(text: str) -> list[str]:
    """Roughly GPT-sized pieces: a word with its leading space, up to 3 digits, punctuation, whitespace."""
    return _TOKEN.findall(text)


def serve_origin(a: argparse.Namespace) -> None:
    from tests.fakes.threaded import serve_forever

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert)
    o = BorderOrigin(port=a.port, ssl_context=ctx)
    o.latency = a.origin_ttft
    o.event_interval = a.token_interval
    o.tokens = a.tokens
    o.record = False
    serve_forever(o, lambda: f"border origin on {o.url}")


# =========================================================================== the app (its own process)


def small_request(i: int) -> dict[str, Any]:
    g = gen.TextGen(1000 + i)
    question = g.english(gen.EN_USER, 2) + " " + g.english(gen.EN_USER, 1)
    return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": SMALL_SYSTEM},
                         {"role": "user", "content": question}]}  # fmt: skip


def user_turns(seed: int) -> list[str]:
    """The user's ten messages: prose and something pasted (a module, pytest output, JSON logs)."""
    g = gen.TextGen(seed)
    out = []
    for k in range(TURNS):
        text = g.english(gen.EN_USER, g.r.randint(1, 3))
        kinds = [("python", g.module(2)[0]), ("text", g.pytest_log()), ("json", g.json_logs(g.r.randint(4, 7)))]
        for lang, paste in (kinds[k % 3], kinds[(k + 1) % 3]):
            text += f"\n\n```{lang}\n{paste}\n```"
        out.append(text)
    return out


def conversation_request(history: list[dict[str, Any]], user: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "system", "content": gen.SYSTEM}, *history,
            {"role": "user", "content": user}], "tools": gen.TOOLS, "temperature": 0.2,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def body_size(req: dict[str, Any]) -> int:
    return len(json.dumps(req, separators=(",", ":")).encode())


class App:
    """The SDK side: runs one job, prints one JSON line per call."""

    def __init__(self, job: Res) -> None:
        import openai

        self.openai = openai
        self.job = job
        self.ctx = ssl.create_default_context(cafile=job["ca"])
        self.urls = {"direct": job["direct"], "via": job["via"]}

    def sync_client(self, side: str) -> Any:
        o = self.openai
        http = o.DefaultHttpxClient(verify=self.ctx) if side == "direct" else o.DefaultHttpxClient()
        return o.OpenAI(base_url=self.urls[side], api_key=API_KEY, max_retries=0, http_client=http)

    def async_client(self, side: str) -> Any:
        o = self.openai
        http = o.DefaultAsyncHttpxClient(verify=self.ctx) if side == "direct" else o.DefaultAsyncHttpxClient()
        return o.AsyncOpenAI(base_url=self.urls[side], api_key=API_KEY, max_retries=0, http_client=http)

    @staticmethod
    def emit(**rec: Any) -> None:
        print(json.dumps(rec), flush=True)

    @staticmethod
    def wait_go() -> None:
        App.emit(ev="ready")
        sys.stdin.readline()

    def call_sync(self, client: Any, req: dict[str, Any]) -> Res:
        t0 = time.monotonic()
        ttft, text, err = None, [], None
        try:
            with client.chat.completions.create(**req) as stream:
                for ch in stream:
                    if ch.choices and ch.choices[0].delta.content:
                        if ttft is None:
                            ttft = time.monotonic() - t0
                        text.append(ch.choices[0].delta.content)
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:160]}"
        return {"t0": t0, "ttft": ttft, "total": time.monotonic() - t0, "err": err, "text": "".join(text)}

    async def call_async(self, client: Any, req: dict[str, Any], t0: float | None = None) -> Res:
        lag = 0.0 if t0 is None else time.monotonic() - t0  # an open loop's start later than planned
        t0 = time.monotonic() if t0 is None else t0
        ttft, text, err = None, [], None
        try:
            stream = await client.chat.completions.create(**req)
            async with stream:
                async for ch in stream:
                    if ch.choices and ch.choices[0].delta.content:
                        if ttft is None:
                            ttft = time.monotonic() - t0
                        text.append(ch.choices[0].delta.content)
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:160]}"
        return {"t0": t0, "ttft": ttft, "total": time.monotonic() - t0, "err": err, "text": "".join(text), "lag": lag}

    def out(self, side: str, i: int, r: Res, **extra: Any) -> None:
        r = dict(r)
        r.pop("text", None)
        self.emit(ev="call", side=side, i=i, **r, **extra)

    # ---- workloads

    def cold(self) -> None:
        self.wait_go()
        for i in range(self.job["n"]):
            for side in order(i):
                client = self.sync_client(side)
                self.out(side, i, self.call_sync(client, small_request(i)))
                client.close()

    def warm_sync(self) -> None:
        clients = {s: self.sync_client(s) for s in SIDES}
        for s in SIDES:
            self.call_sync(clients[s], small_request(-1))
        self.wait_go()
        for i in range(self.job["n"]):
            for side in order(i):
                self.out(side, i, self.call_sync(clients[side], small_request(i)))

    async def warm_async(self) -> None:
        clients = {s: self.async_client(s) for s in SIDES}
        for s in SIDES:
            await self.call_async(clients[s], small_request(-1))
        self.wait_go()
        for i in range(self.job["n"]):
            for side in order(i):
                self.out(side, i, await self.call_async(clients[side], small_request(i)))

    async def idle(self) -> None:
        """Each side's client sits idle at least ``gap`` s between its calls (the other side's call
        goes half-way between): past httpx's 5 s keep-alive expiry."""
        pause = self.job["gap"] / 2
        clients = {s: self.async_client(s) for s in SIDES}
        for s in SIDES:
            await self.call_async(clients[s], small_request(-1))
        self.wait_go()
        await asyncio.sleep(pause)  # the first direct call too comes after `gap` idle
        for i in range(self.job["n"]):
            for side in SIDES:
                await asyncio.sleep(pause)
                self.out(side, i, await self.call_async(clients[side], small_request(i)))

    async def conversation(self) -> None:
        clients = {s: self.async_client(s) for s in SIDES}
        for s in SIDES:
            await self.call_async(clients[s], small_request(-1))
        self.wait_go()
        for conv in range(self.job["n"]):
            users = user_turns(self.job["seed"] + conv)
            history: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
            for k in range(TURNS):
                for side in order(k):
                    req = conversation_request(history[side], users[k])
                    r = await self.call_async(clients[side], req)
                    history[side] += [
                        {"role": "user", "content": users[k]},
                        {"role": "assistant", "content": r["text"]},
                    ]
                    self.out(side, conv * TURNS + k, r, turn=k + 1, body=body_size(req))

    async def blackhole(self) -> None:
        client = self.async_client("via")
        for i in range(3):
            await self.call_async(client, small_request(-1 - i))
        self.wait_go()
        rate, seconds = self.job["rate"], self.job["seconds"]
        start = time.monotonic() + 0.2
        self.emit(ev="start", t=start)
        tasks = []
        for i in range(int(rate * seconds)):
            t0 = start + i / rate
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            req = small_request(i % 50) | {
                "extra_headers": {"x-request-id": f"bh-{i:05d}"},  # in the access log
                "max_tokens": self.job["tokens"],
            }
            tasks.append(asyncio.ensure_future(self.call_async(client, req, t0)))
        for i, r in enumerate(await asyncio.gather(*tasks)):
            self.out("via", i, r, rid=f"bh-{i:05d}")

    def run(self) -> None:
        w = self.job["workload"]
        if w in ("cold", "warm_sync"):
            getattr(self, w)()
        else:
            import uvloop

            uvloop.run(getattr(self, w)())
        self.emit(ev="done", cpu_s=time.process_time())


def order(i: int) -> tuple[str, str]:
    return SIDES if i % 2 == 0 else SIDES[::-1]


# =========================================================================== the bench (orchestration)


def write_certs(tmp: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA(organization_name="border bench CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    return {"ca": str(tmp / "ca.pem"), "cert": str(tmp / "server.pem")}


class Bench:
    def __init__(self, a: argparse.Namespace, tmp: Path, procs: c.Procs) -> None:
        self.a, self.tmp, self.procs = a, tmp, procs
        self.files = write_certs(tmp)
        self.origin_port = c.free_port()
        self.origin_url = f"https://127.0.0.1:{self.origin_port}/v1"
        self.borders = [Border(rate=a.rates[0] * 1e6, rtt=a.rtt / 1000, jitter=a.jitter / 1000, loss=a.loss / 100)
                        for _ in range(2)]  # fmt: skip
        self.edges: list[tuple[int, int, int]] = []  # (port, admin, pid)
        self.origin_pid = 0
        self.ports: dict[str, tuple[Border, int]] = {}  # what crosses which border, by name
        self.sidecars: dict[str, tuple[int, int, c.Popen]] = {}  # name: (port, admin, proc)
        self.probe_bytes: Res = {}

    # ---- processes

    def start(self) -> None:
        f = self.files
        argv = [c.PY, str(Path(__file__)), "--serve-origin", "--port", str(self.origin_port), "--cert", f["cert"],
                "--origin-ttft", str(self.a.origin_ttft), "--token-interval", str(self.a.token_interval),
                "--tokens", str(self.a.tokens)]  # fmt: skip
        p = self.procs.start("origin", argv, log=self.tmp / "origin.log")
        self.origin_pid = p.pid
        c.wait_port(self.origin_port, p)
        for i in range(2):
            self.edges.append(self.start_edge(i))
        a, b = self.borders
        self.ports["direct"] = (a, a.add_port("127.0.0.1", self.origin_port))
        self.ports["via"] = (a, a.add_port("127.0.0.1", self.edges[0][0]))
        self.ports["bh0"] = (a, a.add_port("127.0.0.1", self.edges[0][0]))
        self.ports["bh1"] = (b, b.add_port("127.0.0.1", self.edges[1][0]))
        for border in self.borders:
            border.start_in_thread()
        self.start_sidecar("main", {"edge": self.ports["via"][1]})

    def start_edge(self, i: int) -> tuple[int, int, int]:
        port, admin = c.free_port(), c.free_port()
        f = self.files
        cfg = self.tmp / f"edge{i}.yaml"
        cfg.write_text(
            f'listen: [{{address: "127.0.0.1:{port}", tokens: ["{TOKEN}"], '
            f'tls: {{cert: "{f["cert"]}", key: "{f["cert"]}"}}}}]\n'
            f'admin: {{listen: "127.0.0.1:{admin}"}}\nlog: {{access: json}}\ndrain_timeout: 1s\n'
            f'upstreams: {{openai: {{prefix: /v1, endpoints: [{{url: "{self.origin_url}"}}]}}}}\n'
        )
        env = {**os.environ, "SSL_CERT_FILE": f["ca"]}  # the edge's system CAs: the origin's CA
        argv = [c.EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)]
        with open(self.tmp / f"edge{i}-access.log", "wb") as out, open(self.tmp / f"edge{i}.log", "wb") as err:
            p = subprocess.Popen(argv, cwd=c.ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                 start_new_session=True, preexec_fn=c._pdeathsig)  # fmt: skip
        self.procs.procs.append((f"edge{i}", p))
        c.wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
        c.wait_port(port, p)
        return port, admin, p.pid

    def start_sidecar(self, name: str, lines: dict[str, int]) -> None:
        port, admin = c.free_port(), c.free_port()
        ca = self.files["ca"]
        ls = "".join(f'  {ln}: {{via: "https://127.0.0.1:{bp}", token: "{TOKEN}", compress: br, ca: "{ca}"}}\n'
                     for ln, bp in lines.items())  # fmt: skip
        cfg = self.tmp / f"sidecar-{name}.yaml"
        cfg.write_text(
            f'listen: "127.0.0.1:{port}"\nadmin: {{listen: "127.0.0.1:{admin}"}}\nlog: {{access: json}}\n'
            f"drain_timeout: 1s\nlines:\n{ls}"
            f'upstreams: {{openai: {{prefix: /v1, endpoints: [{{url: "{self.origin_url}"}}]}}}}\n'
        )
        argv = [c.EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)]
        p = self.procs.start(f"sidecar-{name}", argv, log=self.tmp / f"sidecar-{name}.log",
                             stdout=self.tmp / f"sidecar-{name}-access.log")  # fmt: skip
        c.wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
        c.wait_port(port, p)
        self.sidecars[name] = (port, admin, p)
        self.wait_paths_up(name, len(lines))

    def status(self, name: str) -> Res:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecars[name][1]}/-/status", timeout=5) as r:
            up: Res = next(u for u in json.loads(r.read())["upstreams"] if u["name"] == "openai")
            return up

    def wait_paths_up(self, name: str, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            paths = self.status(name).get("paths") or []
            if len(paths) == n and all(p.get("state") == "up" and p.get("srtt_ms") for p in paths):
                return
            time.sleep(0.2)
        raise RuntimeError(f"sidecar {name}: paths not up after {timeout}s: {self.status(name).get('paths')}")

    def metrics(self, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecars[name][1]}/metrics", timeout=5) as r:
            for metric, labels, v in c.metric_samples(r.read().decode()):
                if metric in ("edgeproxy_probes_total", "edgeproxy_rescues_total", "edgeproxy_failovers_total",
                              "edgeproxy_attempts_total", "edgeproxy_route_switches_total"):  # fmt: skip
                    key = metric.removeprefix("edgeproxy_").removesuffix("_total")
                    lab = ",".join(f"{k}={labels[k]}" for k in ("line", "outcome", "reason", "result") if k in labels)
                    out[f"{key}{{{lab}}}"] = out.get(f"{key}{{{lab}}}", 0.0) + v
        return out

    def probes(self, name: str) -> float:
        return sum(v for k, v in self.metrics(name).items() if k.startswith("probes{"))

    def set_rate(self, mbit: float) -> None:
        for b in self.borders:
            b.set(rate=mbit * 1e6)

    def counters(self, *names: str) -> dict[str, dict[str, int]]:
        return {n: self.ports[n][0].counters(self.ports[n][1]) for n in names}

    # ---- measuring

    def measure_probes(self, seconds: float) -> None:
        """Bytes one probe of the main sidecar costs across the border (nothing else crosses now)."""
        c0, p0 = self.counters("via")["via"], self.probes("main")
        time.sleep(seconds)
        c1, p1 = self.counters("via")["via"], self.probes("main")
        n = p1 - p0
        self.probe_bytes = {"probes": n, "seconds": seconds,
                            "up_per_probe": (c1["up"] - c0["up"]) / n if n else 0.0,
                            "down_per_probe": (c1["down"] - c0["down"]) / n if n else 0.0}  # fmt: skip

    def app(self, job: Res) -> subprocess.Popen[str]:
        job = {"ca": self.files["ca"], "direct": f"https://127.0.0.1:{self.ports['direct'][1]}/v1",
               "via": f"http://127.0.0.1:{self.sidecars[job.pop('sidecar', 'main')][0]}/v1", **job}  # fmt: skip
        p = subprocess.Popen([c.PY, str(Path(__file__)), "--app"], cwd=c.ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=open(self.tmp / "app.log", "ab"), text=True,
                             start_new_session=True, preexec_fn=c._pdeathsig)  # fmt: skip
        self.procs.procs.append(("app", p))  # type: ignore[arg-type]
        assert p.stdin is not None
        p.stdin.write(json.dumps(job) + "\n")
        p.stdin.flush()
        return p

    @staticmethod
    def read(p: subprocess.Popen[str], until: str) -> list[Res]:
        assert p.stdout is not None
        got = []
        for line in p.stdout:
            rec = json.loads(line)
            if rec.get("ev") == until:
                return [*got, rec]
            got.append(rec)
        raise RuntimeError(f"the app exited ({p.wait()}) before '{until}': see app.log")

    def workload(self, name: str, mbit: float, **job: Any) -> Res:
        self.set_rate(mbit)
        p = self.app({"workload": name.replace("-", "_"), **job})
        t0 = time.monotonic()
        self.read(p, "ready")
        before = self.counters("direct", "via")
        probes0 = self.probes("main")
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        calls = [r for r in self.read(p, "done") if r.get("ev") == "call"]
        after = self.counters("direct", "via")
        probes = self.probes("main") - probes0
        p.wait(10)
        return summarize(name, mbit, calls, before, after, probes, self.probe_bytes, time.monotonic() - t0)

    def blackhole(self, mbit: float) -> Res:
        """``bh_warm`` s of load (its pool grows), ``bh_pre`` s measured before the hole, the hole
        on the preferred line's border, ``bh_post`` s after it."""
        a = self.a
        self.set_rate(mbit)
        name = f"bh-{mbit:g}"
        self.start_sidecar(name, {"l0": self.ports["bh0"][1], "l1": self.ports["bh1"][1]})
        seconds = a.bh_warm + a.bh_pre + a.hole + a.bh_post
        p = self.app(
            {"workload": "blackhole", "sidecar": name, "rate": a.bh_rate, "seconds": seconds, "tokens": a.bh_tokens}
        )
        self.read(p, "ready")
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        start = self.read(p, "start")[-1]["t"]
        prefs: list[tuple[float, str | None]] = []  # (time, preferred line) every 50 ms

        def watch(until: float) -> None:
            while time.monotonic() < until:
                pref = self.status(name).get("preferred")
                if not prefs or prefs[-1][1] != pref:
                    prefs.append((time.monotonic(), pref))
                time.sleep(0.05)

        watch(start + a.bh_warm)
        m0, c0, t0 = self.metrics(name), self.counters("bh0", "bh1"), time.monotonic()
        pids = {"sidecar": self.sidecars[name][2].pid, "edge0": self.edges[0][2], "edge1": self.edges[1][2],
                "origin": self.origin_pid}  # fmt: skip
        cpu0 = {k: c.cpu_seconds(v) for k, v in pids.items()}
        watch(start + a.bh_warm + a.bh_pre)
        line = self.status(name).get("preferred") or "l0"
        border = self.ports["bh0" if line == "l0" else "bh1"][0]
        t_hole = time.monotonic()
        border.set_blackhole(True)
        watch(t_hole + a.hole)
        t_end = time.monotonic()
        border.set_blackhole(False)
        watch(start + seconds)
        c1, t1 = self.counters("bh0", "bh1"), time.monotonic()
        cpu = {k: round(100 * (c.cpu_seconds(v) - cpu0[k]) / (t1 - t0)) for k, v in pids.items()}
        got = self.read(p, "done")
        calls = [r for r in got if r.get("ev") == "call"]
        cpu["app (whole run)"] = round(100 * got[-1]["cpu_s"] / (time.monotonic() - start + 1))
        p.wait(10)
        time.sleep(0.5)  # the access log's last lines
        m1 = self.metrics(name)
        self.procs.stop(self.sidecars[name][2])  # its probes would cross the borders of the next rows
        moves = [(round(t - t_hole, 2), pref) for t, pref in prefs]
        paths = attempt_paths(self.tmp / f"sidecar-{name}-access.log")
        wall = time.time() - time.monotonic()
        out = blackhole_summary(calls, paths, start + a.bh_warm, t_hole, t_end, line, moves, m0, m1, mbit, a, wall)

        def use(port: str, d: str) -> float:  # share of the line's rate, headers included
            wire = c1[port][d] - c0[port][d] + HEADERS * (c1[port][f"segments_{d}"] - c0[port][f"segments_{d}"])
            return round(wire * 8 / (t1 - t0) / (mbit * 1e6), 2)

        out["cpu_pct"] = cpu  # of one core, from the end of the warm-up to the end
        lags = sorted(r["lag"] for r in calls)
        out["app_start_lag_ms"] = {
            "p50": ms(pctl(lags, 50)),
            "p99": ms(pctl(lags, 99)),
            "max": ms(lags[-1] if lags else None),
        }
        # of each line's border, averaged from the end of the warm-up to the end
        out["link_use"] = {ln: {d: use(port, d) for d in ("up", "down")} for ln, port in (("l0", "bh0"), ("l1", "bh1"))}
        return out


# =========================================================================== analysis


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def pctl(values: list[float], q: float) -> float | None:
    return c.pct(sorted(values), q) if values else None


def summarize(
    name: str, mbit: float, calls: list[Res], before: Res, after: Res, probes: float, pb: Res, took: float
) -> Res:
    out: Res = {"workload": name, "mbit": mbit, "seconds": round(took, 1), "probes_during": probes}
    for side in SIDES:
        cs = [r for r in calls if r["side"] == side]
        ok = [r for r in cs if r["err"] is None and r["ttft"] is not None]
        ttft = [r["ttft"] for r in ok]
        total = [r["total"] for r in ok]
        up = after[side]["up"] - before[side]["up"]
        down = after[side]["down"] - before[side]["down"]
        if side == "via":  # the sidecar's probes crossed meanwhile: not the calls' bytes
            up -= probes * pb.get("up_per_probe", 0.0)
            down -= probes * pb.get("down_per_probe", 0.0)
        n = max(1, len(cs))
        per = TURNS if name == "conversation" else 1  # bytes per conversation, else per call
        out[side] = {
            "n": len(cs),
            "errors": [r["err"] for r in cs if r["err"] is not None][:5],
            "ttft_ms": {"p50": ms(pctl(ttft, 50)), "p90": ms(pctl(ttft, 90))},
            "total_ms": {"p50": ms(pctl(total, 50)), "p90": ms(pctl(total, 90))},
            "up_kb": round(up / n * per / 1000, 2),
            "down_kb": round(down / n * per / 1000, 2),
            "conns_per_call": round((after[side]["connections"] - before[side]["connections"]) / n, 2),
        }
        if name == "conversation":
            bodies = [r["body"] for r in cs]
            out[side]["body_kb_first_last"] = [round(min(bodies) / 1000, 1), round(max(bodies) / 1000, 1)]
            out[side]["ttft_ms_by_turn"] = [ms(pctl([r["ttft"] for r in ok if r["turn"] == k], 50))
                                            for k in range(1, TURNS + 1)]  # fmt: skip
    d, v = out["direct"], out["via"]
    out["ratio"] = {
        "ttft_p50": ratio(v["ttft_ms"]["p50"], d["ttft_ms"]["p50"]),
        "ttft_p90": ratio(v["ttft_ms"]["p90"], d["ttft_ms"]["p90"]),
        "total_p50": ratio(v["total_ms"]["p50"], d["total_ms"]["p50"]),
        "up": ratio(v["up_kb"], d["up_kb"]),
        "down": ratio(v["down_kb"], d["down_kb"]),
    }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def attempt_paths(access: Path) -> dict[str, tuple[str, float | None]]:
    """request id -> the attempts the sidecar made ("l0:connect_timeout > l1:ok") and when it got
    the request (wall clock), from its access log."""
    out = {}
    with contextlib.suppress(OSError):
        for line in access.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError):
                rec = json.loads(line)
                log = rec.get("attempt_log") or [{"line": rec.get("line"), "outcome": rec.get("status")}]
                began = rec["time"] - rec["duration_ms"] / 1000 if rec.get("duration_ms") is not None else None
                tried = " > ".join(f"{x.get('line')}:{x.get('outcome')}" for x in log)
                out[str(rec.get("request_id"))] = (tried, began)
    return out


def blackhole_summary(
    calls: list[Res], paths: dict[str, tuple[str, float | None]], t_warm: float, t_hole: float, t_end: float,
    line: str, moves: list[Any], m0: Res, m1: Res, mbit: float, a: argparse.Namespace, wall: float,
) -> Res:  # fmt: skip
    # Times from when the sidecar got each call: the app's open loop runs late when its CPU is short
    # (the SDK parses every chunk), and so does its HTTP client's sending (when a burst of streams
    # ends at once, up to a few hundred ms): that lateness is the bench's, not the proxy's
    # (app_start_lag_ms, app_send_lag_ms). ``wall``: time.time() - time.monotonic() (the same
    # monotonic clock in every process).
    def late(r: Res) -> float:
        began = paths.get(r["rid"], ("", None))[1]
        return r["lag"] if began is None else max(r["lag"], began - wall - r["t0"])

    calls = [r | {"t0": r["t0"] + late(r), "total": r["total"] - late(r), "late": late(r),
                  "ttft": None if r["ttft"] is None else r["ttft"] - late(r)} for r in calls]  # fmt: skip
    calls = [r for r in calls if r["t0"] >= t_warm]  # the pool has grown to the load by then
    before = [r for r in calls if r["t0"] + r["total"] < t_hole and r["err"] is None]
    base_ttft = pctl([r["ttft"] for r in before], 50) or 0.0
    base_total = pctl([r["total"] for r in before], 50) or 0.0
    hole = t_end - t_hole
    errors = [r for r in calls if r["err"] is not None]

    def phase(start: float) -> str:
        if start < 0:
            return "began before the hole"
        if start <= HOLE_TARGET_S:
            return f"first {HOLE_TARGET_S:g} s of the hole"
        return "later in the hole" if start < hole else "after the hole"

    rows = []
    for r in calls:
        start = r["t0"] - t_hole
        rows.append({"start_s": round(start, 3), "phase": phase(start),
                     "extra_ttft_ms": ms(None if r["ttft"] is None else r["ttft"] - base_ttft),
                     "extra_total_ms": ms(r["total"] - base_total), "err": r["err"],
                     "attempts": paths.get(r["rid"], ("?", None))[0]})  # fmt: skip
    paid = [x for x in rows if x["err"] or (x["extra_total_ms"] or 0) > EXTRA_MS]
    late = [x for x in paid if x["start_s"] > HOLE_TARGET_S]
    by_phase: Res = {}
    for x in rows:
        ph = by_phase.setdefault(x["phase"], {"requests": 0, "paid": 0, "errors": 0, "paid_by_attempts": {}})
        ph["requests"] += 1
        if x in paid:
            ph["paid"] += 1
            ph["errors"] += bool(x["err"])
            ph["paid_by_attempts"][x["attempts"]] = ph["paid_by_attempts"].get(x["attempts"], 0) + 1
    delta = {k: int(v - m0.get(k, 0)) for k, v in m1.items() if v - m0.get(k, 0)}
    in_hole = [x for x in paid if 0 <= x["start_s"] < hole]
    return {
        "mbit": mbit,
        "rate": a.bh_rate,
        "tokens": a.bh_tokens,
        "hole_s": round(hole, 2),
        "holed_line": line,
        "preferred_changes_s": moves,  # (seconds from the hole's start, preferred line), from the warm-up on
        "requests": len(rows),
        "baseline_ms": {"ttft_p50": ms(base_ttft), "total_p50": ms(base_total), "n": len(before)},
        "errors": len(errors),
        "error_sample": [r["err"] for r in errors[:3]],
        "phases": by_phase,
        "last_paid_start_in_hole_s": max((x["start_s"] for x in in_hole), default=None),
        "last_paid_start_s": max((x["start_s"] for x in paid), default=None),
        "paid_later_than_target": len(late),
        "app_send_lag_ms": {q: ms(pctl([r["late"] - r["lag"] for r in calls], q)) for q in (50, 99, 100)},
        "worst_extra_ms_in_hole": max((x["extra_total_ms"] or 0 for x in in_hole), default=0),
        "late": late,
        "metrics_delta": delta,
        "met": len(errors) == 0 and not late,
    }


# =========================================================================== report


def findings(tmp: Path, name: str) -> Res | None:
    """Statuses and errors from one edgeproxy's access log, warnings from its stderr."""
    access, log = tmp / f"{name}-access.log", tmp / f"{name}.log"
    if not access.exists():
        return None
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for line in access.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            statuses[str(rec.get("status"))] = statuses.get(str(rec.get("status")), 0) + 1
            if rec.get("error"):
                errors[str(rec["error"])] = errors.get(str(rec["error"]), 0) + 1
    bad = [ln[:300] for ln in log.read_text(errors="replace").splitlines()
           if any(w in ln for w in ("WARNING", "ERROR", "Traceback"))] if log.exists() else []  # fmt: skip
    return {
        "access_statuses": statuses,
        "access_errors": errors,
        "log_problems": bad[:10],
        "log_problem_lines": len(bad),
    }


def f(x: Any, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def print_workloads(rows: list[Res]) -> None:
    table = []
    for r in rows:
        d, v, q = r["direct"], r["via"], r["ratio"]
        unit = "/conv" if r["workload"] == "conversation" else "/call"
        table.append([
            r["workload"], f"{r['mbit']:g}",
            f"{f(d['ttft_ms']['p50'])} / {f(d['ttft_ms']['p90'])}",
            f"{f(v['ttft_ms']['p50'])} / {f(v['ttft_ms']['p90'])}",
            f"{f(q['ttft_p50'], 2)} / {f(q['ttft_p90'], 2)}",
            f"{f(d['total_ms']['p50'])} / {f(v['total_ms']['p50'])} ({f(q['total_p50'], 2)})",
            f"{f(d['up_kb'], 1)} / {f(d['down_kb'], 1)} KB{unit}",
            f"{f(v['up_kb'], 1)} / {f(v['down_kb'], 1)} KB{unit}",
            f"{f(d['conns_per_call'])} / {f(v['conns_per_call'])}",
            f"{d['n']}+{v['n']}" + (f" ERR {len(d['errors'] + v['errors'])}" if d["errors"] or v["errors"] else ""),
        ])  # fmt: skip
    c.print_table(["workload", "Mbit/s", "direct TTFT p50/p90 ms", "via TTFT p50/p90 ms", "ratio p50/p90",
                   "total p50 ms direct/via (ratio)", "direct up/down", "via up/down", "conns/call d/v", "calls"],
                  table)  # fmt: skip


def headline(rows: list[Res], bh: Res | None, rtt: float) -> list[str]:
    """The README's table ("What it saves across a border"), from this run; the black hole on a
    line of its own (the README has no such row while the target is missed)."""

    def get(w: str, mbit: float) -> Res | None:
        return next((r for r in rows if r["workload"] == w and r["mbit"] == mbit), None)

    out = [f"| workload (2 Mbit/s each way unless said; {rtt:g} ms RTT) | direct TTFT p50 | via edgeproxy | ratio |",
           "|---|---|---|---|"]  # fmt: skip
    spec = [("cold", 2, "cold client (new TCP + TLS across the border each time)"),
            ("warm-sync", 2, "sync SDK, warm client (it opens a new connection per streamed call)"),
            ("idle", 2, "async SDK, calls more than 6 s apart (httpx drops idle connections after 5 s)"),
            ("warm-async", 2, "async SDK, warm client, small bodies"),
            ("conversation", 1, f"{TURNS}-turn conversation growing to {{kb}} KB, async SDK, 1 Mbit/s"),
            ("conversation", 10, "the same conversation at 10 Mbit/s")]  # fmt: skip
    for w, mbit, label in spec:
        r = get(w, mbit)
        if r is None:
            continue
        d, v = r["direct"]["ttft_ms"]["p50"], r["via"]["ttft_ms"]["p50"]
        if w == "warm-sync" and r["direct"]["conns_per_call"] < 0.9:
            label = f"sync SDK, warm client ({f(r['direct']['conns_per_call'], 1)} new connections per call)"
        label = label.format(kb=f(r["direct"].get("body_kb_first_last", [0, 0])[1]))
        out.append(f"| {label} | {f(d)} ms | {f(v)} ms | {f(r['ratio']['ttft_p50'], 2)} |")
    r = get("conversation", 1) or next((x for x in rows if x["workload"] == "conversation"), None)
    if r is not None:
        dd, vv = r["direct"], r["via"]
        out.append(f"| bytes up / down across the border per {TURNS}-turn conversation | {f(dd['up_kb'])} / "
                   f"{f(dd['down_kb'])} KB | {f(vv['up_kb'])} / {f(vv['down_kb'])} KB | "
                   f"{f(r['ratio']['up'], 2)} / {f(r['ratio']['down'], 2)} |")  # fmt: skip
    if bh is not None:
        early = bh["phases"].get(PHASES[1], {})
        out.append(f"\nblack hole on one of two lines, {bh['rate']:g} req/s at {bh['mbit']:g} Mbit/s: "
                   f"{bh['paid_later_than_target']} requests that began more than {HOLE_TARGET_S:g} s into it paid "
                   f"> {EXTRA_MS:g} ms extra (the last {f(bh['last_paid_start_in_hole_s'], 2)} s in; in the first "
                   f"{HOLE_TARGET_S:g} s: {early.get('paid', 0)} of {early.get('requests', 0)}); {bh['errors']} client "
                   f"errors: {'MET' if bh['met'] else 'MISSED'}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 Mbit/s, fewer calls (conversation at 1 Mbit/s), < 3 min")
    ap.add_argument("--rtt", type=float, default=180.0, help="round trip across the border, ms (default 180)")
    ap.add_argument("--jitter", type=float, default=0.0, help="ms of uniform jitter per segment (default 0)")
    ap.add_argument("--loss", type=float, default=0.0, help="%% of segments that arrive one RTO late (default 0)")
    ap.add_argument("--rates", type=str, help="Mbit/s, comma-separated (default 1,2,10; quick 2)")
    ap.add_argument("--n", type=int, help="calls per side per workload (default 12; quick 5)")
    ap.add_argument("--gap", type=float, default=6.0, help="'idle': a client's idle seconds between calls (default 6)")
    ap.add_argument("--origin-ttft", type=float, default=0.2, help="the origin's own time to first token, s")
    ap.add_argument("--token-interval", type=float, default=0.01, help="s between streamed tokens (default 0.01)")
    ap.add_argument("--tokens", type=int, default=60, help="content chunks per answer (default 60)")
    ap.add_argument("--bh-rate", type=float, default=20.0, help="black hole row: requests/s (default 20)")
    ap.add_argument("--bh-tokens", type=int, default=20,
                    help="black hole row: tokens per answer (default 20: at 60 the SDK app alone takes most of a "
                         "core at 20 req/s and its own lateness, not the proxy, sets the times)")  # fmt: skip
    ap.add_argument("--hole", type=float, help="black hole length, s (default 8; quick 6)")
    ap.add_argument("--bh-mbit", type=str, help="black hole row: Mbit/s, comma-separated (default 2,10; quick 10)")
    ap.add_argument("--only", type=str, help="workloads to run, comma-separated (cold,warm-sync,warm-async,idle,"
                    "conversation,blackhole)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--app", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-origin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cert", type=str, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_origin:
        return serve_origin(a)
    if a.app:
        return App(json.loads(sys.stdin.readline())).run()
    q = a.quick
    a.rates = [float(x) for x in a.rates.split(",")] if a.rates else ([2.0] if q else [1.0, 2.0, 10.0])
    a.n = a.n or (5 if q else 12)
    a.hole = a.hole or (6.0 if q else 8.0)
    a.bh_mbit = [float(x) for x in a.bh_mbit.split(",")] if a.bh_mbit else ([10.0] if q else [2.0, 10.0])
    a.bh_warm, a.bh_pre, a.bh_post = (3.0, 3.0, 4.0) if q else (4.0, 4.0, 5.0)
    only = (
        set(a.only.split(",")) if a.only else {"cold", "warm-sync", "warm-async", "idle", "conversation", "blackhole"}
    )
    rev = subprocess.run(["git", "-C", str(c.ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    sys.setswitchinterval(0.0005)  # the borders' threads share the GIL with this (mostly waiting) one
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(
        f"border: RTT {a.rtt:g} ms, rates {a.rates} Mbit/s each way, jitter {a.jitter:g} ms, loss {a.loss:g} %; "
        f"origin TTFT {a.origin_ttft * 1000:g} ms, {a.tokens} tokens at {a.token_interval * 1000:g} ms; "
        f"{a.n} calls per side per workload; edgeproxy {rev.stdout.strip()}; loadavg before {la0}",
        flush=True,
    )
    res: Res = {"bench": "border", "quick": q, "rtt_ms": a.rtt, "rates_mbit": a.rates, "jitter_ms": a.jitter,
                "loss_pct": a.loss, "origin_ttft_ms": a.origin_ttft * 1000, "tokens": a.tokens,
                "token_interval_ms": a.token_interval * 1000, "n": a.n, "gap_s": a.gap, "background": bg,
                "loadavg_before": la0, "revision": rev.stdout.strip() or None}  # fmt: skip
    t0 = time.monotonic()
    rows: list[Res] = []
    holes: list[Res] = []
    with contextlib.ExitStack() as stack:
        td = tempfile.mkdtemp(prefix="bench-border-") if a.keep else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-border-"))  # fmt: skip
        procs = stack.enter_context(c.Procs())
        b = Bench(a, Path(td), procs)
        stack.callback(lambda: [x.stop_thread() for x in b.borders])
        b.start()
        b.measure_probes(6.0)
        res["probe_cost"] = b.probe_bytes
        plan: list[tuple[str, float, Res]] = []
        for mbit in a.rates:
            plan += [(w, mbit, {"n": a.n}) for w in ("cold", "warm-sync", "warm-async")]
            plan.append(("idle", mbit, {"n": max(3, a.n // 2), "gap": a.gap}))
        conv_rates = [1.0] if q else a.rates
        # a new conversation at every rate: one the sidecar had sent before would cross as deltas from its first turn
        plan += [
            ("conversation", mbit, {"n": 1 if q else 2, "seed": 500 + 10 * k}) for k, mbit in enumerate(conv_rates)
        ]
        for w, mbit, job in plan:
            if w not in only:
                continue
            print(f"  {w} at {mbit:g} Mbit/s ...", flush=True)
            try:
                rows.append(b.workload(w, mbit, **job))
            except Exception as e:
                res.setdefault("errors", []).append(f"{w} {mbit:g}: {type(e).__name__}: {e}")
                print(f"  ERROR {w}: {type(e).__name__}: {e}", flush=True)
        for mbit in a.bh_mbit if "blackhole" in only else []:
            print(f"  blackhole at {mbit:g} Mbit/s ...", flush=True)
            try:
                holes.append(b.blackhole(mbit))
            except Exception as e:
                res.setdefault("errors", []).append(f"blackhole: {type(e).__name__}: {e}")
                print(f"  ERROR blackhole: {type(e).__name__}: {e}", flush=True)
        res["edgeproxy_logs"] = {
            n: findings(Path(td), n) for n in [*(f"sidecar-{x}" for x in b.sidecars), "edge0", "edge1"]
        }
        if a.keep:
            res["kept_dir"] = td
    res["workloads"] = rows
    res["blackhole"] = holes
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    report(a, res, rows, holes, bg, la0, la1)
    c.final_json(res)


def report(a: argparse.Namespace, res: Res, rows: list[Res], holes: list[Res], bg: Res, la0: str, la1: str) -> None:
    print()
    if rows:
        print_workloads(rows)
    pc = res.get("probe_cost") or {}
    print(
        f"\nBytes: payload across the border (TLS records included), warm-ups excluded; per call, or per {TURNS}-turn "
        f"conversation. Via bytes exclude the sidecar's probes: {f(pc.get('up_per_probe'))} B up / "
        f"{f(pc.get('down_per_probe'))} B down per probe (measured idle: {pc.get('probes')} probes in "
        f"{pc.get('seconds')} s), one every ~5 s per line. conns/call: new TCP connections across the border."
    )
    for r in rows:
        if r["workload"] == "conversation":
            print(f"conversation at {r['mbit']:g} Mbit/s: bodies {r['direct']['body_kb_first_last']} KB (turn 1, "
                  f"turn {TURNS}); TTFT p50 by turn ms direct {r['direct']['ttft_ms_by_turn']}, via "
                  f"{r['via']['ttft_ms_by_turn']}")  # fmt: skip
        errs = r["direct"]["errors"] + r["via"]["errors"]
        if errs:
            print(f"ERRORS in {r['workload']} {r['mbit']:g}: {errs}")
    if holes:
        print()
        c.print_table(
            ["black hole", "client errors", "paid > 200 ms: before / first 1.5 s / later / after the hole",
             "last paid began", "target", "result"],
            [[f"{bh['rate']:g} req/s, 2 lines, {bh['holed_line']} holed {bh['hole_s']} s at {bh['mbit']:g} Mbit/s",
              f"{bh['errors']}", " / ".join(f"{ph.get('paid', 0)} of {ph.get('requests', 0)}" for ph in (
                  bh["phases"].get(k, {}) for k in PHASES)),
              f"{f(bh['last_paid_start_in_hole_s'], 2)} s into the hole",
              f"none that begins > {HOLE_TARGET_S:g} s in pays > {EXTRA_MS:g} ms; 0 errors",
              "MET" if bh["met"] else "MISSED"] for bh in holes],
        )  # fmt: skip
        for bh in holes:
            print(
                f"\nat {bh['mbit']:g} Mbit/s: baseline TTFT/total p50 {bh['baseline_ms']['ttft_p50']}/"
                f"{bh['baseline_ms']['total_p50']} ms; worst extra (began in the hole) {bh['worst_extra_ms_in_hole']} "
                f"ms; {bh['paid_later_than_target']} paid although they began > {HOLE_TARGET_S:g} s in; preferred "
                f"line (s from the hole, line): {bh['preferred_changes_s']}; link use (share of the rate, "
                f"headers included, averaged over the run) {bh['link_use']}; CPU % of a core {bh['cpu_pct']}; the "
                f"app's open loop started late by p50/p99/max {bh['app_start_lag_ms']} ms, its HTTP client sent "
                f"later still by p50/p99/max {bh['app_send_lag_ms']} ms; sidecar metrics delta "
                f"{bh['metrics_delta']}"
            )
            for k in PHASES:
                ph = bh["phases"].get(k)
                if ph and ph["paid"]:
                    print(f"  {k}: {ph['paid']} of {ph['requests']} paid > {EXTRA_MS:g} ms, by the sidecar's "
                          f"attempts: {ph['paid_by_attempts']}")  # fmt: skip
            if bh["late"]:
                late = [f"{x['start_s']:.2f}:{f(x['extra_ttft_ms'])}/{f(x['extra_total_ms'])}"
                        + (" ERR" * bool(x["err"])) for x in bh["late"][:80]]  # fmt: skip
                print("  began > 1.5 s in and paid (began s, extra TTFT / total ms):", ", ".join(late))
    for name, fd in (res.get("edgeproxy_logs") or {}).items():
        if fd is not None:
            print(f"{name}: access statuses {fd['access_statuses']}, errors {fd['access_errors'] or 0}, "
                  f"stderr warnings/errors {fd['log_problem_lines']}")  # fmt: skip
            for ln in fd["log_problems"][:5]:
                print("    ", ln)
    for e in res.get("errors", []):
        print("ERROR", e)
    print("\nHeadline (README):")
    for ln in headline(rows, holes[-1] if holes else None, a.rtt):
        print(ln)
    print(
        "\n"
        + c.noise_note(
            bg, la0, la1,
            "Direct and via alternate call by call; the borders run in threads of the bench process, the "
            "origin, edges, sidecars and the SDK app in processes of their own.",
        )
    )  # fmt: skip
    print(f"elapsed {res['elapsed_s']} s")


if __name__ == "__main__":
    c.run_main(main)

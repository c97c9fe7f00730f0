"""Route choice between egress lines: where traffic goes, how fast it moves, whether it flaps.

Setup (all started here, all stopped at the end, on error and Ctrl-C too): the fake origin
(a subprocess), one LineSim in a thread of this process in front of it, and edgeproxy (a
subprocess) with 2 or 3 ``bind`` lines (a: 127.0.0.2, b: 127.0.0.3, c: 127.0.0.4) to the one
endpoint behind the simulator. The simulator adds a one-way delay per source address, so each
line has its own RTT (RTT = 2 x one-way; everything below is in RTT terms). A steady load of
small chat requests (closed loop: a few workers, paced to a total rate) runs through edgeproxy
the whole time; /-/status is sampled every 50 ms for the per-path request counters and the
preferred line.

Scenarios:
  1. share: lines at 80 / 20 (/ 50) ms; after 3 probes per line, load for 15 s (quick 3 s):
     share of requests per line. Target: >= 95 % on the 20 ms line.
  2. time to move: swap the 80 and 20 ms delays, 3 times; time from the swap until the
     preferred line is the 20 ms one, in seconds and probe intervals, sampled every 50 ms and
     from edgeproxy's own "now prefers" log line (with 3 lines it may stop on the 50 ms line
     first: shown as "via"). Target: <= 3 intervals (each).
  3. flapping: 20 / 24 (/ 50) ms with +-3 ms of jitter per line re-drawn every 200 ms, 60 s
     (quick 20 s): route switches per minute. Target: <= 1 / min.
  4. outlier: 20 / 50 (/ 80) ms; the 20 ms line spikes for exactly one of its probes (the spike
     starts 0.4 interval after a probe and ends as soon as the next probe has finished), then
     3 intervals are watched. Target: no switch. Run twice when the probe timeout allows no
     1 s probe: a spike of 0.8 x probe.timeout (a slow answer: the estimator's outlier filter),
     and the 1 s spike itself (no answer within probe.timeout: a failed probe).

Usage: .venv/bin/python bench/route.py [--quick] [--lines 3] [--interval 1] [--timeout T]
Output: a table with MET/MISSED per target, details, a noise note, and as the last line one
JSON object {"bench": "route", ...}. Exit status 0 whatever the targets say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import uvloop

sys.path.insert(0, str(c.ROOT))
from tests.fakes.linesim import LineSim

ADDR = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
EDGE_PY = str(c.ROOT / ".venv" / "bin" / "python") if (c.ROOT / ".venv" / "bin" / "python").exists() else c.PY
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "route bench"}]}).encode()
SAMPLE_EVERY = 0.050  # /-/status sampling period
TOLERANCE_MS = 10.0
Res = dict[str, Any]


def ms(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


# --------------------------------------------------------------------------- edgeproxy admin


class Admin(c.AdminClient):
    """/-/status and /metrics of the edgeproxy under test."""

    async def metrics(self) -> dict[str, Any]:
        """Probe results per line ({"ok": {line: n}, "fail": {...}}) and route switches."""
        out: dict[str, Any] = {"ok": Counter(), "fail": Counter(), "switches": 0}
        for name, labels, value in await self.samples():
            if labels.get("upstream") != "openai":
                continue
            if name == "edgeproxy_probes_total":
                out[labels["result"]][labels["line"]] += int(value)
            elif name == "edgeproxy_route_switches_total":
                out["switches"] = int(value)
        return out

    async def probes(self) -> Counter[str]:
        """Probes finished (ok + failed) per line."""
        m = await self.metrics()
        return m["ok"] + m["fail"]


class Monitor:
    """Samples /-/status every 50 ms: requests per line, SRTT per line, the preferred line.

    "preferred" and "switches" come from /-/status when it has them. Otherwise the preferred
    line is read from the traffic itself (the line whose request counter grew since the last
    sample: requests go to the first path in the order, which is what "preferred" means) and
    switches from /metrics (edgeproxy_route_switches_total).
    """

    def __init__(self, admin: Admin, lines: list[str]) -> None:
        self.admin = admin
        self.lines = lines
        self.pref: str | None = None
        self.source: str | None = None  # "status" or "traffic"
        self.requests: dict[str, int] = dict.fromkeys(lines, 0)
        self.srtt: dict[str, float | None] = dict.fromkeys(lines)
        self.paths: dict[str, dict[str, Any]] = {}
        self.switches_status: int | None = None
        # (time, preferred, {line: srtt_ms}, {line: requests})
        self.history: list[tuple[float, str | None, dict[str, float | None], dict[str, int]]] = []
        self.errors = 0
        self._tick = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            try:
                up = await self.admin.upstream()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.errors += 1
            else:
                self._update(up)
            next_t += SAMPLE_EVERY
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            next_t = max(next_t, loop.time())

    def _update(self, up: dict[str, Any]) -> None:
        now = time.monotonic()
        paths = {p["line"]: p for p in up["paths"]}
        reqs = {ln: int(paths[ln]["requests"]) for ln in self.lines}
        if isinstance(up.get("preferred"), str):
            self.source = "status"
            self.pref = up["preferred"]
        else:
            self.source = "traffic"
            grew = [ln for ln in self.lines if reqs[ln] > self.requests[ln]]
            if len(grew) == 1:
                self.pref = grew[0]
            elif grew:  # a change within the sample: the new one is the one that is not the old
                others = [ln for ln in grew if ln != self.pref]
                self.pref = max(others or grew, key=lambda ln: reqs[ln] - self.requests[ln])
        if isinstance(up.get("switches"), int):
            self.switches_status = up["switches"]
        self.requests = reqs
        self.paths = paths
        self.srtt = {ln: paths[ln]["srtt_ms"] for ln in self.lines}
        self.history.append((now, self.pref, dict(self.srtt), reqs))
        self._tick.set()
        self._tick = asyncio.Event()

    async def next_sample(self) -> None:
        await self._tick.wait()

    async def wait(self, cond: Callable[[], bool], timeout: float) -> float | None:
        """Monotonic time of the first sample where cond() holds, or None after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.next_sample(), max(0.01, deadline - time.monotonic()))
            if cond():
                return self.history[-1][0] if self.history else time.monotonic()
        return None

    async def switches(self) -> int:
        if self.switches_status is not None:
            return self.switches_status
        return int((await self.admin.metrics())["switches"])

    def window(self, t0: float, t1: float) -> list[tuple[float, str | None, dict[str, float | None], dict[str, int]]]:
        return [h for h in self.history if t0 <= h[0] <= t1]


# --------------------------------------------------------------------------- load


class Load:
    """Closed-loop load: ``workers`` clients, each paced to rate/workers requests per second.

    Closed loop keeps the requests in flight at most ``workers``: a line that turns slow (or a
    1 s spike) slows the workers down instead of piling requests up on it, so the counts show
    route choice, not pool spilling.
    """

    def __init__(self, url: str, rate: float, workers: int) -> None:
        self.url = url + "/v1/chat/completions"
        self.rate = rate
        self.workers = workers
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _worker(self, s: aiohttp.ClientSession, i: int) -> None:
        loop = asyncio.get_running_loop()
        period = self.workers / self.rate
        next_t = loop.time() + i * period / self.workers
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-route-bench"}
        while True:
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            t0 = loop.time()
            try:
                async with s.post(self.url, data=CHAT, headers=headers) as r:
                    await r.read()
                    self.statuses[str(r.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                self.statuses[type(e).__name__] += 1
            self.latencies.append(loop.time() - t0)
            next_t = max(next_t + period, loop.time())

    async def _run(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.workers * 2)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
            await asyncio.gather(*(self._worker(s, i) for i in range(self.workers)))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, a: argparse.Namespace, sim: LineSim, admin: Admin, mon: Monitor, log: Path) -> None:
        self.a = a
        self.log = log
        self.sim = sim
        self.admin = admin
        self.mon = mon
        self.lines: list[str] = mon.lines
        self.I: float = a.interval
        self.rtt: dict[str, float] = {}  # RTT ms per line, as set now

    def set_rtt(self, rtt_ms: dict[str, float]) -> None:
        """Set each line's RTT (ms); one-way delay = RTT / 2. One dict assignment: atomic."""
        self.rtt = dict(rtt_ms)
        self.sim.delay_by_source = {ADDR[ln]: max(0.0, v) / 2000 for ln, v in rtt_ms.items()}

    async def wait_probes(self, n: int, lines: list[str] | None = None, since: Counter[str] | None = None) -> bool:
        """Until every line (of ``lines``) has finished ``n`` probes more than ``since``."""
        lines = lines or self.lines
        since = since if since is not None else await self.admin.probes()
        deadline = time.monotonic() + n * self.I * 1.2 + 5 * self.I + 2
        while time.monotonic() < deadline:
            p = await self.admin.probes()
            if all(p[ln] - since[ln] >= n for ln in lines):
                return True
            await asyncio.sleep(0.05)
        return False

    def shares(self, r0: dict[str, int], r1: dict[str, int]) -> tuple[dict[str, int], int]:
        d = {ln: r1[ln] - r0[ln] for ln in self.lines}
        return d, sum(d.values())

    # -- 1 ---------------------------------------------------------------------------------
    async def share(self, res: Res) -> list[list[Any]]:
        rtt = {"a": 80.0, "b": 20.0, "c": 50.0}
        fast = "b"
        warm = await self.wait_probes(3, since=Counter())
        await self.mon.next_sample()
        t0, r0 = time.monotonic(), dict(self.mon.requests)
        await asyncio.sleep(self.a.share_s)
        await self.mon.next_sample()
        t1, r1 = time.monotonic(), dict(self.mon.requests)
        d, total = self.shares(r0, r1)
        frac = d[fast] / total if total else None
        prefs = Counter(h[1] for h in self.mon.window(t0, t1))
        res["share"] = {
            "rtt_ms": {ln: rtt[ln] for ln in self.lines},
            "seconds": round(t1 - t0, 2),
            "requests": d,
            "total": total,
            "req_per_s": round(total / (t1 - t0), 1),
            "fast_line": fast,
            "fast_share": None if frac is None else round(frac, 4),
            "warmup_probes_ok": warm,
            "preferred_samples": dict(prefs),
            "srtt_ms": dict(self.mon.srtt),
            "met": frac is not None and frac >= 0.95,
        }
        label = "/".join(f"{ln}={rtt[ln]:g}" for ln in self.lines)
        per = ", ".join(f"{ln} {100 * d[ln] / total:.1f}%" for ln in self.lines) if total else "no requests"
        return [
            [
                f"1 share ({label} ms RTT, {t1 - t0:.0f} s)",
                f"{100 * (frac or 0):.1f}% on {fast} (20 ms) of {total} req [{per}]",
                ">= 95%",
                mark(res["share"]["met"]),
            ]
        ]

    # -- 2 ---------------------------------------------------------------------------------
    async def move(self, res: Res) -> list[list[Any]]:
        rows, runs = [], []
        rng = random.Random(11)
        for k in range(3):
            # a random phase against the probes (else each swap would follow the last probe of the
            # settling wait and always see the slowest case)
            await asyncio.sleep(rng.uniform(0, self.I))
            old = self.mon.pref
            new_rtt = dict(self.rtt)
            new_rtt["a"], new_rtt["b"] = self.rtt["b"], self.rtt["a"]
            target = min(("a", "b"), key=lambda ln: new_rtt[ln])
            other = "b" if target == "a" else "a"
            p0 = await self.admin.probes()
            sw0 = await self.mon.switches()
            self.set_rtt(new_rtt)
            t_swap, wall_swap = time.monotonic(), time.time()
            t_move = await self.mon.wait(lambda t=target: self.mon.pref == t, timeout=8 * self.I)
            p1 = await self.admin.probes()
            secs = None if t_move is None else t_move - t_swap
            srtt_at = dict(self.mon.srtt)
            # settle: three probes on both swapped lines since the swap, so the next swap starts
            # from estimators whose whole median window sits at the new level
            await self.wait_probes(3, ["a", "b"], since=p0)
            sw1 = await self.mon.switches()
            # left the slowed line (with 3 lines it may stop at the 50 ms one on the way)
            leave = next(((h[0], h[1]) for h in self.mon.history if h[0] > t_swap and h[1] != old), None)
            # the same from edgeproxy's log: the reselect itself, to the ms (no sampling delay)
            events = [(t - wall_swap, ln) for t, ln in prefers_log(self.log) if t >= wall_swap - 0.001]
            log_s = next((t for t, ln in events if ln == target), None)
            via = [ln for _, ln in events[: [ln for _, ln in events].index(target)]] if log_s is not None else []
            run = {
                "swap": k + 1,
                "wall_swap": wall_swap,
                "from": old,
                "to": target,
                "seconds": None if secs is None else round(secs, 3),
                "intervals": None if secs is None else round(secs / self.I, 2),
                "log_seconds": None if log_s is None else round(log_s, 3),
                "left_slowed_line_s": None if leave is None else round(leave[0] - t_swap, 3),
                "left_to": None if leave is None else leave[1],
                "log_left_s": round(events[0][0], 3) if events else None,
                "via": via,  # preferred on the way (log), before the 20 ms line
                # probes finished on the line that turned slow / fast between swap and move
                "probes_slow_line": p1[other] - p0[other],
                "probes_fast_line": p1[target] - p0[target],
                "srtt_ms_at_move": srtt_at,
                "switches": sw1 - sw0,
                "met": secs is not None and secs <= 3 * self.I,
            }
            runs.append(run)
            rows.append(
                [
                    f"2 time to move #{k + 1} ({old}->{target})",
                    "no move in 8 intervals"
                    if secs is None
                    else f"{secs:.2f} s = {secs / self.I:.2f} intervals (log: {ms(log_s, 2)} s"
                    + (f"; via {','.join(via)} from {events[0][0]:.2f} s" if via else "")
                    + ")",
                    "<= 3 intervals",
                    mark(run["met"]),
                ]
            )
        vals = [r["seconds"] for r in runs if r["seconds"] is not None]
        worst = max(vals) if len(vals) == len(runs) else None
        res["move"] = {
            "runs": runs,
            "max_s": worst,
            "max_intervals": None if worst is None else round(worst / self.I, 2),
            "met": worst is not None and worst <= 3 * self.I,
        }
        rows.append(
            [
                "2 time to move, max of 3",
                "a swap never moved" if worst is None else f"{worst:.2f} s = {worst / self.I:.2f} intervals",
                "<= 3 intervals",
                mark(res["move"]["met"]),
            ]
        )
        return rows

    # -- 3 ---------------------------------------------------------------------------------
    async def flap(self, res: Res) -> list[list[Any]]:
        base = {"a": 20.0, "b": 24.0, "c": 50.0}
        base = {ln: base[ln] for ln in self.lines}
        rng = random.Random(7)

        async def jitter() -> None:
            while True:
                rtt = {ln: v + (rng.uniform(-3.0, 3.0) if ln in ("a", "b") else 0.0) for ln, v in base.items()}
                self.set_rtt(rtt)
                await asyncio.sleep(0.2)

        jt = asyncio.get_running_loop().create_task(jitter())
        try:
            # settle: 2 probes per line at the new levels (2 of 3 in the median window) before counting
            await self.wait_probes(2)
            await self.mon.next_sample()
            sw0 = await self.mon.switches()
            t0, r0 = time.monotonic(), dict(self.mon.requests)
            await asyncio.sleep(self.a.flap_s)
            await self.mon.next_sample()
            sw1 = await self.mon.switches()
            t1, r1 = time.monotonic(), dict(self.mon.requests)
        finally:
            jt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await jt
        self.set_rtt(base)
        win = self.mon.window(t0, t1)
        pref_changes = sum(1 for x, y in itertools.pairwise(win) if x[1] != y[1])
        srtts = {
            ln: [h[2][ln] for h in win if h[2].get(ln) is not None] for ln in ("a", "b") if ln in self.lines
        }  # fmt: skip
        gaps = [h[2]["b"] - h[2]["a"] for h in win if h[2].get("a") is not None and h[2].get("b") is not None]
        d, _ = self.shares(r0, r1)
        per_min = (sw1 - sw0) / (t1 - t0) * 60
        res["flap"] = {
            "rtt_ms": base,
            "jitter_ms": 3.0,
            "redraw_s": 0.2,
            "seconds": round(t1 - t0, 2),
            "switches": sw1 - sw0,
            "switches_per_min": round(per_min, 2),
            "preferred_changes_seen": pref_changes,
            "requests": d,
            "srtt_ms_range": {ln: [min(v), max(v)] if v else None for ln, v in srtts.items()},
            "srtt_gap_b_minus_a_ms": [round(min(gaps), 2), round(max(gaps), 2)] if gaps else None,
            "met": per_min <= 1.0,
        }
        return [
            [
                f"3 flapping (20/24 ms +-3 ms, {t1 - t0:.0f} s)",
                f"{per_min:.2f} switches/min ({sw1 - sw0} switches; srtt b-a "
                f"{ms(min(gaps) if gaps else None)}..{ms(max(gaps) if gaps else None)} ms)",
                "<= 1 / min",
                mark(res["flap"]["met"]),
            ]
        ]

    # -- 4 ---------------------------------------------------------------------------------
    async def outlier(self, res: Res, spike_ms: float, settle: bool) -> list[list[Any]]:
        base = {"a": 20.0, "b": 50.0, "c": 80.0}
        base = {ln: base[ln] for ln in self.lines}
        spiked, slow = "a", "b"
        if settle:
            p = await self.admin.probes()
            self.set_rtt(base)
            await self.wait_probes(2, since=p)
        await self.mon.wait(lambda: self.mon.pref == spiked, timeout=3 * self.I)
        pref0 = self.mon.pref
        sw0 = await self.mon.switches()
        m0 = await self.admin.metrics()
        n0 = m0["ok"][spiked] + m0["fail"][spiked]
        # a probe on the spiked line has just finished: the next one goes out 0.9-1.1 intervals later
        n, m = n0, m0
        deadline = time.monotonic() + 2 * self.I + 2
        while n == n0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no probe on line {spiked} within {2 * self.I + 2:g} s")
            await asyncio.sleep(0.01)
            m = await self.admin.metrics()
            n = m["ok"][spiked] + m["fail"][spiked]
        t_probe = time.monotonic()
        await asyncio.sleep(max(0.0, t_probe + 0.4 * self.I - time.monotonic()))
        await self.mon.next_sample()
        r_on = dict(self.mon.requests)
        self.set_rtt({**base, spiked: spike_ms})
        t_on = time.monotonic()
        # hold until exactly one more probe on that line has finished (answered or timed out)
        caught, m1 = n, m
        deadline = t_on + 2 * self.I + spike_ms / 1000 + 2
        while caught == n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            m1 = await self.admin.metrics()
            caught = m1["ok"][spiked] + m1["fail"][spiked]
        self.set_rtt(base)
        t_off = time.monotonic()
        ok_delta = m1["ok"][spiked] - m["ok"][spiked]
        await self.mon.next_sample()
        spiked_rtt = self.mon.paths[spiked]["last_rtt_ms"] if ok_delta else None
        srtt_after_spike = dict(self.mon.srtt)
        # watch 3 intervals after the spike
        await asyncio.sleep(3 * self.I)
        await self.mon.next_sample()
        t_end, r_end = time.monotonic(), dict(self.mon.requests)
        sw1 = await self.mon.switches()
        m2 = await self.admin.metrics()
        win = self.mon.window(t_on, t_end)
        prefs = [h[1] for h in win]
        changed = any(p != pref0 for p in prefs) or sw1 != sw0
        d, total = self.shares(r_on, r_end)
        slow_share = d[slow] / total if total else None
        row = {
            "rtt_ms": base,
            "spike_rtt_ms": spike_ms,
            "probe_timeout_ms": self.a.timeout * 1000,
            "spike_held_s": round(t_off - t_on, 3),
            "spike_started_after_probe_s": round(t_on - t_probe, 3),
            "probes_caught": caught - n,
            "spiked_probe": "answered" if ok_delta else "failed",
            "spiked_probe_rtt_ms": spiked_rtt,
            "srtt_ms_after_spike": srtt_after_spike,
            "probes_after_spike": (m2["ok"] + m2["fail"])[spiked] - caught,
            "preferred_before": pref0,
            "preferred_seen": dict(Counter(prefs)),
            "switches": sw1 - sw0,
            "preferred_changed": changed,
            "requests": d,
            "slow_line_share": None if slow_share is None else round(slow_share, 4),
            "met": not changed,
        }
        res.setdefault("outlier", []).append(row)
        why = "slow answer" if ok_delta else "probe failed (timeout)"
        return [
            [
                f"4 outlier: 1 probe at {spike_ms:g} ms RTT on the 20 ms line"
                + (" (>= probe.timeout)" if spike_ms >= self.a.timeout * 1000 else ""),
                f"{'SWITCHED' if changed else 'no switch'} ({sw1 - sw0} switches); {why}, "
                f"probe rtt {ms(spiked_rtt, 0)} ms; {100 * (slow_share or 0):.1f}% of {total} req to the 50 ms line",
                "no switch",
                mark(row["met"]),
            ]
        ]


# --------------------------------------------------------------------------- run


def write_config(
    path: Path, port: int, admin: int, sim: str, lines: list[str], interval: float, timeout: float
) -> None:
    lines_map = ", ".join(f"{ln}: {{bind: {ADDR[ln]}}}" for ln in lines)
    path.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"admin: {{listen: 127.0.0.1:{admin}}}\n"
        "log: {access: off}\n"
        f"lines: {{{lines_map}}}\n"
        f'upstreams: {{openai: {{prefix: /v1, endpoints: [{{url: "http://{sim}/v1"}}]}}}}\n'
        f"probe: {{interval: {round(interval * 1000)}ms, timeout: {round(timeout * 1000)}ms}}\n"
        f"route: {{tolerance: {TOLERANCE_MS:g}ms}}\n"
        "drain_timeout: 1s\n"
    )


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, sim: LineSim, res: Res) -> list[list[Any]]:
    lines = ["a", "b", "c"][: a.lines]
    port, admin_port = c.free_port(), c.free_port()
    cfg = tmp / "edgeproxy.yaml"
    write_config(cfg, port, admin_port, sim.address, lines, a.interval, a.timeout)
    res["config"] = cfg.read_text()
    rows: list[list[Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        admin = Admin(s, admin_port)
        mon = Monitor(admin, lines)
        load = Load(f"http://127.0.0.1:{port}", a.rate, a.workers)
        b = Bench(a, sim, admin, mon, tmp / "edgeproxy.log")
        b.set_rtt({ln: {"a": 80.0, "b": 20.0, "c": 50.0}[ln] for ln in lines})
        p = procs.start("edgeproxy", [EDGE_PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=tmp / "edgeproxy.log")
        await asyncio.to_thread(c.wait_http, f"http://127.0.0.1:{admin_port}/-/ready", p)
        await asyncio.to_thread(c.wait_port, port, p)
        mt = asyncio.get_running_loop().create_task(mon.run())
        load.start()
        t_start = time.monotonic()
        try:
            steps: list[tuple[str, Callable[[], Awaitable[list[list[Any]]]]]] = [
                ("share", lambda: b.share(res)),
                ("move", lambda: b.move(res)),
                ("flap", lambda: b.flap(res)),
            ]
            spikes = [min(1000.0, 0.8 * a.timeout * 1000)]
            if spikes[0] < 1000.0:
                spikes.append(1000.0)
            for i, spike in enumerate(spikes):
                steps.append((f"outlier{i + 1}", lambda sp=spike, first=i == 0: b.outlier(res, sp, settle=first)))
            for name, step in steps:
                t = time.monotonic()
                try:
                    rows += await step()
                except Exception as e:  # report and go on: one broken scenario should not hide the others
                    rows.append([name, f"ERROR {type(e).__name__}: {e}", "-", "MISSED"])
                    res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
                res.setdefault("phase_s", {})[name] = round(time.monotonic() - t, 1)
                if procs.died():
                    raise RuntimeError("; ".join(procs.died()))
        finally:
            await load.stop()
            mt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mt
        res["elapsed_s"] = round(time.monotonic() - t_start, 1)
        lat = sorted(load.latencies)
        res["load"] = {
            "rate_target": a.rate,
            "workers": a.workers,
            "requests": len(lat),
            "statuses": dict(load.statuses),
            "latency_ms": {k: round(v * 1000, 1) for k, v in c.summarize(lat).items() if k != "n"},
        }
        res["preferred_source"] = mon.source
        res["status_sample_errors"] = mon.errors
        res["sim_connections_total"] = sim.connections_total
        m = await admin.metrics()
        res["probes"] = {"ok": dict(m["ok"]), "fail": dict(m["fail"])}
        res["switches_total"] = m["switches"]
        with contextlib.suppress(OSError):
            bad = [ln for ln in (tmp / "edgeproxy.log").read_text(errors="replace").splitlines()
                   if any(w in ln for w in ("WARNING", "ERROR", "Traceback"))]  # fmt: skip
            res["edgeproxy_log_problems"] = bad[:10]
    return rows


_PREFERS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO .* now prefers .* via (\w+)$")


def prefers_log(log: Path) -> list[tuple[float, str]]:
    """(epoch seconds, line) of every "upstream openai now prefers ... via LINE" in edgeproxy's stderr."""
    out = []
    with contextlib.suppress(OSError):
        for ln in log.read_text(errors="replace").splitlines():
            m = _PREFERS.match(ln)
            if m and "upstream openai " in ln:
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                out.append((t, m.group(3)))
    return out


def add_log_times(res: Res, log: Path) -> None:
    res["prefers_log"] = [[round(t, 3), line] for t, line in prefers_log(log)]


def details(res: Res) -> None:
    print()
    if "share" in res:
        s = res["share"]
        print(f"1 share: requests {s['requests']} in {s['seconds']} s ({s['req_per_s']} req/s); srtt_ms {s['srtt_ms']}")
    for r in res.get("move", {}).get("runs", []):
        print(
            f"2 swap #{r['swap']}: {r['from']}->{r['to']} in {ms(r['seconds'], 3)} s sampled, "
            f"{ms(r.get('log_seconds'), 3)} s by edgeproxy's log (first change {ms(r.get('log_left_s'), 3)} s, "
            f"via {r.get('via') or '-'}); probes finished from swap to detection (+<=50 ms): "
            f"slowed line {r['probes_slow_line']}, sped-up line {r['probes_fast_line']}; "
            f"srtt_ms at the move {r['srtt_ms_at_move']}; switches {r['switches']}"
        )
    if "flap" in res:
        f = res["flap"]
        print(
            f"3 flapping: {f['switches']} switches in {f['seconds']} s; "
            f"preferred changes seen {f['preferred_changes_seen']}; "
            f"srtt range {f['srtt_ms_range']}; requests {f['requests']}"
        )
    for o in res.get("outlier", []):
        print(
            f"4 outlier {o['spike_rtt_ms']:g} ms (probe timeout {o['probe_timeout_ms']:g} ms): spike held "
            f"{o['spike_held_s']} s from {o['spike_started_after_probe_s']} s after a probe, caught "
            f"{o['probes_caught']} probe ({o['spiked_probe']}, rtt {o['spiked_probe_rtt_ms']} ms); "
            f"srtt_ms after {o['srtt_ms_after_spike']}; {o['probes_after_spike']} probes after; "
            f"preferred seen {o['preferred_seen']}; requests {o['requests']}"
        )
    ld = res.get("load", {})
    print(
        f"load: {ld.get('requests')} requests, statuses {ld.get('statuses')}, latency ms {ld.get('latency_ms')} "
        f"({ld.get('workers')} workers, {ld.get('rate_target')} req/s target)"
    )
    print(
        f"preferred line read from: {res.get('preferred_source')} "
        + (
            "(/-/status has no 'preferred': the line whose request counter grew in each 50 ms sample; "
            "switches from /metrics edgeproxy_route_switches_total)"
            if res.get("preferred_source") == "traffic"
            else "(/-/status)"
        )
    )
    print(f"probes: ok {res.get('probes', {}).get('ok')}, failed {res.get('probes', {}).get('fail')}; "
          f"route switches in the whole run {res.get('switches_total')}")  # fmt: skip
    if res.get("edgeproxy_log_problems"):
        print("edgeproxy stderr warnings/errors:")
        for ln in res["edgeproxy_log_problems"]:
            print("   ", ln[:300])
    for e in res.get("errors", []):
        print("ERROR", e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    ap.add_argument("--lines", type=int, choices=(2, 3), default=2, help="egress lines (default 2)")
    ap.add_argument("--interval", type=float, default=1.0, help="probe.interval, seconds (default 1)")
    ap.add_argument("--timeout", type=float, help="probe.timeout, seconds (default: = interval, the most allowed)")
    ap.add_argument("--rate", type=float, default=30.0, help="load, requests/s in total (default 30)")
    ap.add_argument("--workers", type=int, default=4, help="load clients (default 4)")
    a = ap.parse_args()
    a.timeout = a.timeout or a.interval
    if a.timeout > a.interval:
        ap.error("--timeout may not exceed --interval (edgeproxy refuses probe.timeout > probe.interval)")
    a.share_s = 3.0 if a.quick else 15.0
    a.flap_s = 20.0 if a.quick else 60.0
    sys.setswitchinterval(0.0005)  # the simulator's thread shares the GIL with the load client
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(
        f"route: {a.lines} lines, probe.interval {a.interval:g} s (bench setting; edgeproxy's default is 5 s), "
        f"probe.timeout {a.timeout:g} s, route.tolerance {TOLERANCE_MS:g} ms, load {a.rate:g} req/s from "
        f"{a.workers} workers; loadavg before {la0}",
        flush=True,
    )
    res: Res = dict(bench="route", quick=a.quick, lines=a.lines, interval_s=a.interval, timeout_s=a.timeout,
                    tolerance_ms=TOLERANCE_MS, loadavg_before=la0, background=bg)  # fmt: skip
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-route-") as td, c.Procs() as procs:
        tmp = Path(td)
        oport = c.free_port()
        c.start_fake_origin(procs, tmp, oport)
        sim = LineSim("127.0.0.1", oport).start_in_thread()
        try:
            rows = uvloop.run(bench(a, tmp, procs, sim, res))
        finally:
            sim.stop_thread()
            add_log_times(res, tmp / "edgeproxy.log")
    la1 = c.loadavg()
    res["loadavg_after"] = la1
    print()
    c.print_table(["scenario", "measured", "target", "result"], rows)
    details(res)
    print(c.noise_note(bg, la0, la1, "Shared machine: other work may run beside the benchmark."))
    res["targets"] = {
        "share_95pct": res.get("share", {}).get("met"),
        "move_3_intervals": res.get("move", {}).get("met"),
        "flap_1_per_min": res.get("flap", {}).get("met"),
        "outlier_no_switch": [o["met"] for o in res.get("outlier", [])],
    }
    res.pop("config", None)
    c.final_json(res)


if __name__ == "__main__":
    c.run_main(main)

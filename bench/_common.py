"""Shared helpers for the benchmarks: child processes, ports, readiness, /proc sampling, tables.

Every child is started in its own session with PR_SET_PDEATHSIG, so it dies with the
benchmark even if the benchmark is killed; ``Procs`` stops them all on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

Popen = subprocess.Popen[bytes]
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The project's own venv python for edgeproxy processes, when there is one (else this one).
EDGE_PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else PY
NGINX = "/usr/sbin/nginx"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- machine


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port, never one this process handed out before: benches that start many
    processes at once would otherwise get the same ephemeral port twice (two edgeproxies on one
    admin port: the second exits, and the first answers the readiness check for both). A small
    race with other programs binding ports remains: acceptable here."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE := hard (children inherit it). Returns the new limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_jiffies() -> tuple[int, int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    steal = f[7] if len(f) > 7 else 0
    return sum(f) - idle, steal, sum(f)


def background_cpu(seconds: float = 1.0) -> dict[str, float]:
    """Busy and steal % of all cores over ``seconds`` before the benchmark starts anything."""
    b0, s0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, s1, t1 = _cpu_jiffies()
    dt = max(t1 - t0, 1)
    return {"busy_pct": round(100 * (b1 - b0) / dt, 1), "steal_pct": round(100 * (s1 - s0) / dt, 1)}


def rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        return round(int(m.group(1)) / 1024, 1) if m else None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def noise_note(
    bg: dict[str, float], la_before: str, la_after: str, setup: str = "Baselines ran in the same run."
) -> str:
    """One line on how quiet the machine was, for every benchmark's output."""
    cores = os.cpu_count() or 1
    load1 = float(la_before.split()[0])
    if bg["busy_pct"] > 10 or bg["steal_pct"] > 2 or load1 > 0.5 * cores:
        verdict = "NOISY: other work was running; treat the numbers as rough and re-run"
    else:
        verdict = "quiet before start"
    return (
        f"{cores} cores; background CPU before start {bg['busy_pct']}% busy, {bg['steal_pct']}% steal; "
        f"loadavg before {la_before}, after {la_after} ({verdict}). "
        f"{setup} The loadavg after includes the benchmark's own load."
    )


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(values: list[float], ps: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    s = sorted(values)
    out = {f"p{p:g}": pct(s, p) for p in ps}
    out["max"] = s[-1] if s else float("nan")
    out["n"] = len(s)
    return out


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print(" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def verdict(value: float | None, limit: float, le: bool = True) -> str:
    if value is None or value != value:
        return "n/a"
    return "PASS" if (value <= limit if le else value >= limit) else "MISS"


def final_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, separators=(",", ":"), default=str), flush=True)


def _pdeathsig() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """Starts child processes and stops every one of them (TERM, then KILL) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, Popen]] = []

    def start(self, name: str, argv: list[str], log: Path | None = None, stdout: Path | None = None) -> Popen:
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL
        err = open(log, "wb") if log else subprocess.DEVNULL
        p = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, preexec_fn=_pdeathsig,
        )  # fmt: skip
        for f in (out, err):
            if not isinstance(f, int):
                f.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: Popen, timeout: float = 10.0) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def died(self) -> list[str]:
        return [f"{name} exited with {p.returncode}" for name, p in self.procs if p.poll() is not None]

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for _name, p in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main(); Ctrl-C / SIGTERM stop it cleanly (its ``with Procs()`` stops the children)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: every process this benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)


def wait_port(port: int, proc: Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_http(url: str, proc: Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered 200")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not 200 after {timeout}s")


def edgeproxy_status(admin: int) -> dict[str, Any]:
    """Listener and upstream-path counters from /-/status (in-flight and open connections: leak check)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/-/status", timeout=5) as r:
        st = json.loads(r.read())
    return {"listeners": st.get("listeners"), "paths": [p for u in st.get("upstreams", []) for p in u.get("paths", [])]}


# --------------------------------------------------------------------------- the actors


def start_nginx(procs: Procs, tmp: Path, port: int, body: str) -> Popen:
    """nginx answering every request with ``body`` (JSON); all its paths inside ``tmp``."""
    tmp.chmod(0o755)  # as root, the workers run as nobody
    temps = "".join(f"  {k}_temp_path {tmp}/{k}_temp;\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{\n  access_log off;\n{temps}  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
        f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
        f"    location / {{ default_type application/json; return 200 '{body}'; }}\n  }}\n}}\n"
    )
    p = procs.start("nginx", [NGINX, "-c", str(conf)], log=tmp / "nginx-stderr.log")
    wait_port(port, p)
    return p


def start_fake_origin(procs: Procs, tmp: Path, port: int, *extra: str) -> Popen:
    argv = [PY, "-m", "tests.fakes.origin", "--port", str(port), *extra]
    p = procs.start("origin", argv, log=tmp / "origin.log")
    wait_port(port, p)
    return p


def start_edgeproxy(procs: Procs, tmp: Path, origin: str, pool: int = 2048) -> tuple[Popen, int, int]:
    """edgeproxy with access log and metrics on (access log to a file). Returns (proc, port, admin port)."""
    port, admin = free_port(), free_port()
    cfg = tmp / "edgeproxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}\nlog: {{access: json}}\n"
        f'upstreams:\n  openai:\n    prefix: /v1\n    endpoints: [{{url: "{origin}/v1"}}]\n'
        f"pool: {{max_per_path: {pool}}}\ndrain_timeout: 2s\n"
    )
    argv = [PY, "-m", "edgeproxy", "run", "-c", str(cfg)]
    p = procs.start("edgeproxy", argv, log=tmp / "edgeproxy.log", stdout=tmp / "access.log")
    wait_http(f"http://127.0.0.1:{admin}/-/ready", p)
    wait_port(port, p)
    return p, port, admin


def start_bare(procs: Procs, tmp: Path, origin: str) -> tuple[Popen, int]:
    port = free_port()
    argv = [PY, str(ROOT / "bench" / "bare_proxy.py"), "--port", str(port), "--upstream", origin]
    p = procs.start("bare_proxy", argv, log=tmp / "bare.log")
    wait_port(port, p)
    return p, port


def edgeproxy_findings(tmp: Path) -> dict[str, Any]:
    """Statuses from edgeproxy's access log, and its warnings/errors/tracebacks from stderr."""
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(tmp / "access.log", "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                statuses[str(rec.get("status"))] += 1
                if rec.get("error"):
                    errors[str(rec["error"])] += 1
    bad: list[str] = []
    with contextlib.suppress(OSError):
        for line in (tmp / "edgeproxy.log").read_text(errors="replace").splitlines():
            if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error")):
                bad.append(line[:300])
    return {"access_statuses": dict(statuses), "access_errors": dict(errors), "log_problems": bad[:20],
            "log_problem_lines": len(bad)}  # fmt: skip


def print_findings(f: dict[str, Any]) -> None:
    print(f"edgeproxy access log statuses: {f['access_statuses']}; errors: {f['access_errors'] or 0}")
    print(f"edgeproxy stderr warnings/errors: {f['log_problem_lines']}")
    for line in f["log_problems"][:10]:
        print("   ", line)


# --------------------------------------------------------------------------- admin API

_METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample in a Prometheus text exposition."""
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            yield m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))


class AdminClient:
    """/-/status and /metrics of the edgeproxy under test (benchmarks add what they read)."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.s = session
        self.base = f"http://127.0.0.1:{port}"

    async def status(self) -> dict[str, Any]:
        async with self.s.get(self.base + "/-/status") as r:
            st: dict[str, Any] = await r.json(content_type=None)
            return st

    async def upstream(self, name: str = "openai") -> dict[str, Any]:
        st = await self.status()
        up = next((u for u in st["upstreams"] if u["name"] == name), None)
        if up is None:
            raise ValueError(f"no upstream {name} in /-/status")
        return up

    async def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        async with self.s.get(self.base + "/metrics") as r:
            return metric_samples(await r.text())

"""Command line: ``edgeproxy run | check | status``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from . import __version__
from .config import Config, ConfigError, default_config, load_file
from .demo import add_demo_arguments  # the options only: the demo's server stack loads in demo.main

__all__ = ["main"]


def _load(path: str | None) -> Config:
    path = path or os.environ.get("EDGEPROXY_CONFIG")
    return load_file(path) if path else default_config()


def _setup_logging(level: str, buffer: int) -> logging.Handler:
    # Not logging.basicConfig: its handler writes with a blocking write(2), and a stderr nobody
    # reads would freeze the event loop at its next log line.
    from .telemetry.processlog import install

    handler = install(level, buffer)
    # aiohttp logs a traceback for every malformed request at ERROR: a client's bad input is
    # not our error, and a log line per bad request lets clients flood the log.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    return handler


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"edgeproxy: invalid config:\n{exc}", file=sys.stderr)
        return 1
    handler = _setup_logging(config.log.level, config.log.buffer)
    import uvloop

    from .ops.server import serve

    try:
        try:
            uvloop.run(serve(config))
        finally:
            # What the reader has not taken yet: a bounded wait, then stderr is as it was.
            handler.close()
    except OSError as exc:
        # Most often: address already in use, or permission to bind.
        print(f"edgeproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"edgeproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"{args.config or 'config'}: invalid\n{exc}", file=sys.stderr)
        return 1
    n_paths = sum(len(ep.lines) for u in config.upstreams for ep in u.endpoints)
    print(
        f"{config.source or 'built-in default'}: ok ({len(config.listen)} listeners,"
        f" {len(config.upstreams)} upstreams, {len(config.lines)} lines, {n_paths} paths)"
    )
    return 0


def _admin_request(args: argparse.Namespace, path: str, method: str = "GET") -> urllib.request.Request:
    """A request to the admin listener, with the admin token if one was given."""
    headers = {"x-edgeproxy-token": args.token} if args.token else {}
    data = b"" if method == "POST" else None
    return urllib.request.Request(args.admin.rstrip("/") + path, data=data, headers=headers, method=method)


def _admin_refused(command: str, url: str, exc: urllib.error.HTTPError, token: str | None) -> str | None:
    """What to tell the user when the admin refused us (rather than answered), else None."""
    if exc.code == 401:
        if token:
            return f"edgeproxy {command}: {url} refused the admin token (401): it is not one of admin.listen.tokens"
        return (
            f"edgeproxy {command}: {url} wants an admin token (401): pass --token, or set"
            " EDGEPROXY_ADMIN_TOKEN (one of admin.listen.tokens)"
        )
    if exc.code == 403:
        try:
            why = orjson.loads(exc.read()).get("error")
        except (orjson.JSONDecodeError, AttributeError, OSError):
            why = None
        return f"edgeproxy {command}: {url} refused the request (403): {why or exc.reason}"
    return None


def cmd_status(args: argparse.Namespace) -> int:
    req = _admin_request(args, "/-/status")
    url = req.full_url
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status: dict[str, Any] = orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        refused = _admin_refused("status", url, exc, args.token)
        print(refused or f"edgeproxy status: {url} answered {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"edgeproxy status: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"edgeproxy {status['version']}  pid {status['pid']}  up {status['uptime_s']}s", end="")
    print(f"  generation {status['generation']}")
    header = "_ UPSTREAM ENDPOINT LINE STATE SRTT_MS RTTVAR_MS PROBED INFLIGHT ACTIVE IDLE REQUESTS FAILURES"
    rows = [(*("" if h == "_" else h for h in header.split()), "LAST ERROR")]
    for u in status["upstreams"]:
        for i, p in enumerate(u["paths"]):
            ago = p["last_probe_s_ago"]
            rows.append(
                (
                    "*" if i == 0 else "",  # the path new requests take
                    u["name"],
                    p["endpoint"],
                    p["line"],
                    p["state"],
                    _num(p["srtt_ms"]),
                    _num(p["rttvar_ms"]),
                    "-" if ago is None else f"{ago}s ago",
                    str(p["inflight"]),
                    str(p["active"]),
                    str(p["idle"]),
                    str(p["requests"]),
                    str(p["failures"]),
                    (p["last_error"] or "")[:60],
                )
            )
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and not args.plain
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        if color:
            line = _paint(line, r, n == 0)
        print(line)
    keys = [
        (u["name"], url, k) for u in status["upstreams"] for url, pool in (u.get("keys") or {}).items() for k in pool
    ]
    if keys:
        table = [("UPSTREAM", "ENDPOINT", "KEY", "STATE", "READY_IN", "REQUESTS", "429S", "LEFT", "TOKENS")]
        for name, url, k in keys:
            ready = k["available_in_s"]
            table.append(
                (
                    name,
                    url,
                    k["id"],
                    k["state"] + (f" ({k['disabled']})" if k.get("disabled") else ""),
                    "-" if not ready else f"{ready:.1f}s",
                    str(k["requests"]),
                    str(k["limited"]),
                    str(k.get("requests_left", "-")),
                    str(k["tokens"]),
                )
            )
        _print_table(table)
    queues = [(u["name"], u["admission"]) for u in status["upstreams"] if u.get("admission")]
    if queues:
        table = [("UPSTREAM", "IN_FLIGHT", "MAX_INFLIGHT", "WAITING_HIGH", "WAITING_NORMAL", "WAITING_LOW")]
        for name, a in queues:
            waiting = a["waiting"]
            cap = a["max_inflight"]
            table.append((name, str(a["inflight"]), "-" if cap is None else str(cap),
                          *(str(waiting[c]) for c in ("high", "normal", "low"))))  # fmt: skip
        _print_table(table)
    return 0


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print()
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ANSI colours for `edgeproxy status` on a terminal: state at a glance.
_STATE_COLOURS = {"up": "32", "unknown": "90", "cooling": "33", "ejected": "33", "down": "31"}


def _paint(line: str, row: tuple[str, ...], header: bool) -> str:
    if header:
        return f"\x1b[1m{line}\x1b[0m"
    code = _STATE_COLOURS.get(row[4], "0")
    if row[0] == "*":
        code += ";1"  # bold: the path that takes traffic
    return f"\x1b[{code}m{line}\x1b[0m"


def cmd_reload(args: argparse.Namespace) -> int:
    if args.pid is not None:
        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"edgeproxy reload: cannot signal pid {args.pid}: {exc}", file=sys.stderr)
            return 1
        print(f"sent SIGHUP to {args.pid} (the outcome is in its log)")
        return 0
    req = _admin_request(args, "/-/reload", "POST")
    url = req.full_url
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            result = orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        refused = _admin_refused("reload", url, exc, args.token)
        if refused is not None or exc.code != 400:  # (400: the new file is invalid; the old one serves on)
            print(refused or f"edgeproxy reload: {url} answered {exc.code} {exc.reason}", file=sys.stderr)
            return 1
        result = orjson.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"edgeproxy reload: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if result.get("ok"):
        print(f"reloaded (generation {result.get('generation')}): {result.get('changes')}")
        return 0
    print(f"reload failed, still serving the previous config:\n{result.get('error')}", file=sys.stderr)
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo  # its main loads the server stack: only when asked (check must run on a bare python)

    return demo.main(args)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _token_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        default=os.environ.get("EDGEPROXY_ADMIN_TOKEN") or None,
        help="admin token, for an admin listener with tokens (default: $EDGEPROXY_ADMIN_TOKEN; the"
        " variable keeps it out of `ps`)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="A lean proxy for LLM API traffic.")
    parser.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the proxy (built-in default config without -c)")
    p.add_argument("-c", "--config", help="YAML config file (default: $EDGEPROXY_CONFIG, else built-in)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a config file; exit 1 with every error found")
    p.add_argument("-c", "--config", help="YAML config file")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("reload", help="make a running edgeproxy re-read its config file")
    p.add_argument("--admin", default="http://127.0.0.1:8788", help="admin listener URL")
    p.add_argument("--pid", type=int, help="send SIGHUP to this process instead")
    _token_argument(p)
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser(
        "demo", help="40 s on this machine: a degrade and a failover; an edge hop across a simulated border"
    )
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("status", help="show paths and counters of a running edgeproxy")
    p.add_argument("--admin", default="http://127.0.0.1:8788", help="admin listener URL")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--plain", action="store_true", help="no colours even on a terminal (also: NO_COLOR=1)")
    _token_argument(p)
    p.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return int(args.func(args))

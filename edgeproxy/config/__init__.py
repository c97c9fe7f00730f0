"""Configuration: YAML in, frozen dataclasses out.

``load_file`` / ``load_dict`` are called at start-up and on every reload (SIGHUP, ``POST
/-/reload``); they either return a complete, validated ``Config`` or raise one ``ConfigError``
listing every problem found, each as ``key.path: message (how to fix)``. Nothing else in
edgeproxy parses config text: the rest of the code reads these dataclasses and may trust them.

Secrets (endpoint keys, listener tokens, via tokens, proxy passwords) never appear in error
messages; ``dump_redacted`` is the only view of a config meant for humans.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

import yaml  # type: ignore[import-untyped]

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "EndpointConfig",
    "FailoverConfig",
    "KeyConfig",
    "LimitsConfig",
    "LineConfig",
    "ListenerConfig",
    "LogConfig",
    "PoolConfig",
    "ProbeConfig",
    "RouteConfig",
    "TLSConfig",
    "UpstreamConfig",
    "default_config",
    "dump_redacted",
    "load_dict",
    "load_file",
    "parse_duration",
    "parse_size",
]


class ConfigError(ValueError):
    """All problems found in one config, each 'key.path: message (how to fix)'."""

    errors: tuple[str, ...]
    source: str | None

    def __init__(self, errors: Iterable[str], source: str | None = None) -> None:
        self.errors = tuple(errors)
        self.source = source
        super().__init__("\n".join(self.errors))


# -- units ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|µs|ms|s|m|h)\s*")
_DURATION_UNITS: Final = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "use seconds as a number, or e.g. 100us, 250ms, 1.5s, 2m, 1h, 1m30s"
# Lower-case suffix -> bytes. A bare k/m/g is 1024-based, like most tools' "1M".
_SIZE_UNITS: Final = {
    **{"": 1, "b": 1},
    **{"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20},
    **{"g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40},
    **{"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)")
_SIZE_HINT = "use bytes as an integer, or e.g. 512, 64KiB, 32MiB, 1GiB, 10KB"


def _tname(v: object) -> str:
    """The YAML-ish name of a value's type, for 'expected X, got Y' messages."""
    if v is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping"})
    return names.get(type(v), type(v).__name__)


def parse_duration(v: object) -> float:
    """Seconds from a number of seconds or a string such as '250ms', '1.5s', '1m30s'."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a duration, got {_tname(v)} ({_DURATION_HINT})")
    if isinstance(v, str):
        text = v.strip().lower()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            parts = _DURATION_PART.findall(text)
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        else:
            raise ValueError(f"invalid duration {v!r} ({_DURATION_HINT})")
    else:
        seconds = float(v)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {v!r}: must be a finite, non-negative time")
    return seconds


def parse_size(v: object) -> int:
    """Bytes from an integer or a string such as '64KiB' (1024-based) or '10KB' (1000-based)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a size, got {_tname(v)} ({_SIZE_HINT})")
    if isinstance(v, float):
        if not v.is_integer() or v < 0:
            raise ValueError(f"invalid size {v!r}: a size is a whole, non-negative number of bytes")
        return int(v)
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"invalid size {v}: must not be negative")
        return v
    m = _SIZE_RE.fullmatch(v.strip().lower())
    if m is None or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"invalid size {v!r} ({_SIZE_HINT})")
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _fmt_size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n} bytes"


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One inbound socket. ``address`` is normalized: '127.0.0.1:8787', '[::1]:8787', 'unix:/x'."""

    address: str
    host: str | None
    port: int | None
    unix: str | None
    tokens: tuple[str, ...] = ()
    tls: TLSConfig | None = None

    def is_loopback(self) -> bool:
        """True when only this host can connect: a unix socket, 127.0.0.0/8, ::1, localhost."""
        if self.unix is not None:
            return True
        return self.host is not None and _is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenerConfig | None  # None: no admin listener


@dataclass(frozen=True, slots=True)
class LineConfig:
    """An egress line. ``kind`` is 'direct' (optionally ``bind``), 'proxy' or 'via'."""

    name: str
    kind: str
    bind: str | None = None
    proxy: str | None = None
    via: str | None = None
    token: str | None = None
    compress: str = "br"
    ca: str | None = None


def key_id(key: str) -> str:
    """A short, stable name for a key that reveals nothing of it: ``k-`` + 6 hex of its SHA-256."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:6]


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One key of an endpoint's pool, with its optional local limits (per minute)."""

    key: str = field(repr=False)  # the secret: never in a repr, a log line or an error
    id: str = ""  # what logs, metrics and /-/status call it
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One origin of an upstream. ``url`` is scheme://host[:port]base_path, no trailing slash."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: never in a repr
    lines: tuple[str, ...] = ()
    priority: int = 1
    models: tuple[tuple[str, str], ...] = ()
    # The pool behind ``keys`` (same order), with ids and local limits. Empty when the
    # endpoint was built by hand from bare keys: ``key_configs()`` fills it in.
    key_pool: tuple[KeyConfig, ...] = field(default=(), repr=False)

    @property
    def origin(self) -> str:
        """'scheme://host:port' with the port always present: what the edge allow-list compares."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def model_map(self) -> dict[str, str]:
        return dict(self.models)

    def key_configs(self) -> tuple[KeyConfig, ...]:
        if self.key_pool or not self.keys:
            return self.key_pool
        return tuple(KeyConfig(k, key_id(k)) for k in self.keys)


_RETRY_ON_DEFAULT: Final = frozenset({"connect", "reset", "timeout", "429", "500", "502", "503", "504"})


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    retries: int = 2
    retry_on: frozenset[str] = _RETRY_ON_DEFAULT
    first_byte_timeout: float = 300.0
    first_event_timeout: float = 30.0
    stream_idle_timeout: float = 60.0
    hedge: float | None = None
    # Every key of the upstream rate-limited: how long a request may wait for one to free up
    # before it gets a 429 with Retry-After.
    queue_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    prefix: str
    provider: str
    endpoints: tuple[EndpointConfig, ...]
    failover: FailoverConfig


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    interval: float = 5.0
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    tolerance: float = 0.010


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_per_path: int = 256
    keepalive: float = 60.0
    warm: int = 1
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body: int = 32 * 1024 * 1024
    replay_body: int = 16 * 1024 * 1024
    max_header: int = 16 * 1024
    max_connections: int = 10000


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: str = "json"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[ListenerConfig, ...]
    admin: AdminConfig
    lines: tuple[LineConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    probe: ProbeConfig
    route: RouteConfig
    failover: FailoverConfig
    pool: PoolConfig
    limits: LimitsConfig
    log: LogConfig
    drain_timeout: float = 30.0
    source: str | None = None

    def line(self, name: str) -> LineConfig:
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(f"no line named {name!r}")


# -- validation context --------------------------------------------------------------------


class _Bad:
    """Stands in for a value whose error is already recorded (e.g. a missing env var)."""


_BAD: Final = _Bad()
_INT_RE = re.compile(r"[+-]?[0-9]+")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Ctx:
    """Collects errors while the sections are read; helpers return a fallback on error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[tuple[str, str]] = []
        self.order: dict[str, int] = {}  # path -> position in the document, to sort errors
        self.interpolated: set[str] = set()  # paths whose string came (partly) from ${...}

    def err(self, path: str, msg: str) -> None:
        self.errors.append((path, msg))

    def messages(self) -> list[str]:
        """The errors in document order (interpolation and cross-checks report out of order)."""

        def position(path: str) -> int:
            while path not in self.order and path:
                path = path[: max(path.rfind("."), path.rfind("["), 0)]
            return self.order.get(path, len(self.order)) if path else len(self.order)

        ordered = sorted(self.errors, key=lambda e: position(e[0]))
        return [f"{path or '(top level)'}: {msg}" for path, msg in ordered]

    def section(self, raw: object, path: str, allowed: Sequence[str]) -> dict[str, object]:
        """Check a mapping's keys against ``allowed``; null -> {}; wrong type -> {} + error."""
        if raw is None or raw is _BAD:
            return {}
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping with keys {', '.join(allowed)}, got {_tname(raw)}")
            return {}
        out: dict[str, object] = {}
        for key, value in raw.items():
            if key in allowed:
                out[key] = value
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            self.err(_join(path, key), f"unknown key ({hint})")
        return out

    def string(self, v: object, path: str, what: str = "a string") -> str | None:
        if v is _BAD:
            return None
        if not isinstance(v, str):
            self.err(path, f"expected {what}, got {_tname(v)}")
            return None
        return v

    def int_(self, m: Mapping[str, object], key: str, path: str, default: int, lo: int, hi: int | None = None) -> int:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        if isinstance(v, str) and p in self.interpolated and _INT_RE.fullmatch(v.strip()):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(p, f"expected an integer, got {_tname(v)}")
            return default
        if v < lo or (hi is not None and v > hi):
            self.err(p, f"{v} is out of range (allowed: {lo}..{hi})" if hi is not None else f"must be >= {lo}, got {v}")
            return default
        return v

    def duration(self, m: Mapping[str, object], key: str, path: str, default: float, *, zero_ok: bool = False) -> float:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        try:
            seconds = parse_duration(v)
        except ValueError as e:
            self.err(p, str(e))
            return default
        if seconds == 0 and not zero_ok:
            self.err(p, "must be greater than 0")
            return default
        return seconds

    def size(self, m: Mapping[str, object], key: str, path: str, default: int, minimum: int) -> int:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        try:
            n = parse_size(v)
        except ValueError as e:
            self.err(p, str(e))
            return default
        if n < minimum:
            self.err(p, f"{_fmt_size(n)} is too small (at least {_fmt_size(minimum)})")
            return default
        return n

    def choice(self, m: Mapping[str, object], key: str, path: str, default: str, choices: Sequence[str]) -> str:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        if v is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            return "off"
        text = self.string(v, p, "one of " + ", ".join(choices))
        if text is None:
            return default
        text = text.strip().lower()
        if text not in choices:
            self.err(p, f"{v!r} is not one of {', '.join(choices)}")
            return default
        return text


# -- ${VAR} interpolation ------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _interpolate_str(ctx: _Ctx, s: str, path: str) -> str | _Bad:
    if "${" not in s:
        return s
    out: list[str] = []
    pos, bad = 0, False
    for m in _VAR_RE.finditer(s):
        out.append(s[pos : m.start()])
        pos = m.end()
        if m.group(0) == "$${":
            out.append("${")
            continue
        inner = m.group(1)
        if inner is None:
            ctx.err(path, "unterminated ${ (close it with }, or write $${ for a literal ${)")
            bad = True
            continue
        name, sep, default = inner.partition(":-")
        if not _VAR_NAME.fullmatch(name) or "${" in default:
            # Never echo `inner`: a default may be a secret.
            ctx.err(path, "malformed ${...}: write ${NAME} or ${NAME:-default} (no nesting), or $${ for a literal ${")
            bad = True
            continue
        ctx.interpolated.add(path)
        value = ctx.env.get(name)
        if value is None or (sep and value == ""):
            if not sep:
                ctx.err(path, f"environment variable {name} is not set (export it or use ${{{name}:-default}})")
                bad = True
                continue
            value = default
        out.append(value)
    out.append(s[pos:])
    return _BAD if bad else "".join(out)


def _interpolate(ctx: _Ctx, v: object, path: str) -> object:
    ctx.order.setdefault(path, len(ctx.order))
    if isinstance(v, str):
        return _interpolate_str(ctx, v, path)
    if isinstance(v, dict):
        return {k: _interpolate(ctx, x, _join(path, k)) for k, x in v.items()}
    if isinstance(v, list):
        return [_interpolate(ctx, x, f"{path}[{i}]") for i, x in enumerate(v)]
    return v


# -- listeners -----------------------------------------------------------------------------

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?"
)
_MIN_TOKEN = 16  # shorter bearer tokens can be guessed by a patient client


def _is_loopback_host(host: str) -> bool:
    if host.rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def norm_host(host: str) -> str:
    """Lower-cased hostname or compressed IP; raises ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or not _HOSTNAME.fullmatch(host.lower()):
        raise ValueError(f"invalid host {host!r}")
    return host.lower()


def _parse_address(text: str) -> ListenerConfig:
    """'host:port', '[v6]:port' or 'unix:/path' -> a ListenerConfig without tokens/tls."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/edgeproxy.sock")
        return ListenerConfig(f"unix:{path}", None, None, path)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} has no port (write host:port, e.g. 127.0.0.1:8787)")
    if not host:
        raise ValueError(f"{text!r} has no host (write 127.0.0.1{text} for this host only, or 0.0.0.0{text} for all)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(_ip_or_none(host), ipaddress.IPv6Address):
            raise ValueError(f"{text!r}: [...] must hold an IPv6 address")
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8787")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number 1-65535")
    host, port = norm_host(host), int(port_text)
    shown = f"[{host}]" if ":" in host else host
    return ListenerConfig(f"{shown}:{port}", host, port, None)


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _readable_file(ctx: _Ctx, v: object, path: str) -> str | None:
    p = ctx.string(v, path, "a file path")
    if p is not None and not (os.path.isfile(p) and os.access(p, os.R_OK)):
        ctx.err(path, f"{p} does not exist or is not readable")
    return p


def _token(ctx: _Ctx, v: object, path: str) -> str | None:
    tok = ctx.string(v, path)
    if tok is None:
        return None
    if not tok or any(c.isspace() for c in tok):
        ctx.err(path, "a token must be non-empty and contain no whitespace")
        return None
    if len(tok) < _MIN_TOKEN:
        ctx.err(
            path,
            f"token too short ({len(tok)} characters; use at least {_MIN_TOKEN}: short tokens are guessable;"
            " generate one with `openssl rand -hex 24`)",
        )
        return None
    return tok


def _str_list(v: object) -> list[tuple[int | None, object]]:
    """A list or a lone scalar as (index or None, item) pairs, for keys/tokens."""
    if isinstance(v, list):
        return list(enumerate(v))
    return [(None, v)]


def _listener(ctx: _Ctx, raw: object, path: str) -> ListenerConfig | None:
    if raw is _BAD:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        ctx.err(path, f"expected 'host:port' or 'unix:/path', got an integer (write 127.0.0.1:{raw})")
        return None
    if not isinstance(raw, (str, dict)):
        ctx.err(path, f"expected 'host:port', 'unix:/path' or a mapping with address, got {_tname(raw)}")
        return None
    m: dict[str, object] = (
        {"address": raw} if isinstance(raw, str) else ctx.section(raw, path, ("address", "tokens", "tls"))
    )
    addr_path = path if isinstance(raw, str) else f"{path}.address"
    if m.get("address") is None:
        ctx.err(addr_path, "missing (e.g. address: 127.0.0.1:8787)")
        return None
    text = ctx.string(m["address"], addr_path, "'host:port' or 'unix:/path'")
    if text is None:
        return None
    try:
        lc = _parse_address(text)
    except ValueError as e:
        ctx.err(addr_path, str(e))
        return None
    tokens = []
    for i, item in _str_list(m.get("tokens") or []):
        tok = _token(ctx, item, f"{path}.tokens" + ("" if i is None else f"[{i}]"))
        if tok is not None:
            tokens.append(tok)
    tls = None
    if m.get("tls") is not None:
        t = ctx.section(m["tls"], f"{path}.tls", ("cert", "key"))
        for k in ("cert", "key"):
            if k not in t and isinstance(m["tls"], dict):
                ctx.err(f"{path}.tls.{k}", "missing (tls needs both cert and key)")
        cert = _readable_file(ctx, t["cert"], f"{path}.tls.cert") if "cert" in t else None
        key = _readable_file(ctx, t["key"], f"{path}.tls.key") if "key" in t else None
        tls = TLSConfig(cert, key) if cert and key else None
    if not lc.is_loopback() and not m.get("tokens"):  # given but invalid: already reported
        ctx.err(
            path,
            f"{lc.address} is reachable from other hosts; set {path}.tokens (clients send x-edgeproxy-token)"
            " or listen on 127.0.0.1",
        )
    return replace(lc, tokens=tuple(tokens), tls=tls)


def _conflicts(a: ListenerConfig, b: ListenerConfig) -> bool:
    if a.address == b.address:
        return True
    if a.port is None or a.port != b.port or a.host is None or b.host is None:
        return False
    # asyncio binds IPv6 sockets v6-only, so a wildcard only clashes within its own family.
    ia, ib = _ip_or_none(a.host), _ip_or_none(b.host)
    if ia is None or ib is None or ia.version != ib.version:
        return False
    return ia.is_unspecified or ib.is_unspecified


# -- lines ---------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9_-]+")
_COMPRESS = ("br", "gzip", "zstd", "off")


def _redact_url(text: str, *, keep_user: bool = False) -> str:
    """The URL with its credentials (or, with ``keep_user``, just the password) shown as ***.

    Greedy up to the last '@', so an unencoded '/' or '@' in a password cannot leak it.
    """
    if keep_user:
        return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):.*@", r"\1:***@", text)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://).*@", r"\1***@", text)


def _split_url(ctx: _Ctx, text: str, path: str, schemes: Sequence[str]) -> SplitResult | None:
    """urlsplit with the checks every URL here needs; errors show the URL redacted."""
    shown = _redact_url(text)
    if "://" not in text:
        ctx.err(path, f"{shown!r} has no scheme (write {schemes[0]}://{shown.strip()})")
        return None
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        ctx.err(path, f"{shown!r} is not a valid URL")
        return None
    if parts.scheme.lower() not in schemes:
        ctx.err(path, f"{shown!r}: scheme must be one of {', '.join(s + '://' for s in schemes)}")
        return None
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        ctx.err(path, f"{shown!r}: port must be a number 1-65535")
        return None
    if not parts.hostname:
        ctx.err(path, f"{shown!r} has no host")
        return None
    try:
        norm_host(parts.hostname)
    except ValueError as e:
        ctx.err(path, f"{shown!r}: {e}")
        return None
    if "?" in text or "#" in text:
        ctx.err(path, f"{shown!r}: a query or fragment is not allowed here")
        return None
    return parts


def _line(ctx: _Ctx, name: str, raw: object, path: str) -> LineConfig | None:
    m = ctx.section(raw, path, ("bind", "proxy", "via", "token", "compress", "ca"))
    kinds = [k for k in ("bind", "proxy", "via") if m.get(k) is not None]
    if len(kinds) > 1:
        ctx.err(
            path,
            f"{' and '.join(kinds)} cannot be combined; a line is one of:"
            " {bind: ...}, {proxy: ...}, {via: ...} or {} (direct)",
        )
        return None
    if "via" not in kinds:
        for k in ("token", "compress", "ca"):
            if k in m:
                ctx.err(f"{path}.{k}", "only applies to via lines (add via: https://edge:8443)")
    if "bind" in kinds:
        text = ctx.string(m["bind"], f"{path}.bind", "an IP address")
        ip = _ip_or_none(text) if text is not None else None
        if text is not None and ip is None:
            ctx.err(
                f"{path}.bind",
                f"{text!r} is not an IP address (bind takes this host's source address, e.g. 192.0.2.10)",
            )
        return LineConfig(name, "direct", bind=str(ip)) if ip else None
    if "proxy" in kinds:
        return _proxy_line(ctx, name, m["proxy"], f"{path}.proxy")
    if "via" not in kinds:
        return LineConfig(name, "direct")
    text = ctx.string(m["via"], f"{path}.via", "a URL such as https://edge.example.com:8443")
    parts = _split_url(ctx, text, f"{path}.via", ("https", "http")) if text is not None else None
    if parts is not None and (parts.username is not None or parts.path not in ("", "/")):
        ctx.err(f"{path}.via", "give only scheme://host:port (no credentials, put the secret in token; no path)")
        parts = None
    token = None
    if m.get("token") is None:
        ctx.err(f"{path}.token", "missing: a peer edge requires a token (one of the edge listener's tokens)")
    else:
        token = _token(ctx, m["token"], f"{path}.token")
    compress = ctx.choice(m, "compress", path, "br", _COMPRESS)
    if compress == "zstd" and not _zstd_available():
        ctx.err(f"{path}.compress", "zstd needs the zstandard package (pip install zstandard), or pick br")
    ca = _readable_file(ctx, m["ca"], f"{path}.ca") if m.get("ca") is not None else None
    if ca is not None and parts is not None and parts.scheme.lower() != "https":
        ctx.err(f"{path}.ca", "only applies to an https:// via URL (the hop is plain http)")
    if parts is None or token is None:
        return None
    return LineConfig(
        name, "via", via=f"{parts.scheme.lower()}://{parts.netloc.lower()}", token=token, compress=compress, ca=ca
    )


def _proxy_line(ctx: _Ctx, name: str, v: object, path: str) -> LineConfig | None:
    text = ctx.string(v, path, "a URL such as socks5://127.0.0.1:1080")
    if text is None:
        return None
    shown = _redact_url(text)
    if text.strip().lower().startswith("https://"):
        ctx.err(
            path,
            f"{shown!r}: https proxies are not supported;"
            " use http:// (the CONNECT tunnel still carries TLS end to end)",
        )
        return None
    parts = _split_url(ctx, text, path, ("http", "socks5", "socks5h"))
    if parts is None:
        return None
    if parts.port is None:
        ctx.err(path, f"{shown!r} has no port (e.g. http://proxy:3128 or socks5://127.0.0.1:1080)")
        return None
    if parts.path not in ("", "/"):
        ctx.err(path, f"{shown!r}: a proxy URL has no path")
        return None
    return LineConfig(name, "proxy", proxy=f"{parts.scheme.lower()}://{parts.netloc}")


@functools.cache
def _zstd_available() -> bool:
    try:
        importlib.import_module("zstandard")  # what edgeproxy.codec uses
        return True
    except ImportError:
        return False


def _lines(ctx: _Ctx, raw: object) -> tuple[LineConfig, ...]:
    if raw is None or raw == {} or raw is _BAD:
        return (LineConfig("direct", "direct"),)
    if not isinstance(raw, dict):
        ctx.err("lines", f"expected a mapping of line name -> settings (e.g. direct: {{}}), got {_tname(raw)}")
        return (LineConfig("direct", "direct"),)
    out = []
    for name, spec in raw.items():
        path = _join("lines", name)
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            ctx.err(path, "a line name uses only a-z, 0-9, _ and - (quote names such as 'no' or 'on')")
            continue
        line = _line(ctx, name, spec, path)
        if line is not None:
            out.append(line)
    return tuple(out)


# -- upstreams -----------------------------------------------------------------------------

_PROVIDERS = ("openai", "anthropic", "gemini")
_DEFAULT_UPSTREAMS: Final[dict[str, Any]] = {
    "openai": {"prefix": "/v1", "endpoints": [{"url": "https://api.openai.com/v1"}]},
    "anthropic": {"prefix": "/anthropic", "provider": "anthropic", "endpoints": [{"url": "https://api.anthropic.com"}]},
    "gemini": {
        "prefix": "/gemini",
        "provider": "gemini",
        "endpoints": [{"url": "https://generativelanguage.googleapis.com"}],
    },
}
_FAILOVER_KEYS = (
    "retries",
    "retry_on",
    "first_byte_timeout",
    "first_event_timeout",
    "stream_idle_timeout",
    "hedge",
    "queue_timeout",
)


def _failover(ctx: _Ctx, raw: object, path: str, base: FailoverConfig) -> FailoverConfig:
    m = ctx.section(raw, path, _FAILOVER_KEYS)
    retry_on = base.retry_on
    if m.get("retry_on") is not None and m["retry_on"] is not _BAD:
        items = m["retry_on"]
        if not isinstance(items, list):
            ctx.err(
                f"{path}.retry_on", f"expected a list (e.g. [connect, reset, timeout, 429, 503]), got {_tname(items)}"
            )
            items = []
        parsed = set()
        for i, item in enumerate(items):
            if item is _BAD:
                continue
            text = str(item).strip().lower() if isinstance(item, (int, str)) and not isinstance(item, bool) else ""
            if text in ("connect", "reset", "timeout") or (
                len(text) == 3 and text.isdigit() and 400 <= int(text) <= 599
            ):
                parsed.add(text)
            else:
                ctx.err(f"{path}.retry_on[{i}]", f"{item!r} is not connect, reset, timeout or a status 400-599")
        retry_on = frozenset(parsed) if isinstance(m["retry_on"], list) else base.retry_on
    hedge = base.hedge
    if "hedge" in m and m["hedge"] is not _BAD:
        h = m["hedge"]
        if h is None or h is False or (isinstance(h, str) and h.strip().lower() == "off"):
            hedge = None
        else:
            try:
                hedge = parse_duration(h) or None
                if hedge is None:
                    ctx.err(f"{path}.hedge", "must be greater than 0 (use off to disable hedging)")
            except ValueError as e:
                ctx.err(f"{path}.hedge", f"{e}, or off")
    return FailoverConfig(
        retries=ctx.int_(m, "retries", path, base.retries, 0, 10),
        retry_on=retry_on,
        first_byte_timeout=ctx.duration(m, "first_byte_timeout", path, base.first_byte_timeout),
        first_event_timeout=ctx.duration(m, "first_event_timeout", path, base.first_event_timeout),
        stream_idle_timeout=ctx.duration(m, "stream_idle_timeout", path, base.stream_idle_timeout),
        hedge=hedge,
        queue_timeout=ctx.duration(m, "queue_timeout", path, base.queue_timeout, zero_ok=True),
    )


_KEY_FIELDS = ("key", "id", "rpm", "tpm")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.:#-]{1,64}")


def _key(ctx: _Ctx, item: object, kp: str) -> KeyConfig | None:
    """One entry of `keys`: a bare key, or a mapping {key, id, rpm, tpm}."""
    m: dict[str, object] = ctx.section(item, kp, _KEY_FIELDS) if isinstance(item, dict) else {"key": item}
    key_path = f"{kp}.key" if isinstance(item, dict) else kp
    if isinstance(item, dict) and m.get("key") is None:
        ctx.err(key_path, "missing: the API key (e.g. key: ${OPENAI_API_KEY_2})")
        return None
    key = ctx.string(m.get("key"), key_path)
    if key == "":
        ctx.err(key_path, "empty key (is the variable it comes from empty? remove the entry to pass client keys)")
        return None
    if key is not None and any(c.isspace() for c in key):
        ctx.err(key_path, "key contains whitespace (a stray newline or space in the variable or file it comes from?)")
        return None
    kid = key_id(key) if key is not None else ""
    if m.get("id") is not None and m["id"] is not _BAD:
        given = ctx.string(m["id"], f"{kp}.id", "a short name (letters, digits, _ . : # -)")
        if given is not None and not _KEY_ID_RE.fullmatch(given):
            ctx.err(f"{kp}.id", "use 1-64 letters, digits and _ . : # - (it names the key in logs and metrics)")
        elif given is not None:
            kid = given
    rpm = ctx.int_(m, "rpm", kp, 0, 1) or None
    tpm = ctx.int_(m, "tpm", kp, 0, 1) or None
    return KeyConfig(key, kid, rpm, tpm) if key is not None else None


def _endpoint(ctx: _Ctx, raw: object, path: str, all_lines: Sequence[str]) -> EndpointConfig | None:
    if raw is _BAD:
        return None
    if not isinstance(raw, (str, dict)):
        ctx.err(path, f"expected a mapping with url (and keys, lines, priority, models) or a URL, got {_tname(raw)}")
        return None
    fields = ("url", "keys", "lines", "priority", "models")
    m: dict[str, object] = {"url": raw} if isinstance(raw, str) else ctx.section(raw, path, fields)
    url_path = path if isinstance(raw, str) else f"{path}.url"
    parts = None
    if m.get("url") is None:
        ctx.err(url_path, "missing (e.g. url: https://api.openai.com/v1)")
    else:
        text = ctx.string(m["url"], url_path, "a URL")
        parts = _split_url(ctx, text, url_path, ("https", "http")) if text is not None else None
    if parts is not None and (parts.username is not None or parts.password is not None):
        ctx.err(url_path, "credentials in the URL are not allowed; put the API key in keys")
        parts = None
    keys: list[KeyConfig] = []
    if m.get("keys") is not None:
        seen_keys: dict[str, str] = {}
        seen_ids: dict[str, str] = {}
        for i, item in _str_list(m["keys"]):
            kp = f"{path}.keys" + ("" if i is None else f"[{i}]")
            kc = _key(ctx, item, kp)
            if kc is None:
                continue
            if kc.key in seen_keys:
                ctx.err(kp, f"the same key as {seen_keys[kc.key]} (list each key once)")
            elif kc.id in seen_ids:
                ctx.err(kp, f"id {kc.id!r} is already used by {seen_ids[kc.id]} (give each key its own id)")
            else:
                seen_keys[kc.key], seen_ids[kc.id] = kp, kp
                keys.append(kc)
    lines = list(all_lines)
    if m.get("lines") is not None and m["lines"] is not _BAD:
        raw_lines = m["lines"] if isinstance(m["lines"], list) else None
        if raw_lines is None or not raw_lines:
            ctx.err(f"{path}.lines", "expected a non-empty list of line names (omit lines to use every line)")
        lines = []
        for i, item in enumerate(raw_lines or []):
            name = ctx.string(item, f"{path}.lines[{i}]", "a line name")
            if name is not None and name not in all_lines:
                ctx.err(f"{path}.lines[{i}]", f"unknown line {name!r} (configured lines: {', '.join(all_lines)})")
            elif name in lines:
                ctx.err(f"{path}.lines[{i}]", f"line {name!r} is listed twice")
            elif name is not None:
                lines.append(name)
    models: list[tuple[str, str]] = []
    if m.get("models") is not None and m["models"] is not _BAD:
        if not isinstance(m["models"], dict):
            ctx.err(
                f"{path}.models", f"expected a mapping of client model -> endpoint model, got {_tname(m['models'])}"
            )
        else:
            for src, dst in m["models"].items():
                mp = _join(f"{path}.models", src)
                if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
                    ctx.err(mp, "model names must be non-empty strings (quote names YAML reads as numbers)")
                else:
                    models.append((src, dst))
    priority = ctx.int_(m, "priority", path, 1, 1)
    if parts is None or parts.hostname is None:
        return None
    scheme, host = parts.scheme.lower(), norm_host(parts.hostname)
    port = parts.port or (443 if scheme == "https" else 80)
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != (443 if scheme == "https" else 80):
        netloc += f":{parts.port}"
    base_path = parts.path.rstrip("/")
    return EndpointConfig(
        f"{scheme}://{netloc}{base_path}",
        scheme,
        host,
        port,
        base_path,
        tuple(k.key for k in keys),
        tuple(lines),
        priority,
        tuple(models),
        tuple(keys),
    )


def _infer_provider(name: str, endpoints: Sequence[EndpointConfig]) -> str:
    if name in _PROVIDERS:
        return name
    host = endpoints[0].host if endpoints else ""
    if host == "anthropic.com" or host.endswith(".anthropic.com"):
        return "anthropic"
    if host == "googleapis.com" or host.endswith(".googleapis.com"):
        return "gemini"
    return "openai"


def _prefix(ctx: _Ctx, v: object, path: str) -> str | None:
    if v is None:
        ctx.err(path, "missing (e.g. prefix: /v1): the path under which clients reach this upstream")
        return None
    text = ctx.string(v, path, "a path such as /v1")
    if text is None:
        return None
    text = text.strip()
    if not text.startswith("/") or any(c in text for c in "?# ") or "//" in text:
        ctx.err(path, f"{text!r} must be a path starting with / (e.g. /v1), without spaces, // , ? or #")
        return None
    prefix = text.rstrip("/") or "/"
    if prefix == "/-" or prefix.startswith("/-/"):
        ctx.err(path, f"{prefix!r}: paths under /-/ are reserved for edgeproxy's own endpoints")
        return None
    return prefix


def _upstreams(ctx: _Ctx, raw: object, all_lines: Sequence[str], base: FailoverConfig) -> tuple[UpstreamConfig, ...]:
    if raw is None or raw == {} or raw is _BAD:
        raw = _DEFAULT_UPSTREAMS
    if not isinstance(raw, dict):
        ctx.err("upstreams", f"expected a mapping of upstream name -> settings, got {_tname(raw)}")
        return ()
    out: list[UpstreamConfig] = []
    prefixes: dict[str, str] = {}
    for name, spec in raw.items():
        path = _join("upstreams", name)
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            ctx.err(path, "an upstream name uses only a-z, 0-9, _ and -")
            continue
        m = ctx.section(spec, path, ("prefix", "provider", "endpoints", "failover"))
        if not isinstance(spec, dict):
            if spec is None:
                ctx.err(path, "missing settings (prefix and endpoints)")
            continue
        prefix = _prefix(ctx, m.get("prefix"), f"{path}.prefix")
        if prefix is not None and prefix in prefixes:
            ctx.err(
                f"{path}.prefix",
                f"{prefix} is already the prefix of upstream '{prefixes[prefix]}' (prefixes must be unique)",
            )
        elif prefix is not None:
            prefixes[prefix] = name
        endpoints: list[EndpointConfig] = []
        raw_eps = m.get("endpoints")
        if not isinstance(raw_eps, list) or not raw_eps:
            if raw_eps is not _BAD:
                ctx.err(
                    f"{path}.endpoints",
                    "expected a non-empty list of endpoints (e.g. [{url: https://api.openai.com/v1}])",
                )
        else:
            seen_urls: dict[str, int] = {}
            for i, ep in enumerate(raw_eps):
                e = _endpoint(ctx, ep, f"{path}.endpoints[{i}]", all_lines)
                if e is None:
                    continue
                if e.url in seen_urls:
                    # Paths are keyed by (upstream, url, line): two endpoints with one URL would
                    # share state. Several keys for one origin belong in one endpoint's `keys`.
                    ctx.err(
                        f"{path}.endpoints[{i}].url",
                        f"{e.url} is already endpoints[{seen_urls[e.url]}] (list both keys under one endpoint)",
                    )
                    continue
                seen_urls[e.url] = i
                endpoints.append(e)
        provider = _infer_provider(name, endpoints)
        if m.get("provider") is not None:
            provider = ctx.choice(m, "provider", path, provider, _PROVIDERS)
        failover = _failover(ctx, m.get("failover"), f"{path}.failover", base)
        if prefix is not None:
            out.append(UpstreamConfig(name, prefix, provider, tuple(endpoints), failover))
    return tuple(out)


# -- entry points --------------------------------------------------------------------------

_TOP_KEYS = (
    "listen",
    "admin",
    "lines",
    "upstreams",
    "probe",
    "route",
    "failover",
    "pool",
    "limits",
    "log",
    "drain_timeout",
)
_DEFAULT_LISTEN: Final = "127.0.0.1:8787"
_DEFAULT_ADMIN: Final = "127.0.0.1:8788"


def _admin(ctx: _Ctx, raw: object) -> AdminConfig:
    if raw is False or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return AdminConfig(None)
    m = ctx.section(raw, "admin", ("listen",))
    if "listen" not in m:
        return AdminConfig(_parse_address(_DEFAULT_ADMIN))
    v = m["listen"]
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() == "off"):
        return AdminConfig(None)
    return AdminConfig(_listener(ctx, v, "admin.listen"))


def load_dict(data: object, *, source: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed YAML (``None`` means empty: all defaults) into a ``Config``.

    Raises ``ConfigError`` listing every problem. ``env`` (default ``os.environ``) feeds ``${VAR}``.
    """
    ctx = _Ctx(os.environ if env is None else env)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): expected a mapping of sections ({', '.join(_TOP_KEYS)}), got {_tname(data)}"], source
        )
    top = ctx.section(_interpolate(ctx, data, ""), "", _TOP_KEYS)

    raw_listen = top.get("listen")
    listen: list[tuple[str, ListenerConfig]] = []
    if raw_listen is None:
        listen.append(("listen", _parse_address(_DEFAULT_LISTEN)))
    elif isinstance(raw_listen, list) and not raw_listen:
        ctx.err("listen", f"empty list (omit listen to use {_DEFAULT_LISTEN})")
    else:
        items = list(enumerate(raw_listen)) if isinstance(raw_listen, list) else [(None, raw_listen)]
        for i, item in items:
            p = "listen" if i is None else f"listen[{i}]"
            lc = _listener(ctx, item, p)
            if lc is not None:
                listen.append((p, lc))
    admin = _admin(ctx, top.get("admin"))
    bound = listen + ([("admin.listen", admin.listen)] if admin.listen is not None else [])
    for j, (p, lc) in enumerate(bound):
        clash = next((q for q, other in bound[:j] if _conflicts(other, lc)), None)
        if clash is not None:
            ctx.err(p, f"{lc.address} clashes with {clash} (each listener needs its own address)")

    lines = _lines(ctx, top.get("lines"))
    failover = _failover(ctx, top.get("failover"), "failover", FailoverConfig())
    upstreams = _upstreams(ctx, top.get("upstreams"), [ln.name for ln in lines], failover)

    m = ctx.section(top.get("probe"), "probe", ("interval", "timeout"))
    probe = ProbeConfig(ctx.duration(m, "interval", "probe", 5.0), ctx.duration(m, "timeout", "probe", 1.0))
    if probe.timeout > probe.interval:
        ctx.err("probe.timeout", f"{probe.timeout:g}s is longer than probe.interval ({probe.interval:g}s); lower it")
    m = ctx.section(top.get("route"), "route", ("tolerance",))
    route = RouteConfig(ctx.duration(m, "tolerance", "route", 0.010, zero_ok=True))
    m = ctx.section(top.get("pool"), "pool", ("max_per_path", "keepalive", "warm", "connect_timeout"))
    pool = PoolConfig(
        max_per_path=ctx.int_(m, "max_per_path", "pool", 256, 1),
        keepalive=ctx.duration(m, "keepalive", "pool", 60.0),
        warm=ctx.int_(m, "warm", "pool", 1, 0),
        connect_timeout=ctx.duration(m, "connect_timeout", "pool", 10.0),
    )
    if pool.warm > pool.max_per_path:
        ctx.err("pool.warm", f"{pool.warm} is more than pool.max_per_path ({pool.max_per_path})")
    m = ctx.section(top.get("limits"), "limits", ("max_body", "replay_body", "max_header", "max_connections"))
    limits = LimitsConfig(
        max_body=ctx.size(m, "max_body", "limits", 32 << 20, 1),
        replay_body=ctx.size(m, "replay_body", "limits", 16 << 20, 0),
        max_header=ctx.size(m, "max_header", "limits", 16 << 10, 1024),
        max_connections=ctx.int_(m, "max_connections", "limits", 10000, 1),
    )
    if limits.replay_body > limits.max_body:
        ctx.err(
            "limits.replay_body",
            f"{_fmt_size(limits.replay_body)} is larger than limits.max_body ({_fmt_size(limits.max_body)});"
            " lower replay_body or raise max_body",
        )
    m = ctx.section(top.get("log"), "log", ("access", "level"))
    if isinstance(m.get("level"), str) and str(m["level"]).strip().lower() == "warn":
        m["level"] = "warning"
    log = LogConfig(
        ctx.choice(m, "access", "log", "json", ("json", "text", "off")),
        ctx.choice(m, "level", "log", "info", ("debug", "info", "warning", "error")),
    )
    drain = ctx.duration(top, "drain_timeout", "", 30.0, zero_ok=True)

    if ctx.errors:
        raise ConfigError(ctx.messages(), source)
    return Config(
        tuple(lc for _, lc in listen), admin, lines, upstreams, probe, route, failover, pool, limits, log, drain, source
    )


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that rejects duplicate keys (the second `openai:` would silently win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[object, int] = {}
        for key_node, _ in getattr(node, "value", ()):
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, -1)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            seen[key] = key_node.start_mark.line if first == -1 else first
            if first != -1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_file(path: str, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; any problem -> ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror or e}"], path) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"], path) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        # Only the problem text: str(e) quotes the offending line, which may hold a secret.
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        what = ", ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError([f"{where}: YAML syntax error: {what}"], path) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML error: {type(e).__name__}"], path) from None
    return load_dict(data, source=path, env=env)


def default_config() -> Config:
    """The built-in config used when no file is given: a loopback sidecar for the three APIs."""
    return load_dict({}, env={})


def dump_redacted(cfg: Config) -> dict[str, Any]:
    """A JSON-able view of ``cfg`` with every secret replaced by '***' (for /-/status)."""

    def listener(lc: ListenerConfig | None) -> dict[str, Any] | None:
        if lc is None:
            return None
        tls = {"cert": lc.tls.cert, "key": lc.tls.key} if lc.tls else None
        return {"address": lc.address, "tokens": ["***"] * len(lc.tokens), "tls": tls}

    def line(ln: LineConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": ln.kind}
        if ln.bind is not None:
            out["bind"] = ln.bind
        if ln.proxy is not None:
            out["proxy"] = _redact_url(ln.proxy, keep_user=True)
        if ln.kind == "via":
            out.update(via=ln.via, token="***", compress=ln.compress, ca=ln.ca)
        return out

    def failover(f: FailoverConfig) -> dict[str, Any]:
        return {
            "retries": f.retries,
            "retry_on": sorted(f.retry_on),
            "first_byte_timeout": f.first_byte_timeout,
            "first_event_timeout": f.first_event_timeout,
            "stream_idle_timeout": f.stream_idle_timeout,
            "hedge": f.hedge,
            "queue_timeout": f.queue_timeout,
        }

    def endpoint(e: EndpointConfig) -> dict[str, Any]:
        return {
            "url": e.url,
            "keys": ["***"] * len(e.keys),
            "key_pool": [{"id": k.id, "rpm": k.rpm, "tpm": k.tpm} for k in e.key_configs()],
            "lines": list(e.lines),
            "priority": e.priority,
            "models": e.model_map(),
        }

    return {
        "source": cfg.source,
        "listen": [listener(lc) for lc in cfg.listen],
        "admin": {"listen": listener(cfg.admin.listen)},
        "lines": {ln.name: line(ln) for ln in cfg.lines},
        "upstreams": {
            u.name: {
                "prefix": u.prefix,
                "provider": u.provider,
                "endpoints": [endpoint(e) for e in u.endpoints],
                "failover": failover(u.failover),
            }
            for u in cfg.upstreams
        },
        "probe": {"interval": cfg.probe.interval, "timeout": cfg.probe.timeout},
        "route": {"tolerance": cfg.route.tolerance},
        "failover": failover(cfg.failover),
        "pool": {
            "max_per_path": cfg.pool.max_per_path,
            "keepalive": cfg.pool.keepalive,
            "warm": cfg.pool.warm,
            "connect_timeout": cfg.pool.connect_timeout,
        },
        "limits": {
            "max_body": cfg.limits.max_body,
            "replay_body": cfg.limits.replay_body,
            "max_header": cfg.limits.max_header,
            "max_connections": cfg.limits.max_connections,
        },
        "log": {"access": cfg.log.access, "level": cfg.log.level},
        "drain_timeout": cfg.drain_timeout,
    }

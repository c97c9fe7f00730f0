"""Entry points: ``load_file`` / ``load_dict`` / ``default_config``.

YAML (duplicate keys rejected) or an already-parsed dict in, a validated ``Config`` out, or one
``ConfigError`` listing every problem. The sections are read by ``listeners``, ``lines`` and
``upstreams``; the small ones (probe, route, pool, limits, log) are read here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import yaml  # type: ignore[import-untyped]

from .context import ConfigError, _Ctx
from .interpolate import _interpolate
from .lines import _lines
from .listeners import _conflicts, _listener, _parse_address
from .redact import _redact_url
from .schema import (
    AdminConfig,
    CacheConfig,
    Config,
    FailoverConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    PoolConfig,
    ProbeConfig,
    RouteConfig,
)
from .units import _fmt_size, _tname
from .upstreams import _failover, _upstreams

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
    "cache",
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
    m = ctx.section(
        top.get("limits"),
        "limits",
        (
            "max_body",
            "replay_body",
            "max_header",
            "max_connections",
            "max_connections_per_address",
            "header_timeout",
            "body_timeout",
            "keepalive_timeout",
            "buffer_memory",
        ),
    )
    limits = LimitsConfig(
        max_body=ctx.size(m, "max_body", "limits", 32 << 20, 1),
        replay_body=ctx.size(m, "replay_body", "limits", 16 << 20, 0),
        max_header=ctx.size(m, "max_header", "limits", 16 << 10, 1024),
        max_connections=ctx.int_(m, "max_connections", "limits", 10000, 1),
        max_connections_per_address=ctx.int_(m, "max_connections_per_address", "limits", 1024, 1),
        header_timeout=ctx.duration(m, "header_timeout", "limits", 10.0),
        body_timeout=ctx.duration(m, "body_timeout", "limits", 30.0),
        keepalive_timeout=ctx.duration(m, "keepalive_timeout", "limits", 75.0),
        buffer_memory=ctx.size(m, "buffer_memory", "limits", 256 << 20, 1 << 20),
    )
    if limits.buffer_memory < limits.replay_body:
        ctx.err(
            "limits.buffer_memory",
            f"{_fmt_size(limits.buffer_memory)} is smaller than limits.replay_body ({_fmt_size(limits.replay_body)}):"
            " a body that size could never be held; raise buffer_memory or lower replay_body",
        )
    if limits.replay_body > limits.max_body:
        ctx.err(
            "limits.replay_body",
            f"{_fmt_size(limits.replay_body)} is larger than limits.max_body ({_fmt_size(limits.max_body)});"
            " lower replay_body or raise max_body",
        )
    m = ctx.section(top.get("log"), "log", ("access", "level", "buffer"))
    if isinstance(m.get("level"), str) and str(m["level"]).strip().lower() == "warn":
        m["level"] = "warning"
    log = LogConfig(
        ctx.choice(m, "access", "log", "json", ("json", "text", "off")),
        ctx.choice(m, "level", "log", "info", ("debug", "info", "warning", "error")),
        ctx.size(m, "buffer", "log", 4 << 20, 64 << 10),
    )
    drain = ctx.duration(top, "drain_timeout", "", 30.0, zero_ok=True)
    cache = _cache_store(ctx, top.get("cache"))

    if ctx.errors:
        raise ConfigError(ctx.messages(), source)
    return Config(
        tuple(lc for _, lc in listen),
        admin,
        lines,
        upstreams,
        probe,
        route,
        failover,
        pool,
        limits,
        log,
        drain,
        source,
        cache,
    )


def _cache_store(ctx: _Ctx, raw: object) -> CacheConfig:
    m = ctx.section(raw, "cache", ("store", "max_memory", "max_entry"))
    store = "memory"
    if m.get("store") is not None:
        text = ctx.string(m["store"], "cache.store", "memory or a redis:// URL")
        if text is not None:
            text = text.strip()
            if text == "memory" or text.startswith(("redis://", "rediss://", "unix://")):
                store = text
            else:
                ctx.err("cache.store", f"{_redact_url(text)!r} is neither memory nor a redis:// (or rediss://) URL")
    return CacheConfig(
        store,
        ctx.size(m, "max_memory", "cache", 256 << 20, 1 << 20),
        ctx.size(m, "max_entry", "cache", 8 << 20, 1 << 10),
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

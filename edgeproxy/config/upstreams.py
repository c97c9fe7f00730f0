"""Upstreams: prefixes, providers, endpoints with their key pools, and failover settings.

``_DEFAULT_UPSTREAMS`` is the built-in set used when a config names none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from .context import _BAD, _Ctx, _join, _str_list
from .hosts import norm_host
from .lines import _NAME_RE, _split_url
from .listeners import _ca_file
from .schema import (
    BUILTIN_MODEL_TIMEOUTS,
    AdmissionConfig,
    EjectionConfig,
    EndpointConfig,
    FailoverConfig,
    FallbackConfig,
    KeyConfig,
    ModelTimeouts,
    UpstreamCacheConfig,
    UpstreamConfig,
    key_id,
)
from .units import _tname, parse_duration

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
    "stream_first_byte_timeout",
    "first_event_timeout",
    "stream_idle_timeout",
    "hedge",
    "queue_timeout",
    "ejection",
    "models",
    "resume",
)
_EJECTION_KEYS = ("origin_errors", "local_failures", "base_time", "max_time")
_MODEL_TIMEOUT_KEYS = ("first_byte_timeout", "stream_first_byte_timeout", "first_event_timeout", "stream_idle_timeout")


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
        stream_first_byte_timeout=ctx.duration(m, "stream_first_byte_timeout", path, base.stream_first_byte_timeout),
        first_event_timeout=ctx.duration(m, "first_event_timeout", path, base.first_event_timeout),
        stream_idle_timeout=ctx.duration(m, "stream_idle_timeout", path, base.stream_idle_timeout),
        hedge=hedge,
        queue_timeout=ctx.duration(m, "queue_timeout", path, base.queue_timeout, zero_ok=True),
        ejection=_ejection(ctx, m.get("ejection"), f"{path}.ejection", base.ejection),
        models=_model_timeouts(ctx, m.get("models"), f"{path}.models", base.models),
        resume=ctx.switch(m, "resume", path, base.resume),
    )


def _ejection(ctx: _Ctx, raw: object, path: str, base: EjectionConfig) -> EjectionConfig:
    if raw is None:
        return base  # (inherited: checked where it was written)
    m = ctx.section(raw, path, _EJECTION_KEYS)
    ejection = EjectionConfig(
        origin_errors=ctx.int_(m, "origin_errors", path, base.origin_errors, 1, 1000),
        local_failures=ctx.int_(m, "local_failures", path, base.local_failures, 1, 1000),
        base_time=ctx.duration(m, "base_time", path, base.base_time),
        max_time=ctx.duration(m, "max_time", path, base.max_time),
    )
    if ejection.max_time < ejection.base_time:
        ctx.err(f"{path}.max_time", f"must be at least base_time ({ejection.base_time:g}s)")
    return ejection


def _model_timeouts(
    ctx: _Ctx, raw: object, path: str, base: tuple[tuple[str, ModelTimeouts], ...]
) -> tuple[tuple[str, ModelTimeouts], ...]:
    """`failover.models`: {pattern: {timeouts}}; matched in order, before the built-in ones."""
    if raw is None or raw is _BAD:
        return base
    if not isinstance(raw, dict):
        ctx.err(
            path,
            f"expected a mapping of model patterns to timeouts (e.g. o3*: {{first_event_timeout: 10m}}),"
            f" got {_tname(raw)}",
        )
        return base
    out = []
    for pattern, spec in raw.items():
        mp = f"{path}.{pattern}"
        if not isinstance(pattern, str) or not pattern.strip():
            ctx.err(mp, "a model name or pattern (fnmatch: * and ?) is expected")
            continue
        m = ctx.section(spec, mp, _MODEL_TIMEOUT_KEYS)
        if not m and spec is not _BAD:
            ctx.err(mp, "set at least one of " + ", ".join(_MODEL_TIMEOUT_KEYS))
            continue
        values = {k: ctx.duration(m, k, mp, 0.0) if m.get(k) is not None else None for k in _MODEL_TIMEOUT_KEYS}
        out.append((pattern, ModelTimeouts(**values)))
    return (*out, *BUILTIN_MODEL_TIMEOUTS)


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
        ctx.err(
            path,
            f"expected a mapping with url (and keys, lines, priority, weight, models, ca) or a URL, got {_tname(raw)}",
        )
        return None
    fields = ("url", "keys", "lines", "priority", "weight", "models", "ca")
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
    weight = ctx.int_(m, "weight", path, 0, 1, 1_000_000) if m.get("weight") is not None else None
    ca = _ca_file(ctx, m["ca"], f"{path}.ca") if m.get("ca") is not None else None
    if ca is not None and parts is not None and parts.scheme.lower() != "https":
        ctx.err(f"{path}.ca", "only applies to an https:// endpoint (this one is plain http)")
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
        ca,
        weight,
    )


_FALLBACK_FIELDS = ("on", "model", "from")
# An error code as the APIs write them: OpenAI's context_length_exceeded, Anthropic's
# overloaded_error, Gemini's RESOURCE_EXHAUSTED.
_CODE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,99}")
# A model name as a request body carries it; a Gemini model also goes into the URL's path.
_MODEL_RE = re.compile(r'[^\s"\\]{1,200}')
_GEMINI_MODEL_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _fallback_on(ctx: _Ctx, v: object, p: str) -> str | None:
    """An entry's `on`: an error code, or a status 400-599 (a number or a string) as 3 digits."""
    if v is _BAD:
        return None
    if v is None:
        ctx.err(p, "required: the origin's error code (e.g. context_length_exceeded) or an HTTP status 400-599")
        return None
    text = str(v).strip() if isinstance(v, (int, str)) and not isinstance(v, bool) else None
    if text is None:
        ctx.err(p, f"expected an error code or an HTTP status 400-599, got {_tname(v)}")
        return None
    if text.isascii() and text.isdigit():
        if len(text) == 3 and 400 <= int(text) <= 599:
            return text
        ctx.err(p, f"{text} is not a status 400-599 (only error answers are rerouted)")
        return None
    if not _CODE_RE.fullmatch(text):
        ctx.err(
            p,
            f"{text!r} is not an error code (letters, digits, _ . : -, starting with a letter, e.g."
            " context_length_exceeded) nor a status 400-599",
        )
        return None
    return text


def _fallback_model(ctx: _Ctx, v: object, p: str, provider: str) -> str | None:
    if v is _BAD:
        return None
    if not isinstance(v, str):
        ctx.err(p, f"expected a model name, got {_tname(v)} (quote names YAML reads as numbers)")
        return None
    gemini = provider == "gemini"
    if not (_GEMINI_MODEL_RE if gemini else _MODEL_RE).fullmatch(v):
        allowed = "letters, digits, _ . -" if gemini else "no spaces, quotes or backslashes"
        ctx.err(p, f"{v!r} is not a model name (1-200 characters: {allowed})")
        return None
    return v


def _fallbacks(ctx: _Ctx, raw: object, path: str, provider: str) -> tuple[FallbackConfig, ...]:
    """`fallbacks`: a list of {on, model, from}. Checked statically: a fallback to the model it
    falls back from, and an entry listed twice."""
    if raw is None or raw is _BAD:
        return ()
    if not isinstance(raw, list):
        ctx.err(path, f"expected a list of {{on: <error code or status>, model: <model>}}, got {_tname(raw)}")
        return ()
    out: list[FallbackConfig] = []
    seen: dict[tuple[str, str | None, str], str] = {}
    for i, item in enumerate(raw):
        ip = f"{path}[{i}]"
        if item is _BAD:
            continue
        if not isinstance(item, dict):
            ctx.err(ip, f"expected a mapping like {{on: context_length_exceeded, model: gpt-4.1}}, got {_tname(item)}")
            continue
        if True in item:
            # YAML 1.1 reads a bare `on` key as the boolean true: that is the `on` key.
            if "on" in item:
                ctx.err(f"{ip}.on", "given twice")
            item = {("on" if k is True else k): v for k, v in item.items()}
        m = ctx.section(item, ip, _FALLBACK_FIELDS)
        on = _fallback_on(ctx, m.get("on"), f"{ip}.on")
        model = None
        if m.get("model") is None:
            ctx.err(f"{ip}.model", "required: the model the request is sent again with (e.g. model: gpt-4.1)")
        else:
            model = _fallback_model(ctx, m["model"], f"{ip}.model", provider)
        source = _fallback_model(ctx, m["from"], f"{ip}.from", provider) if m.get("from") is not None else None
        if on is None or model is None or (m.get("from") is not None and source is None):
            continue
        if source == model:
            ctx.err(f"{ip}.model", f"{model!r} is the model it falls back from (from: {source})")
            continue
        key = (on.lower(), source, model)
        if key in seen:
            ctx.err(ip, f"the same fallback as {seen[key]}")
            continue
        seen[key] = ip
        out.append(FallbackConfig(on, model, source))
    return tuple(out)


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
        m = ctx.section(spec, path, ("prefix", "provider", "endpoints", "failover", "fallbacks", "cache", "admission"))
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
        fallbacks = _fallbacks(ctx, m.get("fallbacks"), f"{path}.fallbacks", provider)
        cache = _cache(ctx, m.get("cache"), f"{path}.cache")
        admission = _admission(ctx, m.get("admission"), f"{path}.admission")
        if prefix is not None:
            out.append(UpstreamConfig(name, prefix, provider, tuple(endpoints), failover, fallbacks, cache, admission))
    return tuple(out)


def _cache(ctx: _Ctx, raw: object, path: str) -> UpstreamCacheConfig | None:
    """``cache: {ttl: 1h, shared: off}``; absent, null or ``off``: no cache."""
    if raw is None or raw is False or raw is _BAD or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return None
    m = ctx.section(raw, path, ("ttl", "shared"))
    if not isinstance(raw, dict):
        return None
    if m.get("ttl") is None:
        ctx.err(f"{path}.ttl", "missing: how long answers are kept (e.g. ttl: 1h)")
        return None
    return UpstreamCacheConfig(ctx.duration(m, "ttl", path, 3600.0), ctx.switch(m, "shared", path, False))


def _admission(ctx: _Ctx, raw: object, path: str) -> AdmissionConfig | None:
    """``admission: {max_inflight: 64, queue: 10000, queue_timeout: 30s}``; absent, null or
    ``off``: none (no cap, no queue, priorities ignored)."""
    if raw is None or raw is False or raw is _BAD or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return None
    m = ctx.section(raw, path, ("max_inflight", "queue", "queue_timeout"))
    if not isinstance(raw, dict):
        return None
    base = AdmissionConfig()
    cap = ctx.int_(m, "max_inflight", path, 0, 1, 1_000_000) if m.get("max_inflight") is not None else None
    return AdmissionConfig(
        cap,
        ctx.int_(m, "queue", path, base.queue, 0, 10_000_000),
        ctx.duration(m, "queue_timeout", path, base.queue_timeout, zero_ok=True),
    )

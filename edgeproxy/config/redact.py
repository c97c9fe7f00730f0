"""Hiding secrets: ``dump_redacted`` (the only view of a config meant for humans) and URL redaction.

Endpoint keys, listener tokens, via tokens and proxy passwords show as '***'.
"""

from __future__ import annotations

import re
from typing import Any

from .schema import Config, EndpointConfig, FailoverConfig, LineConfig, ListenerConfig


def _redact_url(text: str, *, keep_user: bool = False) -> str:
    """The URL with its credentials (or, with ``keep_user``, just the password) shown as ***.

    Greedy up to the last '@', so an unencoded '/' or '@' in a password cannot leak it.
    """
    if keep_user:
        return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):.*@", r"\1:***@", text)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://).*@", r"\1***@", text)


def dump_redacted(cfg: Config) -> dict[str, Any]:
    """A JSON-able view of ``cfg`` with every secret replaced by '***' (for /-/status)."""

    def listener(lc: ListenerConfig | None) -> dict[str, Any] | None:
        if lc is None:
            return None
        tls = {"cert": lc.tls.cert, "key": lc.tls.key} if lc.tls else None
        return {
            "address": lc.address,
            "tokens": ["***"] * len(lc.tokens),
            "token_classes": [
                {"name": c.name, "priority": c.priority, "max_priority": c.max_priority} for c in lc.token_classes
            ],
            "tls": tls,
            "hosts": list(lc.hosts),
            "origins": list(lc.origins),
        }

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
            "weight": e.weight,
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
                "fallbacks": [{"on": f.on, "model": f.model, "from": f.from_model} for f in u.fallbacks],
                "cache": None if u.cache is None else {"ttl": u.cache.ttl, "shared": u.cache.shared},
                "admission": None
                if u.admission is None
                else {
                    "max_inflight": u.admission.max_inflight,
                    "queue": u.admission.queue,
                    "queue_timeout": u.admission.queue_timeout,
                },
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
            "max_connections_per_address": cfg.limits.max_connections_per_address,
            "header_timeout": cfg.limits.header_timeout,
            "body_timeout": cfg.limits.body_timeout,
            "keepalive_timeout": cfg.limits.keepalive_timeout,
            "buffer_memory": cfg.limits.buffer_memory,
        },
        "log": {"access": cfg.log.access, "level": cfg.log.level, "buffer": cfg.log.buffer},
        "drain_timeout": cfg.drain_timeout,
        "cache": {
            "store": _redact_url(cfg.cache.store),
            "max_memory": cfg.cache.max_memory,
            "max_entry": cfg.cache.max_entry,
        },
    }

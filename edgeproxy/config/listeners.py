"""Listeners: inbound addresses ('host:port', '[v6]:port', 'unix:/path'), their tokens and TLS."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace

from .context import _BAD, _Ctx, _str_list
from .hosts import _ip_or_none, norm_host
from .schema import ListenerConfig, TLSConfig
from .units import _tname

_MIN_TOKEN = 16  # shorter bearer tokens can be guessed by a patient client


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
    if lc.unix is not None:
        problem = _socket_dir_problem(lc.unix)
        if problem is not None:
            ctx.err(addr_path, problem)
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


def _socket_dir_problem(path: str) -> str | None:
    """What keeps us from binding a unix socket at ``path``, or None. Its directory must be
    writable, or creatable (run makes it, as systemd's RuntimeDirectory would)."""
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    if os.path.isdir(directory):
        if os.access(directory, os.W_OK | os.X_OK):
            return None
        return f"cannot create the socket {path}: its directory {directory} is not writable by this user"
    parent = directory
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot create the socket {path}: {parent} is a file, not a directory"
    if os.access(parent, os.W_OK | os.X_OK):
        return None  # run creates the missing directories
    return (
        f"cannot create the socket {path}: its directory {directory} does not exist and {parent} is not"
        " writable by this user (create it, or under systemd set RuntimeDirectory=edgeproxy)"
    )


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

"""Listeners: inbound addresses ('host:port', '[v6]:port', 'unix:/path'), their tokens, TLS,
and what browsers may do with them (``hosts``, ``origins``: see engine/guard.py)."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import replace
from typing import Final

from ..proto.priority import PRIORITIES
from .context import _BAD, _Ctx, _str_list
from .hosts import _ip_or_none, norm_host
from .schema import ListenerConfig, TLSConfig, TokenClass
from .tokens import weakness
from .units import _tname

_TOKEN_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MIN_TOKEN = 16  # shorter bearer tokens can be guessed by a patient client
_ORIGIN: Final = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\[\]/:?#@\s]+)(?::([0-9]{1,5}))?/?")
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


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


def _ca_file(ctx: _Ctx, v: object, path: str) -> str | None:
    """A PEM bundle of CA certificates (trusted in addition to the system's): readable, and
    loadable, so a wrong file is a config error here and not a failed handshake later."""
    before = len(ctx.errors)
    p = _readable_file(ctx, v, path)
    if p is None or len(ctx.errors) > before:
        return p
    try:
        ssl.create_default_context().load_verify_locations(cafile=p)
    except (ssl.SSLError, OSError, ValueError) as e:
        ctx.err(path, f"{p} is not a PEM bundle of CA certificates ({e})")
    return p


def _token(ctx: _Ctx, v: object, path: str, exposed: bool) -> str | None:
    """One listener token; ``exposed``: other hosts can reach the listener, so the token is
    all that stands between them and it (no placeholder, no weak token)."""
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
    why = weakness(tok) if exposed else None
    if why is not None:
        ctx.err(path, why)
        return None
    return tok


def _token_class(ctx: _Ctx, m: dict[str, object], path: str) -> tuple[object, TokenClass]:
    """A token written as ``{token, name, priority, max_priority}``: (the token, its class)."""
    m = ctx.section(m, path, ("token", "name", "priority", "max_priority"))
    if m.get("token") is None:
        ctx.err(f"{path}.token", "missing (the secret clients send)")
    name = None
    if m.get("name") is not None:
        name = ctx.string(m["name"], f"{path}.name", "a name")
        if name is not None and not _TOKEN_NAME.fullmatch(name):
            ctx.err(f"{path}.name", f"{name!r}: use 1-64 letters, digits, _ . or - (it names the client in logs)")
            name = None
    cap = ctx.choice(m, "max_priority", path, "high", PRIORITIES)
    priority = ctx.choice(m, "priority", path, max("normal", cap, key=PRIORITIES.index), PRIORITIES)
    if PRIORITIES.index(priority) < PRIORITIES.index(cap):
        ctx.err(f"{path}.priority", f"{priority} is above max_priority ({cap})")
    return m.get("token"), TokenClass(name, priority, cap)


def _host_name(ctx: _Ctx, v: object, path: str) -> str | None:
    """One ``hosts`` entry: a name or address as a Host header carries it, without the port."""
    text = ctx.string(v, path, "a host name")
    if text is None:
        return None
    name = text.strip().lower().rstrip(".")
    if name == "*":
        return name
    wildcard = name.startswith("*.")
    bare = name[2:] if wildcard else name
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    ip = _ip_or_none(bare)
    if ip is not None and not wildcard:
        return str(ip)
    if ":" in bare:
        ctx.err(path, f"{text!r}: list the name without a port (a Host with any port matches)")
        return None
    try:
        bare = norm_host(bare)
    except ValueError:
        ctx.err(path, f"{text!r} is not a host name (e.g. edgeproxy.internal, *.dev.internal, or * for any)")
        return None
    return f"*.{bare}" if wildcard else bare


def _origin(ctx: _Ctx, v: object, path: str) -> str | None:
    """One ``origins`` entry, as browsers serialize an Origin (no default port, no path)."""
    text = ctx.string(v, path, "an origin")
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered == "*":
        return lowered
    if lowered == "null":
        ctx.err(path, "'null' is what sandboxed pages and files of any site send: use * if you mean any page")
        return None
    m = _ORIGIN.fullmatch(lowered)
    if m is None or (m[3] is not None and not 1 <= int(m[3]) <= 65535):
        ctx.err(
            path,
            f"{text!r} is not an origin: write scheme://host[:port] as the browser's address bar shows"
            " it, without a path (e.g. http://localhost:3000), or * for any page",
        )
        return None
    scheme, host, port = m[1], m[2], m[3]
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def _browser_keys(ctx: _Ctx, m: dict[str, object], path: str, lc: ListenerConfig) -> ListenerConfig:
    """``hosts`` and ``origins``: who a browser may be when it calls this listener."""
    hosts: list[str] = []
    if m.get("hosts") is not None:
        if lc.unix is not None:
            ctx.err(f"{path}.hosts", "a unix socket is out of browsers' reach: its Host is never checked; remove hosts")
        elif not lc.is_loopback():
            ctx.err(
                f"{path}.hosts",
                f"only loopback listeners check Host; {lc.address} answers to any name (its tokens guard it):"
                " remove hosts",
            )
        else:
            for i, item in _str_list(m["hosts"]):
                name = _host_name(ctx, item, f"{path}.hosts" + ("" if i is None else f"[{i}]"))
                if name is not None:
                    hosts.append(name)
    origins = []
    for i, item in _str_list(m.get("origins") or []):
        origin = _origin(ctx, item, f"{path}.origins" + ("" if i is None else f"[{i}]"))
        if origin is not None:
            origins.append(origin)
    return replace(lc, hosts=tuple(dict.fromkeys(hosts)), origins=tuple(dict.fromkeys(origins)))


def _listener(ctx: _Ctx, raw: object, path: str) -> ListenerConfig | None:
    if raw is _BAD:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        ctx.err(path, f"expected 'host:port' or 'unix:/path', got an integer (write 127.0.0.1:{raw})")
        return None
    if not isinstance(raw, (str, dict)):
        ctx.err(path, f"expected 'host:port', 'unix:/path' or a mapping with address, got {_tname(raw)}")
        return None
    keys = ("address", "tokens", "tls", "hosts", "origins")
    m: dict[str, object] = {"address": raw} if isinstance(raw, str) else ctx.section(raw, path, keys)
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
    tokens: list[str] = []
    classes: list[TokenClass] = []
    for i, item in _str_list(m.get("tokens") or []):
        item_path = f"{path}.tokens" + ("" if i is None else f"[{i}]")
        cls = TokenClass()
        if isinstance(item, dict):
            item, cls = _token_class(ctx, item, item_path)
            item_path += ".token"
            if item is None:
                continue  # (reported)
        tok = _token(ctx, item, item_path, not lc.is_loopback())
        if tok is not None:
            tokens.append(tok)
            classes.append(cls)
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
    return _browser_keys(ctx, m, path, replace(lc, tokens=tuple(tokens), token_classes=tuple(classes), tls=tls))


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

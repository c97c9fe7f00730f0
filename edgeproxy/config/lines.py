"""Lines: the egress paths (direct, bind, proxy, via a peer edge), and the URL checks they share."""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

from .context import _BAD, _Ctx, _join
from .hosts import _ip_or_none, norm_host
from .listeners import _ca_file, _token
from .redact import _redact_url
from .schema import LineConfig
from .units import _tname

_NAME_RE = re.compile(r"[a-z0-9_-]+")
_COMPRESS = ("br", "gzip", "zstd", "off")


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
        token = _token(ctx, m["token"], f"{path}.token", exposed=False)  # (the edge judges it)
    compress = ctx.choice(m, "compress", path, "br", _COMPRESS)
    if compress == "zstd" and not _zstd_available():
        ctx.err(f"{path}.compress", "zstd needs the zstandard package (pip install zstandard), or pick br")
    ca = _ca_file(ctx, m["ca"], f"{path}.ca") if m.get("ca") is not None else None
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

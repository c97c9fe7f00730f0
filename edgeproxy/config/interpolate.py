"""``${VAR}`` interpolation: environment variables substituted into every string of the document."""

from __future__ import annotations

import re

from .context import _BAD, _Bad, _Ctx, _join

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

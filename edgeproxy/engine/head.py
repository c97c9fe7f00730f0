"""The request head as sent on one attempt: the client's headers less what is not passed on,
then what the engine and the filters add, then the framing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .ctx import Attempt, Ctx

__all__ = ["BODY_METHODS", "request_head"]

# Methods whose requests carry a body even when empty (we always send Content-Length for them).
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def request_head(ctx: Ctx, attempt: Attempt, host: str) -> bytes:
    body = attempt.body
    out = [f"{ctx.method} {attempt.origin}{attempt.target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")]
    skip = attempt.skip
    connection_listed: set[bytes] = set()
    for name, value in ctx.request.raw_headers:
        lname = name.lower()
        if lname in skip or lname[:12] == b"x-edgeproxy-":  # (ours: never an origin's business)
            if lname == b"connection":
                connection_listed.update(v.strip().lower() for v in value.split(b","))
            continue
        if lname == b"x-request-id":
            continue  # ours goes out below: the client's when it was sane, else a new one
        out.append(name + b": " + value + b"\r\n")
    if connection_listed:
        out = [out[0]] + [h for h in out[1:] if h.split(b":", 1)[0].lower() not in connection_listed]
    out.append(b"x-request-id: " + ctx.request_id.encode() + b"\r\n")
    out.extend(attempt.lines)
    if ctx.body_stream is not None:
        length = ctx.body_length
        out.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
    elif body is not None and (body or ctx.method in BODY_METHODS):
        out.append(b"Content-Length: %d\r\n" % len(body))
    out.append(b"\r\n")
    return b"".join(out)

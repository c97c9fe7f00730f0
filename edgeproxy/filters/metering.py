"""Usage metering: the tokens each answer used, per upstream, model and key.

Reads the usage object of complete 200 answers the client gets as JSON (usage.from_body) or
as a framed SSE stream that ended cleanly (an event tap, usage.from_stream); sets
``ctx.usage`` for the filters that act on it (a key pool drains its token buckets) and counts
``edgeproxy_tokens_total``. Content-coded answers are not read (the usage cannot be seen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine import Filter
from . import usage

if TYPE_CHECKING:
    from ..engine import Ctx, Reply, Usage
    from ..telemetry.metrics import Metrics

__all__ = ["UsageMeter"]


class UsageMeter(Filter):
    """On every upstream's chain (it costs a few microseconds per JSON answer)."""

    __slots__ = ("metrics", "upstream")

    def __init__(self, upstream: str, metrics: Metrics) -> None:
        self.upstream = upstream
        self.metrics = metrics

    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        if reply.status != 200 or reply.encoded:
            return
        if reply.body is not None:
            if reply.is_json():
                self._meter(ctx, usage.from_body(reply.body))
        elif reply.framed:
            tap = ctx.keep(self, usage.StreamTap())
            reply.taps.append(tap)

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        tap: usage.StreamTap | None = ctx.local(self)
        if tap is not None and reply is not None and (reply.clean or reply.delivered):
            self._meter(ctx, usage.from_stream(tap))

    def _meter(self, ctx: Ctx, used: Usage | None) -> None:
        if used is None:
            return
        ctx.usage = used
        attempt = ctx.attempt
        credential = attempt.credential if attempt is not None else None
        # (the answer's own model; else the one asked for, a fallback's once one was sent)
        labels = (self.upstream, used.model or ctx.model or "-", credential or "client")
        tokens = self.metrics.tokens
        if used.input:
            tokens.inc((*labels, "input"), used.input)
        if used.output:
            tokens.inc((*labels, "output"), used.output)

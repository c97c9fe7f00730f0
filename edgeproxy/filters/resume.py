"""Mid-stream resume (`failover.resume: on`): a stream broken after commit goes on from
another endpoint, without repeating what the client already has.

Anthropic Messages only, and only while every block of the answer so far is text: the request
is sent again with an assistant message holding the text the client got (a prefill), and the
new answer's events are spliced onto the old stream (prefill.py). Thinking and tool_use
blocks cannot be continued that way; OpenAI Chat Completions and Gemini have no way to
continue an answer (docs/config.md says why), so the filter is never on their chains.

Where it goes: another endpoint if one can take it, else the same endpoint over another line;
at most one resume per request. Whatever goes wrong (the prefill refused, no path, no answer,
a break that cannot be continued) the client gets the in-band error of the original break,
exactly as without resume. The access log says what happened (``resume``: ok, refused,
unavailable) and ``edgeproxy_resumes_total{upstream,result}`` counts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine import Continuation, Filter
from .prefill import Received, Splice, continue_request

if TYPE_CHECKING:
    from ..engine import Ctx, Reply
    from ..proto.errors import ProxyError
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics

__all__ = ["Resume"]

MESSAGES = "/v1/messages"


class _Resumable:
    """One stream's state: what the client got, then the resume, if one was tried."""

    __slots__ = ("continuation", "received", "result")

    def __init__(self) -> None:
        self.received = Received()
        self.continuation: Continuation | None = None
        self.result: str | None = None  # before a continuation: "unavailable" (nowhere to go)


class Resume(Filter):
    """On the chains of Anthropic upstreams with `failover.resume: on`."""

    __slots__ = ("metrics", "upstream")

    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self.upstream = upstream
        self.metrics = metrics

    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        if reply.status != 200 or not reply.framed or ctx.body is None or ctx.body_coding is not None:
            return  # (a body streamed past limits.replay_body, or coded: nothing to send again)
        if not ctx.raw_path.split("?", 1)[0].endswith(MESSAGES):
            return
        state = ctx.keep(self, _Resumable())
        reply.taps.append(state.received)

    def on_stream_break(self, ctx: Ctx, reply: Reply, exc: ProxyError) -> Continuation | None:
        state: _Resumable | None = ctx.local(self)
        if state is None or state.result is not None or state.continuation is not None:
            return None  # not a Messages stream, or resumed once already
        received = state.received
        live = received.live
        received.stop()  # (the tap sees the continuation too: it has nothing more to do)
        body = ctx.body
        if not live or exc.source != "upstream" or body is None:
            return None  # (the drain's end is not the origin's failure: never resumed)
        made = continue_request(body, received.texts(), received.deltas)
        if made is None:
            return None
        if not self._route(ctx):
            state.result = "unavailable"
            return None
        ctx.body, cut = made
        state.continuation = Continuation(Splice(received, cut))
        return state.continuation

    def _route(self, ctx: Ctx) -> bool:
        """Leave in ``ctx.tried`` what the continuation must not use: the broken endpoint's
        other lines too while another endpoint can take it. False: nowhere to go."""
        upstream, broken = ctx.upstream, ctx.path
        if upstream is None or broken is None:
            return False
        same = [p for p in upstream.paths if p.endpoint.url == broken.endpoint.url and p not in ctx.tried]
        if same and upstream.plan([*ctx.tried, *same], retry=True, take=False, only=ctx.pin) is not None:
            ctx.tried.extend(same)
            return True
        return upstream.plan(ctx.tried, retry=True, take=False, only=ctx.pin) is not None

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        result = _result(ctx.local(self))
        if result is not None:
            self.metrics.resumes.inc((self.upstream.name, result))

    def logging_filter(self, ctx: Ctx, record: dict[str, object]) -> None:
        result = _result(ctx.local(self))
        if result is not None:
            record["resume"] = result


def _result(state: _Resumable | None) -> str | None:
    if state is None:
        return None
    if state.continuation is not None:
        return state.continuation.result  # (None: the client left before it was known)
    return state.result

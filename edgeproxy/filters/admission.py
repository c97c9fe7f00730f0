"""Admission control (``Admission``): at most `admission.max_inflight` requests of an upstream
at its origins at once, the others waiting in its ``FairQueue`` by priority class.

A request's class is ``x-edgeproxy-priority: high | normal | low``, else its listener token's
``priority`` (normal without one); a token's ``max_priority`` caps what its clients may ask
for (a higher ask is lowered to it, not refused). Anything else in the header is a 400.

The slot is taken when the request's first attempt is planned (``path_filter``), so what never
reaches an origin takes none: a cache hit, a request sharing another's answer (the leader's
fetch holds the one slot), a refusal. It is held to the end of the answer (streams included)
and given back in ``on_end``. Retries of a request use its one slot; a hedge takes another,
only if one is free and no one waits (else no hedge), so the origins never see more than
``max_inflight`` (hedges fire exactly when an upstream is slow, often when it is saturated).

When no slot is free, or no key is ready (every key of the upstream rate-limited: the plan
finds no path), the request waits in the queue (``no_path_filter``) up to
`admission.queue_timeout` from its arrival: then, or at once when the queue is full, 503
``overloaded``, or 429 ``rate_limited`` when keys are what is short; both with Retry-After.
With admission on, `admission.queue_timeout` is also the longest wait for a key.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from ..engine import Filter
from ..proto.errors import ClientError, Overloaded, RateLimited, ShuttingDown
from ..proto.priority import HEADER, request_class
from .fairqueue import CLOSED, EXPIRED, FULL, GRANTED, SHED, FairQueue, Ticket

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import AdmissionConfig
    from ..engine import Ctx, Flight, Reply
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics

__all__ = ["Admission"]

# Why a request was refused, as the metric's reason label.
_REASONS: Final = {FULL: "queue_full", SHED: "shed", EXPIRED: "timeout"}


class Admission(Filter):
    """One upstream's admission: its queue (kept across reloads) and its metrics."""

    __slots__ = ("_leaders", "_taken_over", "metrics", "name", "queue")

    def __init__(self, upstream: Upstream, config: AdmissionConfig, metrics: Metrics, old: Admission | None) -> None:
        self.name = upstream.name
        self.metrics = metrics
        self.queue: FairQueue
        # Answers shared by several requests (the cache's flights) -> the ticket of the one
        # request that fetches it: whoever shares it lends it their class.
        self._leaders: dict[Flight, Ticket] = old._leaders if old is not None else {}
        self._taken_over: tuple[AdmissionConfig, Upstream] | None = None
        if old is not None:  # the waiters and the slots held stay with their upstream ...
            self.queue = old.queue
            self._taken_over = (config, upstream)  # ... and take the new limits at the swap
        else:
            self.queue = FairQueue(config, upstream)

    def commit(self) -> None:
        if self._taken_over is not None:
            self.queue.reconfigure(*self._taken_over)
            self._taken_over = None

    async def request_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        client = ctx.client
        asked = ctx.request.headers.get(HEADER)
        priority = request_class(asked, client.priority, client.max_priority)
        if priority is None:
            raise ClientError(f"{HEADER} must be high, normal or low (got {asked[:20]!r})")
        ctx.keep(self, Ticket(priority, ctx.started))
        return None

    async def request_body_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        flight = ctx.flight
        if flight is not None:
            ticket: Ticket = ctx.local(self)
            if ctx.leads:
                self._leaders[flight] = ticket
            else:
                lead = self._leaders.get(flight)
                if lead is not None:
                    self.queue.promote(lead, ticket.priority)  # (the fetch waits in the best class)
        return None

    def path_filter(self, ctx: Ctx, path: Path) -> bool:
        ticket: Ticket = ctx.local(self)
        if ctx.hedging:
            return self.queue.take_for_hedge(ticket)
        return ticket.admitted or self.queue.take_at_once(ticket)

    async def no_path_filter(self, ctx: Ctx) -> bool:
        """Wait for a slot (and for keys, if they are what is short) in the queue."""
        ticket: Ticket = ctx.local(self)
        if ticket.admitted:
            return False  # it holds a slot: keys are short (the key pools wait)
        queue = self.queue
        short = queue.keys_short()
        if short == float("inf"):
            return False  # every key refused: the key pools say so
        if short is not None and time.monotonic() + short > ticket.arrived + queue.config.queue_timeout:
            raise self._keys_short(ticket, short)  # (no key before its deadline: say so now)
        outcome = await queue.wait(ticket)
        if outcome == GRANTED:
            return True
        if outcome == CLOSED:
            why = f"edgeproxy is shutting down (drain_timeout ended); the request waited in upstream {self.name}'s"
            exc = ShuttingDown(why + " queue and reached no origin")
            exc.retry_after = 1.0
            raise exc
        short = queue.keys_short()
        if short is not None and short != float("inf"):
            raise self._keys_short(ticket, short)  # (what it waited for, or would have: keys)
        self._refuse(ticket, _REASONS[outcome])
        retry = queue.retry_after()
        if outcome == EXPIRED:
            why = f"waited {ticket.waited:.1f}s in upstream {self.name}'s queue (admission.queue_timeout)"
        elif outcome == SHED:
            why = f"upstream {self.name}'s queue is full, and higher-priority requests came"
        else:
            why = f"upstream {self.name}'s queue is full ({queue.config.queue} waiting)"
        raise Overloaded(f"{why}; retry in {retry:.0f}s", retry)

    def _keys_short(self, ticket: Ticket, wait: float) -> RateLimited:
        self._refuse(ticket, "rate_limited")
        self.metrics.keys_exhausted.inc((self.name,))  # (the same 429 the key pools answer)
        return RateLimited(f"every API key of upstream {self.name} is rate-limited; retry in {wait:.2f}s", wait)

    def _refuse(self, ticket: Ticket, reason: str) -> None:
        labels = (self.name, ticket.priority)
        self.metrics.admission_refused.inc((*labels, reason))
        self.metrics.admission_wait.observe(labels, ticket.waited)

    def on_drain_end(self, ctx: Ctx) -> bool:
        ticket: Ticket | None = ctx.local(self)
        return ticket is not None and self.queue.close(ticket)

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        ticket: Ticket | None = ctx.local(self)
        if ticket is None:
            return
        if ctx.flight is not None and self._leaders.get(ctx.flight) is ticket:
            del self._leaders[ctx.flight]
        if ticket.admitted:
            self.metrics.admission_wait.observe((self.name, ticket.priority), ticket.waited)
        self.queue.release(ticket)

    def logging_filter(self, ctx: Ctx, record: dict[str, object]) -> None:
        ticket: Ticket | None = ctx.local(self)
        if ticket is not None:
            record["priority"] = ticket.priority
            record["queue_ms"] = round(ticket.waited * 1000, 3)

    def status(self, now: float) -> dict[str, object]:
        queue = self.queue
        return {
            "admission": {
                "inflight": queue.inflight,
                "max_inflight": queue.config.max_inflight,
                "waiting": dict(queue.counts),
            }
        }

    def on_scrape(self, metrics: Metrics, now: float) -> None:
        queue = self.queue
        metrics.admission_inflight.set((self.name,), queue.inflight)
        for cls, n in queue.counts.items():
            metrics.admission_depth.set((self.name, cls), n)

"""The filter API: how a capability plugs into the engine's phases.

A **filter** is a class implementing only the hooks it needs (every hook here is a no-op).
Filters are built when a config is loaded or reloaded, one object serving every request of
its chain at once; what a filter knows about one request it keeps itself, with
``ctx.local(self)`` (a slot of its own on that request), never in another filter's state.

A **chain** is the ordered filters one kind of request runs through: one per upstream (its
request-level filters) plus, per path, the filters that apply only there (a `via` hop's
compression, an endpoint's model renames). For each hook the chain keeps only the filters
that override it, so a request pays nothing for a capability that is off. A **pipeline** is
one State's chains plus its route filters; a reload builds a new one and requests keep the
one they started with.

Order: request-side hooks run in chain order (upstream filters, then the path's); the
response-side hooks (``response_filter``, ``on_end``) run in reverse, like Envoy's encoder
filters: the filter nearest the client sees the response last (a hop's compression wraps
what the others wrote).

Rules every filter keeps:

- Before commit (the first byte of content to the client) a hook may refuse by raising a
  ``ProxyError`` (the client gets it in the provider's error shape). After commit only
  taps, stream transforms, ``on_stream_break`` and ``on_end`` run, and none may raise.
- Hooks never block the event loop: CPU-heavy work on big bodies goes to a thread.
- Secrets (keys, tokens) never go into ``attempt.credential``, notes, logs or status: ids only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from aiohttp import web

    from ..net.client import Response
    from ..proto.errors import ProxyError
    from ..routing.lines import Path
    from ..routing.state import State, Upstream
    from ..telemetry.metrics import Metrics
    from .ctx import Attempt, Continuation, Ctx, Reply

__all__ = ["ACCEPT", "AGAIN", "Chain", "Filter", "PathChain", "Pipeline", "SendAgain", "Verdict"]


class Verdict:
    """What ``on_answer`` says about an upstream answer the engine is about to judge."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Verdict {self.name}>"


# The answer goes to the client as it is: the engine's own retry rules are skipped.
ACCEPT: Final = Verdict("accept")
# Plan again at once: this path is not counted as tried (the filter fixed what was wrong,
# e.g. another API key), nor is it a retry of the request.
AGAIN: Final = Verdict("again")


class SendAgain(Exception):
    """Raised by ``upstream_response_filter``: send this attempt again on the same path, with
    its body and head rebuilt (the filter changed what it will send, e.g. a delta whose base
    the edge lost goes whole). Never leaves the attempt; not a retry."""


class Filter:
    """A capability. Subclass it and override the hooks you need; see docs/architecture.md."""

    __slots__ = ()

    # -- accept / route ----------------------------------------------------------------------
    def route_filter(self, ctx: Ctx) -> Chain | None:
        """Route filters only (a pipeline's ``routers``): a request whose target is not in
        origin form (``/path``), which the prefix table does not route. Return the chain it
        runs through (having set ``ctx.upstream`` and checked whatever auth it needs), or
        None if it is not this filter's. May raise ProxyError."""
        return None

    async def request_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        """After route and listener auth, before the body is read. Return a response to answer
        the request early (nothing else runs but ``on_end`` and logging); raise ProxyError to
        refuse it; or tag the request."""
        return None

    # -- request body ------------------------------------------------------------------------
    async def request_body_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        """The body is read: ``ctx.body`` holds it whole, or ``ctx.body_stream`` streams it
        (too big to keep for a retry). May replace either (decode, rebuild); a filter that
        changes a streamed body's length sets ``ctx.body_length`` to None (sent chunked).
        May answer (a response: a cache hit), or give the request a shared answer
        (``ctx.flight``, ``ctx.leads``: see engine/flight.py)."""
        return None

    # -- plan --------------------------------------------------------------------------------
    def path_filter(self, ctx: Ctx, path: Path) -> bool:
        """The plan chose ``path`` for the next attempt: take what the attempt needs there
        (an API key) now, so concurrent requests see it taken. False: not now (the engine
        then asks ``no_path_filter``)."""
        return True

    async def no_path_filter(self, ctx: Ctx) -> bool:
        """Nothing can be planned now. Wait for what is short and return True (plan again),
        raise the error the client should get, or return False (not this filter's concern)."""
        return False

    # -- per attempt -------------------------------------------------------------------------
    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        """Before an attempt is sent on ``attempt.path``: change what goes on this path only
        (``attempt.body``, the head: ``attempt.drop()``, ``attempt.lines``, ``attempt.target``,
        ``attempt.origin``), set ``attempt.decide`` (how the answer's body is decoded) and
        ``attempt.credential`` (the id of a credential put on it). Runs again, from a fresh
        head, when ``SendAgain`` resends the attempt; not when a stale keep-alive connection
        makes the engine resend the same bytes on a new connection."""

    def upstream_response_filter(self, ctx: Ctx, attempt: Attempt, resp: Response) -> None:
        """The attempt's response headers are in (every attempt, hedges included), before the
        engine judges it. Raise a ProxyError to make it a failed attempt (the retry rules
        apply), or ``SendAgain``. Must not change request-wide state: hedges run this too."""

    async def on_answer(self, ctx: Ctx, attempt: Attempt, resp: Response) -> Verdict | Exception | None:
        """The answer the attempt loop is about to judge (the winner, if hedged). None: the
        engine's rules decide (retry_on, 429 cool-down...). ``ACCEPT``: it goes to the client
        as it is. ``AGAIN``: plan again. A ProxyError: the client gets that error instead.
        May await something short and bounded before it decides (key pools check a refused
        key); ``resp`` is held, unread, meanwhile."""
        return None

    def on_abandoned(self, ctx: Ctx, attempt: Attempt, resp: Response) -> None:
        """An answer the engine will not use (a hedge that lost); released after this."""

    # -- response ----------------------------------------------------------------------------
    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        """Before commit, once: the answer as it will go to the client. May change
        ``reply.headers``, replace ``reply.body`` (a whole body), add a stream transform
        (``reply.transforms``) or an SSE event tap (``reply.taps``)."""

    def on_stream_break(self, ctx: Ctx, reply: Reply, exc: ProxyError) -> Continuation | None:
        """A framed event stream failed after commit (``exc``: the origin reset, fell silent
        for ``stream_idle_timeout``, or the drain ended it), before the engine writes the
        in-band error. Return a ``Continuation`` to go on from a new attempt instead: first
        rewrite ``ctx.body`` into the request that continues the answer, and leave in
        ``ctx.tried`` the paths it must not go to. None: the break stands. Must not block
        or raise; the first filter that returns a continuation wins."""
        return None

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        """The request is over (answered, refused, broken or abandoned by the client);
        ``reply`` is None when no upstream answer was relayed. Release, meter, store."""

    def logging_filter(self, ctx: Ctx, record: dict[str, object]) -> None:
        """Last: add fields to the access-log record (never secrets)."""

    def on_drain_end(self, ctx: Ctx) -> bool:
        """The drain (shutdown) ended with ``ctx`` not yet answered: end what it waits for in
        this filter, so that its client gets an error instead of a cut connection. True if it
        was waiting here."""
        return False

    # -- operations --------------------------------------------------------------------------
    def commit(self) -> None:
        """The pipeline this filter is in now serves requests (a reload swapped it in, with its
        State): apply what must not change before then (a reload can still fail before it)."""

    def status(self, now: float) -> dict[str, object]:
        """Fields this filter adds to its upstream's entry in /-/status (no secrets)."""
        return {}

    def on_scrape(self, metrics: Metrics, now: float) -> None:
        """A /metrics scrape: set the gauges this filter owns."""


_BASE = Filter.__dict__


def _overriding(filters: Iterable[Filter], hook: str) -> tuple[Callable[..., Any], ...]:
    """The bound ``hook`` of every filter that overrides it, in order. A hook the API awaits
    that a filter wrote as a plain method (``on_answer`` was one before it became async) is
    wrapped, not left to fail every request."""
    hooks = []
    for f in filters:
        if getattr(type(f), hook) is _BASE[hook]:
            continue
        bound = getattr(f, hook)
        if inspect.iscoroutinefunction(_BASE[hook]) and not inspect.iscoroutinefunction(bound):
            bound = _awaitable(bound)
        hooks.append(bound)
    return tuple(hooks)


def _awaitable(hook: Callable[..., Any]) -> Callable[..., Any]:
    async def awaited(*args: Any) -> Any:
        return hook(*args)

    return awaited


class PathChain:
    """The hooks of a request whose attempt is on one path: the upstream's filters, then the
    path's own (per-attempt hooks; and the response-side ones for the answer it brought)."""

    __slots__ = ("abandoned", "end", "filters", "response", "upstream_request", "upstream_response")

    def __init__(self, filters: tuple[Filter, ...]) -> None:
        self.filters = filters
        self.upstream_request = _overriding(filters, "upstream_request_filter")
        self.upstream_response = _overriding(filters, "upstream_response_filter")
        self.abandoned = _overriding(filters, "on_abandoned")
        self.response = _overriding(reversed(filters), "response_filter")
        self.end = _overriding(reversed(filters), "on_end")


class Chain:
    """The filters one kind of request runs through (see the module docstring)."""

    __slots__ = (
        "answer",
        "drain_end",
        "filters",
        "logging",
        "no_path",
        "path",
        "paths",
        "request",
        "request_body",
        "stream_break",
        "_plain",
    )

    def __init__(self, filters: Iterable[Filter], path_filters: dict[Path, list[Filter]] | None = None) -> None:
        self.filters = tuple(filters)
        fs = self.filters
        self.request = _overriding(fs, "request_filter")
        self.request_body = _overriding(fs, "request_body_filter")
        self.path = _overriding(fs, "path_filter")
        self.no_path = _overriding(fs, "no_path_filter")
        self.answer = _overriding(fs, "on_answer")
        self.stream_break = _overriding(fs, "on_stream_break")
        self.logging = _overriding(fs, "logging_filter")
        self.drain_end = _overriding(fs, "on_drain_end")
        self._plain = PathChain(fs)
        # Paths with filters of their own get a chain of their own; the rest share one.
        self.paths: dict[Path, PathChain] = {
            path: PathChain(fs + tuple(extra)) for path, extra in (path_filters or {}).items() if extra
        }

    def __repr__(self) -> str:
        names = ", ".join(type(f).__name__ for f in self.filters)
        return f"<Chain [{names}] +{len(self.paths)} path chains>"

    def at(self, path: Path | None) -> PathChain:
        """The hooks for an attempt on ``path`` (None: before any, the upstream's own)."""
        return self._plain if path is None else self.paths.get(path, self._plain)

    def all_filters(self) -> list[Filter]:
        """Every filter of this chain, path filters included, each once."""
        seen: dict[int, Filter] = {id(f): f for f in self.filters}
        for pc in self.paths.values():
            for f in pc.filters:
                seen.setdefault(id(f), f)
        return list(seen.values())


class Pipeline:
    """One State's filters: a chain per upstream, and the route filters of its listeners."""

    __slots__ = ("chains", "routers", "state")

    def __init__(self, state: State, chains: dict[str, Chain], routers: tuple[Filter, ...] = ()) -> None:
        self.state = state
        self.chains = chains  # upstream name -> its chain
        self.routers = routers

    def chain(self, upstream: Upstream) -> Chain:
        return self.chains[upstream.name]

    def commit(self) -> None:
        """It serves requests from now on: every filter's ``commit``, once each."""
        done: set[int] = set()
        for f in (*self.routers, *(f for chain in self.chains.values() for f in chain.all_filters())):
            if id(f) not in done:
                done.add(id(f))
                f.commit()

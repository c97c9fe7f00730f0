"""The attempt loop: one request tried on the paths the selector orders, and every decision
to try again.

A request is tried on the paths the plan yields, until one answers acceptably or an outcome
says stop. Each attempt's outcome (connect, reset, timeout, a status) is checked against
``failover.retry_on``; the retry budget, the path health feedback, 429 cool-downs, hedging
and the silent stale-connection retry live here too. Filters take part through the hooks
``path_filter``, ``no_path_filter``, ``upstream_request_filter``,
``upstream_response_filter``, ``on_answer`` and ``on_abandoned`` (see filter.py); the retry
decision itself travels on the outcome, as in Pingora.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..proto.errors import ConnectAbandoned, PathDown, ProxyError, UpstreamReset, UpstreamTimeout
from ..proto.models import wants_stream
from ..proto.providers import retry_wait
from ..routing.events import report_line, report_origin
from ..routing.state import release_trials
from .ctx import Attempt
from .filter import AGAIN, SendAgain
from .head import request_head

if TYPE_CHECKING:
    from ..net.client import Conn, Response
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics
    from .ctx import Ctx
    from .filter import Chain

__all__ = ["Failover", "may_move"]

log = logging.getLogger("edgeproxy")

# 429 without a usable wait in its headers: cool the endpoint down this long.
DEFAULT_COOL_DOWN: Final = 1.0
# A 429 asking for at most this long, with no other path to go to, is waited out (once).
SHORT_WAIT: Final = 2.0
MIN_WAIT: Final = 0.05


class Failover:
    """Mixin for ``Engine``: the attempts of one request."""

    __slots__ = ()

    metrics: Metrics
    on_slow_path: Callable[[Path, bool], None]

    async def _attempts(self, ctx: Ctx, upstream: Upstream, chain: Chain) -> Response:
        """Try paths in plan order until one answers, or an outcome says stop.

        A failed attempt is retried on another path only if `failover.retry_on` names its
        outcome (connect, reset, timeout, or the status), nothing reached the client yet,
        the body can be sent again, `failover.retries` and the retry budget allow, and an
        untried path is left. Otherwise the client gets the last answer as the origin gave
        it, or our error for the last failure.
        """
        upstream.budget.on_request(time.monotonic())
        hedge = upstream.config.failover.hedge
        retry_on = upstream.config.failover.retry_on
        streaming = wants_stream(ctx.body, ctx.raw_path, ctx.request.headers.get("Accept"))
        ctx.timeouts = upstream.timeouts(ctx.model, streaming)
        while True:
            retry = ctx.retrying
            path = _plan(ctx, upstream, retry)
            if path is None or (chain.path and not _taken(ctx, chain, path)):
                if ctx.trials:  # (the plan's claim on a half-open path: not while it waits)
                    release_trials(ctx.trials)
                    ctx.trials.clear()
                await _wait_for_path(ctx, chain)  # something is short (keys, a slot): wait, or raise
                continue
            ctx.tried.append(path)
            ctx.path = path
            started = time.monotonic()
            try:
                if hedge is not None and not retry and ctx.body_stream is None:
                    attempt = await self._hedged(ctx, upstream, chain, path, hedge, started)
                else:
                    attempt = ctx.attempt = Attempt(path, started)
                    await self._attempt(ctx, upstream, chain, attempt)
            except ProxyError as exc:
                path = ctx.path
                if exc.source != "upstream":
                    raise  # the client's fault (a body over the limit...): not the path's
                self._note_attempt(ctx, upstream, path, exc.kind, started, ctx.attempt)
                path.on_failure(exc)
                ctx.error = exc.kind
                if isinstance(exc, UpstreamTimeout) and path.health.answers():
                    # Silence on a line that answers probes is the origin's: that model at
                    # that endpoint failed, and this request goes elsewhere if it can.
                    self._origin_failed(ctx, upstream, path, exc.kind, started, silent=True)
                elif exc.outcome == "connect" and exc.blames_line:
                    self._line(upstream, path, "connect", started)
                    self.on_slow_path(path, True)  # can new connections be made? look at once
                elif exc.outcome and exc.blames_line:
                    self._line(upstream, path, "local", started)
                if not self._may_retry(ctx, upstream, exc.outcome, exc.kind):
                    raise
                ctx.retrying = True
                continue
            path = attempt.path
            resp = attempt.resp
            assert resp is not None
            status = resp.status
            asked = ctx.model  # (a filter may send the request on with another model)
            for on_answer in chain.answer:
                try:
                    verdict = await on_answer(ctx, attempt, resp)
                except BaseException:
                    resp.release()  # (the client left while a filter waited)
                    raise
                if verdict is None:
                    continue
                self._note_attempt(ctx, upstream, path, str(status), started, attempt)
                if verdict is AGAIN:
                    resp.release()
                    ctx.tried.remove(path)  # the path may serve again: it was not the line
                    if status >= 500:  # (sent on by a filter, but still that model's failure there)
                        self._origin_failed(ctx, upstream, path, f"status {status}", started, asked, avoid=False)
                    break
                if isinstance(verdict, Exception):
                    resp.release()
                    raise verdict
                return resp  # ACCEPT
            else:
                verdict = None
            if verdict is AGAIN:
                continue
            if status != 429 and status < 500 and str(status) not in retry_on:
                self._answered(ctx, upstream, path, resp)
                self._note_attempt(ctx, upstream, path, "ok", started, attempt)
                ctx.error = None  # what failed before is in attempt_log; this request did not
                return resp
            # 429, 5xx and the 4xx retry_on lists: the origin answered, but maybe another path
            # or endpoint can do better.
            self._note_attempt(ctx, upstream, path, str(status), started, attempt)
            wait = None
            if status == 429:
                wait = retry_wait(resp.headers)
                upstream.cool_down(path.endpoint.url, ctx.model, DEFAULT_COOL_DOWN if wait is None else wait)
            elif status >= 500:
                self._origin_failed(ctx, upstream, path, f"status {status}", started)
            else:
                self._answered(ctx, upstream, path, resp)  # (a 4xx the operator retries says nothing of health)
            if self._may_retry(ctx, upstream, str(status), f"status_{status}"):
                resp.release()
                ctx.error = f"status_{status}"
                ctx.retrying = True
                continue
            if status == 429 and wait is not None and wait <= SHORT_WAIT and self._may_wait(ctx, upstream):
                # Nowhere else to go, and the origin asks for only a short pause: wait it out
                # (once per request) rather than hand the client a 429 it would retry itself.
                resp.release()
                ctx.waited = True
                await asyncio.sleep(max(wait, MIN_WAIT))
                ctx.tried.remove(path)
                upstream.end_cool_down(path.endpoint.url, ctx.model)
                continue
            return resp

    # -- health feedback: the line per path, the origin per endpoint and model ---------------
    def _line(self, upstream: Upstream, path: Path, outcome: str, started: float | None = None) -> None:
        event = upstream.on_attempt(path, outcome, started)
        if event == "down":
            log.warning("path %s is down: requests could not connect", path.label)
        elif event is not None:
            why = "local failures in a row" if event == "ejected" else "a trial request worked"
            report_line(self.metrics, upstream, path, event, why)

    def _answered(self, ctx: Ctx, upstream: Upstream, path: Path, resp: Response | None) -> None:
        """The origin answered (not with an error of its own): good news for the line; for the
        origin too, unless it is a stream (that is good news once it ends: ``resp`` None)."""
        attempt = ctx.attempt
        started = attempt.started if attempt is not None and attempt.path is path else None
        if resp is not None:
            self._line(upstream, path, "ok", started)
            if resp.status == 200 and _is_sse(resp):
                return
        for model, event in upstream.on_origin(path, ctx.model, True, started):
            report_origin(self.metrics, upstream, path, model, event, "a trial request worked")

    def _stream_failed(self, ctx: Ctx, upstream: Upstream, path: Path, exc: ProxyError) -> None:
        """A stream broke after commit: a stall on a line that answers probes is the origin's
        (that model's), anything else the line's, as before commit."""
        if isinstance(exc, UpstreamTimeout) and path.health.answers():
            attempt = ctx.attempt
            started = attempt.started if attempt is not None and attempt.path is path else None
            for model, event in upstream.on_origin(path, ctx.model, False, started, silent=True):
                report_origin(self.metrics, upstream, path, model, event, "a stream stalled")
        elif exc.blames_line:
            path.on_failure(exc)

    def _origin_failed(
        self,
        ctx: Ctx,
        upstream: Upstream,
        path: Path,
        why: str,
        started: float,
        model: str | None = None,
        avoid: bool = True,
        silent: bool = False,
    ) -> None:
        """The origin failed this request (a 5xx, silence): counted for its model there, and
        the next attempt prefers another endpoint over the same one on another line."""
        self._line(upstream, path, "ok")  # (the line carried the request: it is not to blame)
        asked = ctx.model if model is None else model
        for which, event in upstream.on_origin(path, asked, False, started, silent):
            said = f"silence ({why})" if silent else f"origin errors in a row (last: {why})"
            report_origin(self.metrics, upstream, path, which, event, said)
        if not avoid:
            return
        if ctx.avoid is None:
            ctx.avoid = set()
        ctx.avoid.add(path.endpoint.url)

    async def _hedged(
        self, ctx: Ctx, upstream: Upstream, chain: Chain, path: Path, delay: float, started: float
    ) -> Attempt:
        """`failover.hedge`: if ``path`` has not answered after ``delay``, start the same
        request on the next path too (a retry from the budget); the first good answer wins
        and the other is cancelled (its connection closed, so that origin stops). An answer
        `retry_on` would retry (a 5xx, a 429) does not win while the other attempt runs.
        Off by default: both may be billed."""
        retry_on = upstream.config.failover.retry_on
        first_attempt = ctx.attempt = Attempt(path, started)
        first: asyncio.Future[Attempt] = asyncio.ensure_future(self._attempt(ctx, upstream, chain, first_attempt))
        owner: dict[asyncio.Future[Attempt], Attempt] = {first: first_attempt}
        pending: set[asyncio.Future[Attempt]] = {first}
        winner: asyncio.Future[Attempt] | None = None
        try:
            done, pending = await asyncio.wait(pending, timeout=delay)
            claimed = len(ctx.trials)
            second_path = None if done else _plan(ctx, upstream, retry=True)
            if second_path is not None:
                ctx.hedging = True  # (what a hedge takes is its own: a key, an admission slot)
                if not _taken(ctx, chain, second_path):
                    second_path = None  # what it needs is not ready: no hedge
                ctx.hedging = False
            if second_path is not None and not upstream.budget.try_retry(time.monotonic()):
                second_path = None
            if second_path is None and len(ctx.trials) > claimed:
                release_trials(ctx.trials[claimed:])  # (a half-open path's trial it will not take)
                del ctx.trials[claimed:]
            if second_path is not None:
                ctx.tried.append(second_path)
                self.metrics.hedges.inc((upstream.name,))
                second_attempt = Attempt(second_path, started)
                second = asyncio.ensure_future(self._attempt(ctx, upstream, chain, second_attempt))
                owner[second] = second_attempt
                pending.add(second)
            while True:
                if not done:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    good = exc is None and str(task.result().resp.status) not in retry_on  # type: ignore[union-attr]
                    if good or not pending:
                        winner = task
                        ctx.path = owner[task].path
                        ctx.attempt = owner[task]
                        return task.result()
                    # Failed, or an answer worth retrying, while the other still runs: note
                    # it, let it go, and wait for the other.
                    lost = owner[task]
                    if exc is None:
                        resp = lost.resp
                        assert resp is not None
                        outcome = str(resp.status)
                        for on_abandoned in chain.at(lost.path).abandoned:
                            on_abandoned(ctx, lost, resp)
                        resp.release()
                    else:
                        outcome = exc.kind if isinstance(exc, ProxyError) else "internal"
                    self._note_attempt(ctx, upstream, lost.path, outcome, started, lost)
                done = set()
        finally:
            for task in owner:
                if task is winner:
                    continue
                if not task.done():
                    task.cancel()  # the loser: its connection closes, the origin stops
                elif not task.cancelled() and task.exception() is None:
                    resp = task.result().resp
                    if resp is not None:
                        resp.release()  # finished in the same instant as the winner

    def _may_retry(self, ctx: Ctx, upstream: Upstream, outcome: str, reason: str) -> bool:
        failover = upstream.config.failover
        if not (outcome in failover.retry_on and ctx.body_stream is None and len(ctx.tried) <= failover.retries):
            return False
        following = _plan(ctx, upstream, retry=True, take=False)
        if following is None:
            return False
        # The budget keeps failing origins from being hammered. It is charged for retries after
        # an origin failed (a status, a timeout), unless the retry moves to another endpoint
        # that is healthy: that one takes the request instead, it is not a second copy piled
        # on a failing origin. A line that failed to carry the request costs nothing.
        now = time.monotonic()
        moving_on = following.endpoint.url != ctx.tried[-1].endpoint.url and upstream.is_usable(
            following, ctx.model, now
        )
        charged = outcome not in LINE_OUTCOMES and not moving_on
        if charged and not upstream.budget.try_retry(now):
            self.metrics.budget_exhausted.inc((upstream.name,))
            return False
        self.metrics.failovers.inc((upstream.name, reason))
        return True

    def _may_wait(self, ctx: Ctx, upstream: Upstream) -> bool:
        failover = upstream.config.failover
        return (
            not ctx.waited
            and "429" in failover.retry_on
            and failover.retries > 0
            and ctx.body_stream is None
            and upstream.budget.try_retry(time.monotonic())
        )

    def _note_attempt(
        self, ctx: Ctx, upstream: Upstream, path: Path, outcome: str, started: float, attempt: Attempt | None
    ) -> None:
        self.metrics.attempts.inc((upstream.name, path.line.name, outcome))
        ms = round((time.monotonic() - started) * 1000, 3)
        entry: dict[str, object] = {
            "line": path.line.name,
            "endpoint": path.endpoint.host,
            "outcome": outcome,
            "ms": ms,
        }
        if attempt is not None and attempt.path is path and attempt.credential is not None:
            entry["key"] = attempt.credential
        if attempt is not None and attempt.path is path and attempt.notes:
            for field, value in attempt.notes.items():  # what filters noted (attempt.note)
                entry.setdefault(field, value)
        ctx.attempt_log.append(entry)

    async def _connect(self, ctx: Ctx, path: Path, fresh: bool) -> Conn:
        """A new connection for an attempt on ``path`` (counted in flight already). One slower
        than the line's RTT suggests has the line probed; if the prober then finds the line
        dead, the connect is abandoned and the attempt goes elsewhere (ConnectAbandoned)."""
        loop = asyncio.get_running_loop()
        slow = loop.call_later(path.suspect_after(), self.on_slow_path, path, False)
        opening = asyncio.ensure_future(path.pool.acquire(fresh=fresh, timeout=path.connect_timeout()))
        path.connecting[opening] = ctx
        try:
            conn, _ = await opening
        except asyncio.CancelledError:
            path.inflight -= 1
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                path.pool.release(opening.result()[0])  # opened just as we were cancelled: not leaked
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the request's own (its client left, a hedge lost)
            why = path.health.last_error or "no answer"
            raise ConnectAbandoned(f"{path.label} stopped answering probes ({why})") from None
        except BaseException:
            path.inflight -= 1
            raise
        finally:
            slow.cancel()
            path.connecting.pop(opening, None)
        return conn

    async def _attempt(self, ctx: Ctx, upstream: Upstream, chain: Chain, attempt: Attempt) -> Attempt:
        """One try on one path: send, then wait for headers (and for SSE, the first event)."""
        timeouts = ctx.timeouts or upstream.timeouts(ctx.model, False)
        path = attempt.path
        hooks = chain.at(path)
        fresh = False
        head = None
        while True:
            if head is None:
                attempt._reset(ctx.body, ctx.target if ctx.target is not None else _target(ctx, upstream, path))
                for upstream_request in hooks.upstream_request:
                    await upstream_request(ctx, attempt)
                head = request_head(ctx, attempt, path.host_header)
            body = attempt.body
            # Counted in flight from the moment it is planned on this path, so concurrent
            # requests see the pool filling up and spill before they wait for a connection.
            path.inflight += 1
            if path.inflight > path.peak:
                path.peak = path.inflight
            # A new connection that takes longer than the line's RTT suggests (a black hole:
            # new connections hang) has the line probed too, long before the connect timeout.
            # (Not armed when a warm connection is there to take: the common case.)
            # (Not armed when a warm connection is there to take: the common case.) Such an
            # attempt is failed over at once if the prober finds the line dead meanwhile.
            if fresh or not path.pool.idle:
                conn = await self._connect(ctx, path, fresh)
            else:
                try:
                    conn, _ = await path.pool.acquire(timeout=path.connect_timeout())
                except BaseException:
                    path.inflight -= 1
                    raise
            path.requests += 1
            reused = conn.requests > 0
            resp = conn.send(ctx.method, head, body, path.on_response_end)
            attempt.resp = resp
            resp.decide = attempt.decide
            path.waiting[resp] = ctx  # the prober may fail it over if the line dies meanwhile
            suspect = asyncio.get_running_loop().call_later(path.suspect_after(), self.on_slow_path, path, False)
            try:
                if ctx.body_stream is not None:
                    try:
                        await conn.send_stream(ctx.body_stream, chunked=ctx.body_length is None)
                    except UpstreamReset:
                        if not resp.head_done:
                            raise
                        # The origin answered (and closed) before the upload ended: its answer
                        # (a 413, a 401) is what the client should see.
                await resp.wait_head(timeouts.first_byte)
                suspect.cancel()
                for upstream_response in hooks.upstream_response:
                    upstream_response(ctx, attempt, resp)
                if resp.status == 200 and _is_sse(resp) and resp.header(b"content-encoding") is None:
                    # (a compressed stream's events cannot be seen: its first byte commits it)
                    await resp.wait_event(timeouts.first_event)
                return attempt
            except SendAgain:
                resp.release()
                head = None
                continue
            except UpstreamReset as exc:
                resp.release()
                if not fresh and reused and _stale_connection(ctx, resp, exc):
                    # Sent again on a new connection, unseen by the client: never unseen by
                    # the operator (attempt_log, edgeproxy_attempts_total{outcome="stale_connection"}).
                    self._note_attempt(ctx, upstream, path, "stale_connection", attempt.started, attempt)
                    fresh = True
                    continue
                raise
            except BaseException:
                resp.release()
                raise
            finally:
                suspect.cancel()
                path.waiting.pop(resp, None)


def _plan(ctx: Ctx, upstream: Upstream, retry: bool, take: bool = True) -> Path | None:
    """The next path for this request (``Upstream.plan`` with what the request knows). On an
    upstream split by weights, the request's endpoint is picked once, at its first plan."""
    order = ctx.order
    if order is None and upstream.split is not None and take and ctx.pin is None:
        order = ctx.order = upstream.split.pick()
    claims = ctx.trials if take else None
    return upstream.plan(ctx.tried, retry, take, ctx.pin, ctx.model, ctx.avoid, claims, order)


def _target(ctx: Ctx, upstream: Upstream, path: Path) -> str:
    """The origin-form target on ``path``: the endpoint's base path, then what follows the
    upstream's prefix in the client's target (query kept)."""
    base = path.endpoint.base_path
    rest = ctx.raw_path[len(upstream.prefix) :]
    target = base + rest if rest[:1] != "?" else base + "/" + rest
    return target if target[:1] == "/" else "/" + target


def _taken(ctx: Ctx, chain: Chain, path: Path) -> bool:
    """Did every filter take what an attempt on ``path`` needs (``path_filter``)?"""
    for path_filter in chain.path:
        if not path_filter(ctx, path):
            return False
    return True


async def _wait_for_path(ctx: Ctx, chain: Chain) -> None:
    """Nothing to plan: a filter waits for what is short (and we plan again), or raises."""
    for no_path in chain.no_path:
        if await no_path(ctx):
            return
    raise ProxyError("no path to try")  # an upstream without paths


def _is_sse(resp: Response) -> bool:
    ctype = resp.header(b"content-type")
    return ctype is not None and ctype[:17].lower() == b"text/event-stream"


# Outcomes that blame the line, not the origin: retrying them on another path is free.
LINE_OUTCOMES: Final = frozenset({"connect", "reset"})

# Methods that may be sent twice without harm (RFC 9110 9.2.2), for the stale-connection retry.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _stale_connection(ctx: Ctx, resp: Response, exc: UpstreamReset) -> bool:
    """May a reset on a reused keep-alive connection be retried on a new one, invisibly?

    Only if nothing can have been processed twice: nothing was sent, or the method is
    idempotent (or the client sent an Idempotency-Key). A POST the origin may have read is
    never sent again silently, however soon the reset came (a fast origin reads and fails in
    microseconds): it fails over by the usual rules instead, or reaches the client. Like Go's
    net/http.
    """
    if ctx.body_stream is not None or resp.head_done or resp.bytes_read or isinstance(exc, PathDown):
        return False
    if not exc.sent:
        return True
    return ctx.method in IDEMPOTENT or "idempotency-key" in ctx.request.headers


def may_move(ctx: Ctx, outcome: str = "reset") -> bool:
    """Could this request, waiting on a path that just failed a probe, be sent elsewhere?
    (The same conditions as a retry after a reset, budget aside: a rescue is not a copy on a
    failing origin.) If not, it keeps its chance on the path it is on."""
    upstream = ctx.upstream
    if upstream is None or ctx.body_stream is not None:
        return False
    failover = upstream.config.failover
    return (
        outcome in failover.retry_on
        and len(ctx.tried) <= failover.retries
        and _plan(ctx, upstream, retry=True, take=False) is not None
    )

"""Failover: the attempt loop of the engine, and every decision to try again.

A request is tried on the paths the selector ordered, until one answers acceptably or an
outcome says stop. Each attempt's outcome (connect, reset, timeout, a status) is checked
against ``failover.retry_on``; the retry budget, the path health feedback, 429 cool-downs,
hedging and the silent stale-connection retry live here too. ``Engine`` inherits this; what
it needs from the engine (metrics, the request head and body for a path) is declared below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..filters.edge import BASE_MISSING
from ..filters.keypool import Key, rate_limits
from ..net.client import Response
from ..proto.errors import KeysRefused, PathDown, ProxyError, RateLimited, UpstreamReset, ViaRefused
from ..proto.providers import retry_wait

if TYPE_CHECKING:
    from ..proto.codec import Decoder
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics
    from .engine import Ctx

__all__ = ["Failover", "may_move"]

log = logging.getLogger("edgeproxy")

# 429 without a usable wait in its headers: cool the endpoint down this long.
DEFAULT_COOL_DOWN: Final = 1.0
# A 429 asking for at most this long, with no other path to go to, is waited out (once).
SHORT_WAIT: Final = 2.0
MIN_WAIT: Final = 0.05
# Answers that are about the key we injected, not about the line or the origin's health:
# 429 cools that key down, 401/403 disable it (until a reload); either way another key goes.
KEY_STATUSES: Final = frozenset({401, 403, 429})


class Failover:
    """Mixin for ``Engine``: the attempts of one request."""

    __slots__ = ()

    metrics: Metrics
    on_slow_path: Callable[[Path], None]

    def _body_for(self, ctx: Ctx, path: Path) -> bytes | None:
        raise NotImplementedError

    def _request_head(self, ctx: Ctx, upstream: Upstream, path: Path, body: bytes | None) -> bytes:
        raise NotImplementedError

    async def _hop_body(self, ctx: Ctx, path: Path, body: bytes | None) -> bytes | None:
        raise NotImplementedError

    def _decider(self, ctx: Ctx, path: Path) -> Callable[[list[tuple[bytes, bytes]]], Decoder | None]:
        raise NotImplementedError

    async def _attempts(self, ctx: Ctx, upstream: Upstream) -> Response:
        """Try paths in plan order until one answers, or an outcome says stop.

        A failed attempt is retried on another path only if `failover.retry_on` names its
        outcome (connect, reset, timeout, or the status), nothing reached the client yet,
        the body can be sent again, `failover.retries` and the retry budget allow, and an
        untried path is left. Otherwise the client gets the last answer as the origin gave
        it, or our error for the last failure.
        """
        upstream.budget.on_request(time.monotonic())
        hedge = upstream.config.failover.hedge
        retry = False
        while True:
            path = upstream.plan(ctx.tried, retry, only=ctx.pin)
            if path is None or (upstream.pools and not self._take_key(ctx, upstream, path)):
                await self._wait_for_key(ctx, upstream)  # every key busy: queue, or a 429
                continue
            ctx.tried.append(path)
            ctx.path = path
            started = time.monotonic()
            try:
                if hedge is not None and not retry and ctx.body_stream is None:
                    resp = await self._hedged(ctx, upstream, path, hedge, started)
                else:
                    resp = await self._attempt(ctx, upstream, path)
            except ProxyError as exc:
                path = ctx.path
                if exc.source != "upstream":
                    raise  # the client's fault (a body over the limit...): not the path's
                self._note_attempt(ctx, upstream, path, exc.kind, started)
                path.on_failure(exc)
                ctx.error = exc.kind
                if exc.outcome and exc.blames_line:
                    self._health(upstream, path, "local", started)
                if not self._may_retry(ctx, upstream, exc.outcome, exc.kind):
                    raise
                retry = True
                continue
            path = ctx.path
            status = resp.status
            key = ctx.keys.get(path) if ctx.keys is not None else None
            if key is not None:
                self._key_answer(ctx, key, resp)
                if status in KEY_STATUSES:
                    self._note_attempt(ctx, upstream, path, str(status), started)
                    if self._on_key_refused(ctx, upstream, path, key, resp, retry):
                        resp.release()
                        continue  # at once, with another key: not the line's fault
                    if status == 401 and upstream.pools:
                        # Our last key was refused. The origin's answer would show the client a
                        # masked form of it (OpenAI does): ours says the same without it.
                        resp.release()
                        raise KeysRefused(
                            f"the origin refused the API key(s) of upstream {upstream.name} (401);"
                            " refused keys stay disabled until the next reload"
                        )
                    return resp
            if status != 429 and status < 500:
                self._health(upstream, path, "ok")
                self._note_attempt(ctx, upstream, path, "ok", started)
                ctx.error = None  # what failed before is in attempt_log; this request did not
                return resp
            # 429 and 5xx: the origin answered, but maybe another path or endpoint can do better.
            self._note_attempt(ctx, upstream, path, str(status), started)
            wait = None
            if status == 429:
                wait = retry_wait(resp.headers)
                upstream.cool_down(path.endpoint, DEFAULT_COOL_DOWN if wait is None else wait)
            else:
                self._health(upstream, path, "5xx", started)
            if self._may_retry(ctx, upstream, str(status), f"status_{status}"):
                resp.release()
                ctx.error = f"status_{status}"
                retry = True
                continue
            if status == 429 and wait is not None and wait <= SHORT_WAIT and self._may_wait(ctx, upstream):
                # Nowhere else to go, and the origin asks for only a short pause: wait it out
                # (once per request) rather than hand the client a 429 it would retry itself.
                resp.release()
                ctx.waited = True
                await asyncio.sleep(max(wait, MIN_WAIT))
                ctx.tried.remove(path)
                path.cooldown_until = 0.0
                upstream.reselect()
                continue
            return resp

    def _on_key_refused(self, ctx: Ctx, upstream: Upstream, path: Path, key: Key, resp: Response, retry: bool) -> bool:
        """The origin refused the key we injected: a 429 cools that key down for as long as the
        origin says, a 401/403 disables it until the next reload. True if the request should
        go again at once with another key (the loop queues it if none is ready yet)."""
        status = resp.status
        if status == 429:
            self._cool_key(upstream, path, key, resp)
            allowed = "429" in upstream.config.failover.retry_on
        else:
            first = ctx.disabled_key
            if status == 403 and first is not None and first is not key:
                # A second key refused for the same request: it is about the request (a model,
                # a feature, a region this account may not use), not two dead keys. The first
                # comes back; the client gets the origin's answer.
                if first.disabled == "403":
                    first.disabled = None
                    log.warning(
                        "key %s of %s enabled again: the 403 was about the request", first.id, path.endpoint.url
                    )
                return False
            if ctx.disabled_key is None:
                ctx.disabled_key = key
            if key.disabled is None:
                key.disabled = str(status)
                log.warning(
                    "key %s of %s disabled until the next reload: the origin answered %d",
                    key.id,
                    path.endpoint.url,
                    status,
                )
            allowed = True  # a key the origin refuses is our problem, never the client's
        if not allowed or ctx.body_stream is not None or ctx.key_retries >= upstream.max_key_retries:
            return False
        ctx.tried.remove(path)  # the path may serve again: it was the key, not the line
        only = ctx.pin
        if (
            upstream.plan(ctx.tried, retry, take=False, only=only) is None
            and upstream.key_wait(ctx.tried, only) is None
        ):
            ctx.tried.append(path)
            return False  # no key left anywhere: the client gets the origin's answer as it is
        ctx.key_retries += 1
        self.metrics.key_retries.inc((upstream.name, str(status)))
        return True

    def _take_key(self, ctx: Ctx, upstream: Upstream, path: Path) -> bool:
        """Take the key for an attempt on ``path`` now, as it is planned (so concurrent
        requests, and hedges that start later, see it taken); False if its endpoint has keys
        and none is ready."""
        if path.endpoint.url not in upstream.pools:
            return True
        key = upstream.pick_key(path.endpoint)
        if key is None:
            return False
        if ctx.keys is None:
            ctx.keys = {}
        ctx.keys[path] = key
        self.metrics.key_requests.inc((upstream.name, path.endpoint.url, key.id))
        return True

    def _key_answer(self, ctx: Ctx, key: Key, resp: Response) -> None:
        """What an answer says about its key's limits: the origin's view replaces ours."""
        limits = rate_limits(resp.headers)
        if limits is not None:
            key.on_rate_limits(limits, time.monotonic())
            ctx.counted = "tokens" in limits  # this answer's tokens are off the origin's count already

    def _cool_key(self, upstream: Upstream, path: Path, key: Key, resp: Response) -> None:
        """A 429 on ``key``: it cools down for as long as the origin says."""
        wait = retry_wait(resp.headers)
        now = time.monotonic()
        if wait is not None and wait.is_integer():
            # Retry-After is whole seconds; the same answer's rate-limit headers may say to
            # the millisecond when the key frees up: trust them within that second.
            exact = key.bucket_wait(now, origin_only=True)
            if wait - 1 < exact <= wait:
                wait = exact
        key.limited += 1
        key.cooldown_until = max(key.cooldown_until, now + (DEFAULT_COOL_DOWN if wait is None else wait))
        self.metrics.key_limited.inc((upstream.name, path.endpoint.url, key.id))

    async def _wait_for_key(self, ctx: Ctx, upstream: Upstream) -> None:
        """Nothing to plan: if keys are only busy (rate-limited, out of local headroom), wait
        for the first to free up within `failover.queue_timeout` of the request's arrival;
        else raise RateLimited, whose Retry-After says how long until one is free."""
        wait = upstream.key_wait(ctx.tried, ctx.pin)
        if wait is None:
            if upstream.pools:
                raise KeysRefused(
                    f"the origin refused every API key of upstream {upstream.name} (401/403);"
                    " they stay disabled until the next reload"
                )
            raise ProxyError("no path to try")  # an upstream without paths
        now = time.monotonic()
        if now + wait > ctx.started + upstream.config.failover.queue_timeout:
            self.metrics.keys_exhausted.inc((upstream.name,))
            raise RateLimited(f"every API key of upstream {upstream.name} is rate-limited; retry in {wait:.2f}s", wait)
        if not ctx.queued:
            ctx.queued = True
            self.metrics.queued.inc((upstream.name,))
        await asyncio.sleep(max(wait, MIN_WAIT))

    def _health(self, upstream: Upstream, path: Path, outcome: str, started: float | None = None) -> None:
        if upstream.on_attempt(path, outcome, started):
            self.metrics.ejections.inc((upstream.name, path.line.name))
            log.warning(
                "ejected %s after %s failures (until +%.1fs)",
                path.label,
                outcome,
                path.health.ejected_until - time.monotonic(),
            )

    async def _hedged(self, ctx: Ctx, upstream: Upstream, path: Path, delay: float, started: float) -> Response:
        """`failover.hedge`: if ``path`` has not answered after ``delay``, start the same
        request on the next path too (a retry from the budget); the first good answer wins
        and the other is cancelled (its connection closed, so that origin stops). An answer
        `retry_on` would retry (a 5xx, a 429) does not win while the other attempt runs.
        Off by default: both may be billed."""
        retry_on = upstream.config.failover.retry_on
        first: asyncio.Future[Response] = asyncio.ensure_future(self._attempt(ctx, upstream, path))
        owner: dict[asyncio.Future[Response], Path] = {first: path}
        pending: set[asyncio.Future[Response]] = {first}
        winner: asyncio.Future[Response] | None = None
        try:
            done, pending = await asyncio.wait(pending, timeout=delay)
            second_path = None if done else upstream.plan(ctx.tried, retry=True, only=ctx.pin)
            if second_path is not None and upstream.pools and not self._take_key(ctx, upstream, second_path):
                second_path = None  # no ready key for it: no hedge
            if second_path is not None and upstream.budget.try_retry(time.monotonic()):
                ctx.tried.append(second_path)
                self.metrics.hedges.inc((upstream.name,))
                second = asyncio.ensure_future(self._attempt(ctx, upstream, second_path))
                owner[second] = second_path
                pending.add(second)
            while True:
                if not done:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    good = exc is None and str(task.result().status) not in retry_on
                    if good or not pending:
                        winner = task
                        ctx.path = owner[task]
                        return task.result()
                    # Failed, or an answer worth retrying, while the other still runs: note
                    # it, let it go, and wait for the other.
                    if exc is None:
                        lost = task.result()
                        outcome = str(lost.status)
                        key = ctx.keys.get(owner[task]) if ctx.keys is not None else None
                        if key is not None:
                            self._key_answer(ctx, key, lost)
                            if lost.status == 429:
                                self._cool_key(upstream, owner[task], key, lost)
                        lost.release()
                    else:
                        outcome = exc.kind if isinstance(exc, ProxyError) else "internal"
                    self._note_attempt(ctx, upstream, owner[task], outcome, started)
                done = set()
        finally:
            for task in owner:
                if task is winner:
                    continue
                if not task.done():
                    task.cancel()  # the loser: its connection closes, the origin stops
                elif not task.cancelled() and task.exception() is None:
                    task.result().release()  # finished in the same instant as the winner

    def _may_retry(self, ctx: Ctx, upstream: Upstream, outcome: str, reason: str) -> bool:
        failover = upstream.config.failover
        if not (outcome in failover.retry_on and ctx.body_stream is None and len(ctx.tried) <= failover.retries):
            return False
        following = upstream.plan(ctx.tried, retry=True, take=False, only=ctx.pin)
        if following is None:
            return False
        # The budget keeps failing origins from being hammered. It is charged for retries after
        # an origin failed (a status, a timeout), unless the retry moves to another endpoint
        # that is healthy: that one takes the request instead, it is not a second copy piled
        # on a failing origin. A line that failed to carry the request costs nothing.
        now = time.monotonic()
        moving_on = following.endpoint.url != ctx.tried[-1].endpoint.url and following.is_usable(now)
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

    def _note_attempt(self, ctx: Ctx, upstream: Upstream, path: Path, outcome: str, started: float) -> None:
        self.metrics.attempts.inc((upstream.name, path.line.name, outcome))
        ms = round((time.monotonic() - started) * 1000, 3)
        entry: dict[str, object] = {
            "line": path.line.name,
            "endpoint": path.endpoint.host,
            "outcome": outcome,
            "ms": ms,
        }
        key = ctx.keys.get(path) if ctx.keys is not None else None
        if key is not None:
            entry["key"] = key.id
        ctx.attempt_log.append(entry)

    async def _attempt(self, ctx: Ctx, upstream: Upstream, path: Path) -> Response:
        """One try on one path: send, then wait for headers (and for SSE, the first event)."""
        failover = upstream.config.failover
        fresh = False
        head = None
        while True:
            if head is None:
                body = self._body_for(ctx, path)
                if path.hop is not None:
                    body = await self._hop_body(ctx, path, body)
                head = self._request_head(ctx, upstream, path, body)
            # Counted in flight from the moment it is planned on this path, so concurrent
            # requests see the pool filling up and spill before they wait for a connection.
            path.inflight += 1
            try:
                conn, _ = await path.pool.acquire(fresh=fresh, timeout=path.connect_timeout())
            except BaseException:
                path.inflight -= 1
                raise
            path.requests += 1
            reused = conn.requests > 0
            resp = conn.send(ctx.method, head, body, path.on_response_end)
            if path.hop is not None:
                resp.decide = self._decider(ctx, path)
            path.waiting[resp] = ctx  # the prober may fail it over if the line dies meanwhile
            suspect = asyncio.get_running_loop().call_later(path.suspect_after(), self.on_slow_path, path)
            try:
                if ctx.body_stream is not None:
                    try:
                        await conn.send_stream(ctx.body_stream, chunked=ctx.stream_length() is None)
                    except UpstreamReset:
                        if not resp.head_done:
                            raise
                        # The origin answered (and closed) before the upload ended: its answer
                        # (a 413, a 401) is what the client should see.
                await resp.wait_head(failover.first_byte_timeout)
                suspect.cancel()
                if path.hop is not None:
                    _check_hop(path, resp)
                if resp.status == 200 and _is_sse(resp) and resp.header(b"content-encoding") is None:
                    # (a compressed stream's events cannot be seen: its first byte commits it)
                    await resp.wait_event(failover.first_event_timeout)
                return resp
            except HopBaseMissing:
                # The edge no longer has the body our delta named: send it whole, same path.
                resp.release()
                ctx.whole = True
                head = None
                continue
            except UpstreamReset as exc:
                resp.release()
                if not fresh and reused and _stale_connection(ctx, resp, exc):
                    fresh = True
                    continue
                raise
            except BaseException:
                resp.release()
                raise
            finally:
                suspect.cancel()
                path.waiting.pop(resp, None)


def _check_hop(path: Path, resp: Response) -> None:
    """A `via` response: the edge's own refusal (our token, or an origin it does not serve)
    says the line cannot carry this request, not that the origin said no; and a body that
    already failed to decode is the path's failure, retried like a reset."""
    status = resp.status
    if status in (401, 403, 409) and (kind := resp.header(b"x-edgeproxy-error")) in HOP_REFUSALS:
        assert kind is not None
        if kind == BASE_MISSING_BYTES:
            raise HopBaseMissing("the edge no longer has the base of our delta")
        resp.release()
        raise ViaRefused(f"edge {path.line.name} refused the hop: {status} {kind.decode('latin-1')}")
    resp.check()


class HopBaseMissing(Exception):
    """409 hop_base_unknown from the edge: resend the body whole (never leaves _attempt)."""


BASE_MISSING_BYTES: Final = BASE_MISSING.encode()
# The edge's own refusals of the hop itself (our token, a target it does not serve, a delta
# base it lacks); its other errors (keys_refused, rate_limited...) are answers to pass on.
HOP_REFUSALS: Final = frozenset({b"unauthorized", b"forbidden", BASE_MISSING_BYTES})


def _is_sse(resp: Response) -> bool:
    ctype = resp.header(b"content-type")
    return ctype is not None and ctype[:17].lower() == b"text/event-stream"


# Outcomes that blame the line, not the origin: retrying them on another path is free.
LINE_OUTCOMES: Final = frozenset({"connect", "reset"})

# Methods that may be sent twice without harm (RFC 9110 9.2.2), for the stale-connection retry.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A reset this soon after sending on a reused connection is the origin's idle close racing
# our request (it closed before reading it), not an answer to it.
STALE_WINDOW: Final = 0.05


def _stale_connection(ctx: Ctx, resp: Response, exc: UpstreamReset) -> bool:
    """May a reset on a reused keep-alive connection be retried on a new one, invisibly?

    Only if nothing can have been processed twice: nothing was sent, or the method is
    idempotent (or the client sent an Idempotency-Key), or the reset came within
    STALE_WINDOW of sending, before any byte of answer. Like Go's net/http.
    """
    if ctx.body_stream is not None or resp.head_done or resp.bytes_read or isinstance(exc, PathDown):
        return False
    if not exc.sent:
        return True
    if ctx.method in IDEMPOTENT or "idempotency-key" in ctx.request.headers:
        return True
    return bool(resp.sent_at) and time.monotonic() - resp.sent_at < STALE_WINDOW


def may_move(ctx: Ctx) -> bool:
    """Could this request, waiting on a path that just failed a probe, be sent elsewhere?
    (The same conditions as a retry after a reset, budget aside: a rescue is not a copy on a
    failing origin.) If not, it keeps its chance on the path it is on."""
    upstream = ctx.upstream
    if upstream is None or ctx.body_stream is not None:
        return False
    failover = upstream.config.failover
    return (
        "reset" in failover.retry_on
        and len(ctx.tried) <= failover.retries
        and upstream.plan(ctx.tried, retry=True, take=False, only=ctx.pin) is not None
    )

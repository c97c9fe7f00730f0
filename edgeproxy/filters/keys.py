"""Key pools: an upstream's endpoints inject their own API keys, several per endpoint.

A key is taken as its attempt is planned (so concurrent requests and hedges see it taken);
the answer's rate-limit headers replace our view of its limits; a 429 cools that key down
for as long as the origin says and the request goes again at once with another key. A
401/403 makes the key suspect: a check (keycheck.py: ``GET <models>`` with it, unbilled)
says whether the key is dead, and then it is disabled until the next reload and the request
goes again at once with another key; or whether the refusal was about the request (a
restricted key missing a scope, a model only some keys may use), and then every key stays
enabled and the request goes again once, with another key of the same endpoint if one is
ready, before the client gets the origin's answer. When every key is busy the request waits
up to `failover.queue_timeout` of its arrival (`admission.queue_timeout` when the upstream has
admission: its queue orders these waits by priority), then gets a 429 whose Retry-After says
when a key frees up. Tokens metered from answers (``ctx.usage``) drain each key's token buckets.
The pools (``keypool.py``) outlive reloads: a kept key keeps what we know of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from ..engine import ACCEPT, AGAIN, Filter
from ..proto.errors import KeysRefused, RateLimited
from ..proto.providers import CREDENTIAL_HEADERS, auth_header, auth_value, retry_wait
from .keycheck import DEAD, EDGE_ERROR, LIVE, KeyChecks
from .keypool import Key, KeyPool, rate_limits

if TYPE_CHECKING:
    from ..engine import Attempt, Ctx, Reply, Verdict
    from ..net.client import Response
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics

__all__ = ["KeyPools"]

log = logging.getLogger("edgeproxy")

# 429 without a usable wait in its headers: cool the key down this long.
DEFAULT_COOL_DOWN: Final = 1.0
MIN_WAIT: Final = 0.05
# Answers that are about the key we injected, not about the line or the origin's health:
# 429 cools that key down, 401/403 make it suspect (a check says if it is dead).
KEY_STATUSES: Final = frozenset({401, 403, 429})


class _Keys:
    """One request's keys: the key taken on each path, and what happened to them."""

    __slots__ = ("by_path", "counted", "queued", "retries", "skip", "spared")

    def __init__(self) -> None:
        self.by_path: dict[Path, Key] = {}
        self.retries = 0  # attempts sent again with another key (429, 401, 403)
        # A refusal was about this request, not its key (the key's check passed): the one
        # more try it gets goes with another key; ``skip`` is taken again only if it is the
        # only one ready.
        self.spared = False
        self.skip: Key | None = None
        self.counted = False  # the answer's rate-limit headers already counted its tokens
        self.queued = False  # waited for a rate-limited key to free up


class KeyPools(Filter):
    """The key pools of one upstream's endpoints that have keys."""

    __slots__ = ("auth_header", "checks", "max_retries", "metrics", "name", "pools", "queue_timeout", "upstream")

    def __init__(self, upstream: Upstream, metrics: Metrics, old: KeyPools | None = None) -> None:
        config = upstream.config
        self.upstream = upstream
        self.name = upstream.name
        self.metrics = metrics
        self.auth_header = auth_header(config.provider)
        self.checks = KeyChecks(self.name, config.provider, self.auth_header, metrics)
        now = time.monotonic()
        # endpoint url -> its key pool, for endpoints that have keys (the others pass through)
        self.pools: dict[str, KeyPool] = {
            ep.url: KeyPool(
                ep.url,
                [Key(kc, auth_value(config.provider, kc.key), i, now) for i, kc in enumerate(ep.key_configs())],
            )
            for ep in config.endpoints
            if ep.keys
        }
        if old is not None:
            for url, pool in self.pools.items():
                if url in old.pools:  # what we know of each kept key (not a disable)
                    pool.take_over(old.pools[url])
        # A request switches keys at most this often (an origin answering 429 with no wait
        # on every key must not spin us).
        self.max_retries = 2 * sum(len(p.keys) for p in self.pools.values()) + 2
        upstream.gate = self.is_ready
        upstream.ready_in = self.ready_in
        # The longest a request waits for a key (from its arrival): the admission queue's
        # wait when the upstream has one (it queues the waits for keys too).
        admission = config.admission
        self.queue_timeout = admission.queue_timeout if admission is not None else config.failover.queue_timeout

    def ready_in(self, now: float) -> float | None:
        """Seconds until a key of some endpoint is ready (None: never, all disabled)."""
        return self._wait([], None, None)

    def is_ready(self, path: Path, now: float) -> bool:
        """The plan's gate: a path of an endpoint whose keys are all disabled or rate-limited
        is passed over (see ``no_path_filter`` for the wait)."""
        pool = self.pools.get(path.endpoint.url)
        return pool is None or pool.is_ready(now)

    # -- plan --------------------------------------------------------------------------------
    def path_filter(self, ctx: Ctx, path: Path) -> bool:
        """Take the key for an attempt on ``path`` now, as it is planned; False if its
        endpoint has keys and none is ready."""
        pool = self.pools.get(path.endpoint.url)
        if pool is None:
            return True
        now = time.monotonic()
        keys: _Keys | None = ctx.local(self)
        if keys is None:
            keys = ctx.keep(self, _Keys())
        key = pool.pick(now, keys.skip)
        if key is None:
            if keys.skip is None:
                return False
            # The key a refusal about this request spared comes last, but it is not out: the
            # request takes it rather than wait (or loop) for another.
            key = pool.pick(now)
            if key is None:
                return False
        key.on_pick(now)
        keys.by_path[path] = key
        self.metrics.key_requests.inc((self.name, path.endpoint.url, key.id))
        return True

    async def no_path_filter(self, ctx: Ctx) -> bool:
        """If keys are only busy (rate-limited, out of local headroom), wait for the first to
        free up within ``queue_timeout`` of the request's arrival; else raise
        RateLimited, whose Retry-After says how long until one is free."""
        wait = self._wait(ctx.tried, ctx.pin, ctx.model)
        if wait is None:
            raise KeysRefused(
                f"the origin refused every API key of upstream {self.name} (401/403);"
                " they stay disabled until the next reload"
            )
        now = time.monotonic()
        if now + wait > ctx.started + self.queue_timeout:
            self.metrics.keys_exhausted.inc((self.name,))
            raise RateLimited(f"every API key of upstream {self.name} is rate-limited; retry in {wait:.2f}s", wait)
        keys: _Keys | None = ctx.local(self)
        if keys is None:
            keys = ctx.keep(self, _Keys())
        if not keys.queued:
            keys.queued = True
            self.metrics.queued.inc((self.name,))
        await asyncio.sleep(max(wait, MIN_WAIT))
        return True

    def _wait(self, tried: list[Path], only: str | None, model: str | None) -> float | None:
        """Seconds until a key of an untried endpoint is ready (0: now), or None if no untried
        endpoint has a pool that will ever be (all disabled). ``only``: that endpoint URL."""
        now = time.monotonic()
        wait = None
        for path in self.upstream.paths:
            pool = self.pools.get(path.endpoint.url)
            if pool is None or path in tried or (only is not None and path.endpoint.url != only):
                continue
            w = max(pool.available_in(now), self.upstream.cooling(path.endpoint.url, model, now))
            wait = w if wait is None else min(wait, w)
        return None if wait is None or wait == float("inf") else wait

    # -- per attempt -------------------------------------------------------------------------
    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        key = self._key(ctx, attempt.path)
        if key is not None:
            attempt.drop(CREDENTIAL_HEADERS)
            attempt.lines.append(self.auth_header + b": " + key.value + b"\r\n")
            attempt.credential = key.id  # its id: the key itself never leaves this filter

    def upstream_response_filter(self, ctx: Ctx, attempt: Attempt, resp: Response) -> None:
        """What an answer says about its key's limits: the origin's view replaces ours."""
        key = self._key(ctx, attempt.path)
        if key is None:
            return
        limits = rate_limits(resp.headers)
        if limits is not None:
            key.on_rate_limits(limits, time.monotonic())
            # this answer's tokens are off the origin's count already
            ctx.local(self).counted = "tokens" in limits

    async def on_answer(self, ctx: Ctx, attempt: Attempt, resp: Response) -> Verdict | Exception | None:
        path = attempt.path
        key = self._key(ctx, path)
        status = resp.status
        if key is None or status not in KEY_STATUSES:
            return None
        if status == 429:
            self._cool(path, key, resp)
            if "429" in self.upstream.config.failover.retry_on and self._may_go_again(ctx, path):
                return self._again(ctx, status)  # at once, with another key: not the line's fault
            return ACCEPT
        if path.hop is not None and resp.header(EDGE_ERROR) is not None:
            return None  # the edge's own answer (its keys were refused): not about ours
        keys: _Keys = ctx.local(self)
        verdict = await self.checks.verdict(path, key)
        if verdict == DEAD:
            self._disable(path, key, status)
            if self._may_go_again(ctx, path):
                return self._again(ctx, status)  # a dead key is our problem, never the client's
            if status == 401:
                # Our last key was refused. The origin's answer would show the client a masked
                # form of it (OpenAI does): ours says the same without it.
                return KeysRefused(
                    f"the origin refused the API key(s) of upstream {self.name} (401);"
                    " refused keys stay disabled until the next reload"
                )
            return ACCEPT
        # The key is alive: the refusal was about the request (a scope this key lacks, a
        # model or a path only some keys may use). Every key stays; one more try, with
        # another key of the same endpoint if one is ready now, then the origin's answer.
        pool = self.pools[path.endpoint.url]
        if (
            not keys.spared
            and ctx.body_stream is None
            and keys.retries < self.max_retries
            and pool.is_ready(time.monotonic(), skip=key)
        ):
            # (whichever path the plan takes next can serve it: another endpoint's pool is
            # ready by the plan's gate, this one has a key other than ``key`` ready)
            keys.spared = True
            keys.skip = key
            return self._again(ctx, status)
        if status == 401 and verdict != LIVE:
            # Not proven to be about the request, and OpenAI's 401 quotes a masked form of the
            # key we injected: the client gets ours, which says the same without it.
            return KeysRefused(
                f"the origin refused the API key of upstream {self.name} (401) and a check could not"
                " tell why; the key stays enabled"
            )
        return ACCEPT

    def on_abandoned(self, ctx: Ctx, attempt: Attempt, resp: Response) -> None:
        key = self._key(ctx, attempt.path)
        if key is not None and resp.status == 429:
            self._cool(attempt.path, key, resp)

    def _key(self, ctx: Ctx, path: Path) -> Key | None:
        keys: _Keys | None = ctx.local(self)
        return None if keys is None else keys.by_path.get(path)

    def _disable(self, path: Path, key: Key, status: int) -> None:
        """The origin refused ``key`` and its check confirmed it: never sent again until the
        next reload."""
        if key.disabled is None:
            key.disabled = str(status)
            log.warning(
                "key %s of %s disabled until the next reload: the origin answered %d, and refused its check too",
                key.id,
                path.endpoint.url,
                status,
            )

    def _may_go_again(self, ctx: Ctx, path: Path) -> bool:
        """May the request go again at once with another key (the loop queues it if none is
        ready yet)? Not with a streamed body, nor past ``max_retries``, nor with no key left."""
        keys: _Keys = ctx.local(self)
        if ctx.body_stream is not None or keys.retries >= self.max_retries:
            return False
        others = [p for p in ctx.tried if p is not path]  # the path may serve again: it was the key
        return (
            self.upstream.plan(others, ctx.retrying, False, ctx.pin, ctx.model, ctx.avoid) is not None
            or self._wait(others, ctx.pin, ctx.model) is not None
        )

    def _again(self, ctx: Ctx, status: int) -> Verdict:
        ctx.local(self).retries += 1
        self.metrics.key_retries.inc((self.name, str(status)))
        return AGAIN

    def _cool(self, path: Path, key: Key, resp: Response) -> None:
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
        self.metrics.key_limited.inc((self.name, path.endpoint.url, key.id))

    # -- end ---------------------------------------------------------------------------------
    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        """The tokens the answer used drain its key's token buckets (its local `tpm`, and our
        estimate of the origin's)."""
        used = ctx.usage
        if used is None or ctx.path is None:
            return
        keys: _Keys | None = ctx.local(self)
        key = keys.by_path.get(ctx.path) if keys is not None else None
        if key is not None:
            key.on_tokens(used.input + used.output, time.monotonic(), keys.counted)  # type: ignore[union-attr]

    # -- operations --------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, object]:
        return {"keys": {url: pool.status(now) for url, pool in self.pools.items()}}  # by id only

    def on_scrape(self, metrics: Metrics, now: float) -> None:
        disabled, left = metrics.key_disabled.values, metrics.key_headroom.values
        for url, pool in self.pools.items():
            for key in pool.keys:
                labels = (self.name, url, key.id)
                disabled[labels] = 0.0 if key.disabled is None else 1.0
                for limit, bucket in (("requests", key.origin_requests), ("tokens", key.origin_tokens)):
                    if bucket is not None:
                        left[(*labels, limit)] = max(0.0, float(int(bucket.level_at(now))))

"""Response cache and request coalescing: an identical request is answered once.

On an upstream with ``cache: {ttl: ...}``, a request whose key (below) has a stored answer
gets it at once (``hit``: JSON, or the SSE stream replayed byte for byte, with its own
``x-request-id``). Otherwise it shares the answer of an identical request in flight
(``coalesced``: engine/flight.py, live fan-out for streams) or fetches it for itself and any
that come while it is in flight (``miss``). A complete 200 answer (JSON, or an SSE stream that
ended as its protocol ends it: never a broken one, never one the origin marked ``no-store``)
up to ``cache.max_entry`` is stored for the TTL. Every answer says which in
``x-edgeproxy-cache`` (``bypass``: not looked up; also when the store could not be asked).

The key (a digest: the store never sees a prompt or a credential) covers the method, the
upstream, the path and query, who asked (a digest of the client's credential headers:
Authorization, x-api-key, x-goog-api-key, api-key, x-edgeproxy-token; left out when the
upstream's cache is ``shared``) and the body: a JSON body in canonical form (keys sorted, no
whitespace: the same JSON written another way matches), any other body as it is. The stream
and non-stream forms of a prompt differ in their body: two entries.

Per request: ``x-edgeproxy-cache: off | refresh | ttl=<duration>``; ``Cache-Control:
no-store`` is ``off``, ``no-cache`` is ``refresh`` (fetch, then store).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from ..config import parse_duration
from ..engine import Filter, Flight
from ..proto.codec import THREAD_MIN
from ..proto.errors import ClientError
from ..proto.sse import ends_stream
from .cachestore import Entry, MemoryStore, Store

if TYPE_CHECKING:
    from ..config import CacheConfig, UpstreamCacheConfig
    from ..engine import Attempt, Ctx, Reply
    from ..telemetry.metrics import Metrics

__all__ = ["Cache", "SharedCache"]

log = logging.getLogger("edgeproxy")

HEADER: Final = "x-edgeproxy-cache"
# What is cached: POSTs to the APIs that generate (a POST elsewhere may change state: a thread's
# messages, a batch, a file), by how their paths end.
GENERATING: Final = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/moderations",
    "/v1/messages",  # (Anthropic's; an Assistants thread's /threads/<id>/messages is state)
    "/v1/messages/count_tokens",
    ":generateContent",
    ":streamGenerateContent",
    ":embedContent",
    ":batchEmbedContents",
    ":countTokens",
)
# Request headers that change the answer (API versions, betas, the account billed): in the key.
VARY: Final = (
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "openai-beta",
)
# Answer headers about one request or client, never stored nor replayed.
PRIVATE: Final = ("set-cookie", "date", "age", "retry-after", "cf-ray", "server-timing", "request-id")
PRIVATE_PREFIXES: Final = ("x-ratelimit-", "anthropic-ratelimit-", "openai-processing", "x-envoy-")
NO_ENCODING: Final = frozenset({b"accept-encoding"})
# The headers a client's credential travels in, by provider (and our own listener token).
CREDENTIALS: Final = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "x-edgeproxy-token")
STORED_TYPES: Final = ("application/json", "text/event-stream")


class SharedCache:
    """What every caching upstream of the process shares, across reloads while ``cache:``
    stays the same: the store, and the answers in flight by key."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.store: Store = MemoryStore(config.max_memory) if config.store == "memory" else _redis(config.store)
        self.flights: dict[bytes, Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._scraped = (0, 0)  # the store's evictions and errors at the last scrape

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_scrape(self, metrics: Metrics) -> None:
        store = self.store
        labels = (store.name,)
        if store.name == "memory":
            metrics.cache_entries.set(labels, store.entries)
            metrics.cache_bytes.set(labels, store.stored_bytes)
        evictions, errors = self._scraped
        metrics.cache_evictions.inc(labels, store.evictions - evictions)
        metrics.cache_errors.inc(labels, store.errors - errors)
        self._scraped = (store.evictions, store.errors)


def _redis(url: str) -> Store:
    from .redisstore import RedisStore

    return RedisStore(url)


class Cache(Filter):
    """On the chain of an upstream with ``cache``: first, so a hit costs the least."""

    __slots__ = ("metrics", "provider", "shared", "shared_key", "ttl", "upstream")

    def __init__(
        self, upstream: str, provider: str, config: UpstreamCacheConfig, shared: SharedCache, metrics: Metrics
    ) -> None:
        self.upstream = upstream
        self.provider = provider
        self.ttl = config.ttl
        self.shared_key = config.shared
        self.shared = shared
        self.metrics = metrics

    async def request_body_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        if ctx.pin is not None:
            return None  # a hop from a sidecar: its own cache decides
        off, refresh, ttl = self._control(ctx)
        if off or not _generates(ctx) or ctx.body is None or ctx.body_coding is not None:
            return self._result(ctx, "bypass")
        key = await self._key(ctx)
        shared = self.shared
        flight = shared.flights.get(key)
        if flight is not None and flight.error is None and not flight.broken:
            flight.join()  # at once: its fetch is not cancelled while this one is on its way
            ctx.flight = flight
            return self._result(ctx, "coalesced")
        # This request looks the key up and, on a miss, fetches: identical ones that come
        # meanwhile share the one lookup and the one fetch.
        flight = ctx.flight = shared.flights[key] = Flight(key)
        flight.join()
        ctx.leads = True
        entry = None if refresh else await shared.store.get(key)
        if entry is not None:
            ctx.leads = False  # (nothing to fetch: the sharers get the entry)
            flight.begin(entry.status, list(entry.headers), entry.sse)
            flight.add(entry.body)
            flight.finish()
            _forget(shared, flight)
            self._result(ctx, "hit")
            if entry.tokens:
                self.metrics.tokens_saved.inc((self.upstream,), entry.tokens * flight.joined)
            return self._replay(ctx, entry)
        ctx.keep(self, ttl)
        return self._result(ctx, "miss" if getattr(shared.store, "available", True) else "bypass")

    def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        if ctx.flight is not None:
            # An answer shared or stored is one every client can read: not content-coded for
            # whichever client asked first (and an encoded stream cannot be checked whole).
            attempt.drop(NO_ENCODING)

    def _result(self, ctx: Ctx, result: str) -> None:
        self.metrics.cache_requests.inc((self.upstream, result))
        ctx.shared_headers = [(HEADER, result)]
        return None

    def _control(self, ctx: Ctx) -> tuple[bool, bool, float]:
        """(off, refresh, ttl) from the request's headers."""
        headers = ctx.request.headers
        off = refresh = False
        ttl = self.ttl
        cc = headers.get("cache-control")
        if cc is not None:
            directives = {d.strip().lower().split("=", 1)[0] for d in cc.split(",")}
            off = "no-store" in directives
            refresh = "no-cache" in directives
        ours = headers.get(HEADER)
        if ours is not None:
            value = ours.strip().lower()
            if value == "off":
                off = True
            elif value == "refresh":
                refresh = True
            elif value.startswith("ttl="):
                try:
                    ttl = parse_duration(value[4:].strip())
                except ValueError:
                    ttl = 0.0
                if ttl <= 0:
                    raise ClientError(f"{HEADER}: {ours[:40]!r} is not ttl=<duration> (e.g. ttl=10m)")
                ttl = min(ttl, self.ttl)  # a client may keep its answer shorter, not longer
            else:
                raise ClientError(f"{HEADER}: expected off, refresh or ttl=<duration>, got {ours[:40]!r}")
        return off, refresh, ttl

    async def _key(self, ctx: Ctx) -> bytes:
        body = ctx.body or b""
        canonical = await asyncio.to_thread(_canonical, body) if len(body) >= THREAD_MIN else _canonical(body)
        h = hashlib.blake2b(digest_size=32)
        for part in (ctx.method, self.upstream, ctx.raw_path):
            h.update(part.encode("utf-8", "surrogateescape") + b"\0")
        headers = ctx.request.headers
        names = VARY if self.shared_key else VARY + CREDENTIALS
        who = "\0".join(f"{name}={headers.get(name, '')}" for name in names)
        h.update(hashlib.blake2b(who.encode("utf-8", "surrogateescape"), digest_size=16).digest())
        h.update(b"\0")
        h.update(canonical)
        return h.digest()

    def _replay(self, ctx: Ctx, entry: Entry) -> web.Response:
        headers = [*entry.headers, ("x-request-id", ctx.request_id), *(ctx.shared_headers or ())]
        ctx.bytes_out, ctx.streamed, ctx.committed = len(entry.body), entry.sse, True
        ctx.ttfb = time.monotonic() - ctx.started
        return web.Response(status=entry.status, headers=headers, body=entry.body)

    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        if ctx.flight is None and ctx.shared_headers:
            reply.headers.extend(ctx.shared_headers)  # (bypass: a shared answer gets it from the flight)

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        flight = ctx.flight
        if flight is None or not ctx.leads:
            return
        shared = self.shared
        tokens = ctx.usage.input + ctx.usage.output if ctx.usage is not None else 0
        if tokens and flight.joined > 1:
            self.metrics.tokens_saved.inc((self.upstream,), tokens * (flight.joined - 1))
        entry = _storable(flight, tokens, self.shared.config.max_entry, self.provider, self.shared_key)
        if entry is None:
            _forget(shared, flight)
            return

        async def store() -> None:
            try:
                await shared.store.put(flight.key, entry, ctx.local(self) or self.ttl)
            finally:
                _forget(shared, flight)  # (until now a new request joins the finished flight)

        shared.spawn(store())

    def logging_filter(self, ctx: Ctx, record: dict[str, object]) -> None:
        headers = ctx.shared_headers
        if headers:
            record["cache"] = headers[0][1]

    def on_scrape(self, metrics: Metrics, now: float) -> None:
        self.shared.on_scrape(metrics)


def _generates(ctx: Ctx) -> bool:
    """A POST to an API that generates (see GENERATING)?"""
    if ctx.method != "POST":
        return False
    path = ctx.raw_path.split("?", 1)[0]
    return path.endswith(GENERATING)


def _canonical(body: bytes) -> bytes:
    """A JSON body with its keys sorted and no whitespace; any other body as it is."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        return body


def _storable(flight: Flight, tokens: int, max_entry: int, provider: str, shared: bool) -> Entry | None:
    """The flight's answer as an entry, if it may be stored: a complete 200 JSON or SSE answer,
    not content-coded, not over ``max_entry``, that the origin did not mark no-store (nor
    private, on a cache ``shared`` between clients); its per-request headers left out."""
    if not flight.done or flight.error is not None or flight.broken or flight.status != 200:
        return None
    if flight.size > max_entry:
        return None
    ctype = ""
    kept: list[tuple[str, str]] = []
    for name, value in flight.headers:
        lname = name.lower()
        if lname == "cache-control" and ("no-store" in value.lower() or (shared and "private" in value.lower())):
            return None
        if lname == "content-encoding":
            return None
        if lname == "content-type":
            ctype = value.split(";", 1)[0].strip().lower()
        if lname in PRIVATE or lname.startswith(PRIVATE_PREFIXES):
            continue
        kept.append((name, value))
    if ctype not in STORED_TYPES:
        return None
    sse = ctype == "text/event-stream"
    body = b"".join(flight.chunks)
    if sse and not _whole(body, provider):
        return None
    return Entry(200, tuple(kept), body, sse, tokens, time.time())


def _whole(stream: bytes, provider: str) -> bool:
    """Did the stream end as its protocol ends it (OpenAI's [DONE], Anthropic's message_stop;
    Gemini's streams just end), with no error event anywhere in it (an error event starts a
    line: inside an event's JSON its quotes are escaped)?"""
    if b"event: error" in stream or b'data: {"error"' in stream:
        return False
    return provider == "gemini" or ends_stream(stream[-512:])


def _forget(shared: SharedCache, flight: Flight) -> None:
    if shared.flights.get(flight.key) is flight:
        del shared.flights[flight.key]

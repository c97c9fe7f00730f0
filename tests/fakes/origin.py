"""A fake LLM API origin (OpenAI, Anthropic and a little Gemini) for tests and benchmarks.

The official ``openai`` and ``anthropic`` SDKs work against it directly::

    origin = FakeOrigin()
    await origin.start()
    openai.AsyncOpenAI(base_url=origin.url + "/v1", api_key="k")
    anthropic.AsyncAnthropic(base_url=origin.url, api_key="k")

Behaviour knobs are plain attributes that may be changed at any time (they are
read per request, and per event inside streams).  Observations (``requests``,
the stream counters) are updated on the origin's event loop.

It runs on the current event loop (``await start()`` / ``await stop()``, or
``async with``), in a thread of its own (``start_in_thread()`` /
``stop_thread()``, or ``with``) or as a process::

    python -m tests.fakes.origin --port 9100 [--events N --event-interval S --latency S]

Stream framing notes:

* "events" in ``drop_after_events`` / ``stall_after_events`` count every SSE
  frame written, of any type (the OpenAI role chunk, Anthropic's
  ``message_start``/``content_block_start``/``ping``, ``[DONE]`` ...).  A value
  equal to the total number of frames drops/stalls after the last frame but
  before the end of the chunked body.  0 means right after the headers.
* ``event_interval`` is slept before every frame except the first one.
* ``drop_times`` > 0: ``drop_after_events`` applies to that many streams, then clears
  itself (like ``fail_times``).

Anthropic prefill: a Messages request whose last message is the assistant's is answered
with the rest of the reply after that text (the reply as usual if it does not start with
it). Like the API, a prefill ending in whitespace is refused (400); ``refuse_prefill`` makes
every prefill refused (400), as models without prefill support do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import hashlib
import itertools
import math
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.fakes.threaded import Threaded, serve_forever

__all__ = [
    "EMBEDDING",
    "GZIP_BODY",
    "GZIP_JSON",
    "GZIP_PAYLOAD",
    "MODELS",
    "FakeOrigin",
    "Recorded",
    "reply_for",
    "split_text",
]

# --------------------------------------------------------------------------- constants

MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5", "gemini-2.0-flash")
_CREATED = 1_700_000_000

#: The JSON document served gzip-compressed by ``GET /v1/gzip``.
GZIP_PAYLOAD: dict[str, Any] = {
    "object": "gzip.test",
    "message": "this body was gzip-compressed by the origin",
    "numbers": list(range(32)),
}
GZIP_JSON: bytes = orjson.dumps(GZIP_PAYLOAD)
#: Exact bytes of the ``GET /v1/gzip`` response body (deterministic: mtime=0).
GZIP_BODY: bytes = gzip.compress(GZIP_JSON, compresslevel=6, mtime=0)

#: The embedding returned for every input (exactly representable in float32).
EMBEDDING: list[float] = [0.0, 0.125, -0.25, 0.375, -0.5, 0.625, -0.75, 0.875]
_EMBEDDING_B64 = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()

_JSON_CT = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_NDJSON_ARRAY_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-cache"}
_POLL = 0.02  # how often a sleeping stream checks whether its client went away

_OK, _GONE, _STOPPING = 0, 1, 2
_BODY_KEY = web.RequestKey("fake_origin_body", bytes)
_LIMIT_HEADERS_KEY = web.RequestKey("fake_origin_limit_headers", dict)

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    413: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_OPENAI, _ANTHROPIC, _GEMINI = "openai", "anthropic", "gemini"
PROBE_AGENT = "edgeproxy-probe"
KEY_CHECK_AGENT = "edgeproxy-keycheck"  # edgeproxy checking a key the origin refused
# What OpenAI answers a restricted key that lacks a permission (401, not invalid_api_key).
MISSING_SCOPE = (
    "You have insufficient permissions for this operation. Missing scopes: model.request. Check that you"
    " have the correct role in your organization, and if you're using a restricted API key, that it has"
    " the necessary scopes."
)


# --------------------------------------------------------------------------- helpers


class Recorded:
    """One request as received by the origin."""

    __slots__ = ("_sha256", "body", "headers", "method", "path", "size", "time")

    def __init__(
        self,
        method: str,
        path: str,
        headers: CIMultiDict[str],
        body: bytes,
        time: float,
        size: int | None = None,
        sha256: str | None = None,
    ) -> None:
        self.method = method
        self.path = path  #: raw path including the query string
        self.headers = headers
        self.body = body  #: b"" for /v1/files (streamed, not kept): see size / sha256
        self.time = time  #: time.time() at arrival
        self.size = len(body) if size is None else size  #: body length in bytes
        self._sha256 = sha256

    @property
    def sha256(self) -> str:
        """Hex sha256 of the body as received."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.body).hexdigest()
        return self._sha256

    @property
    def path_only(self) -> str:
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"Recorded({self.method} {self.path} size={self.size})"


def _text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    out.append(t)
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return ""


def reply_for(last_user_text: str) -> str:
    """The deterministic reply text for a request whose last user message is ``last_user_text``."""
    return "echo: " + last_user_text


def split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into ``n`` consecutive pieces (some may be empty) whose concatenation is ``text``."""
    if n <= 0:
        return []
    length = len(text)
    return [text[i * length // n : (i + 1) * length // n] for i in range(n)]


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


def _error_body(kind: str, status: int, message: str) -> bytes:
    if kind == _ANTHROPIC:
        etype = _ANTHROPIC_ERRORS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
    if kind == _GEMINI:
        gstatus = _GOOGLE_STATUS.get(status) or ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        return orjson.dumps({"error": {"code": status, "message": message, "status": gstatus}})
    etype, code = _OPENAI_ERRORS.get(status) or (
        ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    )
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def _kind_for_path(path: str) -> str:
    if path.startswith("/v1/messages"):
        return _ANTHROPIC
    if path.startswith("/v1beta/"):
        return _GEMINI
    return _OPENAI


class _BadRequest(Exception):
    pass


Frame = tuple[bytes, dict[str, Any] | None, bytes]  # prefix, JSON object (gets x_origin_ts), suffix


def _go_duration(seconds: float) -> str:
    """OpenAI's reset format: Go durations such as "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass
class ModelFailure:
    """How one model fails: ``status`` with the provider's error ``code`` (OpenAI's
    ``error.code``, Anthropic's ``error.type``; None: the status's usual one), an optional
    Retry-After; or ``silent``: the request is accepted and never answered. ``delay``: the
    answer (the error, or with ``status`` None the normal answer) comes that much later."""

    status: int | None = 503
    code: str | None = None
    message: str = "fake model failure"
    retry_after: str | None = None
    silent: bool = False
    delay: float = 0.0


def _model_of(request: web.Request, body: bytes) -> str | None:
    if "/models/" in request.path:
        return request.path.rsplit("/models/", 1)[1].split(":", 1)[0]
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else None


class KeyLimit:
    """A per-key token bucket like the real APIs': ``requests`` (and optionally ``tokens``) per
    ``window`` seconds, refilled continuously, starting full."""

    __slots__ = ("at", "requests", "tokens", "tokens_level", "level", "window")

    def __init__(self, requests: int, window: float = 60.0, tokens: int | None = None) -> None:
        self.requests, self.window, self.tokens = requests, window, tokens
        self.level = float(requests)
        self.tokens_level = float(tokens or 0)
        self.at = time.monotonic()

    def _refill(self, now: float) -> None:
        dt, self.at = now - self.at, now
        self.level = min(self.requests, self.level + dt * self.requests / self.window)
        if self.tokens:
            self.tokens_level = min(self.tokens, self.tokens_level + dt * self.tokens / self.window)

    def admit(self, cost: int, now: float) -> float:
        """Take one request (and ``cost`` tokens): 0.0 if admitted, else seconds to wait."""
        self._refill(now)
        wait = 0.0
        if self.level < 1:
            wait = (1 - self.level) * self.window / self.requests
        if self.tokens and self.tokens_level < cost:
            wait = max(wait, (cost - self.tokens_level) * self.window / self.tokens)
        if wait > 0:
            return wait
        self.level -= 1
        if self.tokens:
            self.tokens_level -= cost
        return 0.0

    def wait(self, now: float) -> float:
        """Seconds until one more request would be admitted (reads only: safe from another thread)."""
        level = min(self.requests, self.level + (now - self.at) * self.requests / self.window)
        return max(0.0, (1 - level) * self.window / self.requests)

    def headers(self, kind: str, now: float) -> dict[str, str]:
        """The rate-limit headers the real API sends with every answer, OpenAI's or Anthropic's."""
        self._refill(now)
        dims = [("requests", self.requests, self.level)]
        if self.tokens:
            dims.append(("tokens", self.tokens, self.tokens_level))
        out = {}
        for dim, limit, level in dims:
            full_in = (limit - level) * self.window / limit
            if kind == _ANTHROPIC:
                when = datetime.fromtimestamp(math.ceil(time.time() + full_in), UTC)
                out[f"anthropic-ratelimit-{dim}-limit"] = str(limit)
                out[f"anthropic-ratelimit-{dim}-remaining"] = str(max(0, math.floor(level)))
                out[f"anthropic-ratelimit-{dim}-reset"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
            else:
                out[f"x-ratelimit-limit-{dim}"] = str(limit)
                out[f"x-ratelimit-remaining-{dim}"] = str(max(0, math.floor(level)))
                out[f"x-ratelimit-reset-{dim}"] = _go_duration(full_in)
        return out


def presented_key(request: web.BaseRequest) -> str | None:
    """The API key a request carries, however its SDK presents it."""
    h = request.headers
    for name in ("x-api-key", "x-goog-api-key"):
        if name in h:
            return h[name]
    auth = h.get("Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:]
    return None


# --------------------------------------------------------------------------- the origin


class FakeOrigin(Threaded):
    """Fake OpenAI / Anthropic / Gemini API server on aiohttp."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._waiters: list[asyncio.Future[None]] = []
        self.stream_disconnected_event: asyncio.Event = asyncio.Event()
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Knobs back to defaults, observations cleared."""
        # knobs
        self.latency: float = 0.0
        self.event_interval: float = 0.0
        self.events: int = 5
        self.fail_status: int | None = None
        self.fail_times: int = 0
        self.retry_after: str | None = None
        self.drop_after_events: int | None = None
        self.drop_times: int = 0
        self.refuse_prefill: bool = False
        self.stall_after_events: int | None = None
        self.hold_after_end: float = 0.0  # streams: seconds between the end event and the body's end
        self.require_key: str | None = None
        self.reply: str | None = None  # if set: the reply text for every completion (instead of "echo: ...")
        self.record: bool = True  # False: do not append to .requests (benchmarks)
        self.probes_affected: bool = False  # True: the knobs apply to edgeproxy's probes too
        self.key_limits: dict[str, KeyLimit] = {}  # per-key rate limits (see limit_keys)
        self.revoked_keys: set[str] = set()  # keys answered 401 invalid_api_key (everywhere)
        self.revoked_status: int = 401  # or 403 (an account suspended)
        # Restricted keys: key -> the models (a body's "model") and paths ("/v1/embeddings",
        # prefixes) it may not use, answered ``restricted_status`` with OpenAI's missing-scope
        # message; it works for everything else.
        self.restricted_keys: dict[str, set[str]] = {}
        self.restricted_status: int = 401
        # Failures of one model only (a body's "model", or a Gemini URL's): model -> how it fails
        # (every other model is served). See ModelFailure.
        self.model_failures: dict[str, ModelFailure] = {}
        # At most this many client requests are served at once; the others wait their turn at
        # the origin, in arrival order (None: no limit). Probes and key checks never wait.
        self.capacity: int | None = None
        self._turns: tuple[int, asyncio.Semaphore] | None = None
        # observations
        self.requests: list[Recorded] = []
        self.request_count: int = 0  # client requests, counted even when record is False
        self.probe_count: int = 0  # edgeproxy's probes (User-Agent: edgeproxy-probe), never in requests
        self.stream_disconnects: int = 0
        self.streams_completed: int = 0
        self.streams_dropped: int = 0  # streams the origin aborted itself (drop_after_events)
        self.active_streams: int = 0
        self.serving: int = 0  # client requests being served now (past the capacity wait)
        self.max_serving: int = 0  # the most ever served at once
        self.key_served: Counter[str] = Counter()  # per key: requests admitted (limited keys only)
        self.key_limited: Counter[str] = Counter()  # per key: 429s sent
        self.key_refused: Counter[str] = Counter()  # per key: refusals of a revoked key, key checks aside
        self.key_restricted: Counter[str] = Counter()  # per key: refusals of a restricted key, checks aside
        # edgeproxy's key checks (User-Agent: edgeproxy-keycheck), per key: counted apart like
        # probes, never in requests; revocations and restrictions apply to them, the failure
        # knobs only with probes_affected
        self.key_checks: Counter[str] = Counter()
        self.stream_disconnected_event.clear()

    def limit_keys(self, keys: Iterable[str], requests: int, window: float = 60.0, tokens: int | None = None) -> None:
        """Rate-limit each of ``keys`` on its own: ``requests`` (and ``tokens``) per ``window``
        seconds, with real-shaped headers on every answer and a 429 with Retry-After when over."""
        for key in keys:
            self.key_limits[key] = KeyLimit(requests, window, tokens)

    def next_accept_in(self, keys: Iterable[str] | None = None) -> float:
        """Seconds until one of ``keys`` (default: every limited, unrevoked key) is admitted again."""
        now = time.monotonic()
        names = self.key_limits if keys is None else keys
        waits = [self.key_limits[k].wait(now) for k in names if k in self.key_limits and k not in self.revoked_keys]
        return min(waits, default=0.0)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.on_response_prepare.append(_add_limit_headers)
        r = app.router
        w = self._wrap
        r.add_post("/v1/chat/completions", w(self._chat, _OPENAI))
        r.add_post("/v1/completions", w(self._completions, _OPENAI))
        r.add_post("/v1/embeddings", w(self._embeddings, _OPENAI))
        r.add_get("/v1/models", w(self._models, _OPENAI, parse=False), allow_head=False)
        r.add_get("/v1/models/{model}", w(self._model, _OPENAI, parse=False), allow_head=False)
        r.add_post("/v1/files", w(self._files, _OPENAI, parse=False, stream_body=True))
        r.add_route("*", "/v1/echo", w(self._echo, _OPENAI, parse=False))
        r.add_route("*", "/v1/echo/{tail:.*}", w(self._echo, _OPENAI, parse=False))
        r.add_get("/v1/gzip", w(self._gzip, _OPENAI, parse=False), allow_head=False)
        r.add_post("/v1/messages", w(self._messages, _ANTHROPIC))
        r.add_post("/v1/messages/count_tokens", w(self._count_tokens, _ANTHROPIC))
        r.add_post("/v1beta/models/{target}", w(self._gemini, _GEMINI))
        r.add_route("*", "/{tail:.*}", w(self._not_found, None, parse=False))
        return app

    async def start(self) -> None:
        """Bind and serve on the running loop; ``port`` / ``url`` are set afterwards."""
        if self._runner is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        # a fresh Event, bound to this loop on first use (an origin may be started on several loops in turn)
        was_set = self.stream_disconnected_event.is_set()
        self.stream_disconnected_event = asyncio.Event()
        if was_set:
            self.stream_disconnected_event.set()
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            auto_decompress=False,  # keep request bodies exactly as sent
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving; stalled/slow streams are aborted promptly."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        try:
            await runner.cleanup()
        finally:
            self._stopping = False

    # ------------------------------------------------------------------ waiting

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 1.0, what: str = "condition") -> None:
        """Wait until ``predicate()`` is true; raise TimeoutError after ``timeout``.

        Event driven on the origin's own loop; from another loop (origin in a thread) it polls every 10 ms.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        same_loop = loop is self._loop
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"FakeOrigin: {what} not reached within {timeout}s")
            if not same_loop:  # origin runs in another thread: poll
                await asyncio.sleep(min(remaining, 0.01))
                continue
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                # wake at least every 50 ms, in case a change came from elsewhere (e.g. reset())
                await asyncio.wait_for(fut, min(remaining, 0.05))
            except TimeoutError:
                pass

    async def wait_disconnects(self, n: int = 1, timeout: float = 1.0) -> None:
        await self.wait_for(
            lambda: self.stream_disconnects >= n,
            timeout,
            f"stream_disconnects >= {n} (now {self.stream_disconnects})",
        )

    async def wait_streams_completed(self, n: int = 1, timeout: float = 1.0) -> None:
        await self.wait_for(lambda: self.streams_completed >= n, timeout, f"streams_completed >= {n}")

    async def wait_requests(self, n: int = 1, timeout: float = 1.0) -> None:
        await self.wait_for(lambda: self.request_count >= n, timeout, f"request_count >= {n}")

    async def wait_idle(self, timeout: float = 1.0) -> None:
        """Wait until no stream is active."""
        await self.wait_for(lambda: self.active_streams == 0, timeout, "active_streams == 0")

    # ------------------------------------------------------------------ plumbing

    def _wrap(self, handler: Callable[..., Any], kind: str | None, *, parse: bool = True, stream_body: bool = False):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            k = kind or _kind_for_path(request.path)
            size = sha = None
            if stream_body:
                size, sha = await _consume(request)
                body = b""
            else:
                body = await request.content.read() if request.body_exists else b""
            request[_BODY_KEY] = body
            agent = request.headers.get("User-Agent")
            if agent == KEY_CHECK_AGENT:
                key = presented_key(request) or ""
                self.key_checks[key] += 1
                if self._waiters:
                    self._notify()
                refused = self._refusal(request, k, key, body)
                if refused is not None:
                    return refused
                if not self.probes_affected:
                    return await handler(request, None, size, sha)
            elif agent == PROBE_AGENT:
                # edgeproxy's health probes: counted apart, so tests see only client traffic;
                # and answered normally (the models list works while completions fail),
                # unless probes_affected is set.
                self.probe_count += 1
                if not self.probes_affected:
                    return await handler(request, None, size, sha)
            else:
                self.request_count += 1
                if self.record:
                    self.requests.append(
                        Recorded(request.method, request.raw_path, request.headers.copy(), body, time.time(), size, sha)
                    )
            if self._waiters:
                self._notify()
            if agent in (PROBE_AGENT, KEY_CHECK_AGENT):
                return await self._serve(request, handler, k, body, agent, size, sha, parse)
            async with self._turn(self.capacity):
                return await self._serve(request, handler, k, body, agent, size, sha, parse)

        return wrapped

    @contextlib.asynccontextmanager
    async def _turn(self, capacity: int | None) -> AsyncIterator[None]:
        """Wait for one of ``capacity`` turns (arrival order; None: at once); ``serving``
        counts the held ones."""
        if capacity is None:
            sem: Any = contextlib.nullcontext()
        else:
            if self._turns is None or self._turns[0] != capacity:
                self._turns = (capacity, asyncio.Semaphore(capacity))
            sem = self._turns[1]
        async with sem:
            self.serving += 1
            self.max_serving = max(self.max_serving, self.serving)
            try:
                yield
            finally:
                self.serving -= 1

    async def _serve(
        self,
        request: web.Request,
        handler: Callable[..., Any],
        k: str,
        body: bytes,
        agent: str | None,
        size: int | None,
        sha: str | None,
        parse: bool,
    ) -> web.StreamResponse:
        """A client request past the capacity wait: the failure knobs, then the handler."""
        if self.require_key is not None and not self._authorized(request, k):
            await self._latency(request)
            return self._error(k, 401, "Incorrect API key provided.")
        if (self.revoked_keys or self.key_limits or self.restricted_keys) and agent != KEY_CHECK_AGENT:
            refused = self._key_check(request, k, body)
            if refused is not None:
                await self._latency(request)
                return refused
        if self.model_failures:
            failure = self.model_failures.get(_model_of(request, body) or "")
            if failure is not None and (failure.status is not None or failure.silent):
                return await self._model_failure(request, k, failure)
            if failure is not None:
                await asyncio.sleep(failure.delay)  # slow, then served
        status = self.fail_status
        if status is not None:
            if self.fail_times > 0:
                self.fail_times -= 1
                if self.fail_times == 0:
                    self.fail_status = None
            await self._latency(request)
            return self._error(k, status, f"fake origin failure ({status})", self.retry_after)

        data: Any = None
        if parse:
            try:
                data = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict):
                return self._error(k, 400, "We could not parse the JSON body of your request.")
        try:
            return await handler(request, data, size, sha)
        except _BadRequest as e:
            return self._error(k, 400, str(e))

    def _key_check(self, request: web.Request, kind: str, body: bytes) -> web.Response | None:
        """Per-key limits and revocations: an error to send, or None to serve the request."""
        key = presented_key(request)
        if key is None:
            return None
        refused = self._refusal(request, kind, key, body)
        if refused is not None:
            if key in self.revoked_keys:
                self.key_refused[key] += 1
            else:
                self.key_restricted[key] += 1
            return refused
        limit = self.key_limits.get(key)
        if limit is None:
            return None
        now = time.monotonic()
        wait = limit.admit(len(body) // 4 + 16, now)
        request[_LIMIT_HEADERS_KEY] = limit.headers(kind, now)
        if wait > 0:
            self.key_limited[key] += 1
            return self._error(kind, 429, "Rate limit reached for requests.", str(math.ceil(wait)))
        self.key_served[key] += 1
        return None

    def _refusal(self, request: web.Request, kind: str, key: str, body: bytes) -> web.Response | None:
        """A revoked key is refused everything; a restricted key what it may not use."""
        if key in self.revoked_keys:
            return self._error(kind, self.revoked_status, "Incorrect API key provided: this key was revoked.")
        denied = self.restricted_keys.get(key)
        if denied:
            model = None
            if body[:1] == b"{":
                try:
                    data = orjson.loads(body)
                except orjson.JSONDecodeError:
                    data = None
                model = data.get("model") if isinstance(data, dict) else None
            path = request.path
            if model in denied or any(d.startswith("/") and path.startswith(d) for d in denied):
                return self._error(kind, self.restricted_status, MISSING_SCOPE)
        return None

    def _authorized(self, request: web.Request, kind: str) -> bool:
        key = self.require_key
        h = request.headers
        # anthropic SDK >= 2 sends api_key as "Authorization: Bearer"; older ones and curl use x-api-key
        if kind == _ANTHROPIC and h.get("x-api-key") == key:
            return True
        if kind == _GEMINI and (h.get("x-goog-api-key") == key or request.query.get("key") == key):
            return True
        return h.get("Authorization") == f"Bearer {key}"

    async def _model_failure(self, request: web.Request, kind: str, failure: ModelFailure) -> web.StreamResponse:
        if failure.silent:  # accepts the request, never answers (until the client gives up)
            await asyncio.sleep(3600)
        await asyncio.sleep(failure.delay)
        await self._latency(request)
        assert failure.status is not None
        if failure.code is None:
            return self._error(kind, failure.status, failure.message, failure.retry_after)
        resp = self._error(kind, failure.status, failure.message, failure.retry_after)
        doc = orjson.loads(resp.body)  # type: ignore[arg-type]
        doc["error"]["code" if kind != _ANTHROPIC else "type"] = failure.code
        resp.body = orjson.dumps(doc)
        return resp

    def _error(self, kind: str, status: int, message: str, retry_after: str | None = None) -> web.Response:
        headers = {"Content-Type": _JSON_CT}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if kind == _ANTHROPIC:
            headers["request-id"] = f"req_fake{next(self._ids):08d}"
        else:
            headers["x-request-id"] = f"req_fake{next(self._ids):08d}"
        return web.Response(status=status, body=_error_body(kind, status, message), headers=headers)

    def _json(self, obj: Any, kind: str = _OPENAI) -> web.Response:
        rid = "request-id" if kind == _ANTHROPIC else "x-request-id"
        return web.Response(
            body=orjson.dumps(obj), headers={"Content-Type": _JSON_CT, rid: f"req_fake{next(self._ids):08d}"}
        )

    async def _pause(self, request: web.Request, delay: float) -> int:
        """Sleep ``delay`` seconds, noticing within ~_POLL s if the client goes away or the origin stops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while True:
            if self._stopping:
                return _STOPPING
            tr = request.transport
            if tr is None or tr.is_closing():
                return _GONE
            remaining = deadline - loop.time()
            if remaining <= 0:
                return _OK
            await asyncio.sleep(remaining if remaining < _POLL else _POLL)

    async def _latency(self, request: web.Request) -> int:
        lat = self.latency
        if lat > 0:
            return await self._pause(request, lat)
        return _OK

    def _stream_gone(self) -> None:
        self.stream_disconnects += 1
        self.stream_disconnected_event.set()
        if self._waiters:
            self._notify()

    async def _stream(
        self, request: web.Request, frames: list[Frame], headers: dict[str, str] = _SSE_HEADERS
    ) -> web.StreamResponse:
        """Write ``frames`` as a streamed (chunked) response, honouring the stream knobs."""
        resp = web.StreamResponse(headers=headers)
        self.active_streams += 1
        try:
            st = await self._latency(request)
            if st == _GONE:
                self._stream_gone()
                return resp
            if st == _STOPPING:
                _abort(request)
                return resp
            try:
                await resp.prepare(request)
            except (ConnectionError, RuntimeError):
                self._stream_gone()
                return resp
            dumps = orjson.dumps
            n = len(frames)
            i = 0
            while True:
                drop = self.drop_after_events
                if drop is not None and i >= drop:
                    self.streams_dropped += 1
                    if self.drop_times > 0:
                        self.drop_times -= 1
                        if self.drop_times == 0:
                            self.drop_after_events = None
                    _abort(request)
                    return resp
                stall = self.stall_after_events
                if stall is not None and i >= stall:
                    st = await self._pause(request, float("inf"))
                    if st == _GONE:
                        self._stream_gone()
                    else:
                        _abort(request)
                    return resp
                if i == n:
                    break
                interval = self.event_interval
                if i and interval > 0:
                    st = await self._pause(request, interval)
                    if st != _OK:
                        if st == _GONE:
                            self._stream_gone()
                        else:
                            _abort(request)
                        return resp
                elif request.transport is None:
                    self._stream_gone()
                    return resp
                prefix, obj, suffix = frames[i]
                if obj is None:
                    chunk = prefix
                else:
                    obj["x_origin_ts"] = time.time()
                    chunk = prefix + dumps(obj) + suffix
                try:
                    await resp.write(chunk)
                except (ConnectionError, RuntimeError):
                    self._stream_gone()
                    return resp
                i += 1
            if self.hold_after_end:  # the stream's end event went out; the body's end comes later
                await asyncio.sleep(self.hold_after_end)
            try:
                await resp.write_eof()
            except (ConnectionError, RuntimeError):
                self._stream_gone()
                return resp
            self.streams_completed += 1
            if self._waiters:
                self._notify()
            return resp
        finally:
            self.active_streams -= 1

    async def _plain(self, request: web.Request, resp: web.Response) -> web.StreamResponse:
        if await self._latency(request) == _STOPPING:
            _abort(request)
        return resp

    def _reply(self, user_text: str) -> str:
        r = self.reply
        return r if r is not None else reply_for(user_text)

    # ------------------------------------------------------------------ OpenAI

    async def _chat(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _BadRequest("'messages' is a required property")
        model = data.get("model") or "gpt-4o-mini"
        user_text = ""
        prompt_len = 0
        for m in messages:
            if isinstance(m, dict):
                t = _text_of(m.get("content"))
                prompt_len += len(t)
                if m.get("role") == "user":
                    user_text = t
        reply = self._reply(user_text)
        usage = {
            "prompt_tokens": prompt_len // 4 + 1,
            "completion_tokens": _tokens(reply),
            "total_tokens": prompt_len // 4 + 1 + _tokens(reply),
        }
        cid = f"chatcmpl-fake{next(self._ids):08d}"
        created = int(time.time())
        if not data.get("stream"):
            return await self._plain(
                request,
                self._json(
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply, "refusal": None},
                                "logprobs": None,
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": usage,
                        "system_fingerprint": "fp_fake",
                    }
                ),
            )
        so = data.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None, choices: bool = True) -> Frame:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if include_usage:
                obj["usage"] = None
            return (b"data: ", obj, b"\n\n")

        frames = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        frames += [chunk({"content": piece}, None) for piece in split_text(reply, self.events)]
        frames.append(chunk({}, "stop"))
        if include_usage:
            last = chunk({}, None, choices=False)
            last[1]["usage"] = usage  # type: ignore[index]
            frames.append(last)
        frames.append((b"data: [DONE]\n\n", None, b""))
        return await self._stream(request, frames)

    async def _completions(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        prompt = data.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[-1] if prompt and isinstance(prompt[-1], str) else ""
        if not isinstance(prompt, str):
            prompt = ""
        model = data.get("model") or "gpt-3.5-turbo-instruct"
        reply = self._reply(prompt)
        usage = {
            "prompt_tokens": _tokens(prompt),
            "completion_tokens": _tokens(reply),
            "total_tokens": _tokens(prompt) + _tokens(reply),
        }
        cid = f"cmpl-fake{next(self._ids):08d}"
        created = int(time.time())

        def obj(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        if not data.get("stream"):
            full = obj(reply, "stop")
            full["usage"] = usage
            return await self._plain(request, self._json(full))
        frames: list[Frame] = [(b"data: ", obj(p, None), b"\n\n") for p in split_text(reply, self.events)]
        frames.append((b"data: ", obj("", "stop"), b"\n\n"))
        frames.append((b"data: [DONE]\n\n", None, b""))
        return await self._stream(request, frames)

    async def _embeddings(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        inp = data.get("input")
        if inp is None:
            raise _BadRequest("'input' is a required property")
        inputs = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        vec: Any = _EMBEDDING_B64 if data.get("encoding_format") == "base64" else EMBEDDING
        tokens = sum(_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
        return await self._plain(
            request,
            self._json(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": i, "embedding": vec} for i in range(len(inputs))],
                    "model": data.get("model") or "text-embedding-3-small",
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            ),
        )

    async def _models(self, request: web.Request, *_args: Any) -> web.StreamResponse:
        if "anthropic-version" in request.headers:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in MODELS
                if m.startswith("claude")
            ]
            body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            return await self._plain(request, self._json(body, _ANTHROPIC))
        body = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": _CREATED, "owned_by": "fake-origin"} for m in MODELS],
        }
        return await self._plain(request, self._json(body))

    async def _model(self, request: web.Request, *_args: Any) -> web.StreamResponse:
        model = request.match_info["model"]
        body: dict[str, Any]
        if "anthropic-version" in request.headers:
            body = {"type": "model", "id": model, "display_name": model, "created_at": "2025-01-01T00:00:00Z"}
            return await self._plain(request, self._json(body, _ANTHROPIC))
        body = {"id": model, "object": "model", "created": _CREATED, "owned_by": "fake-origin"}
        return await self._plain(request, self._json(body))

    async def _files(self, request: web.Request, _data: Any, size: int, sha: str) -> web.StreamResponse:
        body = {
            "id": "file-1",
            "object": "file",
            "bytes": size,
            "sha256": sha,
            "created_at": int(time.time()),
            "filename": "upload",
            "purpose": "assistants",
            "status": "processed",
        }
        return await self._plain(request, self._json(body))

    async def _echo(self, request: web.Request, *_args: Any) -> web.StreamResponse:
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            lk = k.lower()
            headers[lk] = f"{headers[lk]}, {v}" if lk in headers else v
        body: bytes = request[_BODY_KEY]
        path, _, query = request.raw_path.partition("?")
        return await self._plain(
            request,
            self._json(
                {
                    "method": request.method,
                    "path": path,
                    "query": query,
                    "headers": headers,
                    "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                    "body_len": len(body),
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                }
            ),
        )

    async def _gzip(self, request: web.Request, *_args: Any) -> web.StreamResponse:
        resp = web.Response(body=GZIP_BODY, headers={"Content-Type": _JSON_CT, "Content-Encoding": "gzip"})
        return await self._plain(request, resp)

    async def _not_found(self, request: web.Request, *_args: Any) -> web.StreamResponse:
        kind = _kind_for_path(request.path)
        return await self._plain(
            request, self._error(kind, 404, f"Invalid URL ({request.method} {request.path_qs.partition('?')[0]})")
        )

    # ------------------------------------------------------------------ Anthropic

    @staticmethod
    def _anthropic_prompt(data: dict[str, Any]) -> tuple[str, int]:
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _BadRequest("messages: Field required")
        user_text = ""
        prompt_len = len(_text_of(data.get("system")))
        for m in messages:
            if isinstance(m, dict):
                t = _text_of(m.get("content"))
                prompt_len += len(t)
                if m.get("role") == "user":
                    user_text = t
        return user_text, prompt_len // 4 + 1

    async def _messages(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        user_text, input_tokens = self._anthropic_prompt(data)
        model = data.get("model") or "claude-sonnet-4-5"
        reply = self._reply(user_text)
        messages = data["messages"]
        last = messages[-1] if messages else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            prefill = _text_of(last.get("content"))
            if self.refuse_prefill:
                await self._latency(request)
                return self._error(
                    _ANTHROPIC,
                    400,
                    "This model does not support assistant message prefill."
                    " The conversation must end with a user message.",
                )
            if prefill != prefill.rstrip():
                return self._error(
                    _ANTHROPIC, 400, "messages: final assistant content cannot end with trailing whitespace"
                )
            if reply.startswith(prefill):
                reply = reply[len(prefill) :]
        output_tokens = _tokens(reply)
        mid = f"msg_fake{next(self._ids):08d}"
        if not data.get("stream"):
            return await self._plain(
                request,
                self._json(
                    {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "text", "text": reply}],
                        "model": model,
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                    },
                    _ANTHROPIC,
                ),
            )

        def ev(name: str, obj: dict[str, Any]) -> Frame:
            return (b"event: " + name.encode() + b"\ndata: ", obj, b"\n\n")

        frames = [
            ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": model,
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                    },
                },
            ),
            ev(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            ev("ping", {"type": "ping"}),
        ]
        frames += [
            ev(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            )
            for p in split_text(reply, self.events)
        ]
        frames += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            ),
            ev("message_stop", {"type": "message_stop"}),
        ]
        return await self._stream(request, frames, _SSE_HEADERS)

    async def _count_tokens(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        _, input_tokens = self._anthropic_prompt(data)
        return await self._plain(request, self._json({"input_tokens": input_tokens}, _ANTHROPIC))

    # ------------------------------------------------------------------ Gemini

    async def _gemini(self, request: web.Request, data: dict[str, Any], *_args: Any) -> web.StreamResponse:
        model, _, action = request.match_info["target"].partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return await self._plain(request, self._error(_GEMINI, 404, f"Method not found: {action or model}"))
        contents = data.get("contents")
        if not isinstance(contents, list):
            raise _BadRequest("contents is required")
        user_text = ""
        prompt_len = 0
        for c in contents:
            if isinstance(c, dict):
                t = _text_of(c.get("parts"))
                prompt_len += len(t)
                if c.get("role", "user") == "user":
                    user_text = t
        reply = self._reply(user_text)
        ptok, ctok = prompt_len // 4 + 1, _tokens(reply)

        def obj(text: str, finish: str | None) -> dict[str, Any]:
            cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if finish:
                cand["finishReason"] = finish
            return {
                "candidates": [cand],
                "usageMetadata": {
                    "promptTokenCount": ptok,
                    "candidatesTokenCount": ctok,
                    "totalTokenCount": ptok + ctok,
                },
                "modelVersion": model,
            }

        if action == "generateContent":
            return await self._plain(request, self._json(obj(reply, "STOP")))
        pieces = split_text(reply, self.events) or [""]
        objs = [obj(p, "STOP" if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]
        if request.query.get("alt") == "sse":
            return await self._stream(request, [(b"data: ", o, b"\n\n") for o in objs])
        frames: list[Frame] = [(b"[" if i == 0 else b",\r\n", o, b"") for i, o in enumerate(objs)]
        frames.append((b"]", None, b""))
        return await self._stream(request, frames, _NDJSON_ARRAY_HEADERS)


# --------------------------------------------------------------------------- module helpers


async def _add_limit_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    headers = request.get(_LIMIT_HEADERS_KEY)
    if headers:
        response.headers.update(headers)


async def _consume(request: web.Request) -> tuple[int, str]:
    """Read the request body in chunks, returning (length, sha256 hex) without keeping it."""
    h = hashlib.sha256()
    n = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        n += len(chunk)
        h.update(chunk)
    return n, h.hexdigest()


def _abort(request: web.Request) -> None:
    tr = request.transport
    if tr is not None:
        tr.abort()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.origin", description="Fake LLM API origin")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--events", type=int, default=5, help="content chunks per stream")
    p.add_argument("--event-interval", type=float, default=0.0, help="seconds between SSE events")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before response headers")
    p.add_argument("--reply", default=None, help="fixed reply text instead of 'echo: <prompt>'")
    p.add_argument("--record", action="store_true", help="keep every request in memory (off by default)")
    p.add_argument("--capacity", type=int, default=None, help="serve at most N requests at once; others wait")
    args = p.parse_args(argv)

    origin = FakeOrigin(host=args.host, port=args.port)
    origin.events = args.events
    origin.event_interval = args.event_interval
    origin.latency = args.latency
    origin.reply = args.reply
    origin.record = args.record
    origin.capacity = args.capacity

    serve_forever(origin, lambda: f"fake origin listening on {origin.url}")


if __name__ == "__main__":
    main()

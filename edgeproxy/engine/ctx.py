"""Per-request state: ``Ctx`` (one client request), ``Attempt`` (one try of it on one path)
and ``Reply`` (the answer as it goes to the client).

These hold only what the engine itself needs and what every filter may read; a filter keeps
its own per-request state with ``ctx.keep(self, obj)`` / ``ctx.local(self)``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

from .auth import ANYONE

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import Timeouts
    from ..net.client import Response
    from ..proto.codec import Decoder
    from ..routing.lines import Path
    from ..routing.state import State, Upstream
    from .auth import ListenerAuth
    from .flight import Flight

__all__ = ["Attempt", "Continuation", "Ctx", "Reply", "Transform", "Usage"]

# RFC 9110 7.6.1 hop-by-hop fields, plus what we always set ourselves (host, framing). Our own
# x-edgeproxy-* headers (the token among them) are never passed on either: head.py drops them
# by their prefix.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_SKIP: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect"}


@functools.lru_cache(maxsize=64)
def _union(a: frozenset[bytes], b: frozenset[bytes]) -> frozenset[bytes]:
    return a | b  # a few distinct sets per config: computed once each


class Usage:
    """The tokens one answer used (a filter reads them from the answer; others may use them)."""

    __slots__ = ("input", "model", "output")

    def __init__(self, model: str | None, input: int, output: int) -> None:
        self.model, self.input, self.output = model, input, output

    def __repr__(self) -> str:
        return f"<Usage {self.model} in={self.input} out={self.output}>"


class Ctx:
    """Everything about one request in flight, and what the access log records."""

    __slots__ = (
        "_local",
        "attempt",
        "attempt_log",
        "auth",
        "avoid",
        "body",
        "body_coding",
        "body_length",
        "body_stream",
        "bytes_in",
        "client",
        "bytes_out",
        "committed",
        "error",
        "flight",
        "hedging",
        "held",
        "metered",
        "leads",
        "method",
        "model",
        "order",
        "path",
        "pin",
        "raw_path",
        "reply",
        "request",
        "request_id",
        "retrying",
        "started",
        "shared_headers",
        "state",
        "status",
        "streamed",
        "target",
        "timeouts",
        "trials",
        "tried",
        "ttfb",
        "upstream",
        "usage",
        "waited",
    )

    def __init__(self, request: web.BaseRequest, state: State, auth: ListenerAuth) -> None:
        self.request = request
        self.state = state
        self.auth = auth  # the listener's tokens (route filters check them too)
        self.client = ANYONE  # who the listener token says the client is (its name, priority)
        self.upstream: Upstream | None = None
        self.started = time.monotonic()
        self.request_id = ""
        self.method = request.method
        self.raw_path = request.raw_path
        # Set by a route filter: the origin-form target to send (else from the prefix), and
        # the one endpoint URL this request may go to (else any).
        self.target: str | None = None
        self.pin: str | None = None
        self.body: bytes | None = None
        self.body_stream: AsyncIterator[bytes] | None = None
        # The body's Content-Encoding as we hold it (None: plain bytes a filter may parse),
        # and a streamed body's length as sent (None: chunked).
        self.body_coding: str | None = None
        self.body_length: int | None = None
        # The model the request asks for (proto.models: the body's top-level "model", or a
        # Gemini URL's), read once the body is in; a filter that changes it says so here.
        self.model: str | None = None
        self.tried: list[Path] = []
        # Its try order when the upstream splits requests by endpoint weight (picked once).
        self.order: tuple[Path, ...] | None = None
        # Half-open trials its plans claimed (health entry, when): let go at its end.
        self.trials: list[tuple[Any, float]] = []
        # Endpoints this request prefers not to go back to: their origin failed it (a 5xx,
        # silence on a line that answers probes). Used only when nothing else is left.
        self.avoid: set[str] | None = None
        self.timeouts: Timeouts | None = None  # its model's, streaming or not (set when planned)
        self.path: Path | None = None
        self.attempt: Attempt | None = None
        self.retrying = False
        self.reply: Reply | None = None
        self.status = 0
        self.ttfb: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.held = 0  # bytes of its body held against limits.buffer_memory
        self.streamed = False
        self.committed = False
        self.error: str | None = None
        self.attempt_log: list[dict[str, object]] = []
        self.waited = False  # a 429's short Retry-After was waited out already
        self.hedging = False  # its hedge (a second attempt racing the first) is being planned
        # Set by a filter (the cache): the answer this request shares with others asking the
        # same at the same moment (engine/flight.py); whether it fetches it; the headers its
        # client gets on top of the shared ones.
        self.flight: Flight | None = None
        self.leads = False
        self.shared_headers: list[tuple[str, str]] | None = None
        self.usage: Usage | None = None  # tokens the answer used, once a filter read them
        # Counted in the request metrics; a filter answering for edgeproxy itself (a probe
        # from a sidecar) says no: such answers are not the traffic operators alert on.
        self.metered = True
        self._local: dict[int, Any] | None = None

    def local(self, owner: object) -> Any:
        """What ``owner`` (a filter) kept for this request, or None."""
        local = self._local
        return None if local is None else local.get(id(owner))

    def keep(self, owner: object, value: Any) -> Any:
        """Keep ``value`` for ``owner`` (a filter) for the rest of this request."""
        if self._local is None:
            self._local = {}
        self._local[id(owner)] = value
        return value


class Attempt:
    """One try of a request on one path, and the head and body as sent there."""

    __slots__ = (
        "body",
        "credential",
        "decide",
        "lines",
        "notes",
        "origin",
        "path",
        "resp",
        "skip",
        "started",
        "target",
    )

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        self.resp: Response | None = None
        self.credential: str | None = None  # the id of a credential a filter put on it (logged as "key")
        # The head and body: set by _reset() before each send (the filters then change them).
        self.body: bytes | None = None
        self.target = self.origin = ""
        self.skip: frozenset[bytes] = REQUEST_SKIP
        self.lines: list[bytes] = []
        self.decide: Callable[[list[tuple[bytes, bytes]]], Decoder | None] | None = None
        self.notes: dict[str, object] | None = None  # fields a filter adds to its attempt_log entry

    def note(self, field: str, value: object) -> None:
        """Add ``field`` to this attempt's entry in the access log's attempt_log (why a filter
        did what it did; never a secret)."""
        if self.notes is None:
            self.notes = {}
        self.notes[field] = value

    def _reset(self, body: bytes | None, target: str) -> None:
        """The head and body from scratch, before the filters run (again)."""
        self.body = body
        self.target = target  # origin-form
        self.origin = ""  # put before the target: absolute form (a `via` hop names the origin)
        self.skip = REQUEST_SKIP  # client headers not passed on
        self.lines = []  # header lines added after the client's, each ending CRLF
        self.decide = None  # how the answer's body is decoded (a `via` hop's coding)

    def drop(self, names: frozenset[bytes]) -> None:
        """Do not pass on the client's headers named ``names`` (lower case) on this attempt."""
        self.skip = _union(self.skip, names)


class Transform:
    """A stream transform a filter adds to ``Reply.transforms`` (e.g. the hop's compression)."""

    __slots__ = ()

    def process(self, data: bytes) -> bytes:
        """``data`` transformed; everything decodable so far must come out now (flush)."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """The last bytes, at the end of the stream (clean or broken)."""
        raise NotImplementedError


class Continuation:
    """What ``on_stream_break`` returns: the broken stream goes on from a new attempt.

    The filter has already made the request the new attempt sends (``ctx.body``) and chosen
    where it may go (``ctx.tried``). ``events`` rewrites the new stream's whole events into
    what the client has not got yet (its ``process`` may return b""); the reply's taps and
    transforms then see them as they go out. The engine sets ``result``: "ok" (the new
    stream is being relayed), "refused" (an answer that cannot continue the stream: not a
    200 event stream), "unavailable" (no attempt answered); None if the client left first."""

    __slots__ = ("events", "result")

    def __init__(self, events: Transform) -> None:
        self.events = events
        self.result: str | None = None


class Reply:
    """The answer as it goes to the client, before commit: filters may change it."""

    __slots__ = (
        "body",
        "clean",
        "ctype",
        "delivered",
        "encoded",
        "framed",
        "headers",
        "length",
        "resp",
        "sse",
        "status",
        "taps",
        "transforms",
    )

    def __init__(
        self, resp: Response, headers: list[tuple[str, str]], length: int | None, ctype: bytes, encoded: bool
    ) -> None:
        self.resp = resp
        self.status = resp.status
        self.headers = headers  # as sent to the client
        self.length = length  # Content-Length to send with a streamed body (None: chunked)
        self.ctype = ctype  # the origin's Content-Type, as bytes (b"" if none)
        self.sse = ctype[:17].lower() == b"text/event-stream"
        self.encoded = encoded  # the body passes on content-coded (as the origin or an edge sent it)
        self.framed = self.sse and not self.encoded  # SSE events are seen whole (taps, in-band errors)
        self.body: bytes | None = None  # the whole body when it came whole; None: it streams
        self.transforms: list[Transform] = []
        self.taps: list[Callable[[bytes], None]] = []  # framed streams: called with whole events
        self.clean = False  # set at the end: the response went out whole
        # Everything the client needs was written (the stream's end event, or the whole body),
        # even if the client hung up before the response's last bytes.
        self.delivered = False

    def deliver(self) -> None:
        self.delivered = True

    def is_json(self) -> bool:
        return self.ctype[:16].lower() == b"application/json"

"""Error-aware fallbacks: an upstream's ``fallbacks`` send a request the origin refused with a
listed error again, with another model.

Only error answers (status >= 400) before commit are looked at, and only their body is read
(bounded: ``MAX_ERROR_BODY``, within ``failover.first_event_timeout``; a content-coded body is
decoded for the look only). An entry matches by the origin's error code (OpenAI's
``error.code`` or ``error.type``, Anthropic's ``error.type``, Gemini's ``error.status`` or a
detail's ``reason``; see ``proto.providers.error_codes``) or by status. A content-policy
refusal is matched only by an entry that names its code: never by a status, nor by another
code the body also gives.

A match sends the request again at once with the entry's model (``AGAIN``: the plan starts
over, so any endpoint may serve it, renamed there by its ``models``); the body's top-level
``model`` is replaced (Gemini: the URL's), and ``ctx.model`` (and with it the request's
timeouts and the per-model health the plan reads) follows. Each entry applies at
most once per request, and never to a model the request already tried: a chain of fallbacks
ends. A fallback is not a retry: it does not count against ``failover.retries`` and is not
charged to the retry budget (the list bounds it). A body edgeproxy does not hold whole as plain
JSON (a streamed upload, a coded body) cannot be sent again: the error passes through.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

import orjson

from ..engine import AGAIN, Filter
from ..proto import codec
from ..proto.models import wants_stream
from ..proto.providers import CONTENT_POLICY_CODES, error_codes

if TYPE_CHECKING:
    from ..config import FallbackConfig, UpstreamConfig
    from ..engine import Attempt, Ctx, Verdict
    from ..net.client import Response
    from ..telemetry.metrics import Metrics

__all__ = ["Fallbacks", "GeminiFallbacks", "fallbacks_for"]

# Error bodies are small; past this much we do not look (and do not reroute).
MAX_ERROR_BODY: Final = 64 * 1024
# Request bodies from this size on are parsed for the rewrite in a thread, not on the loop.
THREAD_MIN: Final = 1 << 20


class _Entry:
    __slots__ = ("code", "from_model", "label", "model", "note", "status")

    def __init__(self, config: FallbackConfig) -> None:
        self.label = config.on  # as configured: the metric label and the log's words
        self.status = config.status
        self.code = None if self.status is not None else config.on.lower()
        self.model = config.model
        self.from_model = config.from_model
        self.note = f"{config.on} -> {config.model}"


class _Used:
    """One request's fallbacks so far."""

    __slots__ = ("asked", "entries", "models", "url_model")

    def __init__(self, asked: str) -> None:
        self.asked = asked  # the model the client asked for
        self.entries: set[int] = set()  # indexes of the entries applied
        self.models = {asked}  # every model tried
        self.url_model: str | None = None  # Gemini: the model the URL names now (None: as sent)


class Fallbacks(Filter):
    """An upstream's ``fallbacks``; on its chain only when it has some."""

    __slots__ = ("entries", "metrics", "timeout", "upstream")

    def __init__(self, upstream: UpstreamConfig, metrics: Metrics) -> None:
        self.upstream = upstream.name
        self.entries = tuple(_Entry(f) for f in upstream.fallbacks)
        self.metrics = metrics
        self.timeout = upstream.failover.first_event_timeout

    async def on_answer(self, ctx: Ctx, attempt: Attempt, resp: Response) -> Verdict | Exception | None:
        status = resp.status
        model = ctx.model
        if status < 400 or model is None:
            return None  # (a 200 is never looked at)
        used: _Used | None = ctx.local(self)
        candidates = [
            (i, e)
            for i, e in enumerate(self.entries)
            if (e.from_model is None or e.from_model == model)
            and (used is None or (i not in used.entries and e.model not in used.models))
            and e.model != model
            and (e.status is None or e.status == status)
        ]
        if not candidates:
            return None
        codes = await self._codes(resp)
        if codes is None:
            return None  # not readable as a whole small body: passed through as it is
        match = _first_match(candidates, codes)
        if match is None:
            return None
        i, entry = match
        if ctx.body_stream is not None or ctx.body_coding is not None:
            attempt.note("fallback", f"{entry.note} not sent: the request body is not held whole to send again")
            return None
        if used is None:
            used = ctx.keep(self, _Used(model))
        if not await self._rewrite(ctx, used, entry.model):
            attempt.note("fallback", f"{entry.note} not sent: no model in the request to replace")
            return None
        used.entries.add(i)
        used.models.add(entry.model)
        ctx.model = entry.model
        if ctx.upstream is not None:  # timeouts are per model too
            accept = ctx.request.headers.get("Accept")
            ctx.timeouts = ctx.upstream.timeouts(entry.model, wants_stream(ctx.body, ctx.raw_path, accept))
        attempt.note("fallback", entry.note)
        self.metrics.fallbacks.inc((self.upstream, entry.label, entry.model))
        return AGAIN

    async def _codes(self, resp: Response) -> frozenset[str] | None:
        """The error codes the answer's body gives; None when its body cannot be read whole."""
        body = await resp.wait_body(MAX_ERROR_BODY, self.timeout)
        if body is None:
            return None
        coding = resp.header(b"content-encoding")
        if coding is not None and coding.strip().lower() != b"identity":
            name = coding.decode("latin-1").strip().lower()
            if name not in codec.DECODABLE:
                return None
            try:
                decoder = codec.decoder(name, MAX_ERROR_BODY)
                body = decoder.feed(body)
                decoder.finish()
            except codec.DecodeError:
                return None
        return error_codes(body)

    async def _rewrite(self, ctx: Ctx, used: _Used, model: str) -> bool:
        """The request as it goes from now on: its body's top-level model replaced."""
        body = ctx.body
        if not body:
            return False
        new = await asyncio.to_thread(_with_model, body, model) if len(body) >= THREAD_MIN else _with_model(body, model)
        if new is None:
            return False
        ctx.body = new
        return True

    def logging_filter(self, ctx: Ctx, record: dict[str, object]) -> None:
        used: _Used | None = ctx.local(self)
        if used is not None and used.entries:
            record["fallback_from"] = used.asked  # ("model" is the one that answered)


class GeminiFallbacks(Fallbacks):
    """Gemini names the model in the URL (``.../models/<name>:generateContent``), not the body:
    the fallback's goes there, on every attempt."""

    __slots__ = ()

    async def _rewrite(self, ctx: Ctx, used: _Used, model: str) -> bool:
        if used.url_model is None and f"/models/{used.asked}:" not in ctx.raw_path:
            return await super()._rewrite(ctx, used, model)  # (a body that names it)
        used.url_model = model
        return True

    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        used: _Used | None = ctx.local(self)
        if used is not None and used.url_model is not None:
            attempt.target = attempt.target.replace(f"/models/{used.asked}:", f"/models/{used.url_model}:", 1)


def _first_match(candidates: list[tuple[int, _Entry]], codes: frozenset[str]) -> tuple[int, _Entry] | None:
    """The first entry (in config order) the answer matches: by status (``candidates`` are of
    its status already) or by a code its body gives; a content-policy refusal only by an entry
    that names its code."""
    refusal = codes & CONTENT_POLICY_CODES
    for i, entry in candidates:
        if entry.code in refusal if refusal else (entry.status is not None or entry.code in codes):
            return i, entry
    return None


def _with_model(body: bytes, model: str) -> bytes | None:
    """``body`` (JSON) with its top-level ``model`` replaced; None if it has none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return None
    doc["model"] = model
    return orjson.dumps(doc)


def fallbacks_for(upstream: UpstreamConfig, metrics: Metrics) -> Fallbacks | None:
    """The upstream's fallbacks filter, or None when it has none (then nothing is on its chain)."""
    if not upstream.fallbacks:
        return None
    cls = GeminiFallbacks if upstream.provider == "gemini" else Fallbacks
    return cls(upstream, metrics)

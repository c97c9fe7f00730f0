"""What differs between the APIs we front: how a key is presented, and how an error looks.

Errors edgeproxy makes itself are shaped like the provider's own, so an SDK raises its usual
exception type with our message instead of choking on an unknown body.
"""

from __future__ import annotations

import email.utils
import hmac
import math
import re
import time
from datetime import UTC, datetime
from typing import Final

import orjson

from .errors import ERRORS

__all__ = [
    "AUTH_HEADERS",
    "CONTENT_POLICY_CODES",
    "auth_header",
    "auth_value",
    "client_credential",
    "error_body",
    "error_codes",
    "probe_target",
    "retry_wait",
    "sse_error_event",
    "token_index",
    "token_matches",
]

# The header each provider reads the API key from, lower-case as bytes for the hot path.
AUTH_HEADERS: Final[dict[str, bytes]] = {
    "openai": b"authorization",
    "anthropic": b"x-api-key",
    "gemini": b"x-goog-api-key",
}
# Every header that may carry a client credential; all are dropped when we inject our key.
CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"x-api-key", b"x-goog-api-key"})


def auth_header(provider: str) -> bytes:
    return AUTH_HEADERS.get(provider, b"authorization")


def auth_value(provider: str, key: str) -> bytes:
    """The header value that presents ``key`` the provider's way."""
    if provider in ("anthropic", "gemini"):
        return key.encode()
    return b"Bearer " + key.encode()


def client_credential(value: str) -> str:
    """The bare secret in a credential header's value (a "Bearer " scheme stripped)."""
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value.strip()


def token_matches(token: str | None, tokens: list[bytes]) -> bool:
    """Is ``token`` one of ``tokens``? Compared with every one, each in constant time."""
    return token_index(token, tokens) >= 0


def token_index(token: str | None, tokens: list[bytes]) -> int:
    """Which of ``tokens`` ``token`` is (-1: none). Compared with every one, in constant time."""
    if token is None:
        return -1
    given = token.encode("utf-8", "surrogateescape")  # aiohttp keeps odd header bytes that way
    found = -1
    for i, expected in enumerate(tokens):
        if hmac.compare_digest(given, expected) and found < 0:
            found = i
    return found


def error_body(provider: str, kind: str, message: str) -> tuple[int, bytes]:
    """(status, JSON body) for an error edgeproxy makes, in the provider's shape."""
    status, etype, code = ERRORS.get(kind, ERRORS["internal"])
    if provider == "anthropic":
        body = {"type": "error", "error": {"type": etype, "message": message}}
    elif provider == "gemini":
        body = {"error": {"code": status, "message": message, "status": code.upper()}}
    else:
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return status, orjson.dumps(body)


def sse_error_event(provider: str, kind: str, message: str) -> bytes:
    """An in-band SSE error for a stream that broke after it started (never a fake [DONE])."""
    _, etype, code = ERRORS.get(kind, ERRORS["internal"])
    if provider == "anthropic":
        data = orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
        return b"event: error\ndata: " + data + b"\n\n"
    data = orjson.dumps({"error": {"message": message, "type": etype, "code": code}})
    return b"data: " + data + b"\n\n"


# Error codes that say the origin refused the request's content (a safety system), in any of
# the APIs' shapes: OpenAI's content_policy_violation, invalid_prompt ("flagged as potentially
# violating our usage policy") and moderation_blocked, Azure OpenAI's content_filter and its
# innererror ResponsibleAIPolicyViolation. Compared lower-case.
CONTENT_POLICY_CODES: Final = frozenset(
    {
        "content_policy_violation",
        "content_filter",
        "invalid_prompt",
        "moderation_blocked",
        "responsibleaipolicyviolation",
    }
)


def error_codes(body: bytes) -> frozenset[str]:
    """The codes an error answer's JSON body gives, lower-case: OpenAI's ``error.code`` and
    ``error.type``, Anthropic's ``error.type``, Gemini's ``error.status`` and its details'
    ``reason``, Azure's ``error.innererror.code``. Empty when the body is not such JSON. A
    Gemini stream's error comes as a one-element array: that element is read."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return frozenset()
    if isinstance(doc, list) and doc:
        doc = doc[0]
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return frozenset()
    found = [error.get("code"), error.get("type"), error.get("status")]
    inner = error.get("innererror")
    if isinstance(inner, dict):
        found.append(inner.get("code"))
    details = error.get("details")
    if isinstance(details, list):
        found.extend(d.get("reason") for d in details[:8] if isinstance(d, dict))
    return frozenset(c.lower() for c in found if isinstance(c, str) and 0 < len(c) <= 100)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


_DURATION_WHOLE = re.compile(r"(?:\d{1,9}(?:\.\d{1,9})?(?:ms|h|m|s))+")
# Longer header values than this are nonsense (and must not cost regex time on the hot path).
MAX_HEADER_TIME: Final = 40


def _duration(text: str) -> float | None:
    """OpenAI's reset durations: "6m0s", "1s", "20ms", "1h2m3.5s"."""
    text = text.replace(" ", "")
    if len(text) > MAX_HEADER_TIME or _DURATION_WHOLE.fullmatch(text) is None:
        return None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _until(text: str, now: float) -> float | None:
    """Seconds from ``now`` (epoch) until an RFC 3339 or HTTP date."""
    if len(text) > MAX_HEADER_TIME:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


# However long an origin asks us to wait, we look again after this (seconds): a buggy header
# ("inf", a date in 9999) must not sideline an endpoint for good.
MAX_WAIT: Final = 300.0


def retry_wait(headers: list[tuple[bytes, bytes]], now: float | None = None) -> float | None:
    """How long the origin asked us to wait (at most MAX_WAIT), from its 429 headers; None if
    it did not say (or said nonsense)."""
    wait = _retry_wait(headers, now)
    if wait is None or not math.isfinite(wait):
        return None
    return min(max(wait, 0.0), MAX_WAIT)


def _retry_wait(headers: list[tuple[bytes, bytes]], now: float | None = None) -> float | None:
    """How long the origin asked us to wait, from its 429 headers; None if it did not say.

    ``Retry-After`` (seconds or a date) and ``retry-after-ms`` win. Otherwise the rate-limit
    reset headers (OpenAI ``x-ratelimit-reset-*``, durations; Anthropic
    ``anthropic-ratelimit-*-reset``, RFC 3339): the longest reset among limits whose
    ``remaining`` is 0, or if none says so, the longest of them all.
    """
    now = time.time() if now is None else now
    resets: dict[str, float] = {}
    remaining: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1").strip()
        if name == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                continue
        if name == "retry-after":
            wait: float | None
            try:
                wait = float(value)
            except ValueError:
                wait = _until(value, now)
            if wait is not None:
                return max(0.0, wait)
        elif name.startswith("x-ratelimit-reset-"):
            d = _duration(value)
            if d is not None:
                resets[name[len("x-ratelimit-reset-") :]] = d
        elif name.startswith("x-ratelimit-remaining-"):
            remaining[name[len("x-ratelimit-remaining-") :]] = value
        elif name.startswith("anthropic-ratelimit-") and name.endswith("-reset"):
            u = _until(value, now)
            if u is not None:
                resets[name[len("anthropic-ratelimit-") : -len("-reset")]] = u
        elif name.startswith("anthropic-ratelimit-") and name.endswith("-remaining"):
            remaining[name[len("anthropic-ratelimit-") : -len("-remaining")]] = value
    if not resets:
        return None
    exhausted = [v for k, v in resets.items() if remaining.get(k) == "0"]
    return max(0.0, max(exhausted or resets.values()))


# Where each provider lists its models (relative to the endpoint's base path for OpenAI-style
# APIs, whose base path already ends in the version).
_PROBE_PATHS = {"openai": "/models", "anthropic": "/v1/models", "gemini": "/v1beta/models"}


def probe_target(provider: str, base_path: str) -> str:
    """The unbilled request target a probe sends: where the provider lists its models."""
    if provider == "openai":
        return (base_path or "") + "/models"
    return _PROBE_PATHS.get(provider, "/")

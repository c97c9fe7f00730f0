"""What differs between the APIs we front: how a key is presented, and how an error looks.

Errors edgeproxy makes itself are shaped like the provider's own, so an SDK raises its usual
exception type with our message instead of choking on an unknown body.
"""

from __future__ import annotations

from typing import Final

import orjson

from .errors import ERRORS

__all__ = ["AUTH_HEADERS", "auth_header", "auth_value", "client_credential", "error_body", "sse_error_event"]

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

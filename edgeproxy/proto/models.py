"""Which model a request asks for, read cheaply: health, cool-downs and timeouts are per model.

A JSON body's top-level ``"model"`` is found with one C-speed search, not a parse: request
bodies can be megabytes of conversation and the hot path parses no JSON it does not need.
Only when ``"model"`` appears more than once (a tool's schema, an object in a message) is the
body parsed, to take the top-level one. Gemini names the model in the URL instead
(``.../models/<name>:generateContent``).
"""

from __future__ import annotations

import re
from typing import Final

import orjson

__all__ = ["request_model", "wants_stream"]

_KEY: Final = b'"model"'
# The key, then a string value without escapes or control characters (model names have
# none, and a name goes into log lines), bounded.
_VALUE = re.compile(rb'"model"\s*:\s*"([^"\\\x00-\x1f\x7f]{1,200})"')
_GEMINI = re.compile(r"/models/([^/:?]{1,200}):")
_STREAM_KEY: Final = b'"stream"'
_STREAM_ON = re.compile(rb'"stream"\s*:\s*true')
MAX_NAME: Final = 200


def request_model(body: bytes | None, target: str) -> str | None:
    """The model the ``target`` URL (Gemini) or ``body`` (plain JSON, or None) names; None if
    neither. The URL first: a Gemini body's history says "role": "model" on every answer."""
    if "/models/" in target:
        found = _GEMINI.search(target)
        if found is not None:
            return found.group(1)
    if body:
        first = body.find(_KEY)
        if first >= 0:
            if body.find(_KEY, first + len(_KEY)) < 0:
                m = _VALUE.match(body, first)
                name = m.group(1).decode("utf-8", "replace") if m is not None else None
                return name if name is not None and name.isprintable() else None
            return _parsed(body)
    return None


def _parsed(body: bytes) -> str | None:
    """``"model"`` more than once: only a parse tells which one is at the top level."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    ok = isinstance(model, str) and 0 < len(model) <= MAX_NAME and model.isprintable()
    return model if ok else None


def wants_stream(body: bytes | None, target: str, accept: str | None) -> bool:
    """Does the request ask for a streamed answer (``"stream": true``, Gemini's streaming
    method, or an SSE ``Accept``)? Its timeouts differ (see FailoverConfig)."""
    if body and _STREAM_KEY in body and _STREAM_ON.search(body) is not None:
        return True
    if ":streamGenerateContent" in target:
        return True
    return accept is not None and "text/event-stream" in accept

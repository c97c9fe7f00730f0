"""Usage metering: the tokens a response used, found cheaply, without parsing whole bodies.

The APIs report usage in one small object: ``usage`` (OpenAI chat/completions/embeddings and
Responses, Anthropic) or ``usageMetadata`` (Gemini), at the end of a JSON body; in a stream,
in the last events (OpenAI's final chunk when ``stream_options.include_usage`` is set;
Anthropic's ``message_delta``, with the input side in ``message_start``). We look for that
object from the end of the bytes and parse only it, and the model name with a regex near the
start. A response without usage costs one ``rfind``.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

import orjson

from ..engine.ctx import Usage

__all__ = ["StreamTap", "Usage", "from_body", "from_stream"]

# Where to look in a JSON body: usage sits at the end, the model near the start (a long
# completion between them is never scanned).
TAIL: Final = 4096
HEAD: Final = 2048
# Events kept from the end of a stream: OpenAI's usage chunk is followed by [DONE], Anthropic's
# message_delta by message_stop; they may come in separate reads.
TAIL_EVENTS: Final = 3

_MODEL = re.compile(rb'"model(?:Version)?"\s*:\s*"([^"\\]{1,200})"')
_KEYS: Final = (b'"usage"', b'"usageMetadata"')


# A usage object nests at most a couple of objects (token details): braces to match, bounded.
MAX_BRACES: Final = 16


def _usage_object(data: bytes, last: bool = True, lo: int = 0) -> dict[str, object] | None:
    """The last (or first) ``"usage": {...}`` object in ``data[lo:]``, parsed; None if none.
    The object's end is found by matching braces (usage holds numbers and small objects, no
    strings with braces), so it is parsed once, with no copy of the data around it."""
    for name in _KEYS:
        hi = len(data)
        start_at = lo
        while True:
            at = data.rfind(name, start_at, hi) if last else data.find(name, start_at, hi)
            if at < 0:
                break
            if last:
                hi = at
            else:
                start_at = at + len(name)
            start = data.find(b"{", at + len(name), at + len(name) + 8)
            if start < 0:
                continue  # "usage": null (OpenAI's chunks before the last one)
            end = _close(data, start)
            if end < 0:
                return None
            try:
                obj = orjson.loads(data[start : end + 1])
            except orjson.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _close(data: bytes, start: int) -> int:
    """Index of the "}" closing the "{" at ``start``; -1 if not found within MAX_BRACES."""
    depth = 0
    i = start
    for _ in range(MAX_BRACES):
        close = data.find(b"}", i + 1)
        if close < 0:
            return -1
        opening = data.find(b"{", i + 1, close)
        if opening >= 0:
            depth += 1
            i = opening
            continue
        if depth == 0:
            return close
        depth -= 1
        i = close
    return -1


def _int(obj: dict[str, object], *names: str) -> int:
    total = 0
    for name in names:
        v = obj.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            total += v
    return total


def _tokens(obj: dict[str, object]) -> tuple[int, int]:
    """(input, output) tokens from any provider's usage object."""
    prompt = obj.get("prompt_tokens")
    if prompt is not None or "completion_tokens" in obj:  # OpenAI chat, completions, embeddings
        completion = obj.get("completion_tokens", 0)
        if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
            return prompt, completion  # the common case, without the general checks below
        return _int(obj, "prompt_tokens"), _int(obj, "completion_tokens")
    if "promptTokenCount" in obj or "candidatesTokenCount" in obj:  # Gemini
        return _int(obj, "promptTokenCount"), _int(obj, "candidatesTokenCount", "thoughtsTokenCount")
    # Anthropic (cache reads and writes are input too) and OpenAI's Responses API
    return (
        _int(obj, "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
        _int(obj, "output_tokens"),
    )


def _model(data: bytes, lo: int = 0, hi: int | None = None) -> str | None:
    m = _MODEL.search(data, lo, len(data) if hi is None else hi)
    return m.group(1).decode("utf-8", "replace") if m else None


# The common case in one step: OpenAI's compact usage object, counts first (what its API and
# most compatible servers send). Anything else takes the general path below.
_OPENAI_USAGE = re.compile(
    rb'"usage":\s{0,16}\{\s{0,16}"prompt_tokens":\s{0,4}(\d{1,12}),\s{0,16}"completion_tokens":\s{0,4}(\d{1,12})\s{0,16}[,}]'
)
_MODEL_KEY: Final = b'"model":'


def from_body(body: bytes) -> Usage | None:
    """Usage from a whole JSON response body, or None. Looks at its last TAIL bytes for the
    usage object and its first HEAD bytes for the model, in place (no copies)."""
    lo = max(0, len(body) - TAIL)
    at = body.rfind(b'"usage":', lo)
    m = _OPENAI_USAGE.match(body, at) if at >= 0 else None
    if m is not None:
        inp, out = int(m.group(1)), int(m.group(2))
    else:
        obj = _usage_object(body, lo=lo)
        if obj is None:
            return None
        inp, out = _tokens(obj)
    return Usage(_fast_model(body) or _model(body, 0, HEAD) or _model(body, lo), inp, out)


# Model names seen, decoded once; past MAX_MODELS distinct ones the rest count as "other" (the
# name comes from the response: it must not grow the metrics without bound).
MAX_MODELS: Final = 1000
_names: dict[bytes, str] = {}


def _fast_model(body: bytes) -> str | None:
    at = body.find(_MODEL_KEY, 0, HEAD)
    if at < 0:
        return None
    start = body.find(b'"', at + len(_MODEL_KEY), at + len(_MODEL_KEY) + 4) + 1  # ("model": "x" too)
    if start <= 0:
        return None
    end = body.find(b'"', start, start + 200)
    if end < 0 or body.find(b"\\", start, end) >= 0:
        return None
    raw = body[start:end]
    name = _names.get(raw)
    if name is None:
        if len(_names) >= MAX_MODELS:
            return "other"
        name = _names[raw] = raw.decode("utf-8", "replace")
    return name


class StreamTap:
    """Sees each chunk of a stream as it is relayed; keeps its first chunk and its last few."""

    __slots__ = ("first", "tail")

    def __init__(self) -> None:
        self.first: bytes | None = None
        self.tail: deque[bytes] = deque(maxlen=TAIL_EVENTS)

    def __call__(self, data: bytes) -> None:
        if self.first is None:
            self.first = data[:HEAD]
        self.tail.append(data)


def from_stream(tap: StreamTap) -> Usage | None:
    """Usage from a relayed stream's first and last chunks, or None."""
    last = b"".join(tap.tail)[-TAIL:]
    first = tap.first or b""
    end = _usage_object(last) if last else None
    start = _usage_object(first, last=False)
    if end is None and start is None:
        return None
    inp, out = _tokens(end) if end is not None else (0, 0)
    if start is not None:  # Anthropic: message_start has the input side, message_delta the output
        s_in, s_out = _tokens(start)
        inp, out = max(inp, s_in), out or s_out
    return Usage(_model(first) or _model(last), inp, out)

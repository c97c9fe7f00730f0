"""Anthropic Messages streams, the little a resume needs: what the client got (an SSE tap),
the request that continues it (an assistant prefill), and the continuation's events rewritten
to follow on from what the client has (a stream transform).

The tap runs on every event of a stream while `failover.resume` is on, so it is cheap: a text
delta is recognised by the exact bytes the API writes (``{"type":"content_block_delta",
"index":N,"delta":{"type":"text_delta","text":"``), and its JSON string is kept as it came,
escaped, to be decoded once if the stream ever breaks. Any other event (a few per stream) is
parsed whole. The rewrite runs only on a continuation, and parses each of its events.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from ..engine import Transform

__all__ = ["Received", "Splice", "continue_request"]

# The start of a text delta's data as the API writes it (compact JSON, these keys first).
TEXT_DELTA: Final = b'{"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":"'
PING: Final = b'{"type":"ping"'
# Text kept per stream (escaped JSON) before giving up on resuming it: what a client gets in
# one answer is far less; this bounds a stream that never ends.
MAX_RECEIVED: Final = 4 * 1024 * 1024
BACKSLASH: Final = 0x5C
# The input side of a usage object: a continuation's (the prompt plus the prefill) is not what
# the client asked; without them in the final event, the client keeps its message_start's.
INPUT_KEYS: Final = frozenset({"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"})


class Received:
    """An SSE tap on an Anthropic Messages stream: the text blocks the client got, while the
    answer could still be continued (``live``)."""

    __slots__ = ("_delta", "_head", "blocks", "deltas", "input", "live", "open", "size")

    def __init__(self) -> None:
        self.blocks: list[list[bytes]] = []  # per content block: its text as JSON string pieces, escaped
        self.open: int | None = None  # the index of the text block being streamed, if one is
        self.deltas = 0  # text deltas seen (each at least one token)
        self.input: int | None = None  # the answer's input tokens, all kinds (message_start)
        self.size = 0
        # False: nothing to continue (a block that is not text, the answer's end, an error
        # event, too much text, an event not understood); the tap then costs a test.
        self.live = True
        self._delta = b""  # TEXT_DELTA for the open block
        self._head = b""  # and the whole event's start, as the API writes it

    def __call__(self, data: bytes) -> None:
        head = self._head
        if head and data.startswith(head):
            # The common case: one text delta of the open block, written as the API does.
            s = len(head)
            q = data.find(b'"', s)
            if q >= s and data[q - 1] != BACKSLASH and data.find(b"data: ", q) < 0:
                self.blocks[-1].append(data[s:q])
                self.deltas += 1
                self.size += q - s
                if self.size > MAX_RECEIVED:
                    self.stop()
                return
        if self.live:
            self._events(data)

    def stop(self) -> None:
        """Nothing to continue from here on: the tap costs a test per event."""
        self.live = False
        self._delta = self._head = b""

    def _events(self, data: bytes) -> None:
        find = data.find
        at = find(b"data: ")
        while at >= 0:
            start = at + 6
            end = find(b"\n", start)
            if end < 0:
                end = len(data)
            if at == 0 or data[at - 1] in (10, 13):  # (a data line; not those words in a text)
                self._data(data, start, end)
                if not self.live:
                    return
            at = find(b"data: ", end)

    def _data(self, data: bytes, start: int, end: int) -> None:
        prefix = self._delta
        if prefix and data.startswith(prefix, start):
            s = start + len(prefix)
            q = _string_end(data, s, end)
            if q >= 0:
                self._text(data[s:q])
                return
        if data.startswith(PING, start):
            return
        try:
            event = orjson.loads(data[start:end])
        except orjson.JSONDecodeError:
            self.stop()
            return
        if isinstance(event, dict):
            self._event(event)

    def _text(self, raw: bytes) -> None:
        self.blocks[-1].append(raw)
        self.deltas += 1
        self.size += len(raw)
        if self.size > MAX_RECEIVED:
            self.stop()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if event.get("index") == self.open and isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str):
                    self._text(orjson.dumps(text)[1:-1])
            # (a text block's citations_delta: nothing the prefill can carry)
        elif kind == "content_block_start":
            block, index = event.get("content_block"), event.get("index")
            if index != len(self.blocks) or not isinstance(block, dict) or block.get("type") != "text":
                self.stop()  # thinking, tool_use...: no prefill continues those
                return
            text = block.get("text")
            self.blocks.append([orjson.dumps(text)[1:-1]] if isinstance(text, str) and text else [])
            self.open = index
            self._delta = TEXT_DELTA % index
            self._head = b"event: content_block_delta\ndata: " + self._delta
        elif kind == "content_block_stop":
            self.open, self._delta, self._head = None, b"", b""
        elif kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self.input = _input(usage) if isinstance(usage, dict) else None
        elif kind in ("message_delta", "message_stop", "error"):
            self.stop()  # the answer is complete, or the origin said it failed

    def texts(self) -> list[str]:
        """The text of each block the client got, decoded."""
        return [orjson.loads(b'"' + b"".join(parts) + b'"') for parts in self.blocks]


def _string_end(data: bytes, s: int, end: int) -> int:
    """Index of the quote closing the JSON string that starts at ``s``; -1 if not before ``end``."""
    q = data.find(b'"', s, end)
    while q >= 0:
        b = q - 1
        while data[b] == BACKSLASH:  # (stops at the opening quote, at s - 1, at the latest)
            b -= 1
        if (q - 1 - b) % 2 == 0:
            return q
        q = data.find(b'"', q + 1, end)
    return -1


def _input(usage: dict[str, Any]) -> int | None:
    total = 0
    seen = False
    for key in INPUT_KEYS:
        v = usage.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            total += v
            seen = True
    return total if seen else None


def continue_request(body: bytes, texts: list[str], deltas: int) -> tuple[bytes, str] | None:
    """The Messages request that continues an answer whose text blocks so far are ``texts``:
    the original with an assistant message holding them (appended to the client's own
    prefill, if it sent one: the answer continued that), and ``max_tokens`` less the text
    deltas already sent (each is at least one token). Also the whitespace cut from the
    prefill's end, which the API refuses: the client has it, the continuation may begin with
    it again. None if the request cannot be continued this way."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    messages = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(messages, list) or not messages or doc.get("stream") is not True:
        return None
    blocks: list[dict[str, Any]] = [{"type": "text", "text": t} for t in texts]
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        content = last.get("content")
        own = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(own, list) or not own:
            return None
        tail = own[-1]
        if not (isinstance(tail, dict) and tail.get("type") == "text" and isinstance(tail.get("text"), str)):
            return None
        if blocks:
            blocks = [*own[:-1], {**tail, "text": tail["text"] + texts[0]}, *blocks[1:]]
        else:
            blocks = list(own)
        messages = messages[:-1]
    cut = ""
    while blocks:
        text = blocks[-1]["text"]
        kept = text.rstrip()
        cut = text[len(kept) :] + cut
        if kept:
            blocks[-1] = {**blocks[-1], "text": kept}
            break
        blocks.pop()
    doc["messages"] = [*messages, {"role": "assistant", "content": blocks}] if blocks else messages
    max_tokens = doc.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and deltas:
        doc["max_tokens"] = max(1, max_tokens - deltas)
    return orjson.dumps(doc), cut


# An event ends at a blank line (any two line ends in a row); lines end in CRLF, LF or CR.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class Splice(Transform):
    """A continuation's events, rewritten to follow on from what the client has: its
    message_start goes (the client has one); the start of the block that continues the
    client's open text block goes, and its text deltas carry the client's index; later
    blocks are numbered after the client's; the final message_delta counts as output the
    text the client got before the break too."""

    __slots__ = ("_chars", "_cut", "_input", "_next", "_open", "_prefilled", "_shift")

    def __init__(self, received: Received, cut: str) -> None:
        self._open = received.open  # the client's open text block, if the break came inside one
        self._next = len(received.blocks)  # the index the client's next block gets
        self._cut = cut
        self._input = received.input
        self._chars = sum(len(p) for parts in received.blocks for p in parts)
        self._shift: int | None = None  # client index - continuation index, from its first block
        self._prefilled: int | None = None  # the client's text, in tokens, as the continuation's input counted it

    def process(self, data: bytes) -> bytes:
        out = []
        for event in _EVENT_END.split(data):
            if event:
                out.append(self._event(event))
        return b"".join(out)

    def finish(self) -> bytes:
        return b""

    def _event(self, raw: bytes) -> bytes:
        name = b""
        data: list[bytes] = []
        for line in _LINE_END.split(raw):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        try:
            event = orjson.loads(b"\n".join(data)) if data else None
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return raw + b"\n\n"  # (a comment, or what we do not understand: as it came)
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            theirs = _input(usage) if isinstance(usage, dict) else None
            if theirs is not None and self._input is not None and theirs >= self._input:
                self._prefilled = theirs - self._input
            return b""
        index = event.get("index")
        if kind == "content_block_start" and isinstance(index, int):
            if self._shift is None:
                return self._first_block(name, event, index)
            event["index"] = index + self._shift
        elif kind == "content_block_delta" and isinstance(index, int):
            shift = self._shift if self._shift is not None else self._where(index)
            if self._cut and index + shift == self._open:
                delta = event.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                    text = self._trim(delta["text"])
                    if not text:
                        return b""
                    event["delta"] = {**delta, "text": text}
            event["index"] = index + shift
        elif kind == "content_block_stop" and isinstance(index, int):
            shift = self._shift if self._shift is not None else self._where(index)
            event["index"] = index + shift
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                fixed = {k: v for k, v in usage.items() if k not in INPUT_KEYS}
                fixed["output_tokens"] = usage["output_tokens"] + self._received_tokens()
                event["usage"] = fixed
        else:
            return raw + b"\n\n"  # ping, message_stop, error: as they came
        return _frame(name, event)

    def _where(self, index: int) -> int:
        return (self._open if self._open is not None else self._next) - index

    def _first_block(self, name: bytes, event: dict[str, Any], index: int) -> bytes:
        block = event.get("content_block")
        is_text = isinstance(block, dict) and block.get("type") == "text"
        if self._open is not None and is_text:
            self._shift = self._open - index
            return b""  # the client's open block goes on: it has its start
        if self._open is not None:
            # Not text after all (a tool call right away): the client's text block ends here.
            closing = _frame(b"content_block_stop", {"type": "content_block_stop", "index": self._open})
            self._shift = self._open + 1 - index
            self._cut = ""
            event["index"] = index + self._shift
            return closing + _frame(name, event)
        self._shift = self._next - index
        event["index"] = index + self._shift
        self._open = self._next if is_text else None  # (the whitespace cut applies to it)
        return _frame(name, event)

    def _trim(self, text: str) -> str:
        """``text`` without the start of the whitespace cut from the prefill (the client has it)."""
        cut = self._cut
        n = 0
        while n < len(cut) and n < len(text) and text[n] == cut[n]:
            n += 1
        self._cut = cut[n:] if n == len(text) else ""  # a delta of only whitespace: maybe more next
        return text[n:]

    def _received_tokens(self) -> int:
        if self._prefilled is not None:
            return self._prefilled
        return (self._chars + 3) // 4  # (no usage to compare: about 4 bytes a token)


def _frame(name: bytes, event: dict[str, Any]) -> bytes:
    head = b"event: " + name + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(event) + b"\n\n"

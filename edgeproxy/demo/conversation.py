"""A made-up coding assistant's conversation for the edge scene, sent the way an agent sends
it: every turn re-sends the system prompt, the whole history and the tools, and the history
grows by a tool's output and the model's answer each turn.

The text is words of a made-up vocabulary drawn with Zipf-like frequencies. Brotli, at the
quality a `via` line uses, shrinks it about 3x, as it does English prose (the GPL's text:
3.1x): the bytes the demo shows saved owe nothing to a text more repetitive than real ones.
"""

from __future__ import annotations

import itertools
import random
import string
import zlib
from typing import Any, Final

import orjson

__all__ = ["ANSWER_WORDS", "MODEL", "Conversation", "answer_for", "prose"]

MODEL: Final = "gpt-4o-mini"
ANSWER_WORDS: Final = 100  # the origin's answers: ~650 bytes, streamed a word per event
SYSTEM_WORDS: Final = 450  # ~3 KB
FIRST_WORDS: Final = 2000  # the first question and the file it is about: ~13 KB
TOOL_OUTPUT_WORDS: Final = 1000  # each later turn: a tool's output, ~6.5 KB


def _vocabulary() -> tuple[list[str], list[float]]:
    rng = random.Random(16)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    return words, list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))


_WORDS, _CUMULATIVE = _vocabulary()


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(_WORDS, cum_weights=_CUMULATIVE, k=words))


def answer_for(body: dict[str, Any]) -> list[str]:
    """The origin's answer to a chat request, as the pieces it streams: ANSWER_WORDS words,
    the same for the same history (the direct and the via conversation stay identical)."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    content = last.get("content") if isinstance(last, dict) else None
    seed = zlib.crc32(f"{len(messages) if isinstance(messages, list) else 0}:{content}".encode())
    words = prose(random.Random(seed), ANSWER_WORDS).split(" ")
    return [words[0], *(" " + w for w in words[1:])]


def _tool(rng: random.Random) -> dict[str, Any]:
    name, *args = prose(rng, 4).split(" ")
    properties = {arg: {"type": "string", "description": prose(rng, 12)} for arg in args}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": prose(rng, 60),
            "parameters": {"type": "object", "properties": properties, "required": list(properties)},
        },
    }


class Conversation:
    """One conversation: ``ask()`` adds the next user turn and returns the request body;
    ``answered(text)`` adds the model's answer. The same ``seed``, the same conversation;
    the system prompt and tools are the app's, the same in all."""

    def __init__(self, seed: int) -> None:
        app = random.Random(1)
        self.rng = random.Random(seed)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": prose(app, SYSTEM_WORDS)}]
        self.tools = [_tool(app) for _ in range(8)]
        self.turns = 0

    def ask(self) -> bytes:
        if self.turns == 0:
            content = "Why does this fail? " + prose(self.rng, FIRST_WORDS)
        else:
            content = "The tool says: " + prose(self.rng, TOOL_OUTPUT_WORDS) + ". What next?"
        self.messages.append({"role": "user", "content": content})
        self.turns += 1
        return orjson.dumps({"model": MODEL, "stream": True, "messages": self.messages, "tools": self.tools})

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

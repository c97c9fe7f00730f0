"""Key pools: an endpoint's API keys, each with its own rate-limit state.

A ``KeyPool`` belongs to one endpoint of one upstream at run time. For every attempt it picks
the key with the most headroom, as far as we know it: the origin's own rate-limit headers
(OpenAI ``x-ratelimit-*``, Anthropic ``anthropic-ratelimit-*``) and the optional local limits
(``rpm``, ``tpm``); keys nothing is known about share the load evenly (round robin).

A key is *ready* unless it is disabled (the origin refused it, 401/403, and a check
confirmed it: until the next reload), cooling down (a 429 asked us to wait), or out of
headroom (a local bucket is empty, or the origin said ``remaining: 0`` and the bucket has not
refilled yet). A pool with no ready key makes its endpoint unavailable until ``available_in()``.

Everything here is synchronous and cheap: a few floats per key, no I/O. Key material lives
only in ``Key.value`` (the header value to send) and never leaves it: logs, metrics and
``status()`` name keys by id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ..proto.providers import MAX_WAIT, _duration, _until

if TYPE_CHECKING:
    from ..config import KeyConfig

__all__ = ["Bucket", "Key", "KeyPool", "rate_limits"]

# OpenAI's and Anthropic's request and token limits are per minute, and both refill
# continuously: a "reset" header is the time until the bucket is full again. Knowing the
# period turns (limit, remaining, reset) into an exact level, fractions included.
BUCKET_PERIOD: Final = 60.0
# A key whose bucket says nothing about a dimension counts as this full (0..1).
FULL: Final = 1.0
INF: Final = math.inf


class Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``rate`` per second, ``level`` at ``at``
    (monotonic). The level may go below zero: tokens spent that were not there (usage learned
    after the fact) are paid back before the bucket is ready again."""

    __slots__ = ("at", "capacity", "level", "rate")

    def __init__(self, capacity: float, rate: float, level: float, at: float) -> None:
        self.capacity, self.rate, self.level, self.at = capacity, rate, level, at

    def __repr__(self) -> str:
        return f"<Bucket {self.level:.2f}/{self.capacity:g} +{self.rate:g}/s>"

    def level_at(self, now: float) -> float:
        return min(self.capacity, self.level + (now - self.at) * self.rate)

    def take(self, n: float, now: float) -> None:
        self.level = self.level_at(now) - n
        self.at = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        missing = n - self.level_at(now)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else INF

    def fill(self, now: float) -> float:
        """How full, 0..1."""
        return max(0.0, self.level_at(now)) / self.capacity if self.capacity > 0 else 0.0


def local_bucket(per_minute: int | None, now: float) -> Bucket | None:
    if not per_minute:
        return None
    return Bucket(per_minute, per_minute / BUCKET_PERIOD, per_minute, now)


def origin_bucket(limit: float, remaining: float, reset: float | None, now: float) -> Bucket:
    """The origin's bucket as its headers describe it (``reset``: seconds until full)."""
    if reset is None or reset <= 0 or remaining >= limit:
        return Bucket(limit, limit / BUCKET_PERIOD, remaining, now)
    rate = limit / BUCKET_PERIOD
    level = limit - reset * rate
    if not remaining - 0.01 <= level < remaining + 1.01:
        # Not a per-minute bucket (a daily limit, a relay's own scheme): assume the level is
        # what it says and that it refills in a straight line until the reset.
        level, rate = remaining, (limit - remaining) / reset
    return Bucket(limit, rate, min(max(level, remaining), remaining + 0.999), now)


# Header name -> (dimension, field): field 0 limit, 1 remaining, 2 reset.
_RATE_HEADERS: Final = {
    **{f"x-ratelimit-{what}-{dim}".encode(): (dim, i) for dim in ("requests", "tokens") for i, what in
       enumerate(("limit", "remaining", "reset"))},
    **{f"anthropic-ratelimit-{dim}-{what}".encode(): (dim, i) for dim in ("requests", "tokens") for i, what in
       enumerate(("limit", "remaining", "reset"))},
}  # fmt: skip
_FIRST_BYTES: Final = frozenset(b"xXaA")  # what a rate-limit header name starts with
# Reset durations repeat ("6ms", "1s", "6m0s"): parse each text once (bounded).
_durations: dict[bytes, float | None] = {}


def _reset_seconds(raw: bytes) -> float | None:
    seconds = _durations.get(raw, -1.0)
    if seconds != -1.0:
        return seconds
    text = raw.decode("latin-1").strip()
    seconds = _duration(text)
    if seconds is None:
        until = _until(text, time.time())  # an RFC 3339 time: not cacheable
        return until if until is not None and math.isfinite(until) else None
    if len(_durations) > 1024:
        _durations.clear()
    _durations[raw] = seconds
    return seconds


def rate_limits(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, tuple[float, float, float | None]] | None:
    """{"requests"|"tokens": (limit, remaining, seconds until full)} from a response's rate-limit
    headers (OpenAI's or Anthropic's); None if there are none. Called on every answer with a
    pooled key, so it only looks twice at headers that may be one of them."""
    found: dict[str, list[bytes | None]] | None = None
    for name, value in headers:
        if len(name) < 24 or name[0] not in _FIRST_BYTES:
            continue
        slot = _RATE_HEADERS.get(name.lower())
        if slot is None:
            continue
        if found is None:
            found = {}
        parts = found.get(slot[0])
        if parts is None:
            parts = found[slot[0]] = [None, None, None]
        parts[slot[1]] = value
    if found is None:
        return None
    out: dict[str, tuple[float, float, float | None]] = {}
    for dimension, (raw_limit, raw_remaining, raw_reset) in found.items():
        if raw_limit is None or raw_remaining is None:
            continue
        try:
            limit, remaining = float(raw_limit), float(raw_remaining)
        except ValueError:
            continue
        if not (math.isfinite(limit) and math.isfinite(remaining)) or limit < 1:
            continue
        reset = _reset_seconds(raw_reset) if raw_reset else None
        out[dimension] = (limit, max(0.0, remaining), reset)
    return out or None


class Key:
    """One key of a pool and what we know about its limits."""

    __slots__ = (
        "cooldown_until",
        "disabled",
        "id",
        "index",
        "limited",
        "local_requests",
        "local_tokens",
        "origin_requests",
        "origin_tokens",
        "config",
        "requests",
        "tokens",
        "value",
    )

    def __init__(self, config: KeyConfig, value: bytes, index: int, now: float) -> None:
        self.config = config
        self.id = config.id
        self.index = index
        self.value = value  # the header value that presents the key: never shown anywhere
        self.disabled: str | None = None  # why the origin refused it ("401"), until a reload
        self.cooldown_until = 0.0  # monotonic: a 429 asked us to wait until then
        self.local_requests = local_bucket(config.rpm, now)
        self.local_tokens = local_bucket(config.tpm, now)
        self.origin_requests: Bucket | None = None
        self.origin_tokens: Bucket | None = None
        self.requests = 0  # attempts sent with it
        self.limited = 0  # 429s it got
        self.tokens = 0  # tokens metered on it

    def __repr__(self) -> str:
        return f"<Key {self.id} {self.state(0.0)}>"

    def _buckets(self) -> tuple[Bucket | None, ...]:
        return (self.local_requests, self.origin_requests, self.local_tokens, self.origin_tokens)

    def available_in(self, now: float) -> float:
        """Seconds until this key may be used (0: now; inf: disabled)."""
        if self.disabled is not None:
            return INF
        return max(self.cooldown_until - now, self.bucket_wait(now), 0.0)

    def bucket_wait(self, now: float, origin_only: bool = False) -> float:
        """Seconds until every bucket (local and origin; or the origin's only) has room for
        one more request."""
        wait = 0.0
        buckets = (self.origin_requests, self.origin_tokens) if origin_only else self._buckets()
        for bucket in buckets:
            if bucket is not None:
                wait = max(wait, bucket.wait_for(1.0, now))
        # However far off a bucket says (a buggy reset in 2999), look again after MAX_WAIT: the
        # next answer's headers correct it; never sideline a key for good.
        return min(wait, MAX_WAIT)

    def headroom(self, now: float) -> float:
        """How much of its limits is left, 0..1: the emptiest of its buckets."""
        room = FULL
        for bucket in self._buckets():
            if bucket is not None:
                room = min(room, bucket.fill(now))
        return room

    def state(self, now: float) -> str:
        if self.disabled is not None:
            return "disabled"
        if self.cooldown_until > now:
            return "cooling"
        return "ready" if self.available_in(now) == 0 else "exhausted"

    def on_pick(self, now: float) -> None:
        self.requests += 1
        for bucket in (self.local_requests, self.origin_requests):
            if bucket is not None:
                bucket.take(1.0, now)

    def on_tokens(self, n: int, now: float, counted: bool = False) -> None:
        """``n`` tokens used. ``counted``: the same answer's rate-limit headers already took
        them off (the origin charges on acceptance, and our buckets were just set from those
        headers): count them, drain nothing twice."""
        self.tokens += n
        if counted:
            return
        for bucket in (self.local_tokens, self.origin_tokens):
            if bucket is not None:
                bucket.take(n, now)

    def on_rate_limits(self, limits: dict[str, tuple[float, float, float | None]], now: float) -> None:
        """The origin's headers: its view replaces our estimate, and caps the local buckets."""
        for dim, (limit, remaining, reset) in limits.items():
            bucket = origin_bucket(limit, remaining, reset, now)
            local = self.local_requests if dim == "requests" else self.local_tokens
            if local is not None and local.level_at(now) > bucket.level:
                local.level, local.at = bucket.level, now  # the origin knows better: slow down
            if dim == "requests":
                self.origin_requests = bucket
            else:
                self.origin_tokens = bucket

    def take_over(self, old: Key) -> None:
        """A reload kept this key: keep what we learnt about it, but not that it was disabled."""
        self.cooldown_until = old.cooldown_until
        self.origin_requests, self.origin_tokens = old.origin_requests, old.origin_tokens
        if old.config.rpm == self.config.rpm:
            self.local_requests = old.local_requests
        if old.config.tpm == self.config.tpm:
            self.local_tokens = old.local_tokens
        self.requests, self.limited, self.tokens = old.requests, old.limited, old.tokens

    def status(self, now: float) -> dict[str, object]:
        """What /-/status shows (no key material)."""
        out: dict[str, object] = {
            "id": self.id,
            "state": self.state(now),
            "available_in_s": None if self.disabled else round(self.available_in(now), 3),
            "requests": self.requests,
            "limited": self.limited,
            "tokens": self.tokens,
        }
        if self.disabled is not None:
            out["disabled"] = self.disabled
        for name, bucket in (("requests_left", self.origin_requests), ("tokens_left", self.origin_tokens)):
            if bucket is not None:
                out[name] = max(0, math.floor(bucket.level_at(now)))
        if self.config.rpm or self.config.tpm:
            out["rpm"], out["tpm"] = self.config.rpm, self.config.tpm
        return out


class KeyPool:
    """The keys of one endpoint, and the choice among them."""

    __slots__ = ("_next", "keys", "url")

    def __init__(self, url: str, keys: list[Key]) -> None:
        self.url = url
        self.keys = keys
        self._next = 0  # round-robin start, for keys with equal headroom

    def __repr__(self) -> str:
        return f"<KeyPool {self.url} [{' | '.join(f'{k.id} {k.state(0.0)}' for k in self.keys)}]>"

    def pick(self, now: float, skip: Key | None = None) -> Key | None:
        """The ready key with the most headroom (ties in turn), other than ``skip``; None if
        none is ready."""
        keys = self.keys
        n = len(keys)
        best: Key | None = None
        best_room = -1.0
        start = self._next
        for i in range(n):
            key = keys[(start + i) % n]
            if key is skip or key.available_in(now) > 0:
                continue
            room = key.headroom(now)
            if room > best_room + 1e-9:
                best, best_room = key, room
        if best is not None:
            self._next = (best.index + 1) % n
        return best

    def available_in(self, now: float) -> float:
        """Seconds until some key is ready (0: now; inf: every key is disabled)."""
        return min((k.available_in(now) for k in self.keys), default=INF)

    def is_ready(self, now: float, skip: Key | None = None) -> bool:
        """Is a key other than ``skip`` ready now?"""
        for key in self.keys:
            if key is not skip and key.available_in(now) == 0:
                return True
        return False

    def take_over(self, old: KeyPool) -> None:
        by_value = {k.value: k for k in old.keys}
        for key in self.keys:
            previous = by_value.get(key.value)
            if previous is not None:
                key.take_over(previous)
        self._next = old._next % len(self.keys) if self.keys else 0

    def status(self, now: float) -> list[dict[str, object]]:
        return [k.status(now) for k in self.keys]

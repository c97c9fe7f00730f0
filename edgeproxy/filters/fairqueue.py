"""An upstream's admission queue (``FairQueue``): slots for requests at its origins, and the
requests waiting for one, served by priority class without starving any.

A request takes a slot at once while no one waits and a slot is free. Otherwise it waits in
its class's line (first come, first served within a class); a freed slot goes to the class
chosen by stride scheduling (weighted fair queuing over the classes): each class has a pass
that grows by 1/weight at each grant, and the class with the lowest pass goes next. While
every class waits, high gets 6 of every 10 slots, normal 3, low 1: low is never starved,
and a class that has no one waiting lends its share to the others. A class that starts
waiting again starts from the current pass, so a pause earns it no credit.

Keys are the other thing a request may be short of: while no path's keys are ready (the
upstream's ``gate``), no one is granted a slot; the queue looks again when the first key is
ready (``ready_in``), and grants one waiter at a time, each after the one before has taken
its key, so the keys go by priority too.

A full queue refuses the newcomer, unless someone of a lower class waits: then the newest of
the lowest class is refused instead (high is never turned away for low). A waiter leaves at
once when its client goes away, and at its deadline (``queue_timeout`` from its arrival).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from ..proto.priority import PRIORITIES, RANK

if TYPE_CHECKING:
    from ..config import AdmissionConfig
    from ..routing.state import Upstream

__all__ = ["CLOSED", "WEIGHTS", "FairQueue", "Ticket"]

# Shares of the slots while every class waits: 6 / 3 / 1 of every 10.
WEIGHTS: Final = {"high": 6, "normal": 3, "low": 1}
_STRIDE: Final = {c: 1.0 / w for c, w in WEIGHTS.items()}
# What a wait ends with.
GRANTED: Final = "granted"
EXPIRED: Final = "expired"  # its deadline passed
FULL: Final = "full"  # the queue was full when it came
SHED: Final = "shed"  # the queue was full, and a higher class came
CLOSED: Final = "closed"  # the drain (shutdown) ended while it waited
_GONE: Final = "gone"  # its client went away
# While keys are short, the queue looks again this often at most (seconds).
KEY_RECHECK: Final = 0.5
# A refusal's Retry-After stays within these bounds (seconds).
RETRY_MIN: Final = 1.0
RETRY_MAX: Final = 60.0
# Waiters that left stay in their line until they reach its head; past this many (and as many
# as wait), the line is rebuilt without them.
_COMPACT_AT: Final = 64


class Ticket:
    """One request's place: its class, whether it holds a slot, and how long it waited."""

    __slots__ = ("admitted", "arrived", "future", "hedges", "priority", "timer", "waited", "waiting")

    def __init__(self, priority: str, arrived: float) -> None:
        self.priority = priority
        self.arrived = arrived  # monotonic: the deadline counts from the request's arrival
        self.admitted = False  # holds a slot (given back at the request's end)
        self.hedges = 0  # slots its hedges hold besides (given back at the request's end too)
        self.waited = 0.0  # seconds in the queue
        self.waiting = False  # in the queue, counted (a cancelled task's future is done first)
        self.future: asyncio.Future[str] | None = None
        self.timer: asyncio.TimerHandle | None = None


class FairQueue:
    """Slots and waiters of one upstream (kept across reloads while the upstream exists)."""

    __slots__ = (
        "_dead",
        "_key_timer",
        "_lines",
        "_next_key",
        "_passes",
        "_rate",
        "_vtime",
        "config",
        "counts",
        "inflight",
        "queued",
        "upstream",
    )

    def __init__(self, config: AdmissionConfig, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream
        self.inflight = 0  # slots held
        self.queued = 0  # requests waiting, all classes
        self.counts = dict.fromkeys(PRIORITIES, 0)  # requests waiting, per class
        self._lines: dict[str, deque[Ticket]] = {c: deque() for c in PRIORITIES}
        self._dead = dict.fromkeys(PRIORITIES, 0)  # tickets in a line that no longer wait
        self._passes = dict.fromkeys(PRIORITIES, 0.0)
        self._vtime = 0.0
        self._next_key: asyncio.Handle | None = None  # granting one at a time (keys)
        self._key_timer: asyncio.TimerHandle | None = None  # looking again when a key is ready
        self._rate = _Rate()

    # -- taking and giving back slots ------------------------------------------------------
    def take_at_once(self, ticket: Ticket) -> bool:
        """A slot now, if no one waits and one is free (the request found a path with keys)."""
        cap = self.config.max_inflight
        if self.queued or (cap is not None and self.inflight >= cap):
            return False
        self.inflight += 1
        ticket.admitted = True
        return True

    def take_for_hedge(self, ticket: Ticket) -> bool:
        """A slot of its own for a hedge, only if one is free and no one waits: a hedge must not
        take the origins' capacity from requests that queue for it."""
        cap = self.config.max_inflight
        if self.queued or (cap is not None and self.inflight >= cap):
            return False
        self.inflight += 1
        ticket.hedges += 1
        return True

    def release(self, ticket: Ticket) -> None:
        """The request is over: its slots go to the next waiters."""
        if ticket.admitted or ticket.hedges:
            self.inflight -= ticket.admitted + ticket.hedges
            ticket.admitted, ticket.hedges = False, 0
            self._rate.tick(time.monotonic())
            if self.queued:
                self._dispatch()

    # -- waiting ---------------------------------------------------------------------------
    async def wait(self, ticket: Ticket) -> str:
        """Wait for a slot: GRANTED, EXPIRED, FULL, SHED or CLOSED. Raises CancelledError if the
        client goes away (the ticket then leaves its line at once)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        remaining = ticket.arrived + self.config.queue_timeout - now
        if remaining <= 0:
            return EXPIRED
        if self.queued >= self.config.queue and not self._shed_below(ticket.priority):
            return FULL
        cls = ticket.priority
        future = ticket.future = loop.create_future()
        ticket.waiting = True
        if not self.counts[cls]:  # (a class that starts waiting again earns nothing for its pause)
            self._passes[cls] = max(self._passes[cls], self._vtime)
        self._lines[cls].append(ticket)
        self.counts[cls] += 1
        self.queued += 1
        ticket.timer = loop.call_later(remaining, self._resolve, ticket, EXPIRED)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._resolve(ticket, _GONE)
            raise
        finally:
            ticket.waited = time.monotonic() - now

    def retry_after(self) -> float:
        """When a refused client might be served: the waiters ahead at the recent pace."""
        if not self.queued:
            return RETRY_MIN  # (no one ahead, `queue: 0`: the next slot given back is its)
        rate = self._rate.per_second(time.monotonic())
        guess = self.queued / rate if rate > 0 else self.config.queue_timeout
        return min(RETRY_MAX, max(RETRY_MIN, guess))

    def keys_short(self) -> float | None:
        """None if some path's keys can take a request now; else seconds until one can (inf:
        never, every key disabled)."""
        up = self.upstream
        gate = up.gate
        now = time.monotonic()
        if gate is None or any(gate(p, now) for p in up.paths):
            return None
        wait = up.ready_in(now) if up.ready_in is not None else None
        return float("inf") if wait is None else wait

    def promote(self, ticket: Ticket, cls: str) -> None:
        """``ticket`` now waits (or will) in class ``cls``, if that is higher: a request of that
        class shares its answer (the cache), and must not wait in a lower class's line."""
        if RANK[cls] >= RANK[ticket.priority]:
            return
        if ticket.waiting:  # (rare: a linear search of its line is fine)
            self._lines[ticket.priority].remove(ticket)
            self.counts[ticket.priority] -= 1
            if not self.counts[cls]:
                self._passes[cls] = max(self._passes[cls], self._vtime)
            self._lines[cls].append(ticket)
            self.counts[cls] += 1
        ticket.priority = cls

    def close(self, ticket: Ticket) -> bool:
        """The drain ended: this waiter leaves with CLOSED (True), if it still waits."""
        if not ticket.waiting:
            return False
        self._resolve(ticket, CLOSED)
        return True

    def reconfigure(self, config: AdmissionConfig, upstream: Upstream) -> None:
        """A reload: new limits (more slots are granted at once), the new State's upstream."""
        self.config, self.upstream = config, upstream
        if self.queued:
            self._dispatch()

    # -- granting --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        cap = self.config.max_inflight
        gated = self.upstream.gate is not None
        while self.queued and (cap is None or self.inflight < cap):
            if gated and (self._next_key is not None or not self._keys_ready()):
                return
            ticket = self._next()
            self.inflight += 1
            ticket.admitted = True
            self._resolve(ticket, GRANTED)
            if gated:
                # One at a time: the next after this one has taken its key. Its task's
                # wake-up was scheduled by the grant just above, so it runs before this.
                self._next_key = asyncio.get_running_loop().call_soon(self._after_key)
                return

    def _after_key(self) -> None:
        self._next_key = None
        if self.queued:
            self._dispatch()

    def _key_ready(self) -> None:
        self._key_timer = None
        if self.queued:
            self._dispatch()

    def _keys_ready(self) -> bool:
        """Can some path's keys take a request now? If not, look again when one can. Every
        key refused counts as ready: the waiters go on, and the key pools tell them."""
        wait = self.keys_short()
        if wait is None or wait == float("inf"):
            if self._key_timer is not None:
                self._key_timer.cancel()
                self._key_timer = None
            return True
        if wait != float("inf") and self._key_timer is None:
            # (at most KEY_RECHECK: a key pool's guess may be long; a freed key is found soon)
            delay = min(max(wait, 0.005), KEY_RECHECK)
            self._key_timer = asyncio.get_running_loop().call_later(delay, self._key_ready)
        return False

    def _next(self) -> Ticket:
        """The waiter a freed slot goes to: the head of the waiting class with the lowest pass."""
        best = None
        for cls in PRIORITIES:  # (ties: the higher class)
            if self.counts[cls] and (best is None or self._passes[cls] < self._passes[best]):
                best = cls
        assert best is not None
        self._vtime = self._passes[best]
        self._passes[best] += _STRIDE[best]
        line = self._lines[best]
        while not line[0].waiting:
            line.popleft()
            self._dead[best] -= 1
        return line.popleft()

    def _shed_below(self, priority: str) -> bool:
        """Full: refuse the newest waiter of the lowest class below ``priority`` (True), if any."""
        for cls in reversed(PRIORITIES[PRIORITIES.index(priority) + 1 :]):
            if not self.counts[cls]:
                continue
            line = self._lines[cls]
            while not line[-1].waiting:
                line.pop()
                self._dead[cls] -= 1
            self._resolve(line.pop(), SHED, in_line=False)
            return True
        return False

    def _resolve(self, ticket: Ticket, outcome: str, in_line: bool = True) -> None:
        """The ticket's wait is over: it no longer counts (granted tickets are out of their
        line; the others stay there, skipped, until the line is rebuilt or reaches them)."""
        future = ticket.future
        if not ticket.waiting or future is None:
            return
        ticket.waiting = False
        cls = ticket.priority
        self.queued -= 1
        self.counts[cls] -= 1
        if ticket.timer is not None:
            ticket.timer.cancel()
            ticket.timer = None
        if outcome == _GONE:
            future.cancel()
        elif not future.done():
            future.set_result(outcome)
        if outcome != GRANTED and in_line:
            self._dead[cls] += 1
            if self._dead[cls] > _COMPACT_AT + self.counts[cls]:
                self._lines[cls] = deque(t for t in self._lines[cls] if t.waiting)
                self._dead[cls] = 0


class _Rate:
    """Slots given back per second, over the last ~10 s (for Retry-After)."""

    __slots__ = ("count", "last", "start")

    WINDOW: Final = 10.0

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.count = 0
        self.last = 0.0  # the previous window's rate

    def tick(self, now: float) -> None:
        if now - self.start > self.WINDOW:
            self.last = self.count / (now - self.start)
            self.start, self.count = now, 0
        self.count += 1

    def per_second(self, now: float) -> float:
        span = now - self.start
        return self.count / span if span >= 1.0 and self.count else self.last

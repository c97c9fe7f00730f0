"""What the demo saw: its client's requests, the events it shows, the results of each scene's
script, and the summaries printed at their ends."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Final

from .screen import Segment

__all__ = [
    "EdgeResults",
    "Event",
    "Request",
    "Results",
    "Turn",
    "TurnRow",
    "edge_summary",
    "kb",
    "recent",
    "summary",
    "verdict",
]

SLOWED_MARGIN: Final = 0.1  # a first token this much later than the slowest before the black hole: slowed


@dataclass(eq=False)
class Request:
    started: float
    stream: bool
    done_at: float | None = None
    ok: bool = False
    line: str | None = None  # which simulated line answered (from x-demo-host)


@dataclass
class Event:
    at: float
    text: str
    style: str = ""


@dataclass
class Results:
    requests: int = 0
    streams: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    on_a_at_start: bool = False
    move_to_b: float | None = None  # seconds after A degraded
    back_to_a: float | None = None  # seconds after A recovered
    death_first_failover: float | None = None  # seconds after A died
    death_move_to_b: float | None = None
    at_death: int = 0
    at_death_ok: int = 0
    at_death_via_b: int = 0
    at_death_slowest: float | None = None
    failovers: dict[str, float] = field(default_factory=dict)
    rescues: float = 0.0
    switches: int = 0
    interrupted: bool = False

    def passed(self) -> bool:
        return (
            not self.interrupted
            and self.errors == 0
            and self.on_a_at_start
            and self.move_to_b is not None
            and self.back_to_a is not None
            and self.death_move_to_b is not None
            and self.at_death_ok == self.at_death
        )


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


def summary(r: Results) -> list[list[Segment]]:
    ok: Segment = ("yes", "g")
    no: Segment = ("NO", "rb")
    reasons = ", ".join(f"{v:g} {k}" for k, v in sorted(r.failovers.items())) or "none"
    out: list[list[Segment]] = [
        [("", "")],
        [("[5/5] summary", "c")],
        [
            (f"  client requests       {r.requests} ({r.streams} streams): {r.ok} answered, ", ""),
            (f"{r.errors} errors", "rb" if r.errors else "gb"),
        ],
        [("  traffic on A at start ", ""), ok if r.on_a_at_start else no],
        [("  A degraded: moved to B after ", ""), (_secs(r.move_to_b), "" if r.move_to_b is not None else "rb")],
        [("  A recovered: back to A after ", ""), (_secs(r.back_to_a), "" if r.back_to_a is not None else "rb")],
        [
            (f"  A died with {r.at_death} requests in flight: {r.at_death_ok} answered", ""),
            (f" ({r.at_death_via_b} via B)", ""),
            (f", the last {_secs(r.at_death_slowest)} after the death", ""),
        ],
        [
            (f"  first failover {_secs(r.death_first_failover)} after the death; ", ""),
            (f"traffic on B after {_secs(r.death_move_to_b)}", "" if r.death_move_to_b is not None else "rb"),
        ],
        [(f"  edgeproxy counted     failovers: {reasons}; rescues: {r.rescues:g}; route switches: {r.switches}", "")],
    ]
    return out + verdict(r)


# -- the edge scene ----------------------------------------------------------------------------


@dataclass(eq=False)
class Turn:
    """One request of a conversation (a streamed chat completion)."""

    way: str  # "direct" or "via"
    started: float
    size: int  # the request body's bytes
    first_token: float | None = None
    done_at: float | None = None
    ok: bool = False

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started


@dataclass
class TurnRow:
    """One turn of the conversation sent both ways, and the bytes each way put across the border."""

    n: int
    size: int
    ttft_direct: float | None
    ttft_via: float | None
    up_direct: int
    down_direct: int
    up_via: int
    down_via: int


@dataclass
class EdgeResults:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    turns: list[TurnRow] = field(default_factory=list)
    up_direct: int = 0
    up_via: int = 0
    down_direct: int = 0
    down_via: int = 0
    before_hole: list[Turn] = field(default_factory=list)  # via, answered before the black hole
    after_hole: list[Turn] = field(default_factory=list)  # via, sent at it or after it
    hole_at: float | None = None  # time.monotonic() of the black hole
    on_hole_at_hole: int = 0  # requests waiting on border 1 when it went dark
    requests_on_hole_at_hole: int = 0  # border 1's request counter then
    rescues_before_hole: float = 0.0
    first_move_after: float | None = None  # seconds from the black hole to the first request re-sent
    left_after: float | None = None  # seconds from the black hole to border 1 marked down
    left_why: str = ""
    requests_on_hole_before_left: int = 0  # sent to border 1 after the black hole, before it was left
    requests_on_hole_at_left: int = 0
    requests_on_hole_after_left: int | None = None  # sent to border 1 after it was left
    hole_state: str = ""  # border 1's state at the end
    rescues: float = 0.0  # requests re-sent from border 1 after the black hole
    failovers: float = 0.0
    interrupted: bool = False

    def median_ttft(self, way: str) -> float | None:
        values = [v for row in self.turns if (v := row.ttft_direct if way == "direct" else row.ttft_via) is not None]
        return statistics.median(values) if values else None

    def usual_ttft(self) -> float | None:
        """The slowest first token via edgeproxy before the black hole."""
        values = [v for t in self.before_hole if (v := t.ttft()) is not None]
        return max(values) if values else None

    def slowed(self) -> list[Turn]:
        """Requests the black hole cost time: no first token, or one later than usual."""
        usual = self.usual_ttft()
        if usual is None:
            return []
        return [t for t in self.after_hole if (v := t.ttft()) is None or v > usual + SLOWED_MARGIN]

    def sent_after_left(self) -> list[Turn]:
        if self.hole_at is None or self.left_after is None:
            return []
        return [t for t in self.after_hole if t.started > self.hole_at + self.left_after]

    def passed(self) -> bool:
        direct, via = self.median_ttft("direct"), self.median_ttft("via")
        return (
            not self.interrupted
            and self.errors == 0
            and self.ok == self.requests > 0
            and 0 < 3 * self.up_via <= self.up_direct
            and 0 < 2 * self.down_via <= self.down_direct
            and direct is not None
            and via is not None
            and via < direct
            and self.left_after is not None
            and self.requests_on_hole_after_left == 0
        )


def kb(n: int) -> str:
    return f"{n / 1000:.1f} KB"


def _times(a: int, b: int) -> str:
    return f"{a / b:.1f}x less" if b else "-"


def edge_summary(r: EdgeResults) -> list[list[Segment]]:
    direct, via = r.median_ttft("direct"), r.median_ttft("via")
    out: list[list[Segment]] = [
        [("", "")],
        [("[edge 3/3] summary", "c")],
        [
            (f"  first token, median of {len(r.turns)} turns: direct {_secs(direct)}, ", ""),
            (f"via edgeproxy {_secs(via)}", "gb" if via is not None and direct is not None and via < direct else "rb"),
        ],
        [
            (f"  across the border, up:   direct {kb(r.up_direct)}, via edgeproxy {kb(r.up_via)}: ", ""),
            (_times(r.up_direct, r.up_via), "gb"),
            (" (compressed, conversation deltas; probes included)", "d"),
        ],
        [
            (f"  across the border, down: direct {kb(r.down_direct)}, via edgeproxy {kb(r.down_via)}: ", ""),
            (_times(r.down_direct, r.down_via), "gb"),
            (" (streams compressed, flushed every event)", "d"),
        ],
        [
            (f"  border 1 went dark with {r.on_hole_at_hole} requests waiting on it; ", ""),
            (f"{r.requests_on_hole_before_left} more were sent to it before edgeproxy left it", ""),
        ],
    ]
    if r.first_move_after is not None:
        out.append(
            [
                (f"  the first requests moved off it after {r.first_move_after:.2f} s", ""),
                (f" (a probe found it dead; {r.rescues:g} re-sent via border 2 in all)", ""),
            ]
        )
    if r.left_after is None:
        out.append([("  edgeproxy never left border 1", "rb")])
    else:
        after = r.requests_on_hole_after_left
        out.append(
            [
                ("  left in ", ""),
                (f"{r.left_after:.2f} s", "gb"),
                (f": border 1 marked down ({r.left_why}); ", ""),
                (f"{after} requests sent to it since" if after else "none sent to it since", "rb" if after else ""),
            ]
        )
    slowed, usual = r.slowed(), r.usual_ttft()
    if slowed and r.hole_at is not None and usual is not None:
        firsts = [t.first_token for t in slowed if t.first_token is not None]
        worst = max((v for t in slowed if (v := t.ttft()) is not None), default=None)
        paid = max(firsts) - r.hole_at if firsts else None
        out.append(
            [
                (f"  {len(slowed)} requests paid for it (first token over {usual:.2f} s, the slowest before,", ""),
                (f" +{SLOWED_MARGIN:g} s), at worst {_secs(worst)}; ", ""),
                ("requests stopped paying ", ""),
                (f"{_secs(paid)} after the black hole", "b"),
            ]
        )
    elif r.hole_at is not None:
        out.append([("  no request was slowed by the black hole", "")])
    later = [v for t in r.sent_after_left() if (v := t.ttft()) is not None]
    if later:
        text = f"  {len(later)} requests sent after it was left: first token in {_secs(max(later))} at most"
        out.append([(text, "")])
    out.append(
        [
            (f"  client requests       {r.requests} (all streams): {r.ok} answered, ", ""),
            (f"{r.errors} errors", "rb" if r.errors else "gb"),
        ]
    )
    return out + verdict(r)


def verdict(r: Results | EdgeResults) -> list[list[Segment]]:
    """A scene summary's last lines: the client errors seen, then whether it did what it should."""
    out = [[(f"  client error: {sample}", "r")] for sample in r.error_samples]
    if r.interrupted:
        out.append([("  interrupted", "y")])
    else:
        out.append([("  result: ", "b"), ("OK", "gb") if r.passed() else ("edgeproxy did not do what it should", "rb")])
    return out


def recent(events: list[Event]) -> list[list[Segment]]:
    """A live block's last lines: the scene's latest events."""
    return [[(f"  {ev.at:5.1f}s  ", "d"), (ev.text, ev.style)] for ev in events[-6:]]

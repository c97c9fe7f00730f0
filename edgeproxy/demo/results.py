"""What the demo saw: its client's requests, the events it shows, the results of the script,
and the summary printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from .screen import Segment

__all__ = ["Event", "Request", "Results", "summary"]


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
    for sample in r.error_samples:
        out.append([(f"  client error: {sample}", "r")])
    if r.interrupted:
        out.append([("  interrupted", "y")])
    else:
        out.append([("  result: ", "b"), ("OK", "gb") if r.passed() else ("edgeproxy did not do what it should", "rb")])
    return out

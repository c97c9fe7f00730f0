"""Validation context: ``ConfigError`` and the ``_Ctx`` that collects every problem found.

The section readers (``listeners``, ``lines``, ``upstreams``, ``load``) report through a
``_Ctx`` and carry on with a fallback, so one run lists all errors, in document order.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from .units import _fmt_size, _tname, parse_duration, parse_size


class ConfigError(ValueError):
    """All problems found in one config, each 'key.path: message (how to fix)'."""

    errors: tuple[str, ...]
    source: str | None

    def __init__(self, errors: Iterable[str], source: str | None = None) -> None:
        self.errors = tuple(errors)
        self.source = source
        super().__init__("\n".join(self.errors))


class _Bad:
    """Stands in for a value whose error is already recorded (e.g. a missing env var)."""


_BAD: Final = _Bad()
_INT_RE = re.compile(r"[+-]?[0-9]+")
_ON: Final = frozenset({"on", "true", "yes"})
_OFF: Final = frozenset({"off", "false", "no"})


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _str_list(v: object) -> list[tuple[int | None, object]]:
    """A list or a lone scalar as (index or None, item) pairs, for keys/tokens."""
    if isinstance(v, list):
        return list(enumerate(v))
    return [(None, v)]


class _Ctx:
    """Collects errors while the sections are read; helpers return a fallback on error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[tuple[str, str]] = []
        self.order: dict[str, int] = {}  # path -> position in the document, to sort errors
        self.interpolated: set[str] = set()  # paths whose string came (partly) from ${...}

    def err(self, path: str, msg: str) -> None:
        self.errors.append((path, msg))

    def messages(self) -> list[str]:
        """The errors in document order (interpolation and cross-checks report out of order)."""

        def position(path: str) -> int:
            while path not in self.order and path:
                path = path[: max(path.rfind("."), path.rfind("["), 0)]
            return self.order.get(path, len(self.order)) if path else len(self.order)

        ordered = sorted(self.errors, key=lambda e: position(e[0]))
        return [f"{path or '(top level)'}: {msg}" for path, msg in ordered]

    def section(self, raw: object, path: str, allowed: Sequence[str]) -> dict[str, object]:
        """Check a mapping's keys against ``allowed``; null -> {}; wrong type -> {} + error."""
        if raw is None or raw is _BAD:
            return {}
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping with keys {', '.join(allowed)}, got {_tname(raw)}")
            return {}
        out: dict[str, object] = {}
        for key, value in raw.items():
            if key in allowed:
                out[key] = value
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            self.err(_join(path, key), f"unknown key ({hint})")
        return out

    def string(self, v: object, path: str, what: str = "a string") -> str | None:
        if v is _BAD:
            return None
        if not isinstance(v, str):
            self.err(path, f"expected {what}, got {_tname(v)}")
            return None
        return v

    def int_(self, m: Mapping[str, object], key: str, path: str, default: int, lo: int, hi: int | None = None) -> int:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        if isinstance(v, str) and p in self.interpolated and _INT_RE.fullmatch(v.strip()):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(p, f"expected an integer, got {_tname(v)}")
            return default
        if v < lo or (hi is not None and v > hi):
            self.err(p, f"{v} is out of range (allowed: {lo}..{hi})" if hi is not None else f"must be >= {lo}, got {v}")
            return default
        return v

    def duration(self, m: Mapping[str, object], key: str, path: str, default: float, *, zero_ok: bool = False) -> float:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        try:
            seconds = parse_duration(v)
        except ValueError as e:
            self.err(p, str(e))
            return default
        if seconds == 0 and not zero_ok:
            self.err(p, "must be greater than 0")
            return default
        return seconds

    def size(self, m: Mapping[str, object], key: str, path: str, default: int, minimum: int) -> int:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        try:
            n = parse_size(v)
        except ValueError as e:
            self.err(p, str(e))
            return default
        if n < minimum:
            self.err(p, f"{_fmt_size(n)} is too small (at least {_fmt_size(minimum)})")
            return default
        return n

    def switch(self, m: Mapping[str, object], key: str, path: str, default: bool) -> bool:
        """An on/off key: YAML booleans (a bare on, off, true, false, yes, no) or those words
        as strings (from ${ENV}, or quoted)."""
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        if isinstance(v, bool):
            return v
        text = v.strip().lower() if isinstance(v, str) else None
        if text in _ON:
            return True
        if text in _OFF:
            return False
        self.err(p, f"expected on or off, got {v!r}" if isinstance(v, str) else f"expected on or off, got {_tname(v)}")
        return default

    def choice(self, m: Mapping[str, object], key: str, path: str, default: str, choices: Sequence[str]) -> str:
        v, p = m.get(key), _join(path, key)
        if v is None or v is _BAD:
            return default
        if v is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            return "off"
        text = self.string(v, p, "one of " + ", ".join(choices))
        if text is None:
            return default
        text = text.strip().lower()
        if text not in choices:
            self.err(p, f"{v!r} is not one of {', '.join(choices)}")
            return default
        return text

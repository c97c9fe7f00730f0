"""Units: durations ('250ms', '1m30s') and sizes ('64KiB', '10KB') in config values.

``parse_duration`` / ``parse_size`` turn a YAML value into seconds / bytes or raise ``ValueError``
with a message fit for a config error; ``_fmt_size`` and ``_tname`` word those messages.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Final

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|µs|ms|s|m|h)\s*")
_DURATION_UNITS: Final = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "use seconds as a number, or e.g. 100us, 250ms, 1.5s, 2m, 1h, 1m30s"
# Lower-case suffix -> bytes. A bare k/m/g is 1024-based, like most tools' "1M".
_SIZE_UNITS: Final = {
    **{"": 1, "b": 1},
    **{"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20},
    **{"g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40},
    **{"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)")
_SIZE_HINT = "use bytes as an integer, or e.g. 512, 64KiB, 32MiB, 1GiB, 10KB"


def _tname(v: object) -> str:
    """The YAML-ish name of a value's type, for 'expected X, got Y' messages."""
    if v is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping"})
    return names.get(type(v), type(v).__name__)


def parse_duration(v: object) -> float:
    """Seconds from a number of seconds or a string such as '250ms', '1.5s', '1m30s'."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a duration, got {_tname(v)} ({_DURATION_HINT})")
    if isinstance(v, str):
        text = v.strip().lower()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            parts = _DURATION_PART.findall(text)
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        else:
            raise ValueError(f"invalid duration {v!r} ({_DURATION_HINT})")
    else:
        seconds = float(v)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {v!r}: must be a finite, non-negative time")
    return seconds


def parse_size(v: object) -> int:
    """Bytes from an integer or a string such as '64KiB' (1024-based) or '10KB' (1000-based)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a size, got {_tname(v)} ({_SIZE_HINT})")
    if isinstance(v, float):
        if not v.is_integer() or v < 0:
            raise ValueError(f"invalid size {v!r}: a size is a whole, non-negative number of bytes")
        return int(v)
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"invalid size {v}: must not be negative")
        return v
    m = _SIZE_RE.fullmatch(v.strip().lower())
    if m is None or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"invalid size {v!r} ({_SIZE_HINT})")
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _fmt_size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n} bytes"

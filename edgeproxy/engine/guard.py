"""The browser guard: web pages must not drive a listener (DNS rebinding, cross-site requests).

Any web page a user opens can make the browser send requests to 127.0.0.1, and through DNS
rebinding (a name of the attacker's that first points to the attacker's server, then to
127.0.0.1) even read the answers. A loopback listener needs no token, so the browser is the
one client we must recognise; Jupyter and Ollama do the same. Part of the accept phase,
before routing, on client and admin listeners:

- **Host** (loopback TCP listeners only): a rebinding page still sends its own name as Host.
  Allowed: localhost and ``*.localhost``, loopback addresses, the listener's own host, and
  the listener's ``hosts``; any port. Listeners other hosts can reach answer to many names
  and have tokens; unix sockets are out of browsers' reach: neither checks Host.
- **Origin** (every listener): browsers send it on cross-origin requests and on every POST;
  SDKs, curl and server-side clients never do. A page's Origin must be in ``origins``.
- **Sec-Fetch-Site: cross-site** (every listener): what a browser says of a request a page
  of another site made (the GETs that carry no Origin). Refused unless the Origin is allowed.

Requests in absolute form are hops from another edgeproxy's `via` line (browsers never send
that form); they are judged by their token, and the sidecar judged its own client.

A plain request costs one Host lookup in a set and two header lookups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from multidict import istr  # (aiohttp's own: the header names, case-folded once)

from ..config.hosts import _ip_or_none, _is_loopback_host

if TYPE_CHECKING:
    from ..config import ListenerConfig

__all__ = ["BrowserGuard"]

_LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "[::1]")
_HOST: Final = istr("Host")
_ORIGIN: Final = istr("Origin")
_SEC_FETCH_SITE: Final = istr("Sec-Fetch-Site")
_HOW: Final = "to allow a browser app on purpose, add its origin to the listener's `origins` (docs/config.md)"


def _shown(value: str) -> str:
    return repr(value[:100])


class BrowserGuard:
    """One listener's rules for browser requests (see the module docstring)."""

    __slots__ = ("_any_origin", "_exact", "_names", "_origins", "_suffixes", "_where")

    def __init__(self, lc: ListenerConfig) -> None:
        self._where = lc.address
        self._any_origin = "*" in lc.origins
        self._origins = frozenset(lc.origins)
        self._exact: frozenset[str] | None = None  # None: Host is not checked
        self._names: frozenset[str] = frozenset()
        self._suffixes: tuple[str, ...] = ()
        if lc.unix is None and lc.is_loopback() and "*" not in lc.hosts:
            names = {"localhost", *(h for h in lc.hosts if not h.startswith("*."))}
            if lc.host is not None:
                names.add(lc.host)
            self._names = frozenset(names)
            self._suffixes = (".localhost", *(h[1:] for h in lc.hosts if h.startswith("*.")))
            # The Host values seen on almost every request, for one set lookup.
            shown = {_bracketed(n) for n in (*names, *_LOOPBACK_NAMES)}
            self._exact = frozenset(shown | {f"{h}:{lc.port}" for h in shown})

    @classmethod
    def for_listener(cls, lc: ListenerConfig) -> BrowserGuard | None:
        """The guard for ``lc``; None when it would let everything through (costs nothing)."""
        guard = cls(lc)
        return None if guard._exact is None and guard._any_origin else guard

    def refusal(self, target: str, headers: Mapping[str, str]) -> str | None:
        """Why a request for ``target`` with these headers must be refused, or None."""
        if target[:1] != "/":
            return None  # absolute form: a hop (see the module docstring)
        if self._exact is not None:
            host = headers.get(_HOST)
            if host is not None and host not in self._exact and not self._host_ok(host):
                return (
                    f"Host {_shown(host)} is not a name of the loopback listener {self._where} (a web page"
                    " using DNS rebinding looks like this); if you reach edgeproxy by that name, add it to"
                    " the listener's `hosts` (docs/config.md)"
                )
        origin = headers.get(_ORIGIN)
        if origin is not None:
            if self._any_origin or origin in self._origins or origin.lower() in self._origins:
                return None
            return f"browser pages from {_shown(origin)} may not call {self._where}; {_HOW}"
        if not self._any_origin:
            site = headers.get(_SEC_FETCH_SITE)
            if site is not None and site.lower() == "cross-site":
                return f"cross-site browser requests may not call {self._where}; {_HOW}"
        return None

    def _host_ok(self, host: str) -> bool:
        """The slow path: a Host not in the exact set (another port, a case, a subdomain)."""
        name = host.strip().lower()
        if name.startswith("["):
            end = name.find("]")
            rest = name[end + 1 :] if end > 0 else "?"
            if rest and not (rest[0] == ":" and rest[1:].isdigit()):
                return False
            name = name[1:end]
        else:
            bare, sep, port = name.rpartition(":")
            if sep:
                if not port.isdigit() or ":" in bare:
                    return False
                name = bare
            name = name.rstrip(".")
        if not name:
            return False
        if name in self._names or name.endswith(self._suffixes):
            return True
        return _ip_or_none(name) is not None and _is_loopback_host(name)


def _bracketed(name: str) -> str:
    """A name as a Host header carries it (IPv6 addresses in brackets)."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name

"""Listener auth: the bearer tokens a listener requires, and the throttle on wrong ones.

Part of the engine's accept phase: every request on a listener with tokens must present one
(``x-edgeproxy-token``, or the provider's own credential header where every endpoint of the
upstream injects its keys). Route filters (the edge role) use the same tokens.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ..config import TokenClass
from ..proto.hop import TOKEN_HEADER
from ..proto.providers import client_credential, token_index

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["AuthThrottle", "ListenerAuth", "peer_key"]

# SDKs differ in which header carries the key (the Anthropic SDK sends Authorization: Bearer as
# well as x-api-key): any of them may carry our token where it will be replaced by a key.
_CREDENTIALS: Final = ("authorization", "x-api-key", "x-goog-api-key")


# Who a client is on a listener without tokens, or with a token written as a bare string.
ANYONE: Final = TokenClass()


class ListenerAuth:
    """One listener's tokens (none: an open listener), their classes, and the throttle on
    guessing."""

    __slots__ = ("classes", "throttle", "tokens")

    def __init__(
        self, tokens: Sequence[str], throttle: AuthThrottle | None = None, classes: Sequence[TokenClass] = ()
    ) -> None:
        self.tokens = [t.encode() for t in tokens]
        self.classes = tuple(classes) or (ANYONE,) * len(self.tokens)
        self.throttle = throttle or AuthThrottle()

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def identify(self, token: str | None) -> TokenClass | None:
        """The class of ``token`` if it is one of ours, else None."""
        i = token_index(token, self.tokens)
        return self.classes[i] if i >= 0 else None

    def identify_request(self, request: web.BaseRequest, credential_replaced: bool) -> TokenClass | None:
        """The class of the token ``request`` presents, or None if it presents none of ours.
        ``credential_replaced``: the upstream injects its own keys, so the client's credential
        header is free to carry our token."""
        headers = request.headers
        token = headers.get(TOKEN_HEADER)
        if token is None and credential_replaced:
            for name in _CREDENTIALS:
                cred = headers.get(name)
                if cred is not None:
                    token = client_credential(cred)
                    break
        return self.identify(token)


def peer_key(peer: str | None) -> str:
    """Who is guessing: an IPv4 address, or an IPv6 /64 (one host usually has a whole /64)."""
    if not peer:
        return "local"
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


class AuthThrottle:
    """Slows down guessing: after FREE wrong tokens from one address within WINDOW seconds,
    each further refusal is delayed (doubling, up to MAX_DELAY) and its connection closed.
    The delays hold per address, not per connection: refusals to one address go out one
    after another, each its delay after the one before, so guessing over many connections
    at once gains nothing (a refusal waits MAX_WAIT at most). Right tokens are never delayed.
    Memory is bounded (oldest addresses forgotten first)."""

    FREE: Final = 5
    WINDOW: Final = 60.0
    FIRST_DELAY: Final = 0.1
    MAX_DELAY: Final = 5.0
    MAX_WAIT: Final = 30.0  # a refusal queued behind others: the longest a connection is held
    MAX_PEERS: Final = 10_000
    MAX_COUNT: Final = 64  # far past MAX_DELAY; keeps the arithmetic small

    __slots__ = ("_fails",)

    def __init__(self) -> None:
        # address -> (wrong tokens in the window, time of the last, when its last refusal goes out)
        self._fails: dict[str, tuple[int, float, float]] = {}

    def on_failure(self, peer: str | None) -> float:
        """Record a wrong token from ``peer``; the delay its answer should wait (seconds)."""
        key = peer_key(peer)
        now = time.monotonic()
        count, last, out_at = self._fails.pop(key, (0, now, now))
        if now - last > self.WINDOW:
            count = 0
        count = min(count + 1, self.MAX_COUNT)
        delay = 0.0
        if count > self.FREE:
            step = min(self.MAX_DELAY, self.FIRST_DELAY * 2 ** (count - self.FREE - 1))
            out_at = min(max(now, out_at) + step, now + self.MAX_WAIT)
            delay = out_at - now
        self._fails[key] = (count, now, out_at)  # re-inserted: the dict stays in last-seen order
        if len(self._fails) > self.MAX_PEERS:
            del self._fails[next(iter(self._fails))]
        return float(delay)

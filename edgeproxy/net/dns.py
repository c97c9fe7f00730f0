"""Cached DNS resolution (aiodns) for the upstream pools.

A lookup costs a round trip to the resolver; a proxy that pays it per connection adds that to
every cold request. Answers are cached for their TTL (clamped to [MIN_TTL, MAX_TTL]) and a
stale answer is served when a refresh fails, so a flaky resolver does not take an origin down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Final

import aiodns

__all__ = ["Address", "Resolver"]

# A TTL of 0 (common for /etc/hosts answers) would mean a lookup per connection.
MIN_TTL: Final = 5.0
# Cap long TTLs so a moved origin is followed within minutes.
MAX_TTL: Final = 300.0

Address = tuple[int, str]  # (family, ip)


class Resolver:
    """Resolves host names to addresses, caching answers; IP literals skip the resolver."""

    __slots__ = ("_cache", "_inflight", "_resolver")

    def __init__(self) -> None:
        self._resolver: aiodns.DNSResolver | None = None
        self._cache: dict[str, tuple[float, list[Address]]] = {}
        self._inflight: dict[str, asyncio.Future[list[Address]]] = {}

    async def resolve(self, host: str) -> list[Address]:
        """Addresses for ``host``, IPv4 first (most API origins answer best there)."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        hit = self._cache.get(host)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(host)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[list[Address]] = asyncio.get_running_loop().create_future()
        self._inflight[host] = fut
        try:
            addrs, ttl = await self._lookup(host)
            self._cache[host] = (now + min(max(ttl, MIN_TTL), MAX_TTL), addrs)
            fut.set_result(addrs)
            return addrs
        except Exception as exc:
            if hit is not None:  # serve stale rather than fail
                fut.set_result(hit[1])
                return hit[1]
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[host]

    async def _lookup(self, host: str) -> tuple[list[Address], float]:
        if self._resolver is None:
            self._resolver = aiodns.DNSResolver()
        try:
            res = await self._resolver.getaddrinfo(host, type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as exc:
            raise OSError(f"cannot resolve {host}: {exc.args[-1] if exc.args else exc}") from None
        seen: dict[Address, int] = {}
        ttl = MAX_TTL
        for node in res.nodes:
            ip = node.addr[0].decode() if isinstance(node.addr[0], bytes) else str(node.addr[0])
            seen.setdefault((int(node.family), ip), 0)
            ttl = min(ttl, float(node.ttl))
        addrs = sorted(seen, key=lambda a: a[0] != socket.AF_INET)
        if not addrs:
            raise OSError(f"cannot resolve {host}: no addresses")
        return addrs, ttl

    def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None


def _literal(host: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))

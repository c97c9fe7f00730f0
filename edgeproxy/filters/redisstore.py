"""Cached answers in Redis (``RedisStore``): shared by every edgeproxy process and host that
names the same server, so an answer cached by one is a hit for all.

Each entry is one Redis string under ``edgeproxy:cache:<key, hex>`` holding ``encode(entry)``,
written with SET PX, so Redis expires it (and evicts it under its own ``maxmemory-policy``).
A value that does not decode (another program's, a torn write) is a miss.

Redis must never make a client wait: every call is bounded by ``timeout`` (50 ms by default:
connecting, waiting for a pooled connection, the command itself). A write (no client waits for
it: it runs after the answer) gets ``timeout`` plus the time to send its value at ``PUT_RATE``,
so a large answer is stored over a slower link instead of timing out and starting a back-off. Any failure (a timeout, a
refused or reset connection, a protocol error) is a miss or a dropped write, counted in
``errors``, and starts a back-off (0.5 s doubling to 10 s, jittered, reset on the first
success): while it lasts ``available`` is False, ``get`` returns None and ``put`` returns at
once, without touching the network. When it ends, one call tries Redis again (the others keep
bypassing it until that call has succeeded or failed). redis-py's own retries are off: this
back-off is the only one. An error Redis answers with (WRONGTYPE on a key another program
wrote, OOM, READONLY) is counted in ``errors`` too, but starts no back-off: it came at once, and
Redis is there.

``entries``, ``stored_bytes`` and ``evictions`` stay 0: they are Redis's to tell (INFO keyspace,
``used_memory``, ``evicted_keys``), not this process's; the store counts only ``errors``.

redis is an optional extra (``pip install 'edgeproxy[redis]'``): it is imported when a
RedisStore is made, not when this module is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any, Final

from ..config.redact import _redact_url
from .cachestore import Entry, decode, encode

__all__ = ["RedisStore"]

log = logging.getLogger("edgeproxy")

PREFIX: Final = b"edgeproxy:cache:"
MAX_CONNECTIONS: Final = 32
# Bytes per second a write's budget assumes beyond ``timeout`` (8 MiB: +0.34 s).
PUT_RATE: Final = 25e6
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 10.0
MISSING: Final = "the redis cache store needs: pip install 'edgeproxy[redis]'"


def redacted(url: str) -> str:
    """The URL as it may be shown: no user or password, no ``password=`` in its query."""
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", _redact_url(url))


class RedisStore:
    """The ``Store`` over one Redis server (a ``redis://``, ``rediss://`` or ``unix://`` URL)."""

    __slots__ = (
        "_answered",
        "_fails",
        "_pool",
        "_trying",
        "_until",
        "stored_bytes",
        "entries",
        "errors",
        "evictions",
        "name",
        "shown",
        "timeout",
    )

    def __init__(self, url: str, timeout: float = 0.05) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ResponseError
        except ImportError:
            raise RuntimeError(MISSING) from None
        self.name = "redis"
        self.timeout = timeout
        self.shown = redacted(url)
        self.entries = self.stored_bytes = self.evictions = self.errors = 0
        self._fails = 0  # failures since the last success: the back-off's exponent
        self._until = 0.0  # monotonic time the back-off ends
        self._trying = False  # a call is trying Redis again after a back-off
        self._answered: type[Exception] = ResponseError  # an error reply: Redis is there
        try:
            self._pool: Any = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=timeout,  # waiting for a pooled connection
                socket_connect_timeout=timeout,  # (and closing a connection)
                # No socket_timeout: every call runs inside asyncio.timeout(self.timeout), which
                # bounds the command too; redis-py's would add a timeout per read and a Task
                # per write (asyncio.wait_for) to every call: ~20 us of a hit's CPU.
                socket_timeout=None,
                retry=Retry(NoBackoff(), 0),
                # RESP2: GET and SET answer the same in both, and redis-py >= 8 defaults to RESP3
                # with maintenance notifications "auto", which turns off its pool's check of an idle
                # connection taken from the pool (closed by a restarted Redis, or data pending):
                # the first calls after a restart would fail on connections to the old server.
                # (RESP2 also saves HELLO and CLIENT MAINT_NOTIFICATIONS, a round trip each, per
                # new connection.) A ?protocol=3 in the URL would win over this.
                protocol=2,
            )
        except ValueError as e:  # redis-py's messages name the scheme, not the URL
            raise ValueError(f"redis cache store {self.shown}: {e}") from None

    @property
    def available(self) -> bool:
        """False while backing off (calls do not touch the network): the cache reports ``bypass``."""
        return not self._trying and time.monotonic() >= self._until

    async def get(self, key: bytes) -> Entry | None:
        trying = self._begin()
        if trying is None:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                data = await self._command(b"GET", PREFIX + key.hex().encode())
        except Exception as e:  # anything from redis-py or the socket; CancelledError goes up
            self._failed(e)
            return None
        finally:
            if trying:
                self._trying = False
        self._succeeded(trying)
        return decode(data) if isinstance(data, bytes) else None

    async def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        ms = int(ttl * 1000)
        if ms <= 0:  # already stale (and Redis refuses PX 0)
            return
        trying = self._begin()
        if trying is None:
            return
        value = encode(entry)
        try:
            async with asyncio.timeout(self.timeout + len(value) / PUT_RATE):
                await self._command(b"SET", PREFIX + key.hex().encode(), value, b"PX", ms)
        except Exception as e:
            self._failed(e)
            return
        finally:
            if trying:
                self._trying = False
        self._succeeded(trying)

    async def _command(self, *args: bytes | int) -> Any:
        """One command on a pooled connection, its reply as Redis sent it (bytes, None, b"OK"):
        what ``Redis.execute_command`` does, less what it adds per call that this store does not
        use (its retry wrapper, with retries off; per-command observability): ~15 us of a hit's
        CPU. A connection that failed is never reused with a reply pending: redis-py's
        send_packed_command and read_response close it on any exception, the cancellation by
        asyncio.timeout too. An error reply (WRONGTYPE, OOM) is raised as ResponseError."""
        pool = self._pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
            return await conn.read_response(disable_decoding=True)
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        try:
            await self._pool.disconnect()
        except Exception as e:  # closing a pool whose server is gone
            log.debug("redis cache store %s: closing: %r", self.shown, e)

    def _begin(self) -> bool | None:
        """None: bypass Redis (backing off, or another call is trying it again); else whether
        this call is the one trying it again after a back-off."""
        if self._trying or time.monotonic() < self._until:
            return None
        if self._fails:
            self._trying = True
            return True
        return False

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        if isinstance(e, self._answered):
            log.debug("redis cache store %s: %s", self.shown, _why(e))
            self._succeeded(True)
            return
        if time.monotonic() < self._until:
            return  # a call begun before the back-off did: it is already counted in the back-off
        self._fails += 1
        base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._fails - 1))
        wait = base * random.uniform(0.75, 1.0)
        self._until = time.monotonic() + wait
        if self._fails == 1:
            log.warning("redis cache store %s failed (%s); bypassing it for %.1f s", self.shown, _why(e), wait)
        else:
            log.debug("redis cache store %s still failing (%s); bypassing it for %.1f s", self.shown, _why(e), wait)

    def _succeeded(self, trying: bool | None) -> None:
        if self._fails and not trying and time.monotonic() < self._until:
            return  # a call begun before the back-off: the retry after it says whether Redis is back
        if self._fails:
            log.warning("redis cache store %s is back", self.shown)
        self._fails = 0
        self._until = 0.0


def _why(e: BaseException) -> str:
    """A short reason for a log line: the error's type, and its message if it has one (redis-py's
    name host and port, never the password)."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

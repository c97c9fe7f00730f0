"""Keep-alive connection pool of one path (one endpoint over one line).

Decisions are made in synchronous methods (``_take_idle``, ``release``, ``_wanted_warm``) and
only then is I/O awaited, so no decision is half-made across an ``await`` (httpcore's rule).
Idle connections are handed out last-in first-out: the most recently used is the most likely
to still be alive, and the rest age out after ``keepalive`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from ..proto.errors import ConnectError, ConnectTimeout, PoolExhausted
from .client import Conn

if TYPE_CHECKING:
    from ..config import PoolConfig

__all__ = ["Connector", "Pool"]

# Opens a connection for the pool: (protocol factory, timeout) -> the connected protocol and
# the time it took to reach the origin (an RTT sample for the estimator).
# (factory, timeout, reach timeout: for the TCP part alone, or None) -> (conn, reach seconds)
Connector = Callable[[Callable[[], Conn], float, float | None], Awaitable[tuple[Conn, float]]]

# How often idle connections are checked for expiry and the warm set topped up.
MAINTAIN_INTERVAL: Final = 1.0
# Warming a path whose connections fail (a broken proxy, a dead origin) backs off, doubling
# from MAINTAIN_INTERVAL up to this, with jitter; any connection that opens resets it.
WARM_BACKOFF_MAX: Final = 30.0


class Pool:
    """Connections of one path. ``acquire`` gives a connection, ``release`` takes it back."""

    __slots__ = (
        "_active",
        "_closed",
        "_warm_backoff",
        "_warm_next",
        "_connecting",
        "_connector",
        "_idle",
        "_maintainer",
        "_tasks",
        "_waiters",
        "connect_errors",
        "connect_timeout",
        "connects",
        "floor",
        "keepalive",
        "label",
        "max_size",
        "on_connect",
        "on_connect_error",
        "warm",
    )

    def __init__(
        self,
        label: str,
        connector: Connector,
        *,
        max_size: int,
        keepalive: float,
        warm: int,
        connect_timeout: float,
    ) -> None:
        self.label = label
        self._connector = connector
        self.max_size = max_size
        self.keepalive = keepalive
        self.warm = warm
        # Set by the owner above ``warm`` while this path stands by for another one's traffic
        # (it gets that traffic at once if the other's line dies): kept open, ready.
        self.floor = 0
        self.connect_timeout = connect_timeout
        self._idle: list[Conn] = []
        self._active: set[Conn] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[Conn]] = collections.deque()
        self._closed = False
        self._maintainer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warm_backoff = 0.0  # seconds; 0 while warming works
        self._warm_next = 0.0  # monotonic: no warming attempt before this
        # Hooks for the estimator and health (set by the owner): set-up time, and failures.
        self.on_connect: Callable[[float], None] | None = None
        self.on_connect_error: Callable[[BaseException], None] | None = None
        self.connects = 0
        self.connect_errors = 0

    def __repr__(self) -> str:
        return (
            f"<Pool {self.label} [active {len(self._active)} | idle {len(self._idle)}"
            f" | connecting {self._connecting} | waiting {len(self._waiters)}]>"
        )

    def reconfigure(self, config: PoolConfig) -> None:
        """A reload changed pool settings: apply them in place (connections stay)."""
        self.max_size, self.keepalive = config.max_per_path, config.keepalive
        self.warm, self.connect_timeout = config.warm, config.connect_timeout

    # -- questions -------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def is_full(self) -> bool:
        return len(self._active) + len(self._idle) + self._connecting >= self.max_size

    # -- use -------------------------------------------------------------------------------
    async def acquire(
        self, *, fresh: bool = False, timeout: float | None = None, probe: bool = False, reach: float | None = None
    ) -> tuple[Conn, bool]:
        """A connection for one request, and whether it was reused from the idle set.

        ``timeout`` bounds setting up a new connection (default: the pool's connect_timeout);
        ``reach`` its TCP part alone (a probe asking "does the line answer at all?").
        A ``probe`` never queues behind a full pool (it opens one connection past the limit):
        a pool busy with long completions is not a dead line.
        """
        timeout = self.connect_timeout if timeout is None else timeout
        if self._closed:
            raise ConnectError(f"{self.label}: pool is closed")
        if not fresh:
            conn = self._take_idle()
            if conn is not None:
                self._active.add(conn)
                return conn, True
        if self.is_full() and not probe:
            if fresh and self._idle:
                self._idle.pop(0).close()  # make room: oldest idle goes
            else:
                fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                try:
                    conn = await asyncio.wait_for(fut, self.connect_timeout)  # a busy pool: not the line's fault
                except asyncio.CancelledError:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        self.release(fut.result())  # handed over as we were cancelled
                    raise
                except TimeoutError:
                    raise PoolExhausted(
                        f"{self.label}: all {self.max_size} connections busy for {self.connect_timeout:g}s"
                    ) from None
                self._active.add(conn)
                return conn, True
        conn = await self._open(timeout, reach)
        self._active.add(conn)
        return conn, False

    def _take_idle(self) -> Conn | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.has_expired(now, self.keepalive) and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
            conn.close()
        return None

    async def _open(self, timeout: float | None = None, reach_timeout: float | None = None) -> Conn:
        timeout = self.connect_timeout if timeout is None else timeout
        self._connecting += 1
        try:
            conn, reach = await self._connector(lambda: Conn(self), timeout, reach_timeout)
        except (ConnectError, asyncio.CancelledError):
            self.connect_errors += 1
            raise
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self.connect_errors += 1
            if self.on_connect_error is not None:
                self.on_connect_error(exc)
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectTimeout(f"{self.label}: connect timed out after {timeout:.3g}s") from None
            raise ConnectError(f"{self.label}: {_describe(exc)}") from None
        finally:
            self._connecting -= 1
        self.connects += 1
        self._warm_backoff = self._warm_next = 0.0  # the path works again: warm it as usual
        if self.on_connect is not None:
            self.on_connect(reach)
        return conn

    def release(self, conn: Conn) -> None:
        """Take a connection back (closed ones are just forgotten); serve a waiter first."""
        self._active.discard(conn)
        if conn.closed or self._closed:
            conn.close()  # after close(): an active connection coming home is shut, not kept
            self._kick_waiter()
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._active.add(conn)  # handed over: counts as in use from now on
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _kick_waiter(self) -> None:
        # A slot freed up: open a new connection for the first waiter, if any.
        while self._waiters and not self._closed:
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self._spawn(self._open_for(fut))
            return

    async def _open_for(self, fut: asyncio.Future[Conn]) -> None:
        try:
            conn = await self._open()
        except Exception as exc:  # the waiter raises it
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():
            self.release(conn)
        else:
            fut.set_result(conn)

    def on_conn_lost(self, conn: Conn) -> None:
        # Only an idle connection's loss frees a slot here; an active one frees its slot
        # when its response is released (kicking a waiter twice would exceed max_size).
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._kick_waiter()

    # -- warmth ----------------------------------------------------------------------------
    def start(self) -> None:
        """Open the warm connections now and keep them topped up."""
        if self._maintainer is None and not self._closed:
            self._maintainer = asyncio.get_running_loop().create_task(
                self._maintain(), name=f"pool-maintain {self.label}"
            )

    def _wanted_warm(self) -> int:
        now = time.monotonic()
        keep: list[Conn] = []
        for conn in self._idle:
            if conn.has_expired(now, self.keepalive):
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep
        have = len(self._idle) + self._connecting
        busy = len(self._active)
        # ``warm`` idle ones; ``floor`` in all (once the traffic it stands by for is here,
        # its requests hold them: no new ones are opened in the middle of a failover)
        return max(0, min(max(self.warm - have, self.floor - have - busy), self.max_size - have - busy))

    def prewarm(self, n: int) -> int:
        """Have ``n`` connections ready (idle or opening) now: traffic is about to move here
        and its requests should not each pay a handshake. How many were started."""
        if self._closed:
            return 0
        ready = len(self._idle) + self._connecting
        n = max(0, min(n - ready, self.max_size - ready - len(self._active)))
        self._warm(n)
        return n

    def stand_by(self, n: int) -> None:
        """Keep ``n`` connections open from now on (idle, or busy with requests), opening the
        missing ones now: this path takes another's traffic at once if that one's line dies."""
        self.floor = n
        if not self._closed:
            self._top_up()

    def _top_up(self) -> None:
        """Open what ``warm`` and ``floor`` want (expired idle ones go), unless warming is
        backed off (a path that refuses new connections)."""
        wanted = self._wanted_warm()
        if wanted and time.monotonic() >= self._warm_next:
            self._warm(wanted)

    def _warm(self, n: int) -> None:
        for _ in range(n):
            self._spawn(self._warm_one())

    async def _maintain(self) -> None:
        while not self._closed:
            self._top_up()
            await asyncio.sleep(MAINTAIN_INTERVAL)

    async def _warm_one(self) -> None:
        try:
            conn = await self._open()
        except Exception:
            # Counted in _open. Try again later, later each time: a broken proxy or origin is
            # not hammered once a second, and many paths do not retry in step.
            self._warm_backoff = min(max(MAINTAIN_INTERVAL, 2 * self._warm_backoff), WARM_BACKOFF_MAX)
            self._warm_next = time.monotonic() + self._warm_backoff * (0.5 + random.random())
            return
        self.release(conn)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close idle connections now; active ones close when their response is released."""
        self._closed = True
        if self._maintainer is not None:
            self._maintainer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectError(f"{self.label}: pool closed"))
        self._waiters.clear()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text

"""A TCP line simulator: a relay that adds delay or breaks the line between a client and a target.

It sits between edgeproxy and an origin (or a proxy)::

    sim = LineSim("127.0.0.1", origin.port, delay=0.02)
    await sim.start()                 # sim.port / sim.address
    ... point edgeproxy at sim.address ...
    sim.delay = 0.05                  # applies to new data at once, also on open connections
    sim.set_mode("blackhole")         # "pass" | "blackhole" | "reset" | "refuse"
    await sim.stop()

It runs on the current event loop (``await start()`` / ``await stop()``, or ``async with``), in a
daemon thread with its own (uv)loop (``start_in_thread()`` / ``stop_thread()``, or ``with``), or as
a process::

    python -m tests.fakes.linesim --listen-port 9200 --target 127.0.0.1:9100 --delay 0.02

Knobs may be changed from any thread.  ``delay`` and ``delay_by_source`` are plain attributes read
per chunk; ``set_mode()`` (or assigning ``mode``) acts on the open connections and, when called from
another thread, returns once the change is applied.

Semantics:

* ``delay`` is one-way and applies in each direction (an echo round trip grows by ``2 * delay``),
  per chunk, from the moment the chunk is read: each chunk leaves at ``arrival + delay`` (never
  before an earlier chunk of the same direction, so data is never reordered, even if the delay is
  lowered).  Chunks are not serialised: one arriving 1 ms after another leaves 1 ms after it.
  EOF (half-close) and peer resets travel the line too, behind the data.
* ``delay_by_source`` adds an extra one-way delay (both directions) by the client's source IP, so
  connections from different ``127.0.0.x`` addresses see different RTTs through one simulator.
* Only data is delayed: the TCP handshake with the simulator completes at once (connect time does
  not grow by an RTT).
* ``"blackhole"``: nothing is forwarded either way and nothing is answered.  Open connections are
  frozen (reading stops, queued data is held) and resume intact when the mode goes back to
  ``"pass"``/``"refuse"``.  New connections complete the handshake but are never connected to the
  target; what they send is discarded and they stay open until the blackhole ends, when they are
  reset (like a line whose state was lost).
* ``"reset"``: open connections are reset at once (RST on both sides, SO_LINGER 0); new connections
  are accepted and reset immediately.
* ``"refuse"``: the listener is closed (connects get ECONNREFUSED, the port stays reserved by a bound,
  non-listening socket); open connections keep working.  Back to ``"pass"`` listens on the same port.
* If the target refuses or is unreachable the client connection is reset.
* Flow control: a direction stops reading its source while the destination's write buffer is above
  its high-water mark or more than ``buffer_limit`` bytes are held in its delay queue.

Counters: ``connections_total`` (accepted), ``connections_open`` (client connections open now),
``bytes_up`` / ``bytes_down`` (bytes actually written to the target / to the client).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from tests.fakes.threaded import Threaded, serve_forever

__all__ = ["MODES", "LineSim", "main"]

MODES = ("pass", "blackhole", "reset", "refuse")

_T = TypeVar("_T")
_LINGER0 = struct.pack("ii", 1, 0)

# markers queued behind the data of a direction (data items are bytes)
_EOF = "eof"  # the source half-closed: write_eof() the destination
_CLOSE = "close"  # the source went away cleanly: close the connection
_ABORT = "abort"  # the source was reset / failed: reset the connection


# release times are on this clock rather than loop.time(): uvloop's is in whole milliseconds
_clock = time.monotonic


def _nodelay(sock: Any) -> None:
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rst_transport(transport: asyncio.Transport) -> None:
    """Abort with SO_LINGER 0, so that the peer sees a RST."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    transport.abort()


# --------------------------------------------------------------------------- a relayed connection


class _Side(asyncio.Protocol):
    """One end of a relayed connection: the client's or the target's."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.out: _Pipe  # the direction this side feeds (set by _Conn)
        self.write_paused = False  # our transport's write buffer is above its high-water mark
        self.read_paused = False
        self.eof = False  # EOF received from this side
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        _nodelay(transport.get_extra_info("socket"))
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.conn.eof(self)
        return True  # keep the transport open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.update_reading(self.conn.other(self))

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.update_reading(self.conn.other(self))


class _Pipe:
    """One direction of a connection: a queue of (release_time, item), released by a timer."""

    def __init__(self, conn: _Conn, src: _Side, dst: _Side, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.q: collections.deque[tuple[float, bytes | str]] = collections.deque()
        self.queued = 0  # bytes held in q
        self.last = 0.0  # release time of the last item queued (no reordering)
        self.timer: asyncio.TimerHandle | None = None
        self.eof_done = False
        self.dead = False  # the destination is gone: drop everything

    def push(self, item: bytes | str) -> None:
        if self.dead:
            return
        now = _clock()
        rel = now + self.conn.one_way_delay()
        if rel < self.last:
            rel = self.last
        self.last = rel
        self.q.append((rel, item))
        if isinstance(item, bytes):
            self.queued += len(item)
        self.pump()

    def pump(self) -> None:
        """Deliver every item that is due; arm the timer for the next one."""
        conn = self.conn
        if self.dead or conn.finished:
            return
        q = self.q
        if q and not conn.frozen and self.dst.transport is not None:
            now = _clock()
            while q and q[0][0] <= now:
                _, item = q.popleft()
                self._deliver(item)
                if self.dead or conn.finished:
                    return
            if q and self.timer is None:
                # a timer that fires early (uvloop rounds to ms) just re-arms: nothing leaves before its time
                self.timer = conn.loop.call_later(q[0][0] - now, self._fire)
        conn.update_reading(self.src)

    def _fire(self) -> None:
        self.timer = None
        self.pump()

    def _deliver(self, item: bytes | str) -> None:
        conn = self.conn
        tr = self.dst.transport
        assert tr is not None
        if isinstance(item, bytes):
            self.queued -= len(item)
            if self.dst.lost or tr.is_closing():
                return
            if self.up:  # counted first, so that a peer that got the bytes never sees a stale counter
                conn.sim.bytes_up += len(item)
            else:
                conn.sim.bytes_down += len(item)
            tr.write(item)
        elif item == _EOF:
            self.eof_done = True
            if not (self.dst.lost or tr.is_closing()):
                if tr.can_write_eof():
                    tr.write_eof()
                else:
                    tr.close()
            conn.check_done()
        else:
            conn.shutdown(rst=item == _ABORT)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def kill(self) -> None:
        self.dead = True
        self.stop_timer()
        self.q.clear()
        self.queued = 0


class _Conn:
    def __init__(self, sim: LineSim) -> None:
        self.sim = sim
        loop = sim._loop
        assert loop is not None
        self.loop = loop
        self.client = _Side(self)
        self.target = _Side(self)
        self.up = _Pipe(self, self.client, self.target, True)
        self.down = _Pipe(self, self.target, self.client, False)
        self.client.out = self.up
        self.target.out = self.down
        self.src_ip = ""
        self.frozen = False  # blackholed while open: hold everything
        self.dead = False  # accepted in blackhole mode: never connected
        self.finished = False
        self.connect_task: asyncio.Task[Any] | None = None

    def other(self, side: _Side) -> _Side:
        return self.target if side is self.client else self.client

    def one_way_delay(self) -> float:
        sim = self.sim
        d = sim.delay
        by_source = sim.delay_by_source
        if by_source:
            d += by_source.get(self.src_ip, 0.0)
        return d if d > 0 else 0.0

    # ---- events from the sides

    def side_made(self, side: _Side) -> None:
        sim = self.sim
        if side is self.client:
            sim.connections_open += 1
            assert side.transport is not None
            peer = side.transport.get_extra_info("peername")
            self.src_ip = peer[0] if peer else ""
            sim._conns.add(self)
            mode = sim._mode
            if mode == "reset" or sim._loop is None:
                self.shutdown(rst=True)
            elif mode == "blackhole":
                self.dead = True
            else:
                self.connect_task = self.loop.create_task(self._connect())
        else:
            if self.finished:
                assert side.transport is not None
                _rst_transport(side.transport)
                return
            self.up.pump()
            self.update_reading(self.target)

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: self.target, self.sim.target_host, self.sim.target_port)
        except OSError:
            self.shutdown(rst=True)
        finally:
            self.connect_task = None

    def data(self, side: _Side, data: bytes) -> None:
        if self.dead or self.finished:
            return
        side.out.push(data)

    def eof(self, side: _Side) -> None:
        if self.dead or self.finished:
            return
        side.out.push(_EOF)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.client:
            self.sim.connections_open -= 1
        if self.finished:
            self._maybe_forget()
            return
        if self.dead or self.other(side).transport is None or self.other(side).lost:
            self.shutdown(rst=True)
            return
        # the line carries the close / reset to the other side, behind the data already in flight
        self.other(side).out.kill()
        side.out.push(_ABORT if exc is not None else _CLOSE)

    def check_done(self) -> None:
        if self.up.eof_done and self.down.eof_done:
            self.shutdown(rst=False)

    # ---- control

    def update_reading(self, side: _Side) -> None:
        tr = side.transport
        if tr is None or side.lost or side.eof or self.finished or self.dead:
            return
        pipe = side.out
        limit = self.sim.buffer_limit
        if self.frozen or pipe.dst.write_paused or pipe.queued > limit:
            if not side.read_paused:
                side.read_paused = True
                tr.pause_reading()
        elif side.read_paused and pipe.queued <= limit // 2:
            side.read_paused = False
            tr.resume_reading()

    def freeze(self) -> None:
        if self.frozen or self.dead or self.finished:
            return
        self.frozen = True
        self.up.stop_timer()
        self.down.stop_timer()
        self.update_reading(self.client)
        self.update_reading(self.target)

    def unfreeze(self) -> None:
        if not self.frozen:
            return
        self.frozen = False
        self.up.pump()
        self.down.pump()
        self.update_reading(self.client)
        self.update_reading(self.target)

    def shutdown(self, *, rst: bool) -> None:
        """Close both sides: gracefully (pending writes are flushed) or with a reset."""
        if self.finished:
            return
        self.finished = True
        self.up.kill()
        self.down.kill()
        if self.connect_task is not None:
            self.connect_task.cancel()
        for side in (self.client, self.target):
            tr = side.transport
            if tr is None or side.lost:
                continue
            if rst:
                _rst_transport(tr)
            else:
                tr.close()
        self._maybe_forget()

    def _maybe_forget(self) -> None:
        """Drop from the simulator's set once both transports are gone (stop() aborts those still closing)."""
        if all(side.transport is None or side.lost for side in (self.client, self.target)):
            self.sim._conns.discard(self)


# --------------------------------------------------------------------------- the simulator


class LineSim(Threaded):
    """TCP relay on ``host:port`` to ``target_host:target_port`` simulating a network line."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        # knobs
        self.delay: float = delay
        self.delay_by_source: dict[str, float] = {}
        self.buffer_limit: int = 4 * 1024 * 1024  # per direction, bytes held in the delay queue
        self._mode = "pass"
        # counters
        self.connections_total = 0
        self.connections_open = 0
        self.bytes_up = 0
        self.bytes_down = 0
        # state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self._lsock: socket.socket | None = None
        self._reserve: socket.socket | None = None  # bound, not listening (mode "refuse")
        self._conns: set[_Conn] = set()
        self._adopting: dict[asyncio.Task[None], tuple[socket.socket, _Conn]] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<LineSim {self.address} -> {self.target_host}:{self.target_port} mode={self._mode} delay={self.delay}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("LineSim already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        try:
            if self._mode == "refuse":
                self._reserve = self._bind()
                self.port = self._reserve.getsockname()[1]
            else:
                self._listen()
        except BaseException:
            self._loop = None
            raise

    async def stop(self) -> None:
        """Close the listener and every relayed connection."""
        if self._loop is None:
            return
        self._unlisten(reserve=False)
        for conn in list(self._conns):
            conn.shutdown(rst=False)
            self._conns.discard(conn)
            for side in (conn.client, conn.target):
                if side.transport is not None and not side.lost:
                    side.transport.abort()
        adopting, self._adopting = self._adopting, {}
        for task in adopting:
            task.cancel()
        if adopting:
            await asyncio.gather(*adopting, return_exceptions=True)
        for sock, conn in adopting.values():
            if conn.client.transport is None:
                sock.close()
        await asyncio.sleep(0)  # let the transports report connection_lost
        self._loop = None
        self._loop_thread_id = None

    # ------------------------------------------------------------------ knobs

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        """Switch mode; acts on the open connections (see the module docstring).  Thread-safe."""
        if mode not in MODES:
            raise ValueError(f"unknown LineSim mode {mode!r}; expected one of {MODES}")
        self._call(lambda: self._apply_mode(mode))

    def reset_counters(self) -> None:
        """Zero connections_total, bytes_up and bytes_down (connections_open is a gauge).  Thread-safe."""

        def reset() -> None:
            self.connections_total = 0
            self.bytes_up = 0
            self.bytes_down = 0

        self._call(reset)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """Poll ``predicate()`` every 5 ms (e.g. ``lambda: sim.connections_open == 0``); TimeoutError after timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"LineSim: condition not reached within {timeout}s")
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ internals

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the simulator's loop and wait for it (directly if already there or not running)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread_id or not loop.is_running():
            return fn()
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def _apply_mode(self, mode: str) -> None:
        self._mode = mode
        if self._loop is None:
            return  # applied by start()
        if mode == "refuse":
            self._unlisten(reserve=True)
        else:
            self._listen()
        for conn in list(self._conns):
            if mode == "reset":
                conn.shutdown(rst=True)
            elif mode == "blackhole":
                conn.freeze()
            elif conn.dead:
                conn.shutdown(rst=True)
            else:
                conn.unfreeze()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen(self) -> None:
        if self._lsock is not None:
            return
        assert self._loop is not None
        sock, self._reserve = self._reserve, None
        if sock is None:
            sock = self._bind()
        try:
            sock.listen(1024)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept)
        except BaseException:
            sock.close()
            raise
        self._lsock = sock
        self.port = sock.getsockname()[1]

    def _unlisten(self, *, reserve: bool) -> None:
        if self._lsock is not None and self._loop is not None:
            self._accept(limit=None)  # connections whose handshake completed are kept, not reset with the backlog
        sock, self._lsock = self._lsock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()  # connections still in the backlog get a RST
        if reserve:
            if self._reserve is None:
                with contextlib.suppress(OSError):  # best effort: keep the port from being taken meanwhile
                    self._reserve = self._bind()
        elif self._reserve is not None:
            self._reserve.close()
            self._reserve = None

    def _accept(self, limit: int | None = 128) -> None:
        lsock, loop = self._lsock, self._loop
        if lsock is None or loop is None:
            return
        n = 0
        while limit is None or n < limit:
            n += 1
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: back off a little
                loop.remove_reader(lsock.fileno())
                loop.call_later(0.1, self._resume_accepting, lsock)
                return
            self.connections_total += 1
            if self._mode == "reset":
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                sock.close()
                continue
            sock.setblocking(False)
            _nodelay(sock)
            conn = _Conn(self)
            task = loop.create_task(self._adopt(sock, conn))
            self._adopting[task] = (sock, conn)
            task.add_done_callback(self._adopted)

    def _resume_accepting(self, lsock: socket.socket) -> None:
        if self._lsock is lsock and self._loop is not None:
            self._loop.add_reader(lsock.fileno(), self._accept)

    async def _adopt(self, sock: socket.socket, conn: _Conn) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: conn.client, sock)
        except OSError:
            if conn.client.transport is None:
                sock.close()

    def _adopted(self, task: asyncio.Task[None]) -> None:
        self._adopting.pop(task, None)


# --------------------------------------------------------------------------- CLI


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.linesim", description="TCP line simulator")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--target", type=_host_port, required=True, metavar="HOST:PORT")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds, each direction")
    p.add_argument("--mode", choices=MODES, default="pass")
    args = p.parse_args(argv)

    sim = LineSim(args.target[0], args.target[1], host=args.listen_host, port=args.listen_port, delay=args.delay)
    sim.set_mode(args.mode)

    serve_forever(sim, lambda: f"linesim listening on {sim.address} -> {args.target[0]}:{args.target[1]}")


if __name__ == "__main__":
    main()

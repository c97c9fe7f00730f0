"""A border between two networks, in user space: a TCP relay with a link model.

Where ``LineSim`` adds a delay to each chunk, a ``Border`` is a *link* that several ports
(listener -> target) share, as the connections of one host share its way across a border::

    border = Border(rate=2e6, rtt=0.18)                   # 2 Mbit/s each way, 180 ms round trip
    direct = border.add_port("127.0.0.1", origin_port)    # listen port -> the origin
    via = border.add_port("127.0.0.1", edge_port)         # another port, the same link
    border.start_in_thread()                              # or: await border.start()
    border.set_blackhole(True)                            # and back with False
    border.counters(direct)                               # {"up": .., "down": .., "connections": ..}

or as a process: ``python -m tests.fakes.border --target 127.0.0.1:9100 --rate 2 --rtt 180``.

The model, per direction (up: towards the targets, down: back):

* **Bandwidth**, ``rate`` bits/s, shared by every connection of the border: data read from a
  source is cut into segments of ``MSS`` bytes; a segment leaves when the link is free (after
  the segments queued before it, whatever their connection) and takes ``(size + 52) * 8 / rate``
  to go out (52: IP and TCP headers; the counters count payload only). Infinite buffer, no
  drops: a busy link queues, as a bufferbloated uplink does.
* **Delay**: a segment arrives ``rtt / 2`` after it has left. With ``jitter`` it arrives up to
  that much later (uniform), and with ``loss`` (a probability per segment) one retransmission
  time later (``loss_penalty``, default ``rtt + 0.2``: the RTO's 200 ms floor on top of the
  round trip). Segments of one connection never overtake each other: a late one holds those
  behind it (head-of-line blocking, as TCP does).
* **A new connection costs a round trip**: its first bytes leave no earlier than ``rtt`` after it
  was accepted (the SYN, SYN-ACK exchange a real client waits for before it sends).
  TCP slow start is not modelled: a large body goes out at the link's rate at once.
* **Black hole** (``set_blackhole(True)``): open connections freeze (nothing is read, nothing
  is delivered, what was on its way is held), and new connections hang in ``connect()``: the
  listeners' accept queues are filled and no longer served, so the kernel drops the SYNs and
  the clients retransmit them (1 s, 3 s, 7 s... later). When the hole ends, everything held
  resumes with its timing shifted by the hole's length, and connections that were waiting get
  through at their next SYN retransmission.

Knobs: ``rate`` (or ``rate_up`` / ``rate_down``), ``rtt``, ``jitter``, ``loss``,
``loss_penalty``: plain attributes read per segment; ``set()`` changes several from any thread.
Counters per port and for the whole border: payload bytes and segments delivered up and down,
connections accepted. Targets are reached directly (they are on the far side of the border: no cost).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from tests.fakes.threaded import Threaded, serve_forever

__all__ = ["MSS", "Border", "main"]

MSS = 1448  # payload per segment (1500-byte MTU, TCP timestamps on)
HEADERS = 52  # IP (20) + TCP with timestamps (32): they take link time, not counted as payload
QUEUE_LIMIT = 256 * 1024  # per connection and direction: bytes read but not yet delivered
_LINGER0 = struct.pack("ii", 1, 0)
_EOF, _CLOSE, _ABORT = "eof", "close", "abort"  # markers queued behind the data

_T = TypeVar("_T")
_clock = time.monotonic  # uvloop's loop.time() has whole milliseconds


def _nodelay(sock: Any) -> None:
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rst(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    cast(asyncio.Transport, transport).abort()


class _Link:
    """One direction of the border: a FIFO that serialises segments at ``rate``, and a heap of
    arrivals released by one timer."""

    __slots__ = ("border", "free_at", "heap", "timer", "up")

    def __init__(self, border: Border, up: bool) -> None:
        self.border = border
        self.up = up
        self.free_at = 0.0  # when the last queued segment has left
        self.heap: list[tuple[float, int, _Pipe, bytes | str]] = []
        self.timer: asyncio.TimerHandle | None = None

    def rate(self) -> float:
        b = self.border
        return b.rate_up if self.up else b.rate_down

    def send(self, pipe: _Pipe, data: bytes, now: float) -> None:
        b = self.border
        rate = self.rate()
        one_way = b.rtt / 2
        for i in range(0, len(data), MSS):
            seg = data[i : i + MSS]
            start = self.free_at if self.free_at > now else now
            self.free_at = start + (len(seg) + HEADERS) * 8 / rate if rate > 0 else start
            arrive = self.free_at + one_way
            if b.jitter > 0:
                arrive += b.rng.uniform(0, b.jitter)
            if b.loss > 0 and b.rng.random() < b.loss:
                arrive += b.rtt + 0.2 if b.loss_penalty is None else b.loss_penalty
            self.push(pipe, seg, arrive)

    def push(self, pipe: _Pipe, item: bytes | str, arrive: float) -> None:
        if arrive < pipe.last:
            arrive = pipe.last  # no overtaking within a connection
        pipe.last = arrive
        heapq.heappush(self.heap, (arrive, next(self.border.seq), pipe, item))
        self.arm()

    def arm(self) -> None:
        b = self.border
        if self.timer is None and self.heap and not b.frozen and b.loop is not None:
            self.timer = b.loop.call_later(max(0.0, self.heap[0][0] - _clock()), self.fire)

    def fire(self) -> None:
        self.timer = None
        if self.border.frozen:
            return
        now = _clock()
        heap = self.heap
        touched: set[_Pipe] = set()
        while heap and heap[0][0] <= now:
            _, _, pipe, item = heapq.heappop(heap)
            pipe.deliver(item)
            touched.add(pipe)
        for pipe in touched:
            pipe.conn.update_reading(pipe.src)
        self.arm()

    def shift(self, dt: float, since: float) -> None:
        """A black hole of ``dt`` seconds ended: what was held arrives that much later."""
        self.heap = [(t + dt, s, p, it) for t, s, p, it in self.heap]  # a uniform shift keeps the heap order
        if self.free_at > since:
            self.free_at += dt


class _Side(asyncio.Protocol):
    """One end of a relayed connection: the client's or the target's."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.out: _Pipe  # the direction this side feeds
        self.read_paused = False
        self.write_paused = False
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport.get_extra_info("socket"))
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.conn.marker(self, _EOF)
        return True  # half-close: the other direction goes on

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
    """One direction of one connection."""

    __slots__ = ("conn", "dst", "eof_done", "hold", "last", "link", "pending", "queued", "src", "up")

    def __init__(self, conn: _Conn, src: _Side, dst: _Side, link: _Link) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.link = link
        self.up = link.up
        self.last = 0.0  # arrival time of the last item queued
        self.queued = 0  # bytes read from src, not yet delivered
        self.hold = 0.0  # nothing leaves before this (the new connection's round trip)
        self.pending: list[bytes | str] = []  # read during the hold
        self.eof_done = False

    def feed(self, item: bytes | str) -> None:
        if isinstance(item, bytes):
            self.queued += len(item)
        now = _clock()
        if self.pending or now < self.hold or self.conn.border.frozen or self.dst.transport is None:
            self.pending.append(item)  # (the target is connected long before a hold ends: rtt 0 aside)
            self.conn.border.wake_at(self.hold, self.flush)
            return
        self.send(item, now)

    def send(self, item: bytes | str, now: float) -> None:
        if isinstance(item, bytes):
            self.link.send(self, item, now)
        else:  # a marker travels behind the data, taking no link time
            self.link.push(self, item, max(now, self.link.free_at) + self.conn.border.rtt / 2)

    def flush(self) -> None:
        now = _clock()
        if not self.pending or self.conn.border.frozen or self.dst.transport is None:
            return  # (the end of a black hole, or the target's connection_made, flushes again)
        if now < self.hold:  # uvloop's timers may fire up to a millisecond early
            self.conn.border.wake_at(self.hold, self.flush)
            return
        items, self.pending = self.pending, []
        for item in items:
            self.send(item, now)

    def deliver(self, item: bytes | str) -> None:
        conn = self.conn
        if conn.finished:
            return
        tr = self.dst.transport
        if isinstance(item, bytes):
            self.queued -= len(item)
            if tr is None or self.dst.lost or tr.is_closing():
                return
            conn.port.count(self.up, len(item))
            tr.write(item)
        elif item == _EOF:
            self.eof_done = True
            if tr is not None and not self.dst.lost and not tr.is_closing():
                if tr.can_write_eof():
                    tr.write_eof()
                else:
                    tr.close()
            if conn.up.eof_done and conn.down.eof_done:
                conn.shutdown(rst=False)
        else:
            conn.shutdown(rst=item == _ABORT)


class _Conn:
    def __init__(self, port: _Port) -> None:
        self.port = port
        self.border = port.border
        self.client = _Side(self)
        self.target = _Side(self)
        self.up = _Pipe(self, self.client, self.target, self.border.links[0])
        self.down = _Pipe(self, self.target, self.client, self.border.links[1])
        self.client.out = self.up
        self.target.out = self.down
        self.finished = False
        self.connecting: asyncio.Task[Any] | None = None

    def other(self, side: _Side) -> _Side:
        return self.target if side is self.client else self.client

    def made(self, side: _Side) -> None:
        border = self.border
        if side is self.client:
            border.conns.add(self)
            self.up.hold = _clock() + border.rtt  # the handshake a real client would wait for
            assert border.loop is not None
            self.connecting = border.loop.create_task(self._connect())
        elif self.finished:
            assert side.transport is not None
            _rst(side.transport)
            return
        else:
            self.up.flush()
        self.update_reading(side)

    async def _connect(self) -> None:
        loop = self.border.loop
        assert loop is not None
        try:
            await loop.create_connection(lambda: self.target, self.port.target_host, self.port.target_port)
        except OSError:
            self.shutdown(rst=True)
        finally:
            self.connecting = None

    def data(self, side: _Side, data: bytes) -> None:
        if not self.finished:
            side.out.feed(data)
            self.update_reading(side)

    def marker(self, side: _Side, item: str) -> None:
        if not self.finished:
            side.out.feed(item)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if self.finished:
            self._forget()
            return
        other = self.other(side)
        if other.transport is None or other.lost:
            self.shutdown(rst=True)
            return
        if not side.eof or exc is not None:  # a close or reset travels behind the data
            side.out.feed(_ABORT if exc is not None else _CLOSE)

    def update_reading(self, side: _Side) -> None:
        tr = side.transport
        if tr is None or side.lost or side.eof or self.finished:
            return
        pipe = side.out
        stop = self.border.frozen or pipe.dst.write_paused or pipe.queued > QUEUE_LIMIT
        if stop and not side.read_paused:
            side.read_paused = True
            tr.pause_reading()
        elif not stop and side.read_paused and pipe.queued <= QUEUE_LIMIT // 2:
            side.read_paused = False
            tr.resume_reading()

    def shutdown(self, *, rst: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.connecting is not None:
            self.connecting.cancel()
        for side in (self.client, self.target):
            tr = side.transport
            if tr is not None and not side.lost:
                _rst(tr) if rst else tr.close()
        self._forget()

    def _forget(self) -> None:
        if all(s.transport is None or s.lost for s in (self.client, self.target)):
            self.border.conns.discard(self)


class _Port:
    """A listener of the border and the target its connections are relayed to."""

    def __init__(self, border: Border, target_host: str, target_port: int, host: str) -> None:
        self.border = border
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []  # our own connections filling the accept queue (black hole)
        self.bytes_up = self.bytes_down = self.segments_up = self.segments_down = 0
        self.connections = 0

    def count(self, up: bool, n: int) -> None:
        """One segment of ``n`` payload bytes delivered."""
        b = self.border
        if up:
            self.bytes_up += n
            self.segments_up += 1
            b.bytes_up += n
            b.segments_up += 1
        else:
            self.bytes_down += n
            self.segments_down += 1
            b.bytes_down += n
            b.segments_down += 1

    def serve(self) -> None:
        loop = self.border.loop
        assert loop is not None
        loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self) -> None:
        loop = self.border.loop
        assert loop is not None
        filler_names = {f.getsockname() for f in self.fillers}
        while True:
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if peer in filler_names:
                sock.close()
                continue
            self.connections += 1
            self.border.connections += 1
            sock.setblocking(False)
            _nodelay(sock)
            conn = _Conn(self)
            task = loop.create_task(loop.connect_accepted_socket(lambda c=conn: c.client, sock))  # type: ignore[misc]
            self.border.adopting.add(task)
            task.add_done_callback(self.border.adopting.discard)

    def close_door(self) -> None:
        """Stop accepting and fill the accept queue: the kernel drops further SYNs."""
        loop = self.border.loop
        assert loop is not None
        loop.remove_reader(self.sock.fileno())
        self.sock.listen(0)  # an accept queue of one
        for _ in range(2):
            f = socket.socket(self.sock.family, socket.SOCK_STREAM)
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                f.connect((self.host, self.port))
            self.fillers.append(f)

    def open_door(self) -> None:
        self.sock.listen(1024)
        self.accept()  # whoever waited in the queue (our fillers are closed there)
        for f in self.fillers:
            f.close()
        self.fillers = []
        self.serve()

    def close(self) -> None:
        if self.border.loop is not None:
            with contextlib.suppress(Exception):
                self.border.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for f in self.fillers:
            f.close()


class Border(Threaded):
    """A link across a border shared by the ports added with ``add_port`` (see the module docstring)."""

    def __init__(
        self,
        *,
        rate: float = 2e6,
        rtt: float = 0.18,
        jitter: float = 0.0,
        loss: float = 0.0,
        loss_penalty: float | None = None,
        host: str = "127.0.0.1",
        seed: int = 1,
    ) -> None:
        self.rate_up = self.rate_down = float(rate)
        self.rtt = rtt
        self.jitter = jitter
        self.loss = loss
        self.loss_penalty = loss_penalty
        self.host = host
        self.rng = random.Random(seed)
        self.seq = itertools.count()
        self.links = (_Link(self, True), _Link(self, False))
        self.ports: dict[int, _Port] = {}
        self.conns: set[_Conn] = set()
        self.adopting: set[asyncio.Task[Any]] = set()
        self.frozen = False
        self.frozen_at = 0.0
        self.holes = 0
        self.bytes_up = self.bytes_down = self.segments_up = self.segments_down = 0
        self.connections = 0
        self.port = 0  # the first port added (Threaded names its thread after it)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None
        self._wakers: dict[float, list[Callable[[], None]]] = {}

    def __repr__(self) -> str:
        rates = f"{self.rate_up / 1e6:g}/{self.rate_down / 1e6:g} Mbit/s"
        return f"<Border {rates} rtt={self.rtt * 1000:g}ms ports={sorted(self.ports)} frozen={self.frozen}>"

    def add_port(self, target_host: str, target_port: int) -> int:
        """A new listener relaying to ``target_host:target_port`` across this border; its port."""
        p = _Port(self, target_host, target_port, self.host)
        self.ports[p.port] = p
        self.port = self.port or p.port
        if self.loop is not None:
            self._call(p.serve)
        return p.port

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for p in self.ports.values():
            p.serve()

    async def stop(self) -> None:
        for p in self.ports.values():
            p.close()
        for conn in list(self.conns):
            conn.shutdown(rst=True)
        for task in list(self.adopting):
            task.cancel()
        for link in self.links:
            if link.timer is not None:
                link.timer.cancel()
        await asyncio.sleep(0)
        self.loop = self._loop = None

    # ------------------------------------------------------------------ knobs

    def set(self, **knobs: float | None) -> None:
        """Change knobs (rate, rate_up, rate_down, rtt, jitter, loss, loss_penalty) at once. Thread-safe."""

        def apply() -> None:
            for k, v in knobs.items():
                if k == "rate":
                    self.rate_up = self.rate_down = float(cast(float, v))
                elif k in ("rate_up", "rate_down", "rtt", "jitter", "loss", "loss_penalty"):
                    setattr(self, k, v)
                else:
                    raise ValueError(f"unknown Border knob {k!r}")

        self._call(apply)

    def set_blackhole(self, on: bool) -> None:
        """Freeze the open connections and make new ones hang (True), or resume (False). Thread-safe."""
        self._call(lambda: self._hole(on))

    def counters(self, port: int | None = None) -> dict[str, int]:
        """Of one port or of all: payload bytes delivered up / down, the segments that carried them
        (each also took ``HEADERS`` bytes of link time), connections accepted."""
        src: Any = self if port is None else self.ports[port]
        return {"up": src.bytes_up, "down": src.bytes_down, "segments_up": src.segments_up,
                "segments_down": src.segments_down, "connections": src.connections}  # fmt: skip

    # ------------------------------------------------------------------ internals

    def _hole(self, on: bool) -> None:
        if on == self.frozen:
            return
        now = _clock()
        if on:
            self.frozen, self.frozen_at = True, now
            self.holes += 1
            for link in self.links:
                if link.timer is not None:
                    link.timer.cancel()
                    link.timer = None
            for p in self.ports.values():
                p.close_door()
        else:
            dt = now - self.frozen_at
            self.frozen = False
            for link in self.links:
                link.shift(dt, self.frozen_at)
            for conn in self.conns:
                for pipe in (conn.up, conn.down):
                    pipe.last += dt if pipe.last > self.frozen_at else 0.0
                    pipe.hold += dt if pipe.hold > self.frozen_at else 0.0
                    if pipe.pending:
                        self.wake_at(pipe.hold, pipe.flush)
            for link in self.links:
                link.arm()
            for p in self.ports.values():
                p.open_door()
        for conn in list(self.conns):
            conn.update_reading(conn.client)
            conn.update_reading(conn.target)

    def wake_at(self, t: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` at ``t`` (a pipe's hold ends), once per (time, fn)."""
        loop = self.loop
        if loop is None:
            return
        fns = self._wakers.get(t)
        if fns is not None:
            if fn not in fns:
                fns.append(fn)
            return
        self._wakers[t] = [fn]

        def run() -> None:
            for f in self._wakers.pop(t, []):
                f()

        loop.call_later(max(0.0, t - _clock()), run)

    def _call(self, fn: Callable[[], _T]) -> _T:
        loop = self.loop
        if loop is None or threading.get_ident() == self._loop_thread or not loop.is_running():
            return fn()
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.border", description="a user-space border (link model)")
    p.add_argument("--target", type=_host_port, action="append", required=True, metavar="HOST:PORT")
    p.add_argument("--rate", type=float, default=2.0, help="Mbit/s each way (default 2)")
    p.add_argument("--rtt", type=float, default=180.0, help="round trip in ms (default 180)")
    p.add_argument("--jitter", type=float, default=0.0, help="ms, uniform, per segment")
    p.add_argument("--loss", type=float, default=0.0, help="%% of segments that arrive one RTO late")
    a = p.parse_args(argv)
    b = Border(rate=a.rate * 1e6, rtt=a.rtt / 1000, jitter=a.jitter / 1000, loss=a.loss / 100)
    ports = [(b.add_port(h, pt), f"{h}:{pt}") for h, pt in a.target]
    serve_forever(b, lambda: "border " + ", ".join(f"127.0.0.1:{lp} -> {t}" for lp, t in ports))


if __name__ == "__main__":
    main()

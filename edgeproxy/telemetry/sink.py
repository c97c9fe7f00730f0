"""Log lines out to a descriptor whose reader may stop reading: never blocks, never splits a line.

stdout and stderr are whatever the operator connected: a terminal, a pipe (docker, `| tee`),
the journal's socket (systemd), a file. A reader that stops (a pager left open, a stuck log
shipper, Ctrl-S on a terminal) fills the pipe, and one blocking write(2) from the event loop then
freezes everything, the admin listener included. So a ``LineSink``:

- writes without blocking, on a descriptor of its own where it can (``_Out``): O_NONBLOCK set
  on a shared stdout would change it for the shell and every process holding the same terminal
  or pipe;
- keeps what the reader has not taken yet in a bounded queue of whole lines, in order, written
  out when the descriptor is writable again (the event loop watches it);
- past the bound, drops new lines whole and counts them: a line partly written is always
  finished, so a reader never sees half of one.

stdout and stderr are often one pipe or socket (`2>&1 | tee`, systemd's journal): their logs
then share one queue (a ``_Channel``), or a partial write of one log's line could be followed by
the other's, splicing two lines. Thread-safe: the process log writes from any thread (the
access log from the loop only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from itertools import islice
from typing import Final

__all__ = ["LineSink"]


# Buffers per write: far under IOV_MAX (1024), enough for a loop turn's access-log lines.
_IOV: Final = 256
# Bytes per write to a pipe: a pipe takes up to PIPE_BUF bytes whole or not at all, so writes of
# whole lines that size never leave half a line in it (the reader gone for good at exit: the
# rest could never follow), nor let another writer's bytes in the middle of one.
_ATOMIC: Final = select.PIPE_BUF


class _Out:
    """A non-blocking way to write to ``fd`` that leaves ``fd`` itself as it was.

    - a regular file (or block device): written as is; a disk does not say EAGAIN;
    - a socket (the journal): send(MSG_DONTWAIT), a per-call flag, on a dup of it;
    - a pipe or terminal: opened again through /proc/self/fd, a new open file description of
      the same pipe or tty that alone is non-blocking;
    - otherwise (no /proc; a pipe created by another user, as docker's under `USER`):
      O_NONBLOCK on ``fd`` itself, put back on close.
    """

    __slots__ = ("_restore", "_sock", "fd", "most", "waitable")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._sock: socket.socket | None = None
        self._restore: int | None = None  # the fd whose blocking mode close() puts back
        self.waitable = True  # False: writes never say EAGAIN, nothing to wait for
        mode = os.fstat(fd).st_mode
        self.most = _ATOMIC if stat.S_ISFIFO(mode) else 1 << 30  # bytes per write (whole lines)
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            self.waitable = False
        elif stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self.fd = self._sock.fileno()
        else:
            try:
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                self.fd = os.open(f"/proc/self/fd/{fd}", flags)
            except OSError:
                if os.get_blocking(fd):
                    os.set_blocking(fd, False)
                    self._restore = fd

    def write(self, buffers: list[bytes | memoryview]) -> int:
        if self._sock is not None:
            return self._sock.sendmsg(buffers, (), socket.MSG_DONTWAIT)
        return os.writev(self.fd, buffers)

    def write_one(self, data: bytes) -> int:
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)  # half writev's cost for one buffer

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._restore is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self._restore, True)
        elif self.fd >= 0 and self.waitable:  # our own reopened descriptor
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self._restore = None
        self.fd = -1


class _Reentered(Exception):
    """A channel entered again by the thread working on it (see _Channel.lock)."""


class _Channel:
    """One output file (pipe, terminal, socket, file): its descriptor, the lines queued for it
    in order (whoever wrote them), and the event loop watching it while its reader is behind."""

    __slots__ = (
        "armed", "broken", "busy", "head", "key", "lock", "loop", "out", "queue", "queued", "users", "written",
    )  # fmt: skip

    def __init__(self, out: _Out, key: tuple[int, int] | None) -> None:
        self.out = out
        self.key = key  # in _channels while in use; None: not shared (a regular file)
        self.users = 0
        self.queue: deque[bytes] = deque()
        self.head = 0  # bytes of queue[0] already written
        self.queued = 0  # bytes in queue not yet written
        self.written = 0  # bytes the reader has been given
        self.armed = False  # the loop watches the descriptor; only its callback writes then
        self.loop: asyncio.AbstractEventLoop | None = None
        self.broken = False  # the reader is gone (EPIPE), or the channel closed
        # Re-entrant, with ``busy`` saying the queue is being worked on: a log record made on
        # this thread while it is (a finaliser run by the garbage collector mid-write) finds
        # it busy and is dropped, instead of deadlocking on a plain lock or corrupting the queue.
        self.lock = threading.RLock()
        self.busy = False

    def __enter__(self) -> _Channel:
        self.lock.acquire()
        if self.busy:
            self.lock.release()
            raise _Reentered
        self.busy = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy = False
        self.lock.release()

    # -- all under the lock ------------------------------------------------------------------
    def put(self, lines: list[bytes], limit: int, force: bool, loop: asyncio.AbstractEventLoop | None) -> int:
        """Queue what fits and write what the reader takes now; the number of lines dropped."""
        if loop is not None:
            self.loop = loop
        if self.armed and self.loop is not None and self.loop.is_closed():
            self.armed = False  # the loop that watched is gone: write from here again
        if not self.queue and not self.armed and not self.broken:
            # The usual case, the reader keeps up: one write, nothing queued.
            lines, head = self._write_now(lines)
            if not lines:
                return 0
            if self.broken:
                return len(lines)
            self.queue.append(lines[0])  # never dropped: it may be partly written
            self.head, self.queued = head, len(lines[0]) - head
            lines = lines[1:]
        dropped = 0
        for line in lines:
            if self.broken or (self.queued and self.queued + len(line) > limit and not force):
                dropped += 1
            else:
                self.queue.append(line)
                self.queued += len(line)
        if not self.armed:
            self.flush(loop)
        return dropped

    def _write_now(self, lines: list[bytes]) -> tuple[list[bytes], int]:
        """Write ``lines`` at once if the reader takes them: (the lines left, the bytes of the
        first one written)."""
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        if len(data) > self.out.most:
            return lines, 0
        try:
            n = self.out.write_one(data)
        except (BlockingIOError, InterruptedError):
            return lines, 0
        except OSError:
            self.broken = True
            return lines, 0
        self.written += n
        if n == len(data):
            return [], 0
        i = 0
        while n >= len(lines[i]):
            n -= len(lines[i])
            i += 1
        return lines[i:], n

    def flush(self, loop: asyncio.AbstractEventLoop | None, arm: bool = True) -> None:
        out = self.out
        while self.queue and not self.broken:
            buffers = self._next_write()
            try:
                n = out.write(buffers)
            except (BlockingIOError, InterruptedError):
                if arm:
                    self._arm(loop)
                return
            except OSError:
                self.broken = True  # EPIPE (the reader left), EBADF...: nothing more gets through
                return
            self._advance(n)

    def _next_write(self) -> list[bytes | memoryview]:
        """The next lines to write: whole ones, at most out.most bytes (or the rest of one
        longer line, in pieces then)."""
        first = self.queue[0]
        buffers: list[bytes | memoryview] = [memoryview(first)[self.head :] if self.head else first]
        size, most = len(first) - self.head, self.out.most
        for line in islice(self.queue, 1, _IOV):
            size += len(line)
            if size > most:
                break
            buffers.append(line)
        return buffers

    def discard(self) -> int:
        """Forget what is queued (the reader is gone, or we are): the number of lines."""
        n = len(self.queue)
        self.queue.clear()
        self.queued = self.head = 0
        return n

    def _advance(self, n: int) -> None:
        self.written += n
        self.queued -= n
        queue = self.queue
        while n:
            left = len(queue[0]) - self.head
            if n < left:
                self.head += n
                return
            n -= left
            queue.popleft()
            self.head = 0

    def _arm(self, running: asyncio.AbstractEventLoop | None) -> None:
        """Have the loop call us when the descriptor takes more. From another thread (the
        process log), through the loop; with no loop at all, the lines wait for the next write."""
        if not self.out.waitable:
            return
        if running is not None:
            try:
                running.add_writer(self.out.fd, self._on_writable)
            except (OSError, ValueError, RuntimeError):
                return
            self.armed = True
        elif self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._arm_from_loop)
            except RuntimeError:
                return
            self.armed = True

    def _arm_from_loop(self) -> None:
        with contextlib.suppress(_Reentered), self:
            if self.loop is None or not self.armed or self.broken:
                return
            try:
                self.loop.add_writer(self.out.fd, self._on_writable)
            except (OSError, ValueError, RuntimeError):
                self.armed = False

    def _on_writable(self) -> None:
        with contextlib.suppress(_Reentered), self:
            self.flush(None, arm=False)
            if not self.queue or self.broken:
                self.disarm()

    def disarm(self) -> None:
        if self.armed and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_writer(self.out.fd)
        self.armed = False

    def finish(self, timeout: float) -> int:
        """The last user is done: write out what the reader takes within ``timeout`` s without
        progress (blocking: the end of the process), then let go of the descriptor. The number
        of lines lost."""
        since = time.monotonic()
        while self.queue and not self.broken:
            written = self.written
            self.flush(None, arm=False)
            if self.written != written:
                since = time.monotonic()
            left = timeout - (time.monotonic() - since)
            if not self.queue or left <= 0:
                break
            with contextlib.suppress(OSError, ValueError):
                poller = select.poll()
                poller.register(self.out.fd, select.POLLOUT)
                poller.poll(left * 1000)
        lost = self.discard()
        self.broken = True
        self.out.close()
        return lost


# Channels in use, by the (device, inode) of what they write to: stdout and stderr on one pipe
# or socket share one.
_channels: dict[tuple[int, int], _Channel] = {}
_channels_lock = threading.Lock()


def _acquire(fd: int) -> _Channel:
    with _channels_lock:
        st = os.fstat(fd)
        shared = not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode))
        key = (st.st_dev, st.st_ino) if shared else None
        channel = _channels.get(key) if key is not None else None
        if channel is None:
            channel = _Channel(_Out(fd), key)
            if key is not None:
                _channels[key] = channel
        channel.users += 1
        return channel


class LineSink:
    """One log's lines to ``fd``: whole, in order, never blocking; the lines it had to drop
    counted in ``dropped``. Past ``limit`` bytes waiting for the reader, new lines are dropped."""

    __slots__ = ("_channel", "_closed", "dropped", "fd", "limit")

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.dropped = 0  # lines dropped: the reader was behind by more than limit, or gone
        self._channel: _Channel | None = None  # at the first write
        self._closed = False

    @property
    def pending(self) -> int:
        """Bytes accepted but not yet written (to this log's output, whichever log wrote them)."""
        return 0 if self._channel is None else self._channel.queued

    def write(self, lines: list[bytes], force: bool = False) -> None:
        """Queue ``lines`` (each one ending in a newline) and write what the reader takes now.
        A line that would take the queue past ``limit`` is dropped and counted, unless ``force``
        (a notice of the drops themselves: one short line, once)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        channel = self._channel
        if channel is None:
            if self._closed:
                self.dropped += len(lines)
                return
            try:
                channel = self._channel = _acquire(self.fd)
            except OSError:  # the descriptor is closed or unusable: every line is dropped
                self._closed = True
                self.dropped += len(lines)
                return
        try:
            with channel:
                self.dropped += channel.put(lines, self.limit, force, loop)
        except _Reentered:
            self.dropped += len(lines)

    def flush(self) -> None:
        """Write what the reader takes now, without waiting."""
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(_Reentered), channel:
                if not channel.armed:
                    channel.flush(None)

    async def drain(self, timeout: float) -> None:
        """Wait for the reader to take what is queued: until it is all written, or the reader
        has taken nothing for ``timeout`` seconds (it is stalled: the rest stays queued)."""
        channel = self._channel
        if channel is None:
            return
        self.flush()
        written, since = channel.written, time.monotonic()
        while channel.queued and not channel.broken and time.monotonic() - since < timeout:
            await asyncio.sleep(0.02)
            self.flush()
            if channel.written != written:
                written, since = channel.written, time.monotonic()

    def close(self, timeout: float = 0.0) -> None:
        """Done with this log. The last one on its output writes out what is queued, waiting
        (blocking: for the end of the process) while the reader takes it and at most
        ``timeout`` s without progress, then lets go of the descriptor; lines still queued are
        lost, and counted. Not the last: the queue carries on for the other log."""
        channel, self._channel, self._closed = self._channel, None, True
        if channel is None:
            return
        with _channels_lock:
            channel.users -= 1
            last = channel.users == 0
            if last and channel.key is not None and _channels.get(channel.key) is channel:
                del _channels[channel.key]
        if not last:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with channel.lock:
            if channel.armed and channel.loop is not None and not channel.loop.is_closed():
                if running is not channel.loop:
                    return  # another thread's loop still watches the descriptor: leave it be
            channel.disarm()
            self.dropped += channel.finish(timeout)

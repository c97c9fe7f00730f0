"""A tiny sd_notify(3) client: tell systemd when edgeproxy is ready, reloading or stopping.

``Notifier`` reads ``$NOTIFY_SOCKET`` once, when built. Without it (not started by systemd with
``Type=notify``, a container, a test) every call is a cheap no-op. Messages go out on a
non-blocking ``AF_UNIX`` datagram socket; nothing here ever raises: a failed send is logged at
debug level and reported as ``False``.

Where the server calls what:

- ``ready()`` once every listener is bound (systemd holds ``systemctl start`` until then);
- ``reloading()`` when a SIGHUP reload begins, then ``ready()`` when it is done (applied or
  rejected: either way the process serves again);
- ``stopping()`` when SIGTERM/SIGINT starts the drain;
- ``status(text)`` for a one-line state in ``systemctl status``;
- ``watchdog_loop(notifier)`` as a task for the process's life: it pings at half of
  ``WatchdogSec=``, so a wedged event loop gets the service restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_loop"]

log = logging.getLogger("edgeproxy.sdnotify")  # the name operators filter on (kept from the flat layout)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (a path, or an abstract name ``@...``)."""

    __slots__ = ("_address", "_sock", "_watchdog_pid", "_watchdog_usec")

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address: bytes | None = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given (messages are actually sent)."""
        return self._address is not None

    # -- the messages ----------------------------------------------------------------------
    def ready(self) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``."""
        return self.notify("READY=1")

    def reloading(self) -> bool:
        """A reload began: ``RELOADING=1`` with the ``MONOTONIC_USEC`` that Type=notify-reload needs."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown began (draining): ``STOPPING=1``."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line free-form state for ``systemctl status``: ``STATUS=...``."""
        # A newline would start another assignment: keep the status on its one line.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``: ``WATCHDOG=1``."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when there is no
        watchdog for this process (unset, invalid, or ``$WATCHDOG_PID`` names another process)."""
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` as one datagram (newline-separated); True if it was sent."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", data, self._address, exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket (a later call opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _socket_address(value: str) -> bytes | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: a path as is, ``@name`` as abstract ``\\0name``."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value:
        log.debug("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying", value)
    return None


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping the watchdog every ``watchdog_interval()`` until cancelled; return at once if there
    is no watchdog. Run on the event loop, so a loop that stops turning stops the pings."""
    interval = notifier.watchdog_interval()
    if interval is None or not notifier.enabled:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)

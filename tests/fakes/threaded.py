"""Run an asyncio server object (``start()``/``stop()`` coroutines) in its own thread.

The fakes run on a test's own event loop, and in a thread of their own when a benchmark or a
synchronous client drives them; this is the thread part, shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

__all__ = ["Threaded", "new_loop", "serve_forever"]


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Threaded:
    """Mixin: ``start_in_thread()`` / ``stop_thread()`` and both context-manager styles.

    The class provides ``async start()``, ``async stop()``, ``port``, and keeps the loop it
    runs on in ``_loop`` and its thread in ``_thread``.
    """

    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    port: int

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Serve from a daemon thread with its own (uvloop if available) event loop."""
        if self._thread is not None:
            raise RuntimeError("already running in a thread")
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = new_loop()
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException as e:
                    errors.append(e)
                    return
                finally:
                    ready.set()
                loop.run_forever()
                loop.run_until_complete(self.stop())
            finally:
                loop.close()

        name = type(self).__name__
        self._thread = threading.Thread(target=run, name=f"{name}:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{name} did not start")
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc: Any) -> None:
        self.stop_thread()


def serve_forever(server: Threaded, banner: Callable[[], str]) -> None:
    """Run ``server`` on this thread until SIGINT/SIGTERM (the fakes' command lines)."""

    async def serve() -> None:
        await server.start()
        print(banner(), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    loop = new_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()

"""Active probes: a cheap timed HTTP request on every path, over its warm pool.

The probe is ``GET <models list>`` without credentials: every provider answers it (200, or 401
without a key), it is never billed, and any HTTP answer means the path works end to end. The
time from request sent to response headers is one RTT sample (plus the origin's trivial work).
One task per path, owned by the ``Prober``; ``sync(paths)`` starts and stops tasks so a reload
keeps the probes of unchanged paths running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from ..proto.errors import ProxyError
from ..proto.hop import ORIGIN_RTT_HEADER

if TYPE_CHECKING:
    from ..config import ProbeConfig
    from ..net.client import Response
    from ..telemetry.metrics import Metrics
    from .lines import Path, PathKey

__all__ = ["Prober"]

log = logging.getLogger("edgeproxy.probe")

# At most one urgent probe per path this often (seconds), however many attempts wait.
URGENT_SPACING: Final = 0.25


def _edge_answer(resp: Response) -> float:
    """A `via` probe's answer: the edge's own RTT to the origin, added to the hop's so the
    path is scored whole. Anything but 200 means the edge cannot reach it (or refused us)."""
    if resp.status != 200:
        why = resp.header(b"x-edgeproxy-error") or b"no reason given"
        raise ProxyError(f"edge answered the probe with {resp.status} ({why.decode('latin-1')})")
    value = resp.header(ORIGIN_RTT_HEADER.encode())
    try:
        rtt = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return rtt if 0.0 <= rtt < 60.0 else 0.0


class Prober:
    """Runs one probe loop per path; reports each result to the path and to
    ``on_result(path, ok, changed)`` (changed: the path's new state, if it changed)."""

    def __init__(
        self, config: ProbeConfig, metrics: Metrics, on_result: Callable[[Path, bool, str | None], None]
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.on_result = on_result
        self._tasks: dict[PathKey, tuple[Path, asyncio.Task[None]]] = {}
        self._urgent_out: set[PathKey] = set()  # an urgent probe is in flight on these paths
        self._urgent_tasks: set[asyncio.Task[bool]] = set()
        self._urgent_at: dict[PathKey, float] = {}
        self._wake: dict[PathKey, asyncio.Event] = {}  # wakes a path's loop to re-plan its next probe

    def sync(self, paths: Iterable[Path], config: ProbeConfig | None = None) -> None:
        """Probe exactly these paths: start loops for new ones, stop the rest."""
        if config is not None:
            self.config = config
        wanted = {p.key: p for p in paths}
        for key, (path, task) in list(self._tasks.items()):
            if wanted.get(key) is not path:
                task.cancel()
                del self._tasks[key]
        loop = asyncio.get_running_loop()
        for key, path in wanted.items():
            if key not in self._tasks:
                task = loop.create_task(self._run(path), name=f"probe {path.label}")
                self._tasks[key] = (path, task)

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [t for _, t in self._tasks.values()]
        tasks += self._urgent_tasks
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, path: Path) -> None:
        # The first probe goes out at once: a fresh path has no RTT until it is measured.
        wake = self._wake[path.key] = asyncio.Event()
        try:
            while True:
                await self.probe(path)
                while True:  # sleep until the next probe is due; a wake-up re-plans from now
                    wake.clear()
                    try:
                        async with asyncio.timeout(path.health.next_probe_in(self.config.interval)):
                            await wake.wait()
                    except TimeoutError:
                        break
        finally:
            if self._wake.get(path.key) is wake:
                del self._wake[path.key]

    def urgent(self, path: Path, fresh: bool = False, again: bool = False) -> None:
        """Probe ``path`` now: an attempt on it waits longer than its RTT suggests (on a warm
        connection, with an RTT-sized timeout), or ``fresh``: a real request could not connect,
        or a probe went unanswered (on a new connection, with time for the handshake); ``again``:
        the re-probe after a failed one. Not while an urgent probe is out, nor (unless ``fresh``
        or ``again``) if one went out just now."""
        now = time.monotonic()
        # Only another urgent probe holds this one back: a regular probe out on the path may
        # have gone out before the line died and wait its full (longer) timeout.
        if path.key in self._urgent_out:
            return
        if not (fresh or again) and now - self._urgent_at.get(path.key, 0.0) < URGENT_SPACING:
            return
        if path.key not in self._tasks:
            return  # not (or no longer) a probed path
        self._urgent_at[path.key] = now
        ceiling = self.config.timeout
        timeout = reach = path.urgent_probe_timeout(ceiling)
        if fresh or not path.pool.idle:
            # A new connection: its TCP part must answer as fast as a request would (a black
            # hole is seen there); the handshakes after it get the time they take.
            timeout = min(timeout + path.connect_timeout(), 2 * ceiling)
        task = asyncio.get_running_loop().create_task(
            self.probe(path, timeout, urgent=True, fresh=fresh, reach=reach), name=f"urgent probe {path.label}"
        )
        self._urgent_tasks.add(task)
        task.add_done_callback(self._urgent_tasks.discard)

    async def probe(
        self,
        path: Path,
        timeout: float | None = None,
        urgent: bool = False,
        fresh: bool = False,
        reach: float | None = None,
    ) -> bool:
        """Probe ``path`` once; feed the estimator and health; True if it answered.

        A regular probe that fails has an urgent one sent at once, on a fresh connection: one
        slow probe moves no traffic, two failures in a row mark the path down. An urgent probe
        is sent because something real already went wrong (a request waiting too long, one that
        could not connect): its failure marks the path down at once, behind every usable path,
        and it is probed again fast (see Health.next_probe_in) until it answers."""
        loop = asyncio.get_running_loop()
        timeout = self.config.timeout if timeout is None else timeout
        error: str | None = None
        resp = None
        if urgent:
            self._urgent_out.add(path.key)
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await path.pool.acquire(probe=True, fresh=fresh, timeout=timeout, reach=reach)
                resp = conn.send("GET", path.probe_head, None, None)
                sent = loop.time()
                await resp.wait_head(timeout)
                rtt = loop.time() - sent
                if resp.status >= 500 and path.hop is None:
                    # The line works, but the origin answers nothing useful here, whatever
                    # the model (the models list failing is the whole origin failing).
                    raise ProxyError(f"the origin answered the probe with {resp.status}")
                if path.hop is not None:
                    path.edge_rtt = _edge_answer(resp)
                    rtt += path.edge_rtt
                while await resp.read():
                    pass
        except ProxyError as exc:
            error = exc.message
        except TimeoutError:
            error = f"no answer within {timeout:g}s"
        except Exception as exc:  # whatever it was, the probe loop must live on
            error = str(exc) or type(exc).__name__
        finally:
            if urgent:
                self._urgent_out.discard(path.key)
            if resp is not None:
                resp.release()
        ok = error is None
        now = time.monotonic()
        if ok:
            path.estimator.add(rtt, now)
        changed = path.health.on_probe(ok, now, error, urgent)
        if changed:
            log.info("path %s is %s%s", path.label, changed, f": {error}" if error else "")
        self.metrics.probes.inc((path.upstream, path.line.name, "ok" if ok else "fail"))
        self.on_result(path, ok, changed)
        if not ok:
            if path.health.state == "down":
                wake = self._wake.get(path.key)
                if wake is not None:
                    wake.set()  # its next probe comes soon, not at the interval
            else:
                # One failure proves nothing (a spike): look again, a moment later (a fresh
                # sample, not the same burst), after a regular probe on a new connection (was
                # it the connection, or the line?). Meanwhile, after an urgent one, the path is
                # suspect: new requests pass it over.
                asyncio.get_running_loop().call_later(URGENT_SPACING, self.urgent, path, not urgent, True)
        return ok

"""Listeners, the admin endpoint, and the process lifecycle (start, drain, stop).

This is the one module that binds sockets. Each client listener gets its own ``Engine``
(its tokens differ); all engines share one ``State``, swapped whole on reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Final

import orjson
from aiohttp import web, web_response

from .. import __version__
from ..config import Config, ConfigError, ListenerConfig, dump_redacted, load_file
from ..engine.attempts import may_move
from ..engine.auth import AuthThrottle
from ..engine.body import BodyBudget
from ..engine.engine import Engine
from ..engine.guard import BrowserGuard
from ..filters import FilterFactory, assemble
from ..filters.deltas import edge_bases
from ..net.dns import Resolver
from ..proto.errors import PathDown
from ..proto.providers import client_credential, token_matches
from ..routing.events import report_line, report_origin
from ..routing.lines import Path
from ..routing.probe import Prober
from ..routing.state import State, Upstream, describe_changes
from ..telemetry.accesslog import AccessLog
from ..telemetry.metrics import Metrics
from ..telemetry.processlog import process_log_dropped, set_limit
from .conn import ConnectionGuard, GuardedServer
from .sdnotify import Notifier, watchdog_loop

__all__ = ["Proxy", "serve"]

log = logging.getLogger("edgeproxy")
# What our own answers say in their Server header (no versions: see Proxy.__init__).
SERVER_NAME: Final = "edgeproxy"
LINGER: Final = 2.0
# At the end of a drain, how long streams have to write their in-band error and end.
STREAM_END_GRACE: Final = 1.0

# Refusal sent to a client over the listener's connection limit, then the socket closes.
_BUSY_BODY = b'{"error":{"message":"edgeproxy: too many connections","type":"api_error","code":"overloaded"}}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"x-edgeproxy-error: too_many_connections\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
        transport.close()


class Listener:
    """One bound client socket: its config, engine, aiohttp server and asyncio server."""

    __slots__ = ("config", "engine", "server", "web_server")

    def __init__(self, config: ListenerConfig, engine: Engine, web_server: GuardedServer) -> None:
        self.config = config
        self.engine = engine
        self.web_server = web_server
        self.server: asyncio.AbstractServer | None = None


class Proxy:
    """The whole running edgeproxy: state, listeners, admin, metrics."""

    def __init__(self, config: Config, filters: Sequence[FilterFactory] = ()) -> None:
        # aiohttp names itself and Python's version in every answer without a Server header
        # (our own errors, the admin's pages): a free fingerprint for an attacker. We say less.
        web_response.SERVER_SOFTWARE = SERVER_NAME
        self.config = config
        self.filters = tuple(filters)  # extra filters (embedding, tests): built again at each reload
        self.metrics = Metrics()
        self.access = AccessLog(config.log.access, limit=config.log.buffer)
        self.resolver = Resolver()
        self.state = State.build(config, self.resolver)
        self.prober = Prober(config.probe, self.metrics, self._on_probe)
        self.bases = edge_bases()  # edge role: the bases of sidecars' deltas
        self.pipeline = assemble(self.state, self.metrics, self.bases, extra=self.filters)
        self.bodies = BodyBudget(config.limits.buffer_memory, self.metrics)  # all listeners' held bodies
        self.metrics.on_scrape = self._path_gauges
        self.listeners: list[Listener] = []
        self.admin_runner: web.AppRunner | None = None
        # Wrong tokens per address, on every listener and the admin: one guesser gets one
        # budget, and keeps it across reloads (a restarted listener is no clean slate).
        self.throttle = AuthThrottle()
        self.started_at = time.time()
        self.generation = 1
        self.draining = False
        self.ready = False
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener (all or none), open warm pools, start the admin endpoint."""
        try:
            for lc in self.config.listen:
                self.listeners.append(await self._open_listener(lc))
            if self.config.admin.listen is not None:
                await self._start_admin(self.config.admin.listen)
        except BaseException:
            await self.stop(0)
            raise
        self.state.start()
        self.prober.sync(self.state.paths.values())
        self.ready = True

    async def _open_listener(self, lc: ListenerConfig) -> Listener:
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        engine = Engine(self.pipeline, lc, self.metrics, self.access, self.prober.urgent, self.throttle, self.bodies)
        conns = ConnectionGuard(limits, self.metrics)
        ws = GuardedServer(
            engine.handle,
            conns,
            handler_cancellation=True,  # client gone -> cancel -> upstream closed
            # Request bodies stay as the client coded them: passed on as they are, or (hop
            # requests at an edge) decoded by us, bounded (proto/codec.py); aiohttp's own decoding
            # would change what the origin gets and has no ratio guard.
            auto_decompress=False,
            access_log=None,
            max_line_size=limits.max_header,
            max_field_size=limits.max_header,
            # After an answer sent before the body was read (413, 408, 503), aiohttp reads and
            # drops what is left of it for this long so the client sees the answer, not a
            # reset: short, or a stalled client would hold the connection on.
            lingering_time=LINGER,
        )
        listener = Listener(lc, engine, ws)

        def factory() -> asyncio.Protocol:
            if len(ws.connections) >= self.config.limits.max_connections:
                return _Refuse()
            return ws()

        tls = _server_tls(lc)
        # A TLS handshake is part of the head: no longer than header_timeout (not asyncio's 60 s).
        handshake = limits.header_timeout if tls is not None else None
        try:
            if lc.unix is not None:
                _prepare_socket_path(lc.unix)
                listener.server = await loop.create_unix_server(
                    factory, lc.unix, ssl=tls, backlog=1024, ssl_handshake_timeout=handshake
                )
            else:
                listener.server = await loop.create_server(
                    factory, lc.host, lc.port or 0, ssl=tls, backlog=1024, reuse_address=True,
                    ssl_handshake_timeout=handshake,
                )  # fmt: skip
        except OSError as exc:
            raise _naming(exc, lc.address) from None
        log.info("listening on %s%s", lc.address, " (tls)" if tls else "")
        return listener

    async def _close_listener(self, listener: Listener, drain_timeout: float) -> None:
        """Stop accepting on it; let its requests finish (up to drain_timeout); close it."""
        if listener.server is not None:
            listener.server.close()
        deadline = time.monotonic() + drain_timeout
        while listener.engine.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if listener.engine.end_streams():
            # Streams still running get an in-band error in their protocol (never a silent
            # cut a client would take for a network fault): a moment to write it.
            deadline = time.monotonic() + STREAM_END_GRACE
            while listener.engine.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await listener.web_server.shutdown(0.1)
        if listener.config.unix is not None:
            _remove_stale_socket(listener.config.unix)

    # -- reload ----------------------------------------------------------------------------
    async def reload(self) -> tuple[bool, str]:
        """SIGHUP / POST /-/reload: read and validate the file; swap, or change nothing.

        Unchanged paths keep their pools, probes and RTT history; new paths are warmed and
        probed before they take traffic; removed paths and listeners drain, then close.
        """
        async with self._reload_lock:
            source = self.config.source
            if source is None:
                return False, "running the built-in default config: there is no file to reload"
            try:
                # Off the event loop: parsing and validating takes milliseconds that streams
                # and requests in flight should not wait for.
                new = await asyncio.to_thread(load_file, source)
            except ConfigError as exc:
                self.metrics.reloads.inc(("failed",))
                log.error("reload failed, still serving the previous config:\n%s", exc)
                return False, str(exc)
            try:
                summary = await self._apply(new)
            except Exception as exc:  # a listener that cannot bind: nothing was swapped
                self.metrics.reloads.inc(("failed",))
                log.error("reload failed, still serving the previous config: %s", exc)
                return False, str(exc)
            self.generation += 1
            self.metrics.reloads.inc(("ok",))
            self.metrics.generation.set((), self.generation)
            log.info("reloaded %s (generation %d): %s", source, self.generation, summary)
            return True, summary

    async def _apply(self, new: Config) -> str:
        old, old_state = self.config, self.state
        state = State.build(new, self.resolver, old_state)
        pipeline = assemble(state, self.metrics, self.bases, self.pipeline, self.filters)
        kept_addrs = {lst.config.address: lst for lst in self.listeners}
        new_addrs = {lc.address for lc in new.listen}
        # 1. Everything that can fail first: bind the new listeners (rolled back on error).
        opened: list[Listener] = []
        try:
            for lc in new.listen:
                if lc.address not in kept_addrs:
                    opened.append(await self._open_listener(lc))
        except BaseException:
            for listener in opened:
                await self._close_listener(listener, 0)
            raise
        # 2. New paths warm up and get a first probe before they can be chosen.
        added = [p for k, p in state.paths.items() if old_state.paths.get(k) is not p]
        state.start()
        self.prober.sync(state.paths.values(), new.probe)
        if added:
            await self._first_probes(added, new.probe.timeout + 0.5)
        # 3. Swap: one reference per engine; requests in flight keep the state they began with.
        # Kept paths take their new settings now, not earlier: nothing above may leave them
        # changed under the old state if it fails (no await from here to the swap).
        state.commit()
        pipeline.commit()
        self.config, self.state, self.pipeline = new, state, pipeline
        self.bodies.limit = new.limits.buffer_memory
        self.access.mode, self.access.limit = new.log.access, new.log.buffer
        set_limit(new.log.buffer)
        logging.getLogger("edgeproxy").setLevel(new.log.level.upper())
        removed_listeners = [lst for lst in self.listeners if lst.config.address not in new_addrs]
        by_addr = {lc.address: lc for lc in new.listen}
        for listener in self.listeners:
            if listener.config.address in by_addr:
                listener.config = by_addr[listener.config.address]
                listener.engine.reconfigure(pipeline, listener.config)
                listener.web_server.guard.limits = new.limits
        for listener in opened:
            listener.engine.reconfigure(pipeline, listener.config)
        self.listeners = [lst for lst in self.listeners if lst not in removed_listeners] + opened
        # 4. What left: drain in the background, then close.
        removed_paths = [p for k, p in old_state.paths.items() if state.paths.get(k) is not p]
        if removed_paths:
            self._spawn(self._retire(removed_paths, old_state, max(new.drain_timeout, old.drain_timeout)))
        for listener in removed_listeners:
            self._spawn(self._close_listener(listener, new.drain_timeout))
        if old.admin.listen != new.admin.listen:
            if self.admin_runner is not None:
                await self.admin_runner.cleanup()
                self.admin_runner = None
            if new.admin.listen is not None:
                await self._start_admin(new.admin.listen)
        return describe_changes(old, new, old_state, state, opened, removed_listeners)

    async def _retire(self, paths: list[Path], old_state: State, limit: float) -> None:
        """Removed paths close once no request begun under the State that had them is left
        (one waiting in an admission queue plans its first attempt when granted: on them),
        or after ``limit``: idle connections then, active ones when released."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(
            ctx.state is old_state for listener in self.listeners for ctx in listener.engine.requests()
        ):
            await asyncio.sleep(0.1)
        for path in paths:
            await path.pool.close()

    async def _first_probes(self, paths: list[Path], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.health.last_probe_at is None for p in paths):
            await asyncio.sleep(0.02)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to drain_timeout), then close."""
        self.draining = True
        self.ready = False
        await asyncio.gather(*(self._close_listener(lst, drain_timeout) for lst in self.listeners))
        self.listeners.clear()
        for task in list(self._background):
            task.cancel()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
            self.admin_runner = None
        await self.prober.close()
        await self.state.close()
        self.resolver.close()
        await self.access.close()

    def _on_probe(self, path: Path, ok: bool, changed: str | None) -> None:
        """A probe finished: re-rank that path's upstream. A failed probe fails over the
        attempts waiting on the path now, not at their own timeouts. A path back up lifts
        its endpoint's origin ejections (the outage was the whole origin's, and it is over)."""
        upstream = self.state.upstream(path.upstream)
        if changed == "up" and upstream is not None:
            if path.health.previous == "ejected":  # (counted like the ejection was)
                report_line(self.metrics, upstream, path, "restored", "its probes answer again")
            elif path.health.previous == "down":
                # (from down only: a new or rebuilt path's first probe, or a line's own
                # ejection ending, says nothing about the origin's models)
                for model in upstream.origin_recovered(path.endpoint.url):
                    report_origin(self.metrics, upstream, path, model, "restored", "its probes answer again")
        if upstream is not None:
            if ok:
                upstream.keep_standby()
            else:
                upstream.prewarm_standby(path)
        if not ok and (path.waiting or path.connecting):
            # Late senders too, and those still connecting; only requests that have somewhere
            # else to go: the others keep their chance here, and their own timeouts.
            movable = [resp for resp, ctx in path.waiting.items() if may_move(ctx)]
            opening = [fut for fut, ctx in path.connecting.items() if not fut.done() and may_move(ctx, "connect")]
            if movable or opening:
                self.metrics.rescues.inc((path.upstream, path.line.name), len(movable) + len(opening))
                if upstream is not None:  # a rescue is a local failure of the line (once, however many it moved)
                    upstream.on_attempt(path, "local")
            for resp in movable:
                resp.fail(PathDown(f"{path.label} stopped answering probes ({path.health.last_error})"))
            for fut in opening:
                fut.cancel()  # the attempt raises ConnectAbandoned and goes elsewhere
        if upstream is not None and upstream.reselect():
            first = upstream.order[0]
            log.info("upstream %s now prefers %s", upstream.name, first.label)
            self.metrics.switches.inc((upstream.name,))

    def _path_gauges(self) -> None:
        """Per-path gauges, rebuilt from the current state at each scrape (and the logs' drops,
        which their sinks count)."""
        now = time.monotonic()
        dropped = self.metrics.log_dropped.values
        dropped[("access",)] = float(self.access.dropped)
        dropped[("process",)] = float(process_log_dropped())
        rtt, up = self.metrics.path_rtt.values, self.metrics.path_up.values
        rtt.clear()
        up.clear()
        for path in self.state.paths.values():
            labels = (path.upstream, path.endpoint.url, path.line.name)
            if path.estimator.srtt is not None:
                rtt[labels] = path.estimator.srtt
            upstream = self.state.upstream(path.upstream)
            up[labels] = 1.0 if upstream is not None and upstream.is_usable(path, None, now) else 0.0
        m = self.metrics
        for gauge in (m.key_disabled, m.key_headroom, m.admission_inflight, m.admission_depth):
            gauge.values.clear()  # (set again by the filters that are still there)
        for chain in self.pipeline.chains.values():
            for f in chain.all_filters():
                f.on_scrape(self.metrics, now)

    # -- admin -----------------------------------------------------------------------------
    async def _start_admin(self, lc: ListenerConfig) -> None:
        guard = BrowserGuard.for_listener(lc)
        middlewares = [_admin_guard(guard)] if guard is not None else []
        if lc.tokens:
            middlewares.append(_admin_auth(lc, self.throttle))
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/-/healthy", self._healthy)
        app.router.add_get("/-/ready", self._ready)
        app.router.add_get("/-/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/-/reload", self._reload)
        limits = self.config.limits
        # The admin's idle connections close like the client listeners' (aiohttp's own
        # default is an hour); its per-address cap and header timer are the client side's only.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=limits.keepalive_timeout)
        await runner.setup()
        self.admin_runner = runner
        site: web.BaseSite
        if lc.unix is not None:
            _prepare_socket_path(lc.unix)
            site = web.UnixSite(runner, lc.unix, ssl_context=_server_tls(lc))
        else:
            site = web.TCPSite(runner, lc.host, lc.port, ssl_context=_server_tls(lc), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise _naming(exc, f"admin {lc.address}") from None
        log.info("admin on %s", lc.address)

    async def _healthy(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "draining" if self.draining else "starting"}, status=503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.status()), content_type="application/json")

    async def _reload(self, request: web.Request) -> web.Response:
        ok, detail = await self.reload()
        body = {"ok": ok, "generation": self.generation, ("changes" if ok else "error"): detail}
        return web.Response(body=orjson.dumps(body), status=200 if ok else 400, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def status(self) -> dict[str, Any]:
        """What /-/status answers; built only from redacted config and counters."""
        now = time.monotonic()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 1),
            "generation": self.generation,
            "config_source": self.config.source,
            "ready": self.ready,
            "listeners": [
                {
                    "address": lst.config.address,
                    "inflight": lst.engine.inflight,
                    "connections": len(lst.web_server.connections),
                }
                for lst in self.listeners
            ],
            "upstreams": [self._upstream_status(u, now) for u in self.state.upstreams],
            "config": dump_redacted(self.config),
        }

    def _upstream_status(self, u: Upstream, now: float) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": u.name,
            "prefix": u.prefix or "/",
            "provider": u.provider,
            "preferred": u.order[0].line.name if u.order else None,
            "switches": u.switches,
            "retry_budget_exhausted": u.budget.exhausted,
            "paths": [p.status() for p in u.order],  # in try order: the first takes traffic
            # models (or whole endpoints: model "*") the origin is failing or pausing for
            "origins": u.origin_status(),
            "keys": {},
        }
        for f in self.pipeline.chain(u).all_filters():
            status.update(f.status(now))  # (key pools: "keys", by id only)
        return status


# Health checks reveal nothing and orchestrators rarely send headers: always open.
_OPEN_ADMIN_PATHS = frozenset({"/-/healthy", "/-/ready"})


def _admin_guard(guard: BrowserGuard) -> Any:
    """Web pages may not drive the admin (a cross-site POST /-/reload): engine/guard.py."""

    @web.middleware
    async def browser_guard(request: web.Request, handler: Any) -> web.StreamResponse:
        refusal = guard.refusal(request.path, request.headers)  # (the path: no hops come here)
        if refusal is not None:
            return web.json_response({"error": refusal}, status=403, headers={"x-edgeproxy-error": "browser_refused"})
        response: web.StreamResponse = await handler(request)
        return response

    return browser_guard


def _admin_auth(lc: ListenerConfig, throttle: AuthThrottle) -> Any:
    """An admin listener with tokens wants one (x-edgeproxy-token or Authorization: Bearer,
    as Prometheus sends it) for /metrics, /-/status and /-/reload; repeated wrong ones from
    one address are slowed down as on client listeners."""
    tokens = [t.encode() for t in lc.tokens]

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in _OPEN_ADMIN_PATHS:
            given = request.headers.get("x-edgeproxy-token") or client_credential(
                request.headers.get("authorization", "")
            )
            if not token_matches(given, tokens):
                refused = web.json_response(
                    {"error": "missing or wrong admin token (send it as x-edgeproxy-token)"},
                    status=401,
                    headers={"x-edgeproxy-error": "unauthorized", "WWW-Authenticate": 'Bearer realm="edgeproxy"'},
                )
                delay = throttle.on_failure(request.remote)
                if delay:  # someone keeps guessing: make each guess slow, and reconnect
                    refused.force_close()
                    await asyncio.sleep(delay)
                return refused
        response: web.StreamResponse = await handler(request)
        return response

    return auth


def _server_tls(lc: ListenerConfig) -> ssl.SSLContext | None:
    if lc.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(lc.tls.cert, lc.tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _naming(exc: OSError, where: str) -> OSError:
    """The same error, saying which address it is about (a bare "No such file or directory"
    or "Address already in use" names nothing)."""
    return OSError(exc.errno, f"{where}: {exc.strerror or exc}")


def _prepare_socket_path(path: str) -> None:
    """A unix socket's directory made if missing (as systemd's RuntimeDirectory would), and a
    socket file left by a previous run removed."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    except OSError as exc:
        raise _naming(exc, f"unix:{path}") from None
    _remove_stale_socket(path)


def _remove_stale_socket(path: str) -> None:
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            os.unlink(path)
    except OSError:
        pass


async def _reload(proxy: Proxy, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        ok, detail = await proxy.reload()  # logs its own outcome
        if not ok:
            notifier.status(f"reload failed, serving the previous config: {detail.splitlines()[0]}")
        else:
            notifier.status(f"generation {proxy.generation}")
    finally:
        notifier.ready()


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then drain and return. Tells systemd how it goes."""
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: proxy._spawn(_reload(proxy, notifier)))
    watchdog = loop.create_task(watchdog_loop(notifier), name="sd_notify watchdog")
    notifier.ready()
    log.info(
        "edgeproxy %s ready (%d upstreams, %d paths)", __version__, len(proxy.state.upstreams), len(proxy.state.paths)
    )
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        log.info("stopping: draining for up to %gs", proxy.config.drain_timeout)
        await proxy.stop(proxy.config.drain_timeout)
        watchdog.cancel()
        notifier.close()
        log.info("stopped")

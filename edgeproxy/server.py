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
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .accesslog import AccessLog
from .config import Config, ListenerConfig, dump_redacted
from .dns import Resolver
from .errors import PathDown
from .forward import Engine
from .lines import Path
from .metrics import Metrics
from .probe import Prober
from .state import State

__all__ = ["Proxy", "serve"]

log = logging.getLogger("edgeproxy")

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

    def __init__(self, config: ListenerConfig, engine: Engine, web_server: web.Server) -> None:
        self.config = config
        self.engine = engine
        self.web_server = web_server
        self.server: asyncio.AbstractServer | None = None


class Proxy:
    """The whole running edgeproxy: state, listeners, admin, metrics."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.access = AccessLog(config.log.access)
        self.resolver = Resolver()
        self.state = State.build(config, self.resolver)
        self.prober = Prober(config.probe, self.metrics, self._on_probe)
        self.listeners: list[Listener] = []
        self.admin_runner: web.AppRunner | None = None
        self.started_at = time.time()
        self.generation = 1
        self.draining = False
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener (all or none), open warm pools, start the admin endpoint."""
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        try:
            for lc in self.config.listen:
                engine = Engine(self.state, lc, self.metrics, self.access, self.prober.urgent)
                ws = web.Server(
                    engine.handle,
                    handler_cancellation=True,  # client gone -> cancel -> upstream closed
                    access_log=None,
                    max_line_size=limits.max_header,
                    max_field_size=limits.max_header,
                )
                listener = Listener(lc, engine, ws)
                max_conns = limits.max_connections

                def factory(ws: web.Server = ws, max_conns: int = max_conns) -> asyncio.Protocol:
                    if len(ws.connections) >= max_conns:
                        return _Refuse()
                    return ws()

                tls = _server_tls(lc)
                if lc.unix is not None:
                    _remove_stale_socket(lc.unix)
                    listener.server = await loop.create_unix_server(factory, lc.unix, ssl=tls, backlog=1024)
                else:
                    listener.server = await loop.create_server(
                        factory, lc.host, lc.port or 0, ssl=tls, backlog=1024, reuse_address=True
                    )
                self.listeners.append(listener)
                log.info("listening on %s%s", lc.address, " (tls)" if tls else "")
            if self.config.admin.listen is not None:
                await self._start_admin(self.config.admin.listen)
        except BaseException:
            await self.stop(0)
            raise
        self.state.start()
        self.prober.sync(self.state.paths.values())
        self.ready = True

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to drain_timeout), then close."""
        self.draining = True
        self.ready = False
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        deadline = time.monotonic() + drain_timeout
        while any(lst.engine.inflight for lst in self.listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for listener in self.listeners:
            await listener.web_server.shutdown(0.1)
            if listener.config.unix is not None:
                _remove_stale_socket(listener.config.unix)
        self.listeners.clear()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
            self.admin_runner = None
        await self.prober.close()
        await self.state.close()
        self.resolver.close()
        self.access.flush()

    def _on_probe(self, path: Path, changed: bool) -> None:
        """A probe finished: re-rank that path's upstream; export what changed. A line found
        dead fails over the attempts waiting on it now, not at their own timeouts."""
        upstream = self.state.upstream(path.upstream)
        if path.health.state == "down" and path.waiting and upstream is not None and upstream.has_alternative(path):
            # At every failed probe (late senders too), and only with somewhere else to go:
            # with none, the attempt keeps its own chance and its own timeouts.
            self.metrics.rescues.inc((path.upstream, path.line.name), len(path.waiting))
            for resp in list(path.waiting):
                resp.fail(PathDown(f"{path.label} stopped answering probes ({path.health.last_error})"))
        if upstream is not None and upstream.reselect():
            first = upstream.order[0]
            log.info("upstream %s now prefers %s", upstream.name, first.label)
            self.metrics.switches.inc((upstream.name,))
        m, labels = self.metrics, (path.upstream, path.endpoint.url, path.line.name)
        srtt = path.estimator.srtt
        if srtt is not None:
            m.path_rtt.set(labels, srtt)
        m.path_up.set(labels, 1 if path.health.is_healthy(time.monotonic()) else 0)

    # -- admin -----------------------------------------------------------------------------
    async def _start_admin(self, lc: ListenerConfig) -> None:
        app = web.Application()
        app.router.add_get("/-/healthy", self._healthy)
        app.router.add_get("/-/ready", self._ready)
        app.router.add_get("/-/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.admin_runner = runner
        site: web.BaseSite
        if lc.unix is not None:
            _remove_stale_socket(lc.unix)
            site = web.UnixSite(runner, lc.unix, ssl_context=_server_tls(lc))
        else:
            site = web.TCPSite(runner, lc.host, lc.port, ssl_context=_server_tls(lc), reuse_address=True)
        await site.start()
        log.info("admin on %s", lc.address)

    async def _healthy(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "draining" if self.draining else "starting"}, status=503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.status()), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def status(self) -> dict[str, Any]:
        """What /-/status answers; built only from redacted config and counters."""
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
            "upstreams": [
                {
                    "name": u.name,
                    "prefix": u.prefix or "/",
                    "provider": u.provider,
                    "preferred": u.order[0].line.name if u.order else None,
                    "switches": u.switches,
                    "retry_budget_exhausted": u.budget.exhausted,
                    "paths": [p.status() for p in u.order],  # in try order: the first takes traffic
                }
                for u in self.state.upstreams
            ],
            "config": dump_redacted(self.config),
        }


def _server_tls(lc: ListenerConfig) -> ssl.SSLContext | None:
    if lc.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(lc.tls.cert, lc.tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _remove_stale_socket(path: str) -> None:
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            os.unlink(path)
    except OSError:
        pass


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    loop = asyncio.get_running_loop()
    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "edgeproxy %s ready (%d upstreams, %d paths)", __version__, len(proxy.state.upstreams), len(proxy.state.paths)
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining for up to %gs", config.drain_timeout)
        await proxy.stop(config.drain_timeout)
        log.info("stopped")

"""Shared fixtures: a fake origin and real edgeproxy instances on localhost sockets."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.config import load_dict
from edgeproxy.ops.server import Proxy
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_origin() -> AsyncIterator[FakeOrigin]:
    o = FakeOrigin()
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


@pytest.fixture
async def origin() -> AsyncIterator[FakeOrigin]:
    async with running_origin() as o:
        yield o


@pytest.fixture
async def origin2() -> AsyncIterator[FakeOrigin]:
    """A second fake origin: another endpoint (a fallback, a relay)."""
    async with running_origin() as o:
        yield o


@pytest.fixture
def fallback(origin2: FakeOrigin) -> FakeOrigin:
    """The operator's fallback endpoint (the second origin, by the name its tests use)."""
    return origin2


@pytest.fixture
async def lines(origin: FakeOrigin) -> AsyncIterator[tuple[LineSim, LineSim]]:
    """Two lines to one origin: `near` (preferred: faster) and `far`."""
    near, far = LineSim("127.0.0.1", origin.port), LineSim("127.0.0.1", origin.port, delay=0.01)
    await near.start()
    await far.start()
    yield near, far
    await near.stop()
    await far.stop()


class RedisServer:
    """A real redis-server on a loopback port, in a temp dir, persisting nothing."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe, self.workdir = exe, workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again, on the same port); return when it answers PING."""
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to clients, as when a host dies)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(exe, tmp_path)
    server.start()
    yield server
    server.stop()


def proxy_config(origin_url: str, **overrides: Any) -> dict[str, Any]:
    """A config dict: one listener on a free port, openai and anthropic upstreams at the origin."""
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": {"listen": "off"},
        "log": {"access": "off"},
        "upstreams": {
            "openai": {"prefix": "/v1", "endpoints": [{"url": origin_url + "/v1"}]},
            "anthropic": {"prefix": "/anthropic", "provider": "anthropic", "endpoints": [{"url": origin_url}]},
            "gemini": {"prefix": "/gemini", "provider": "gemini", "endpoints": [{"url": origin_url}]},
        },
    }
    cfg.update(overrides)
    return cfg


class RunningProxy:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        lc = proxy.config.listen[0]
        self.url = f"http://{lc.host}:{lc.port}" if lc.unix is None else ""
        admin = proxy.config.admin.listen
        self.admin_url = f"http://{admin.host}:{admin.port}" if admin is not None and admin.unix is None else ""


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    """Start edgeproxy in this test's event loop from a config dict; stopped at teardown."""
    started: list[Proxy] = []

    async def make(cfg: dict[str, Any], env: dict[str, str] | None = None) -> RunningProxy:
        proxy = Proxy(load_dict(cfg, env=env or {}))
        await proxy.start()
        started.append(proxy)
        return RunningProxy(proxy)

    yield make
    for p in started:
        with contextlib.suppress(Exception):
            await p.stop(1.0)


@pytest.fixture
async def proxy(origin: FakeOrigin, make_proxy: Callable[..., Awaitable[RunningProxy]]) -> RunningProxy:
    """The usual setup: edgeproxy in front of the fake origin, no tokens, no keys."""
    return await make_proxy(proxy_config(origin.url))

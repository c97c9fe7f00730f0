"""Egress lines over real sockets: bind addresses through the line simulator, a real HTTP
CONNECT proxy (tinyproxy) and a real SOCKS5 proxy (microsocks), and RTT-based route choice."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PROBE = {"interval": "200ms", "timeout": "150ms"}


async def chat(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=CHAT) as r:
        await r.read()
        return r.status


def lines_used(p: RunningProxy) -> dict[str, int]:
    return {path.line.name: path.requests for path in p.proxy.state.paths.values() if path.upstream == "openai"}


async def wait_until(cond: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def preferred(p: RunningProxy) -> str:
    up = p.proxy.state.upstream("openai")
    assert up is not None
    return up.order[0].line.name


@pytest.fixture
async def sim(origin: FakeOrigin) -> AsyncIterator[LineSim]:
    s = LineSim("127.0.0.1", origin.port)
    await s.start()
    yield s
    await s.stop()


def only_openai(cfg: dict[str, Any], url: str, lines: list[str] | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"url": url + "/v1"}
    if lines:
        ep["lines"] = lines
    cfg["upstreams"] = {"openai": {"prefix": "/v1", "endpoints": [ep]}}
    return cfg


async def test_bind_lines_take_the_faster_source_address(sim: LineSim, make_proxy: Any) -> None:
    sim.delay_by_source = {"127.0.0.2": 0.040, "127.0.0.3": 0.010}
    cfg = only_openai(proxy_config(""), f"http://{sim.address}")
    cfg["lines"] = {"slow": {"bind": "127.0.0.2"}, "fast": {"bind": "127.0.0.3"}}
    cfg["probe"] = PROBE
    p = await make_proxy(cfg)
    await wait_until(lambda: preferred(p) == "fast", 3.0, "the 10 ms line to be preferred")
    for _ in range(20):
        assert await chat(p.url) == 200
    used = lines_used(p)
    assert used["fast"] >= 19, used

    # Swap the delays: traffic follows within about three probe intervals (0.6 s here). The bound
    # is generous for a shared machine; bench/route.py measures the real time to move.
    sim.delay_by_source = {"127.0.0.2": 0.010, "127.0.0.3": 0.040}
    await wait_until(lambda: preferred(p) == "slow", 2.5, "traffic to move after the swap")
    status = p.proxy.status()
    assert status["upstreams"][0]["preferred"] == "slow"
    assert status["upstreams"][0]["paths"][0]["line"] == "slow"  # in try order
    rows = {row["line"]: row for row in status["upstreams"][0]["paths"]}
    assert rows["slow"]["srtt_ms"] < rows["fast"]["srtt_ms"]
    assert rows["slow"]["state"] == "up" and rows["fast"]["last_probe_ok"] is True


async def test_one_spike_moves_no_traffic(sim: LineSim, make_proxy: Any) -> None:
    sim.delay_by_source = {"127.0.0.2": 0.005, "127.0.0.3": 0.030}
    cfg = only_openai(proxy_config(""), f"http://{sim.address}")
    cfg["lines"] = {"a": {"bind": "127.0.0.2"}, "b": {"bind": "127.0.0.3"}}
    cfg["probe"] = {"interval": "500ms", "timeout": "450ms"}
    p = await make_proxy(cfg)
    await wait_until(lambda: preferred(p) == "a", 3.0, "line a preferred")
    up = p.proxy.state.upstream("openai")
    assert up is not None
    path_a = next(x for x in up.paths if x.line.name == "a")
    await wait_until(lambda: path_a.estimator.samples >= 3, 3.0, "a warmed-up estimate")
    switches, probes = up.switches, path_a.health.probes
    seen: set[str] = set()

    async def watch() -> None:
        while True:
            seen.add(preferred(p))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    sim.delay_by_source = {"127.0.0.2": 0.15, "127.0.0.3": 0.030}  # one slow probe on a (300 ms RTT)
    await wait_until(lambda: path_a.health.probes == probes + 1, 3.0, "one probe during the spike")
    sim.delay_by_source = {"127.0.0.2": 0.005, "127.0.0.3": 0.030}
    await wait_until(lambda: path_a.health.probes >= probes + 4, 3.0, "probes after the spike")
    watcher.cancel()
    assert seen == {"a"}, [(x.line.name, x.estimator, x.health) for x in up.paths]
    assert up.switches == switches


@pytest.mark.parametrize("failure", ["refuse", "blackhole", "reset"])
async def test_dead_line_loses_traffic_to_live_one(origin: FakeOrigin, make_proxy: Any, failure: str) -> None:
    near, far = LineSim("127.0.0.1", origin.port), LineSim("127.0.0.1", origin.port, delay=0.015)
    await near.start()
    await far.start()
    try:
        cfg = proxy_config("")
        cfg["lines"] = {"near": {}, "far": {}}
        cfg["upstreams"] = {
            "openai": {
                "prefix": "/v1",
                "endpoints": [
                    {"url": f"http://{near.address}/v1", "lines": ["near"]},
                    {"url": f"http://{far.address}/v1", "lines": ["far"]},
                ],
            }
        }
        cfg["probe"] = PROBE
        p = await make_proxy(cfg)
        await wait_until(lambda: preferred(p) == "near", 3.0, "near preferred")
        near.set_mode(failure)
        await wait_until(lambda: preferred(p) == "far", 3.0, f"far preferred once near is dead ({failure})")
        for _ in range(5):
            assert await chat(p.url) == 200
        near.set_mode("pass")
        await wait_until(lambda: preferred(p) == "near", 5.0, "near preferred again once it is back")
    finally:
        await near.stop()
        await far.stop()


# -- real proxies ----------------------------------------------------------------------------


def _need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it from Debian)")
    return path


@contextlib.contextmanager
def _process(args: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{args[0]} did not start")
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[str]:
    binary = _need("tinyproxy")
    port = free_port()
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 200\nLogLevel Error\nBasicAuth edge p4ss\n")
    with _process([binary, "-d", "-c", str(conf)], port):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def microsocks() -> Iterator[str]:
    binary = _need("microsocks")
    port = free_port()
    with _process([binary, "-i", "127.0.0.1", "-p", str(port), "-u", "edge", "-P", "p4ss"], port):
        yield f"127.0.0.1:{port}"


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
async def test_proxy_lines_carry_requests_and_streams(
    scheme: str, origin: FakeOrigin, make_proxy: Any, request: pytest.FixtureRequest
) -> None:
    addr = request.getfixturevalue("tinyproxy" if scheme == "http" else "microsocks")
    cfg = only_openai(proxy_config(""), origin.url, ["corp"])
    cfg["lines"] = {"corp": {"proxy": f"{scheme}://edge:p4ss@{addr}"}}
    p = await make_proxy(cfg)
    assert await chat(p.url) == 200
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = await r.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert lines_used(p)["corp"] == 2
    path = next(iter(p.proxy.state.paths.values()))
    assert path.connect_rtt is not None  # the tunnel set-up was timed
    await wait_until(lambda: path.estimator.srtt is not None, 3.0, "a probe through the proxy")


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_proxy_line_wrong_password_is_a_clear_502(
    scheme: str, origin: FakeOrigin, make_proxy: Any, request: pytest.FixtureRequest
) -> None:
    addr = request.getfixturevalue("tinyproxy" if scheme == "http" else "microsocks")
    cfg = only_openai(proxy_config(""), origin.url, ["corp"])
    cfg["lines"] = {"corp": {"proxy": f"{scheme}://edge:wrong-secret@{addr}"}}
    p = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=CHAT) as r:
        body = await r.text()
        assert r.status == 502
    assert "proxy" in body and addr in body
    assert "wrong-secret" not in body
    status = str(p.proxy.status())
    assert "wrong-secret" not in status
    assert origin.requests == []


async def test_proxy_down_is_a_clear_502(origin: FakeOrigin, make_proxy: Any) -> None:
    port = free_port()
    cfg = only_openai(proxy_config(""), origin.url, ["corp"])
    cfg["lines"] = {"corp": {"proxy": f"socks5://127.0.0.1:{port}"}}
    p = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.post(p.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 502
        assert "connection refused" in await r.text()


async def test_full_pool_spills_to_the_next_line(sim: LineSim, origin: FakeOrigin, make_proxy: Any) -> None:
    sim.delay_by_source = {"127.0.0.2": 0.001, "127.0.0.3": 0.020}
    cfg = only_openai(proxy_config(""), f"http://{sim.address}")
    cfg["lines"] = {"a": {"bind": "127.0.0.2"}, "b": {"bind": "127.0.0.3"}}
    cfg["probe"] = {"interval": "5s", "timeout": "1s"}
    cfg["pool"] = {"max_per_path": 2, "warm": 1}
    p = await make_proxy(cfg)
    await wait_until(lambda: preferred(p) == "a", 3.0, "line a preferred")
    origin.latency = 0.3  # hold each request for a while
    statuses = await asyncio.gather(*(chat(p.url) for _ in range(4)))
    assert statuses == [200] * 4
    used = lines_used(p)
    assert used == {"a": 2, "b": 2}, used  # a's pool holds two; the rest spilled to b


@pytest.mark.parametrize("when", ["from the start", "while serving"])
async def test_every_line_dead_the_preference_holds_still(
    origin: FakeOrigin, make_proxy: Any, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """Every path down (one endpoint refusing or resetting, the other a black hole, two lines
    each): the preferred path stays put, with no "now prefers" lines, round after round of
    failed probes; the first path that answers again takes the traffic at once."""
    a, b = LineSim("127.0.0.1", origin.port), LineSim("127.0.0.1", origin.port, delay=0.005)
    await a.start()
    await b.start()
    try:
        cfg = proxy_config("")
        cfg["lines"] = {"isp1": {"bind": "127.0.0.2"}, "isp2": {"bind": "127.0.0.3"}}
        cfg["upstreams"] = {
            "openai": {
                "prefix": "/v1",
                "endpoints": [{"url": f"http://{a.address}/v1"}, {"url": f"http://{b.address}/v1", "priority": 2}],
            }
        }
        cfg["probe"] = PROBE
        if when == "from the start":
            a.set_mode("refuse")
            b.set_mode("blackhole")
        p = await make_proxy(cfg)
        up = p.proxy.state.upstream("openai")
        assert up is not None
        if when == "while serving":
            await wait_until(lambda: all(x.estimator.samples >= 3 for x in up.paths), 3.0, "every path measured")
            assert await chat(p.url) == 200
            a.set_mode("reset")  # (refusing new connections would leave the warm ones working)
            b.set_mode("blackhole")
        await wait_until(lambda: all(x.health.state == "down" for x in up.paths), 5.0, "every path down")
        caplog.clear()
        switches, first = up.switches, up.order[0]
        await asyncio.sleep(2.0)  # ten probe rounds, every one failing
        assert up.switches - switches <= 1, [(x.label, x.health) for x in up.order]
        assert sum("now prefers" in r.getMessage() for r in caplog.records) <= 1, caplog.text
        assert up.order[0] is first
        # A request while everything is down is answered (an error), not left hanging.
        assert await chat(p.url) == 502
        b.set_mode("pass")  # the priority-2 endpoint answers again: traffic goes there
        await wait_until(
            lambda: up.order[0].endpoint.url.startswith(f"http://{b.address}") and up.order[0].health.state == "up",
            3.0,
            "a path of b preferred once it answers",
        )
        assert await chat(p.url) == 200
    finally:
        await a.stop()
        await b.stop()

"""The long haul: a black-holed line left at once, endpoints behind a private CA, and honest
logs for clients that hang up as soon as they have their answer. Real sockets throughout."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import trustme

from edgeproxy.config import ConfigError, load_dict
from edgeproxy.routing.lines import tls_context
from edgeproxy.telemetry.accesslog import AccessLog
from tests.conftest import proxy_config
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin
from tests.test_failover import post, two_lines_proxy

STREAM = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def read_until_done_then_hang_up(url: str) -> bytes:
    """What an SDK does: read events until [DONE], then close the connection at once."""
    got = b""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        resp = await s.post(url + "/v1/chat/completions", json=STREAM)
        async for line in resp.content:
            got += line
            if line.startswith(b"data: [DONE]"):
                break
        resp.close()  # hang up before the body's last chunk
    return got


async def test_a_stream_delivered_whole_is_logged_with_its_status_when_the_client_hangs_up(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.hold_after_end = 1.0  # [DONE] goes out; the body ends a second later
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        got = await read_until_done_then_hang_up(p.url)
        assert b"data: [DONE]" in got
        await origin.wait_for(lambda: origin.stream_disconnects >= 1, 3.0, "the origin saw the stream end")
        await asyncio.sleep(0.1)  # the log flushes on the next loop turn
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["status"] == 200 and record["error"] is None  # not 499 client_disconnected


async def test_a_client_that_leaves_mid_stream_is_still_logged_499(
    origin: FakeOrigin, make_proxy: Any, tmp_path: Path
) -> None:
    p = await make_proxy(proxy_config(origin.url))
    origin.events, origin.event_interval = 50, 0.05
    log_path = tmp_path / "access.log"
    with log_path.open("wb") as f:
        p.proxy.listeners[0].engine.access = AccessLog("json", f.fileno())
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            resp = await s.post(p.url + "/v1/chat/completions", json=STREAM)
            await resp.content.readline()
            resp.close()  # gone after the first event
        await origin.wait_for(lambda: origin.stream_disconnects >= 1, 3.0, "the origin saw the client go")
        await asyncio.sleep(0.1)
    record = orjson.loads(log_path.read_bytes().splitlines()[-1])
    assert record["status"] == 499 and record["error"] == "client_disconnected"


# -- endpoints[].ca: an origin behind a private CA ----------------------------------------------


@pytest.fixture
async def tls_origin(tmp_path: Path) -> AsyncIterator[tuple[FakeOrigin, Path, Path]]:
    """A fake origin serving TLS with a certificate from a private CA: (origin, that CA's PEM,
    another CA's PEM)."""
    ca, other = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    origin = FakeOrigin(ssl_context=ctx)
    await origin.start()
    yield origin, tmp_path / "ca.pem", tmp_path / "other.pem"
    await origin.stop()


def endpoint_config(url: str, **endpoint: Any) -> dict[str, Any]:
    cfg = proxy_config("")
    cfg["upstreams"] = {"openai": {"prefix": "/v1", "endpoints": [{"url": url + "/v1", **endpoint}]}}
    return cfg


async def test_an_endpoint_trusts_its_private_ca(tls_origin: tuple[FakeOrigin, Path, Path], make_proxy: Any) -> None:
    origin, ca, _ = tls_origin
    assert origin.url.startswith("https://")
    p = await make_proxy(endpoint_config(origin.url, ca=str(ca)))
    client = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-client", max_retries=0)
    got = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert got.choices[0].message.content and len(origin.requests) == 1


async def test_an_endpoint_without_its_ca_or_with_another_is_refused_with_a_clear_error(
    tls_origin: tuple[FakeOrigin, Path, Path], make_proxy: Any
) -> None:
    origin, _, other = tls_origin
    for endpoint in ({}, {"ca": str(other)}):  # the system CAs alone, or a CA that did not sign it
        p = await make_proxy(endpoint_config(origin.url, **endpoint))
        async with aiohttp.ClientSession() as s, s.get(p.url + "/v1/models") as r:
            body = await r.read()
        assert r.status == 502 and b"certificate" in body.lower()
    assert origin.requests == []


def test_the_ca_is_added_to_the_system_cas_not_put_in_their_place(tmp_path: Path) -> None:
    """A relay with its own CA must not cost the public endpoints their trust (SSL_CERT_FILE,
    the only way before, replaced the system bundle)."""
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    system = tls_context().cert_store_stats()["x509_ca"]
    assert tls_context(str(tmp_path / "ca.pem")).cert_store_stats()["x509_ca"] == system + 1


def test_endpoint_ca_config_errors_name_the_key_path(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    for ca, url, expected in (
        (str(tmp_path / "missing.pem"), "https://relay.example.com/v1", "does not exist"),
        (str(tmp_path / "junk.pem"), "https://relay.example.com/v1", "not a PEM bundle"),
        (str(tmp_path / "junk.pem"), "http://relay.example.com/v1", "only applies to an https"),
    ):
        with pytest.raises(ConfigError) as err:
            load_dict({"upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": url, "ca": ca}]}}})
        assert "upstreams.openai.endpoints[0].ca" in str(err.value) and expected in str(err.value)


# -- a black hole left at once -------------------------------------------------------------------


async def steady_load(url: str, seconds: float, rate: float = 20.0) -> list[tuple[float, int, float]]:
    """Requests at ``rate`` per second for ``seconds``: (start, status, seconds taken) each."""
    loop = asyncio.get_running_loop()
    out: list[tuple[float, int, float]] = []

    async def one(s: aiohttp.ClientSession) -> None:
        t0 = loop.time()
        async with s.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}) as r:
            await r.read()
            out.append((t0, r.status, loop.time() - t0))

    async with aiohttp.ClientSession() as s:
        tasks = []
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, i / rate - (loop.time() - tasks[0][0])) if tasks else 0)
            tasks.append((loop.time(), asyncio.ensure_future(one(s))))
        await asyncio.gather(*(t for _, t in tasks))
    return out


async def test_a_black_hole_is_left_without_waiting_for_a_regular_probe(
    lines: tuple[LineSim, LineSim],
    make_proxy: Any,
    origin: FakeOrigin,
) -> None:
    """Regular probes 60 s apart: only the evidence of real requests (a slow one has the line
    probed at once, the failed probe has it re-probed at once) can find the hole."""
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far, probe={"interval": "60s", "timeout": "1s"})
    loop = asyncio.get_running_loop()
    load = asyncio.ensure_future(steady_load(p.url, 4.0))
    await asyncio.sleep(0.5)
    hole = loop.time()
    near.set_mode("blackhole")  # new connections hang, open ones freeze
    results = await load
    assert [status for _, status, _ in results] == [200] * len(results)  # nobody saw the hole
    paths = {x.endpoint.port: x for x in p.proxy.state.paths.values()}
    assert paths[near.port].health.state == "down"  # found without a regular probe
    late = [took for t0, _, took in results if t0 > hole + 2.5]  # generous: the target is 1.5 s (bench)
    assert late and max(late) < 0.5  # nobody who came later waited on the dead line


async def test_a_request_that_cannot_connect_has_the_line_probed_at_once(
    lines: tuple[LineSim, LineSim],
    make_proxy: Any,
    origin: FakeOrigin,
) -> None:
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far, probe={"interval": "60s", "timeout": "1s"}, pool={"warm": 0})
    near.set_mode("reset")  # the open connections die...
    near.set_mode("refuse")  # ...and new ones are refused (the line's far end went away)
    paths = {x.endpoint.port: x for x in p.proxy.state.paths.values()}
    for _ in range(3):
        assert (await post(p.url))[0] == 200  # the first failed over to the far line...
    # ...and had the line probed on a new connection at once: that failed too, so the next
    # ones went straight to the far line (suspect), and the re-probe then took it down
    assert p.proxy.metrics.failovers.values.get(("openai", "connect")) == 1
    await origin.wait_for(lambda: paths[near.port].health.state == "down", 2.0, "the line taken down")
    near.set_mode("pass")
    await origin.wait_for(lambda: paths[near.port].health.state == "up", 5.0, "re-probed fast until it answers")


async def test_the_standby_path_is_kept_warm_for_the_traffic_it_would_take(
    lines: tuple[LineSim, LineSim],
    make_proxy: Any,
    origin: FakeOrigin,
) -> None:
    """Across a border every request that lands on a cold pool at a failover pays a handshake:
    the path next in line holds open connections for the traffic of the preferred one."""
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far, probe={"interval": "500ms", "timeout": "400ms"})
    paths = {x.endpoint.port: x for x in p.proxy.state.paths.values()}
    standby = paths[far.port].pool
    assert standby.idle <= 2  # the configured warm one (and a probe's) while nothing flows
    origin.latency = 0.3  # (probes too: under their timeout)
    assert [r[0] for r in await asyncio.gather(*(post(p.url) for _ in range(6)))] == [200] * 6
    await origin.wait_for(lambda: standby.idle >= 6, 5.0, "the standby pool warmed for the traffic")
    origin.latency = 0.0
    opened = standby.connects
    near.set_mode("refuse")  # the preferred path's line dies: its traffic moves to the standby
    near.set_mode("reset")
    assert [r[0] for r in await asyncio.gather(*(post(p.url) for _ in range(6)))] == [200] * 6
    assert standby.connects == opened  # every one of them found a connection ready there


async def test_one_failed_urgent_probe_does_not_move_the_route(
    lines: tuple[LineSim, LineSim],
    make_proxy: Any,
    origin: FakeOrigin,
) -> None:
    """A blip (the re-probe answers) leaves the preference where it was."""
    near, far = lines
    p = await two_lines_proxy(make_proxy, near, far, probe={"interval": "60s", "timeout": "1s"})
    up = p.proxy.state.upstream("openai")
    switches = up.switches
    near.delay = 0.4  # a blip: slow enough for an urgent probe to fail, over before the re-probe
    slow = asyncio.ensure_future(post(p.url))
    await asyncio.sleep(0.6)
    near.delay = 0.0
    assert (await slow)[0] == 200
    await asyncio.sleep(1.0)
    assert up.switches == switches and up.order[0].endpoint.port == near.port
    assert up.order[0].health.state == "up"

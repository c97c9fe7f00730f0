"""Config reload: swap atomically or change nothing; unchanged paths keep their warm pools."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from edgeproxy.config import load_file
from edgeproxy.ops.server import Proxy
from tests.conftest import free_port
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin
from tests.test_cli import EDGEPROXY, ROOT, _wait_ready

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def write_config(path: Path, port: int, lines: dict[str, Any], endpoints: list[dict[str, Any]], **more: Any) -> None:
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": "off"},
        "log": {"access": "off"},
        "lines": lines,
        "upstreams": {"openai": {"prefix": "/v1", "endpoints": endpoints}},
        "probe": {"interval": "1s", "timeout": "500ms"},
    }
    cfg.update(more)
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
async def sims(origin: FakeOrigin) -> Any:
    a, b = LineSim("127.0.0.1", origin.port), LineSim("127.0.0.1", origin.port)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def started(path: Path) -> Proxy:
    proxy = Proxy(load_file(str(path)))
    await proxy.start()
    return proxy


async def chat(port: int) -> int:
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
        await r.read()
        return r.status


async def test_reload_keeps_unchanged_paths_and_adds_new_ones(sims: Any, tmp_path: Path) -> None:
    a, b = sims
    conf, port = tmp_path / "c.yaml", free_port()
    ep_a = {"url": f"http://{a.address}/v1"}
    write_config(conf, port, {"direct": {}}, [ep_a])
    proxy = await started(conf)
    try:
        assert await chat(port) == 200
        (path_a,) = proxy.state.paths.values()
        connects = path_a.pool.connects
        write_config(conf, port, {"direct": {}}, [ep_a, {"url": f"http://{b.address}/v1", "priority": 2}])
        ok, summary = await proxy.reload()
        assert ok, summary
        assert "1 kept, 1 new, 0 removed" in summary
        assert proxy.generation == 2
        kept = proxy.state.paths[("openai", f"http://{a.address}/v1", "direct")]
        assert kept is path_a and path_a.pool.connects == connects  # same warm pool
        new = proxy.state.paths[("openai", f"http://{b.address}/v1", "direct")]
        assert new.health.last_probe_at is not None  # probed before it could take traffic
        # and back: the removed path drains and closes
        write_config(conf, port, {"direct": {}}, [ep_a])
        ok, summary = await proxy.reload()
        assert ok and "1 removed" in summary
        await asyncio.sleep(0.1)
        assert new.pool.idle == 0 and new.pool._closed
        assert await chat(port) == 200
        metrics = proxy.metrics.render().decode()
        assert f'endpoint="http://{a.address}/v1"' in metrics
        assert b.address not in metrics  # no stale series for the removed path
    finally:
        await proxy.stop(1)


async def test_a_path_that_still_exists_is_kept_whatever_else_changed(
    origin: FakeOrigin, sims: Any, tmp_path: Path
) -> None:
    """Adding a line to an endpoint's `lines`, changing its priority, models and keys' limits:
    every (upstream, endpoint, line) that still exists keeps its warm pool, RTT history and
    health, and serves with the new settings at once."""
    a, b = sims
    conf, port = tmp_path / "c.yaml", free_port()
    lines = {"direct": {}, "isp2": {"bind": "127.0.0.2"}}
    ep_a: dict[str, Any] = {
        "url": f"http://{a.address}/v1",
        "lines": ["direct"],
        "keys": [{"key": "sk-a-0123456789", "rpm": 100}],
    }
    ep_b: dict[str, Any] = {"url": f"http://{b.address}/v1", "lines": ["direct"], "priority": 2}
    write_config(conf, port, lines, [ep_a, ep_b])
    proxy = await started(conf)
    try:
        assert await chat(port) == 200
        up = proxy.state.upstream("openai")
        assert up is not None and up.order[0].endpoint.url == ep_a["url"]
        path_a, path_b = (proxy.state.paths[("openai", ep["url"], "direct")] for ep in (ep_a, ep_b))
        for _ in range(200):  # RTT history worth keeping
            if path_a.estimator.samples >= 2 and path_b.estimator.samples >= 2:
                break
            await asyncio.sleep(0.05)
        samples, connects_b = path_a.estimator.samples, b.connections_total
        idle_b = path_b.pool.idle

        # b becomes the first choice and renames the model; a gets a second line and a new rpm
        ep_a = {**ep_a, "lines": ["direct", "isp2"], "priority": 3, "keys": [{"key": "sk-a-0123456789", "rpm": 50}]}
        ep_b = {**ep_b, "priority": 1, "models": {"gpt-4o": "gpt-4o-2024-08-06"}}
        write_config(conf, port, lines, [ep_a, ep_b])
        ok, summary = await proxy.reload()
        assert ok, summary
        assert "paths: 2 kept, 1 new, 0 removed" in summary
        kept_a, kept_b = (proxy.state.paths[("openai", ep["url"], "direct")] for ep in (ep_a, ep_b))
        assert kept_a is path_a and kept_b is path_b
        assert path_a.estimator.samples >= samples and path_a.health.state == "up"
        assert b.connections_total == connects_b and path_b.pool.idle == idle_b  # warm pool as it was
        up = proxy.state.upstream("openai")
        assert up is not None and up.order[0] is path_b  # the new priorities rank at once
        requests_b = path_b.requests
        assert await chat(port) == 200
        assert path_b.requests == requests_b + 1
        assert origin.requests[-1].json()["model"] == "gpt-4o-2024-08-06"  # b's models map
        assert proxy.status()["upstreams"][0]["paths"][0]["priority"] == 1
        # and a key's limit alone: nothing at all happens to the paths
        ep_a["keys"] = [{"key": "sk-a-0123456789", "rpm": 60}]
        write_config(conf, port, lines, [ep_a, ep_b])
        connects_a, probes_a = a.connections_total, path_a.health.probes
        ok, summary = await proxy.reload()
        assert ok and "paths: 3 kept, 0 new, 0 removed" in summary, summary
        assert a.connections_total == connects_a and path_a.health.probes <= probes_a + 1  # no warm-up, no probe
    finally:
        await proxy.stop(1)


async def test_new_connection_settings_rebuild_the_path(origin: FakeOrigin, sims: Any, tmp_path: Path) -> None:
    """A line whose connections go another way (here: another source address) gets a new
    pool: the reload says the path was rebuilt, and the new connections come from there."""
    a, _ = sims
    conf, port = tmp_path / "c.yaml", free_port()
    ep = {"url": f"http://{a.address}/v1"}
    write_config(conf, port, {"isp": {"bind": "127.0.0.2"}}, [ep])
    proxy = await started(conf)
    try:
        assert await chat(port) == 200
        (old,) = proxy.state.paths.values()
        write_config(conf, port, {"isp": {"bind": "127.0.0.3"}}, [ep])
        ok, summary = await proxy.reload()
        assert ok and "paths: 0 kept, 0 new, 0 removed, 1 rebuilt" in summary, summary
        assert "lines changed: isp" in summary
        (new,) = proxy.state.paths.values()
        assert new is not old and new.pool is not old.pool
        a.delay_by_source = {"127.0.0.2": 5.0}  # the old source address would now hang
        assert await chat(port) == 200
        await asyncio.sleep(0.1)
        assert old.pool._closed
    finally:
        await proxy.stop(1)


async def test_a_via_lines_new_token_keeps_its_pool(origin: FakeOrigin, tmp_path: Path) -> None:
    """Rotating a `via` line's token (and its compression): the connections to the edge stay;
    requests and probes carry the new token from the reload on."""
    old_token, new_token = "edge-token-old-0123456789", "edge-token-new-0123456789"
    edge_conf, edge_port = tmp_path / "edge.yaml", free_port()
    edge_listen = {"address": f"127.0.0.1:{edge_port}", "tokens": [old_token, new_token]}
    write_config(edge_conf, 0, {"direct": {}}, [{"url": origin.url + "/v1"}], listen=edge_listen)
    edge = await started(edge_conf)
    hop = LineSim("127.0.0.1", edge_port)
    await hop.start()
    conf, port = tmp_path / "side.yaml", free_port()
    ep = {"url": origin.url + "/v1"}

    def side(token: str, compress: str) -> None:
        write_config(conf, port, {"edge": {"via": f"http://{hop.address}", "token": token, "compress": compress}}, [ep])

    side(old_token, "br")
    proxy = await started(conf)
    try:
        assert await chat(port) == 200
        (path,) = proxy.state.paths.values()
        connects = hop.connections_total
        side(new_token, "gzip")
        ok, summary = await proxy.reload()
        assert ok and "paths: 1 kept" in summary and "lines changed: edge" in summary, summary
        assert proxy.state.paths[path.key] is path
        assert new_token not in summary and old_token not in summary
        # the edge stops taking the old token: only the new one gets through now
        edge_listen["tokens"] = [new_token]
        write_config(edge_conf, 0, {"direct": {}}, [{"url": origin.url + "/v1"}], listen=edge_listen)
        ok, summary = await edge.reload()
        assert ok, summary
        probes = path.health.probes
        assert await chat(port) == 200
        for _ in range(100):
            if path.health.probes >= probes + 2:
                break
            await asyncio.sleep(0.05)
        assert path.health.probes >= probes + 2 and path.health.state == "up", path.health
        assert hop.connections_total == connects  # the same connections to the edge
    finally:
        await proxy.stop(1)
        await hop.stop()
        await edge.stop(1)


async def test_invalid_reload_changes_nothing(origin: FakeOrigin, tmp_path: Path, caplog: Any) -> None:
    conf, port = tmp_path / "c.yaml", free_port()
    write_config(conf, port, {"direct": {}}, [{"url": origin.url + "/v1"}])
    proxy = await started(conf)
    try:
        state = proxy.state
        conf.write_text(conf.read_text().replace("interval: 1s", "interval: 1s\n  intervall: 2s"))
        ok, error = await proxy.reload()
        assert not ok and "probe.intervall" in error
        assert proxy.state is state and proxy.generation == 1
        assert proxy.metrics.reloads.values[("failed",)] == 1
        assert "probe.intervall" in caplog.text and "still serving the previous config" in caplog.text
        assert await chat(port) == 200
    finally:
        await proxy.stop(1)


async def test_listeners_added_and_removed(origin: FakeOrigin, tmp_path: Path) -> None:
    conf, port, port2 = tmp_path / "c.yaml", free_port(), free_port()
    eps = [{"url": origin.url + "/v1"}]
    write_config(conf, port, {"direct": {}}, eps)
    proxy = await started(conf)
    try:
        cfg = yaml.safe_load(conf.read_text())
        cfg["listen"] = [f"127.0.0.1:{port}", f"127.0.0.1:{port2}"]
        conf.write_text(yaml.safe_dump(cfg))
        ok, summary = await proxy.reload()
        assert ok and f"+127.0.0.1:{port2}" in summary
        assert await chat(port2) == 200
        cfg["listen"] = [f"127.0.0.1:{port2}"]
        conf.write_text(yaml.safe_dump(cfg))
        ok, summary = await proxy.reload()
        assert ok and f"-127.0.0.1:{port}" in summary
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(port)
        assert await chat(port2) == 200
    finally:
        await proxy.stop(1)


async def test_a_listener_that_cannot_bind_fails_the_reload_whole(origin: FakeOrigin, tmp_path: Path) -> None:
    conf, port = tmp_path / "c.yaml", free_port()
    write_config(conf, port, {"direct": {}}, [{"url": origin.url + "/v1"}])
    proxy = await started(conf)
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = yaml.safe_load(conf.read_text())
        cfg["listen"] = [f"127.0.0.1:{port}", f"127.0.0.1:{busy.getsockname()[1]}"]
        cfg["probe"]["interval"] = "2s"
        cfg["upstreams"]["openai"]["endpoints"][0]["models"] = {"gpt-4o": "gpt-4o-2024-08-06"}
        cfg["pool"] = {"max_per_path": 7}
        conf.write_text(yaml.safe_dump(cfg))
        try:
            ok, error = await proxy.reload()
            assert not ok and "address already in use" in error.lower()
            assert proxy.config.probe.interval == 1.0 and len(proxy.listeners) == 1
            assert await chat(port) == 200
            # the path the failed config would have kept serves on as it was
            assert origin.requests[-1].json()["model"] == "gpt-4o"
            (path,) = proxy.state.paths.values()
            assert path.endpoint.models == () and path.pool.max_size != 7
        finally:
            await proxy.stop(1)


async def test_reloads_under_load_drop_nothing(origin: FakeOrigin, sims: Any, tmp_path: Path) -> None:
    """20 reloads alternating two configs (a line added and removed) under requests and
    streams: no failed request, no broken stream, no new connection on the unchanged path."""
    a, b = sims
    conf, port = tmp_path / "c.yaml", free_port()
    one = [{"url": f"http://{a.address}/v1"}]
    two = [*one, {"url": f"http://{b.address}/v1", "priority": 2}]
    # warm 0 and slow probes: the pool on line a then holds exactly what the load needs
    quiet = {"pool": {"warm": 0}, "probe": {"interval": "30s", "timeout": "1s"}}
    write_config(conf, port, {"direct": {}}, one, **quiet)
    proxy = await started(conf)
    origin.event_interval = 0.02
    origin.events = 40
    failures: list[str] = []
    stop = asyncio.Event()

    async def requests() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(f"status {r.status}")

    async def streams() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    body = await r.read()
                    if not body.rstrip().endswith(b"data: [DONE]"):
                        failures.append("broken stream")

    try:
        workers = [asyncio.create_task(requests()) for _ in range(3)] + [
            asyncio.create_task(streams()) for _ in range(4)
        ]
        await asyncio.sleep(1.0)  # warm: the pool on line a has what the load needs
        connects = a.connections_total
        for i in range(20):
            write_config(conf, port, {"direct": {}}, two if i % 2 == 0 else one, **quiet)
            ok, summary = await proxy.reload()
            assert ok, summary
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        assert failures == []
        assert proxy.generation == 21
        assert a.connections_total == connects, "the unchanged path opened new connections"
    finally:
        stop.set()
        await proxy.stop(1)


@pytest.mark.timeout(60)
async def test_sighup_and_reload_command_on_the_real_process(origin: FakeOrigin, tmp_path: Path) -> None:
    conf, port, admin = tmp_path / "c.yaml", free_port(), free_port()
    write_config(conf, port, {"direct": {}}, [{"url": origin.url + "/v1"}], admin={"listen": f"127.0.0.1:{admin}"})
    proc = subprocess.Popen(
        [*EDGEPROXY, "run", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/-/ready", proc)
        conf.write_text(conf.read_text().replace("interval: 1s", "interval: 2s"))
        proc.send_signal(signal.SIGHUP)
        metrics = b""
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                    metrics = await r.read()
                if b'edgeproxy_reloads_total{result="ok"} 1.0' in metrics:
                    break
                await asyncio.sleep(0.05)
        assert b"edgeproxy_config_generation 2.0" in metrics
        # an invalid file through `edgeproxy reload`: exit 1, the key path, the old config serves
        conf.write_text(conf.read_text().replace("interval: 2s", "interval: soon"))
        r = await asyncio.to_thread(
            subprocess.run,
            [*EDGEPROXY, "reload", "--admin", f"http://127.0.0.1:{admin}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1 and "probe.interval" in r.stderr
        assert await chat(port) == 200
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/-/status") as resp:
            status = orjson.loads(await resp.read())
        assert status["generation"] == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "reloaded" in err and "probe.interval" in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
async def test_sigterm_lets_50_open_streams_finish(origin: FakeOrigin, tmp_path: Path) -> None:
    conf, port, admin = tmp_path / "c.yaml", free_port(), free_port()
    write_config(
        conf,
        port,
        {"direct": {}},
        [{"url": origin.url + "/v1"}],
        admin={"listen": f"127.0.0.1:{admin}"},
        drain_timeout="20s",
    )
    proc = subprocess.Popen(
        [*EDGEPROXY, "run", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    origin.events = 20
    origin.event_interval = 0.1  # two-second streams
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/-/ready", proc)
        started_streams = 0

        async def stream(s: aiohttp.ClientSession) -> bytes:
            nonlocal started_streams
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                await r.content.readline()
                started_streams += 1
                return await r.read()

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            tasks = [asyncio.create_task(stream(s)) for _ in range(50)]
            while started_streams < 50:
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            bodies = await asyncio.gather(*tasks)
        assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert time.monotonic() - t0 < 15
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
async def test_systemd_notifications_and_admin_tokens(origin: FakeOrigin, tmp_path: Path) -> None:
    import os
    import socket

    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.setblocking(False)
    token = "admin-token-0123456789"
    conf, port, admin = tmp_path / "c.yaml", free_port(), free_port()
    write_config(
        conf,
        port,
        {"direct": {}},
        [{"url": origin.url + "/v1"}],
        admin={"listen": {"address": f"127.0.0.1:{admin}", "tokens": [token]}},
    )
    proc = subprocess.Popen(
        [*EDGEPROXY, "run", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
    )
    messages: list[str] = []

    async def expect(text: str) -> None:
        for _ in range(200):
            try:
                while True:
                    messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                pass
            if any(text in m for m in messages):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {text!r} in {messages}")

    try:
        await expect("READY=1")
        base = f"http://127.0.0.1:{admin}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/-/healthy") as r:
                assert r.status == 200  # health checks stay open
            async with s.get(base + "/metrics") as r:
                assert r.status == 401
            async with s.get(base + "/-/status", headers={"x-edgeproxy-token": token + "x"}) as r:
                assert r.status == 401
            async with s.get(base + "/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200  # as Prometheus sends it
        messages.clear()
        proc.send_signal(signal.SIGHUP)
        await expect("RELOADING=1")
        assert any("MONOTONIC_USEC=" in m for m in messages)
        await expect("READY=1")
        proc.send_signal(signal.SIGTERM)
        await expect("STOPPING=1")
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        sock.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

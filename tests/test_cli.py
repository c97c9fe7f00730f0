"""The real `edgeproxy` process: check, run, status, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.fakes.origin import FakeOrigin

EDGEPROXY = [sys.executable, "-m", "edgeproxy"]
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEPROXY, *args], capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def test_check_accepts_examples() -> None:
    """Examples pass as shipped, with no secrets in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    examples = sorted((ROOT / "conf").glob("*.yaml"))
    assert examples
    for f in examples:
        r = subprocess.run([*EDGEPROXY, "check", "-c", str(f)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, f"{f.name}: {r.stderr}"
        assert ": ok" in r.stdout


def test_check_loads_no_server_stack() -> None:
    """`check` runs on a bare python: the cli's parser (the demo's options included) imports
    none of the server stack; only `run` and `demo` load it."""
    code = (
        "import sys; from edgeproxy.cli import main; rc = main(['check']);"
        "print(sorted(m for m in ('uvloop', 'aiohttp', 'httptools', 'edgeproxy.ops.server',"
        " 'edgeproxy.demo.run', 'edgeproxy.demo.world') if m in sys.modules)); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_check_reports_every_error_with_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: 0.0.0.0:8787\n"
        "probe: {intervall: 5s}\n"
        "upstreams:\n"
        "  openai:\n"
        "    prefix: /v1\n"
        "    endpoints: [{url: 'https://api.openai.com/v1', lines: [tokio], keys: ['${NOPE_KEY}']}]\n"
    )
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert "listen: 0.0.0.0:8787" in r.stderr and "tokens" in r.stderr
    assert "probe.intervall" in r.stderr and "interval" in r.stderr
    assert "upstreams.openai.endpoints[0].lines[0]" in r.stderr and "tokio" in r.stderr
    assert "NOPE_KEY" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_refuses_off_loopback_listener_without_tokens(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: 0.0.0.0:{free_port()}\nadmin: {{listen: off}}\n")
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 1
    assert "tokens" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_reports_address_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"listen: 127.0.0.1:{s.getsockname()[1]}\nadmin: {{listen: off}}\n")
        r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(url)


@pytest.mark.timeout(60)
async def test_run_serves_then_drains_open_stream_on_sigterm(origin: FakeOrigin, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"admin: {{listen: 127.0.0.1:{admin}}}\n"
        "drain_timeout: 10s\n"
        f"upstreams:\n  openai: {{prefix: /v1, endpoints: [{{url: '{origin.url}/v1'}}]}}\n"
    )
    proc = subprocess.Popen(
        [*EDGEPROXY, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/-/ready", proc)
        r = await asyncio.to_thread(run_cli, "status", "--admin", f"http://127.0.0.1:{admin}")
        assert r.returncode == 0
        assert "openai" in r.stdout and "direct" in r.stdout and origin.url in r.stdout
        assert "\x1b[" not in r.stdout  # piped: plain
        r = await asyncio.to_thread(run_cli, "status", "--json", "--admin", f"http://127.0.0.1:{admin}")
        assert json.loads(r.stdout)["upstreams"][0]["preferred"] == "direct"

        origin.events = 10
        origin.event_interval = 0.1  # a one-second stream
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            ) as resp:
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                proc.send_signal(signal.SIGTERM)  # mid-stream
                rest = await resp.read()
        assert rest.rstrip().endswith(b"data: [DONE]")  # the stream finished intact
        rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0
        out = proc.stdout.read() if proc.stdout else b""
        assert b'"status":200' in out and b'"streamed":true' in out  # the access log line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""Logging never blocks serving: a log reader that stops reading (a pipe nobody drains, a
terminal on Ctrl-S, a stuck journal) costs log records, counted and said once, never requests.

The first tests run the real `edgeproxy run` with its stdout and stderr on pipes; the others
drive the sink and the process log handler on real descriptors of each kind stdout can be
(pipe, terminal, socket, file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from edgeproxy.telemetry.processlog import ProcessLogHandler
from edgeproxy.telemetry.sink import LineSink
from tests.conftest import free_port
from tests.fakes.origin import FakeOrigin
from tests.test_cli import EDGEPROXY, ROOT, _wait_ready

REQUESTS = 2000
NOTICE = "dropping records until it catches up"


def write_config(path: Path, origin: FakeOrigin, port: int, admin: int, **log: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "log": {"access": "json", **log},
                "upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": origin.url + "/v1"}]}},
            }
        )
    )


async def serve_requests(port: int, admin: int, workers: int = 16) -> tuple[list[int], list[int]]:
    """REQUESTS GETs of /v1/echo/<worker>-<n> (each worker's in order) and, meanwhile, the
    admin's /-/healthy every 50 ms: (request statuses, health statuses)."""
    statuses: list[int] = []
    health: list[int] = []
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)  # a frozen proxy fails here, not at the test's timeout
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def worker(w: int) -> None:
            for n in range(REQUESTS // workers):
                async with s.get(f"http://127.0.0.1:{port}/v1/echo/{w}-{n}") as r:
                    await r.read()
                    statuses.append(r.status)

        async def healthy() -> None:
            while not done.is_set():
                async with s.get(f"http://127.0.0.1:{admin}/-/healthy") as r:
                    health.append(r.status)
                await asyncio.sleep(0.05)

        probe = asyncio.ensure_future(healthy())
        try:
            await asyncio.gather(*(worker(w) for w in range(workers)))
        finally:
            done.set()
            await probe
    return statuses, health


async def log_dropped(admin: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r'edgeproxy_log_dropped_total\{log="(\w+)"\} (\S+)', text)}


def read_all(fd: int) -> bytes:
    """Everything the pipe holds, up to EOF (the writer has exited)."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def running(conf: Path, stdout: int, stderr: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*EDGEPROXY, "run", "-c", str(conf)], stdout=stdout, stderr=stderr, cwd=ROOT)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
async def test_logs_nobody_reads_never_stall_serving(origin: FakeOrigin, tmp_path: Path) -> None:
    """`edgeproxy run | sleep 300`: the pipes fill, requests and the admin go on, the access
    log drops whole records (counted, said once on stderr), and SIGTERM still stops it."""
    conf, port, admin = tmp_path / "c.yaml", free_port(), free_port()
    write_config(conf, origin, port, admin, buffer="64KiB")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        with running(conf, out_w, err_w) as proc:
            os.close(out_w)
            os.close(err_w)
            await _wait_ready(f"http://127.0.0.1:{admin}/-/ready", proc)
            statuses, health = await serve_requests(port, admin)
            assert statuses == [200] * REQUESTS
            assert health and set(health) == {200}
            dropped = await log_dropped(admin)
            assert dropped["access"] > 0
            assert dropped["process"] == 0  # stderr's pipe still had room: the notice went through
            proc.send_signal(signal.SIGTERM)  # the reader still reads nothing: stopping must not wait for it
            assert await asyncio.to_thread(proc.wait, 10) == 0
        out, err = read_all(out_r), read_all(err_r).decode()
    finally:
        os.close(out_r)
        os.close(err_r)
    lines = out.split(b"\n")
    assert lines[-1] == b""  # ends on a whole line
    records = [orjson.loads(line) for line in lines[:-1]]  # each one whole: never half a record
    assert 0 < len(records) < REQUESTS - dropped["access"] + 1
    assert all(r["status"] == 200 and r["path"].startswith("/v1/echo/") for r in records)
    assert err.count(NOTICE) == 1, err
    assert 'edgeproxy_log_dropped_total{log="access"}' in err
    assert "stopped" in err  # the process log went on after the notice
    assert "Traceback" not in err


@pytest.mark.timeout(60)
async def test_a_reader_that_keeps_up_gets_every_record_in_order(origin: FakeOrigin, tmp_path: Path) -> None:
    """`edgeproxy run 2>&1 | slow-reader`: a reader that sips the pipe falls behind at times;
    the records wait for it, and it gets every one, once, whole, each client's in the order
    they were sent, and the process log's lines (reloads meanwhile) between them, never
    spliced into them."""
    conf, port, admin = tmp_path / "c.yaml", free_port(), free_port()
    write_config(conf, origin, port, admin)
    out_r, out_w = os.pipe()
    got: list[bytes] = []

    def sip() -> None:
        while chunk := os.read(out_r, 4096):
            got.append(chunk)
            time.sleep(0.02)  # ~200 KB/s: slower than the requests make records

    reader = threading.Thread(target=sip, daemon=True)
    try:
        with running(conf, out_w, out_w) as proc:
            os.close(out_w)
            reader.start()
            await _wait_ready(f"http://127.0.0.1:{admin}/-/ready", proc)
            load = asyncio.ensure_future(serve_requests(port, admin, workers=8))
            reloads = 0
            while not load.done():
                proc.send_signal(signal.SIGHUP)
                reloads += 1
                await asyncio.sleep(0.2)
            statuses, _ = await load
            assert statuses == [200] * REQUESTS
            assert await log_dropped(admin) == {"access": 0, "process": 0}
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0
        await asyncio.to_thread(reader.join, 10)
    finally:
        os.close(out_r)
    out = b"".join(got)
    assert out.endswith(b"\n")
    lines = out.decode().splitlines()
    process_log = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    assert all(line.startswith("{") or process_log.match(line) for line in lines)
    paths = [orjson.loads(line)["path"] for line in lines if line.startswith("{")]
    assert len(paths) == REQUESTS
    for w in range(8):
        mine = [p for p in paths if p.startswith(f"/v1/echo/{w}-")]
        assert mine == [f"/v1/echo/{w}-{n}" for n in range(REQUESTS // 8)]
    text = "\n".join(lines)
    assert text.count("reloaded") == reloads and "stopped" in lines[-1]
    assert NOTICE not in text and "Traceback" not in text


# -- the sink and the handler on each kind of descriptor -------------------------------------------


def fill(sink: LineSink, n: int = 20000) -> list[bytes]:
    lines = [b"%05d %s\n" % (i, b"x" * 90) for i in range(n)]
    started = time.monotonic()
    for line in lines:
        sink.write([line])
    assert time.monotonic() - started < 2.0  # never waited for the reader
    return lines


def assert_whole_prefix(data: bytes, lines: list[bytes]) -> None:
    """What came through: the first lines, whole and in order; the rest dropped whole."""
    got = data.splitlines(keepends=True)
    assert got and got == lines[: len(got)]


@pytest.mark.parametrize("kind", ["pipe", "terminal", "socket"])
def test_sink_drops_whole_lines_when_the_reader_stops(kind: str) -> None:
    if kind == "pipe":
        r, w = os.pipe()
    elif kind == "terminal":
        r, w = os.openpty()
    else:
        a, b = socket.socketpair()
        r, w = a.detach(), b.detach()
    try:
        sink = LineSink(w, 64 << 10)
        lines = fill(sink)
        assert 0 < sink.dropped < len(lines)
        assert sink.pending <= 64 << 10
        # The descriptor is as it was: a shell's terminal or a shared pipe stays blocking.
        assert os.get_blocking(w)
        os.set_blocking(r, False)
        data = b""
        while True:  # the reader is back: what was queued follows, then the queue is empty
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                chunk = b""
            data += chunk
            sink.flush()
            if not chunk and not sink.pending:
                break
        if kind == "terminal":
            data = data.replace(b"\r\n", b"\n")  # the tty's own newline translation
        assert_whole_prefix(data, lines)
        assert len(data.splitlines()) == len(lines) - sink.dropped
        sink.write([b"after\n"])  # the reader is back: lines go through again
        time.sleep(0.05)
        assert os.read(r, 1 << 16).replace(b"\r\n", b"\n") == b"after\n"
        sink.close()
    finally:
        os.close(r)
        os.close(w)


def test_sink_on_a_file_writes_everything(tmp_path: Path) -> None:
    with (tmp_path / "log").open("ab") as f:
        sink = LineSink(f.fileno(), 64 << 10)
        lines = fill(sink)
        sink.close()
    assert sink.dropped == 0
    assert (tmp_path / "log").read_bytes() == b"".join(lines)


async def test_sink_waits_for_a_slow_reader_on_the_loop() -> None:
    """Queued lines go out when the pipe drains, with the loop watching: no later write needed."""
    r, w = os.pipe()
    try:
        sink = LineSink(w, 1 << 20)
        lines = [b"%05d %s\n" % (i, b"y" * 200) for i in range(2000)]  # 400 KB: far more than the pipe
        sink.write(lines)
        assert sink.pending > 0 and sink.dropped == 0
        data = b""
        while len(data) < sum(map(len, lines)):
            data += await asyncio.to_thread(os.read, r, 1 << 16)
        assert data == b"".join(lines)
        assert sink.pending == 0
        sink.close()
    finally:
        os.close(r)
        os.close(w)


def test_process_log_handler_never_blocks_and_says_it_once() -> None:
    """A stderr nobody reads: logging returns at once; when the reader comes back it finds the
    records up to the gap, whole and in order, then the notice, once."""
    r, w = os.pipe()
    logger = logging.getLogger("test-processlog")
    logger.propagate = False
    handler = ProcessLogHandler(w, 64 << 10)
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for i in range(5000):
            logger.warning("record %d %s", i, "z" * 80)
        assert time.monotonic() - started < 5.0
        assert handler.sink.dropped > 0
        os.set_blocking(r, False)
        text = b""
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                chunk = b""
            text += chunk
            handler.flush()
            if not chunk and not handler.sink.pending:
                break
        handler.close()
    finally:
        logger.removeHandler(handler)
        os.close(r)
        os.close(w)
    lines = text.decode().splitlines()
    assert all(" WARNING " in line for line in lines)  # the usual format, whole lines
    assert NOTICE in lines[-1] and 'edgeproxy_log_dropped_total{log="process"}' in lines[-1]
    assert text.decode().count(NOTICE) == 1
    numbers = [int(line.split("record ")[1].split()[0]) for line in lines[:-1]]
    assert numbers == list(range(len(numbers)))  # in order; the lost ones are the last
    assert len(numbers) == 5000 - handler.sink.dropped

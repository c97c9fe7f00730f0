"""RedisStore against a real redis-server: entries round-trip and expire in Redis, are shared
between stores (processes, hosts), and a dead, hung or missing Redis is a fast miss, never an
error or a wait, with a back-off that keeps the network out of it until Redis is back."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from edgeproxy.filters.cachestore import Entry
from edgeproxy.filters.redisstore import RedisStore
from tests.conftest import RedisServer, free_port

JSON = Entry(
    200,
    (("content-type", "application/json"), ("openai-model", "gpt-4o-mini")),
    b'{"id":"chatcmpl-1","choices":[{"message":{"role":"assistant","content":"hi \xc3\xa9"}}]}',
    sse=False,
    tokens=17,
    stored_at=1_700_000_000.5,
)
SSE = Entry(
    200,
    (("content-type", "text/event-stream"),),
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: {"choices":[{"delta":{}}]}\n\ndata: [DONE]\n\n',
    sse=True,
    tokens=9,
    stored_at=1_700_000_001.0,
)


ROOT = str(Path(__file__).resolve().parent.parent)  # for child processes: this checkout's edgeproxy


def rkey(key: bytes) -> bytes:
    return b"edgeproxy:cache:" + key.hex().encode()


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., RedisStore]]:
    """Make RedisStores; all closed at teardown."""
    made: list[RedisStore] = []

    def make(url: str, timeout: float = 0.05) -> RedisStore:
        made.append(RedisStore(url, timeout))
        return made[-1]

    yield make
    for s in made:
        await s.close()


async def until_available(store: RedisStore, within: float = 12.0) -> float:
    """Wait for the back-off to end; how long it took."""
    t0 = time.monotonic()
    while not store.available:
        assert time.monotonic() - t0 < within, "the back-off did not end"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_round_trip_json_and_sse(redis_server: RedisServer, stores: Callable[..., RedisStore]) -> None:
    store = stores(redis_server.url)
    await store.put(b"\x01" * 32, JSON, 60)
    await store.put(b"\x02" * 32, SSE, 60)
    got_json, got_sse = await store.get(b"\x01" * 32), await store.get(b"\x02" * 32)
    assert got_json == JSON and got_json is not None and got_json.body == JSON.body
    assert got_sse == SSE and got_sse is not None and got_sse.body == SSE.body
    assert await store.get(b"\x03" * 32) is None  # never stored: a miss
    assert (store.name, store.errors, store.available) == ("redis", 0, True)
    assert (store.entries, store.stored_bytes, store.evictions) == (0, 0, 0)  # Redis's INFO tells those


async def test_entries_expire_in_redis(redis_server: RedisServer, stores: Callable[..., RedisStore]) -> None:
    store = stores(redis_server.url)
    key = b"\x11" * 32
    await store.put(key, JSON, 0.3)
    raw = redis.Redis.from_url(redis_server.url)
    pttl = raw.pttl(rkey(key))
    assert 0 < pttl <= 300  # the TTL travels with the entry: every store sees it expire
    assert await store.get(key) == JSON
    await asyncio.sleep(0.4)
    assert await store.get(key) is None
    assert raw.exists(rkey(key)) == 0
    await store.put(key, JSON, 0)  # already stale: not written (and not an error)
    assert raw.exists(rkey(key)) == 0 and store.errors == 0
    raw.close()


async def test_a_value_that_is_not_ours_is_a_miss(redis_server: RedisServer, stores: Callable[..., RedisStore]) -> None:
    store = stores(redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(rkey(b"\x21" * 32), b"hello from another program")
    raw.set(rkey(b"\x22" * 32), b"EPC1\x00\x00\x00\xff{torn")
    raw.rpush(rkey(b"\x23" * 32), b"a list, not a string")
    assert await store.get(b"\x21" * 32) is None
    assert await store.get(b"\x22" * 32) is None
    assert await store.get(b"\x23" * 32) is None  # WRONGTYPE: a miss, counted (Redis said no)
    assert store.errors == 1
    # Redis answered: no back-off, the store keeps using it
    assert store.available
    await store.put(b"\x21" * 32, JSON, 60)
    assert await store.get(b"\x21" * 32) == JSON
    raw.close()


async def test_stores_share_entries_across_processes(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis_server.url), stores(redis_server.url)
    await a.put(b"\x31" * 32, SSE, 60)
    assert await b.get(b"\x31" * 32) == SSE
    # another process (another host, as far as Redis can tell) sees what this one stored, and back
    code = (
        "import asyncio, sys\n"
        "from edgeproxy.filters.redisstore import RedisStore\n"
        "from edgeproxy.filters.cachestore import Entry\n"
        "async def main():\n"
        "    s = RedisStore(sys.argv[1])\n"
        "    e = await s.get(bytes(32 * [0x31]))\n"
        "    await s.put(bytes(32 * [0x32]), Entry(200, (), b'from the child', False, 3), 60)\n"
        "    sys.stdout.buffer.write(e.body)\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code, redis_server.url], capture_output=True, timeout=30, env=env
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == SSE.body
    got = await a.get(b"\x32" * 32)
    assert got is not None and got.body == b"from the child"


async def test_redis_killed_is_a_fast_miss_then_bypassed(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(redis_server.url)
    await store.put(b"\x41" * 32, JSON, 60)
    assert await store.get(b"\x41" * 32) == JSON  # a pooled connection, now to a dead server
    redis_server.stop()
    t0 = time.monotonic()
    assert await store.get(b"\x41" * 32) is None
    assert time.monotonic() - t0 < 0.5
    assert store.errors == 1 and not store.available
    # backing off: no network, no wait, no new errors
    t0 = time.monotonic()
    for i in range(1000):
        assert await store.get(bytes([i % 256]) * 32) is None
        await store.put(bytes([i % 256]) * 32, JSON, 60)
    assert time.monotonic() - t0 < 0.1
    assert store.errors == 1


async def test_redis_restarted_works_again_after_the_back_off(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(redis_server.url)
    redis_server.stop()
    assert await store.get(b"\x51" * 32) is None and store.errors == 1
    redis_server.start()
    raw = redis.Redis.from_url(redis_server.url)
    await stores(redis_server.url).put(b"\x51" * 32, JSON, 60)  # another proxy, one that never saw it down
    assert raw.exists(rkey(b"\x51" * 32)) == 1
    # Redis is back and holds the entry, but this store is still backing off: it does not look
    assert not store.available
    assert await store.get(b"\x51" * 32) is None and store.errors == 1
    waited = await until_available(store)
    assert waited < 0.5  # the first back-off: at most 0.5 s
    assert await store.get(b"\x51" * 32) == JSON
    await store.put(b"\x52" * 32, SSE, 60)
    assert raw.exists(rkey(b"\x52" * 32)) == 1
    assert store.errors == 1 and store.available
    raw.close()


async def test_pooled_connections_to_a_restarted_redis_are_replaced_not_failed(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    # Idle pooled connections to the Redis that died must be noticed (the server closed them) and
    # replaced when taken, not used: a GET on one is "Connection closed by server", counted and
    # another 0.4-0.5 s back-off just after Redis came back (under concurrency, one per stale
    # connection taken). redis-py 8 (RESP3 by default, maintenance notifications "auto") skips its
    # pool's check for a closed or dirty idle connection unless the store speaks RESP2.
    store = stores(redis_server.url)
    keys = [bytes([0x90 + i]) * 32 for i in range(8)]
    await asyncio.gather(*(store.put(k, JSON, 60) for k in keys))  # 8 at once: 8 pooled connections
    redis_server.stop()
    assert await store.get(keys[0]) is None and store.errors == 1
    redis_server.start()
    await until_available(store)
    await store.put(keys[0], JSON, 60)  # the call that tries Redis again: it is back
    assert store.available and store.errors == 1
    for _ in range(3):  # the 7 idle connections to the dead server are taken now
        assert await asyncio.gather(*(store.get(keys[0]) for _ in keys)) == [JSON] * len(keys)
    assert store.errors == 1 and store.available


async def test_a_server_that_never_existed(stores: Callable[..., RedisStore]) -> None:
    store = stores(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    t0 = time.monotonic()
    assert await store.get(b"\x61" * 32) is None
    await store.put(b"\x61" * 32, JSON, 60)  # backing off already: dropped at once
    assert time.monotonic() - t0 < 0.5
    assert store.errors == 1 and not store.available
    first = await until_available(store)
    assert first < 0.6
    # still down when the back-off ends: one call tries, fails, and the back-off doubles
    assert await store.get(b"\x61" * 32) is None
    assert store.errors == 2 and not store.available
    second = await until_available(store)
    assert 0.7 < second < 1.1


async def test_a_large_answer_is_stored_within_a_budget_for_its_size(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    # A 2 ms budget: a 6 MiB SET takes longer even on loopback. The write's own budget grows
    # with its size (no client waits for it), so it is stored, and no back-off starts.
    store = stores(redis_server.url, timeout=0.002)
    big = Entry(200, (("content-type", "application/json"),), b"[" + b"1," * (3 << 20) + b"1]", False, 7)
    await store.put(b"\x72" * 32, big, 60)
    assert store.errors == 0 and store.available
    assert await stores(redis_server.url).get(b"\x72" * 32) == big


async def test_a_hung_redis_costs_at_most_the_timeout(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(redis_server.url)
    await store.put(b"\x71" * 32, JSON, 60)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts (the kernel does) but never answers
    try:
        t0 = time.monotonic()
        assert await store.get(b"\x71" * 32) is None
        assert time.monotonic() - t0 < 0.5
        assert store.errors == 1 and not store.available
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await until_available(store)
    assert await store.get(b"\x71" * 32) == JSON


async def test_a_silent_server_costs_at_most_the_timeout(stores: Callable[..., RedisStore]) -> None:
    # Accepts TCP connections, reads, never answers (a hung Redis, a wrong port behind a proxy):
    # connecting succeeds, so only the store's own timeout bounds the handshake and the command
    # (the pool sets no socket_timeout). Nothing waits longer, with more calls than connections too.
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = stores(f"redis://127.0.0.1:{port}/0")
        t0 = time.monotonic()
        got = await asyncio.gather(*(store.get(bytes([i]) * 32) for i in range(100)))
        assert got == [None] * 100 and time.monotonic() - t0 < 0.5
        assert held and not store.available
        await until_available(store)
        t0 = time.monotonic()
        await store.put(b"\x75" * 32, JSON, 60)  # the call that tries again: the same wait
        assert time.monotonic() - t0 < 0.5 and not store.available
        t0 = time.monotonic()
        await store.close()
        assert time.monotonic() - t0 < 0.5
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_reply_that_comes_after_the_timeout_is_never_read_as_the_next_answer(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    # The GET that timed out left its reply on the way; that connection must not be reused, or the
    # next GET (another key, another tenant's) reads the late reply as its own answer. A proxy in
    # front of the real redis-server holds Redis's answers back while `hold` is set.
    hold = 0.0
    pumps: set[asyncio.Task[None]] = set()

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool) -> None:
        try:
            while data := await src.read(65536):
                if delayed and hold:
                    await asyncio.sleep(hold)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def proxied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", redis_server.port)
        for t in (pump(reader, w, False), pump(r, writer, True)):
            pumps.add(asyncio.create_task(t))

    server = await asyncio.start_server(proxied, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = stores(f"redis://127.0.0.1:{port}/0")
        a, b = b"\xa1" * 32, b"\xb2" * 32
        await store.put(a, JSON, 60)
        await store.put(b, SSE, 60)
        hold = 0.25  # the next answer (a's entry) comes 0.25 s late: after the timeout, before
        assert await store.get(a) is None and store.errors == 1  # the back-off (>= 0.375 s) ends
        hold = 0.0
        await until_available(store)
        assert await store.get(b) == SSE  # not a's entry
        assert await asyncio.gather(store.get(a), store.get(b)) == [JSON, SSE]
        assert store.errors == 1
    finally:
        for t in pumps:
            t.cancel()
        server.close()
        await server.wait_closed()


async def test_concurrent_gets_while_redis_is_killed(
    redis_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(redis_server.url)
    for i in range(200):
        await store.put(i.to_bytes(32, "big"), JSON, 60)
    hits = misses = 0
    slowest = 0.0
    stop_at = time.monotonic() + 0.35  # (ends inside the first back-off: >= 0.375 s from the kill at 0.15)

    async def reader(i: int) -> None:
        nonlocal hits, misses, slowest
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            got = await store.get(i.to_bytes(32, "big"))
            slowest = max(slowest, time.monotonic() - t0)
            if got is None:
                misses += 1
            else:
                assert got == JSON
                hits += 1
            await asyncio.sleep(0.005)

    async def killer() -> None:
        await asyncio.sleep(0.15)
        redis_server.stop()

    await asyncio.gather(killer(), *(reader(i) for i in range(200)))  # any exception fails the test
    assert hits > 0 and misses > 0
    assert slowest < 0.5
    assert store.errors >= 1 and not store.available


async def test_the_password_is_never_logged(
    caplog: pytest.LogCaptureFixture, stores: Callable[..., RedisStore]
) -> None:
    port = free_port()
    store = stores(f"redis://edge:s3cret-pw@127.0.0.1:{port}/0")
    with caplog.at_level(logging.DEBUG):
        assert await store.get(b"\x81" * 32) is None
    assert f"127.0.0.1:{port}" in caplog.text  # which Redis is down, so the operator can tell
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in store.shown
    assert "s3cret" not in RedisStore(f"redis://127.0.0.1:{port}/0?password=s3cret").shown


def test_without_redis_installed() -> None:
    code = (
        "import sys\n"
        "for m in ('redis', 'redis.asyncio', 'redis.asyncio.retry', 'redis.backoff'): sys.modules[m] = None\n"
        "import edgeproxy.filters.redisstore as rs\n"  # importing the module needs no redis
        "try:\n"
        "    rs.RedisStore('redis://127.0.0.1:6379/0')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "the redis cache store needs: pip install 'edgeproxy[redis]'"

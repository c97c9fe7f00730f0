"""Admission's harder cases, each found by a review of the first version (its docstring says
what went wrong then): weights under queueing, keys short, reloads, a queue of 0, slots that
must all come back."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import AdmissionConfig, load_file
from edgeproxy.filters.fairqueue import GRANTED, FairQueue, Ticket
from edgeproxy.ops.server import Proxy
from tests.conftest import RunningProxy
from tests.fakes.origin import FakeOrigin
from tests.test_admission import KEYS, admitted, ask, keyed, served_order, waiting


def the_queue(p: RunningProxy) -> FairQueue:
    return next(f.queue for f in p.proxy.pipeline.chains["openai"].all_filters() if hasattr(f, "queue"))


# -- 1. weights: a plan the admission queue refuses still spends the split's pick ---------------
async def test_weights_hold_when_requests_queue_for_a_slot(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """Two clients, each sending one request after the other, through max_inflight: 1 to two
    endpoints of weight 1 each: every request queues once (its refused plan picks an endpoint
    too), so the picks alternate arrival / grant and every *served* request lands on the same
    endpoint. A user sees weights 1:1 serve 100:0."""
    cfg = admitted(origin, {"max_inflight": 1})
    cfg["upstreams"]["openai"]["endpoints"] = [
        {"url": origin.url + "/v1", "weight": 1},
        {"url": origin2.url + "/v1", "weight": 1},
    ]
    p = await make_proxy(cfg)
    origin.latency = origin2.latency = 0.01

    async def client(name: str) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(20):
                async with s.post(
                    p.url + "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": f"{name}{i}"}]},
                ) as r:
                    assert r.status == 200
                    await r.read()

    await asyncio.gather(client("a"), client("b"))
    one, two = len(served_order(origin)), len(served_order(origin2))
    assert one + two == 40
    assert abs(one - two) <= 4, f"weights 1:1 served {one}:{two}"


# -- 2. keys short: "one waiter at a time" grants two per key ------------------------------------
class _OneKeyUpstream:
    """The upstream as FairQueue sees it: one path, gated by a key that has ``tokens`` uses."""

    def __init__(self) -> None:
        self.tokens = 0
        self.paths = [object()]
        self.gate = lambda path, now: self.tokens > 0
        self.ready_in = lambda now: 0.2


async def test_keys_short_grants_one_waiter_per_ready_key() -> None:
    """``_after_key`` is scheduled (call_soon) *before* the grant
    resolves the waiter's future, so it runs before the granted task has taken its key: the
    queue still sees the key ready and grants the next waiter too. That one finds no key and
    waits in KeyPools.no_path_filter, outside the priority queue, holding a slot."""
    up = _OneKeyUpstream()
    queue = FairQueue(AdmissionConfig(None, 100, 5.0), up)  # type: ignore[arg-type]
    granted: list[str] = []

    async def waiter(name: str) -> None:
        ticket = Ticket("normal", time.monotonic())
        if await queue.wait(ticket) == GRANTED:
            granted.append(name)
            if up.tokens > 0:
                up.tokens -= 1  # takes its key synchronously, as _attempts does after the wait

    tasks = [asyncio.ensure_future(waiter(f"w{i}")) for i in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert queue.queued == 4 and not granted
    up.tokens = 1  # one key use frees up
    queue._key_ready()  # (what its recheck timer does)
    for _ in range(10):
        await asyncio.sleep(0)
    assert granted == ["w0"], f"one key use, yet granted {granted}"
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- 3. a reload that fails has already changed the running queue ----------------------------------
async def test_a_failed_reload_leaves_the_cap_as_it_was(origin: FakeOrigin, tmp_path: Path) -> None:
    """FairQueue.reconfigure ran inside assemble(), before the
    reload binds its new listeners: a reload that then fails ("still
    serving the previous config") has already given the live queue its new cap (and the new,
    never-committed State's upstream)."""
    cfg, conf = admitted(origin, {"max_inflight": 1}), tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        p = RunningProxy(proxy)
        cfg["upstreams"]["openai"]["admission"] = {"max_inflight": 8}
        cfg["listen"] = [cfg["listen"], f"127.0.0.1:{busy.getsockname()[1]}"]  # cannot bind: the reload fails
        conf.write_text(yaml.safe_dump(cfg))
        ok, detail = await proxy.reload()
        assert not ok, detail
        origin.latency = 0.2
        results = await asyncio.gather(*(ask(p, f"r{i}") for i in range(4)))
        assert [s for s, _, _ in results] == [200] * 4
        assert origin.max_serving == 1, f"the running config says max_inflight 1; the origin saw {origin.max_serving}"
        assert the_queue(p).config.max_inflight == 1
    finally:
        busy.close()
        await proxy.stop(1.0)


# -- 4. any reload lets every waiter for a key out of the priority queue ---------------------------
async def test_a_reload_keeps_waiters_for_keys_in_priority_order(origin: FakeOrigin, tmp_path: Path) -> None:
    """assemble() builds Admission (FairQueue.reconfigure -> _dispatch) before KeyPools sets the
    new upstream's ``gate``: with the gate still None the queue thinks keys are no concern and
    grants every waiter at once (up to the cap; no cap here). They then wait in
    KeyPools.no_path_filter's sleep, in arrival order: a high that comes after the reload goes
    last. Any reload does it (here: the same file again)."""
    cfg, conf = keyed(origin, {"queue_timeout": "10s"}), tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_file(str(conf)))
    await proxy.start()
    try:
        p = RunningProxy(proxy)
        origin.fail_status, origin.fail_times, origin.retry_after = 429, 1, "1.5"
        first = asyncio.ensure_future(ask(p, "first"))
        await origin.wait_requests(1)  # refused: the only key cools down for 1.5 s
        await asyncio.sleep(0.05)
        lows = [asyncio.ensure_future(ask(p, f"low{i}", "low")) for i in range(2)]
        await waiting(p, 2)
        ok, detail = await proxy.reload()
        assert ok, detail
        await asyncio.sleep(0.05)
        queue = the_queue(p)
        after_reload = (queue.queued, queue.inflight)
        high = asyncio.ensure_future(ask(p, "high", "high"))
        answers = await asyncio.gather(first, high, *lows)
        assert [a[0] for a in answers] == [200] * 4, [(a[0], a[2][:150]) for a in answers]
        order = [t for t in served_order(origin) if t != "first"]
        assert order == ["high", "low0", "low1"], f"served {served_order(origin)}"
        assert after_reload == (2, 1), f"after the reload: {after_reload[0]} wait, {after_reload[1]} hold a slot"
    finally:
        await proxy.stop(1.0)


async def test_a_queued_request_is_not_refused_while_the_one_behind_it_is_served(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    """The user-visible side of the double grant above: the extra grantee (low0) leaves the
    queue for KeyPools.no_path_filter, whose own estimate of the key (a per-minute bucket from
    the origin's headers: 60 s) is past its deadline, so it gets a 429 "retry in 60s" at
    t=1.5 s although queue_timeout is 10 s, while low1, queued behind it, is served at ~3 s
    (the queue itself looks again every KEY_RECHECK and finds the key)."""
    p = await make_proxy(keyed(origin, {"queue_timeout": "10s"}))
    origin.limit_keys(KEYS, requests=1, window=1.5)
    assert (await ask(p, "first"))[0] == 200
    lows = [asyncio.ensure_future(ask(p, f"low{i}", "low")) for i in range(2)]
    await waiting(p, 2)
    high = asyncio.ensure_future(ask(p, "high", "high"))
    answers = await asyncio.gather(high, *lows)
    assert [a[0] for a in answers] == [200, 200, 200], [(a[0], a[2][:100]) for a in answers]
    assert served_order(origin) == ["first", "high", "low0", "low1"]


# -- 5. every key refused while requests wait: they hang to queue_timeout, then a wrong 503 ------
async def test_waiters_learn_at_once_that_every_key_was_refused(origin: FakeOrigin, make_proxy: Any) -> None:
    """A request waits for the cap; the one holding the slot finds the only key revoked (401,
    the key check confirms: the key is disabled). The queue's _keys_ready() sees keys short
    for ever (inf) and sets no timer, so the waiter hangs until its
    queue_timeout and is then refused 503 "overloaded ... waited 3.0s"
    instead of the 401 upstream_keys_refused a request arriving now gets at once."""
    p = await make_proxy(keyed(origin, {"max_inflight": 1, "queue_timeout": "3s"}))
    origin.revoked_keys = set(KEYS)
    origin.latency = 0.3
    holder = asyncio.ensure_future(ask(p, "holder"))
    await origin.wait_requests(1)
    t0 = time.monotonic()
    status, headers, body = await ask(p, "waiter")
    took = time.monotonic() - t0
    assert (await holder)[0] == 401
    assert (status, headers.get("x-edgeproxy-error")) == (401, "keys_refused"), (status, body[:160])
    assert took < 1.0, f"waited {took:.1f}s"


# -- 6. `queue: 0` (a cap, no queue) turns every wait for a key into a 503 "queue is full" -------
async def test_no_queue_still_waits_for_a_key_or_says_429(origin: FakeOrigin, make_proxy: Any) -> None:
    """Keys short and within the deadline -> queue.wait(), which with
    queue: 0 answers FULL at once -> 503 overloaded "queue is full (0 waiting)". Without
    admission the same request waits the ~0.5 s for its key and is served; a client retrying
    a 503 sees an outage where there is only a short rate limit."""
    p = await make_proxy(keyed(origin, {"max_inflight": 4, "queue": 0, "queue_timeout": "5s"}))
    origin.limit_keys(KEYS, requests=1, window=0.5)
    assert (await ask(p, "first"))[0] == 200  # the key's next request: in 0.5 s
    status, headers, body = await ask(p, "second")
    assert status == 200 or (status == 429 and headers.get("x-edgeproxy-error") == "rate_limited"), (
        f"{status} {headers.get('x-edgeproxy-error')}: {body[:120]!r}"
    )


# -- (a check that passes) slots come back whatever way requests end -------------------------------
async def test_every_slot_comes_back_after_a_messy_load(
    origin: FakeOrigin, origin2: FakeOrigin, make_proxy: Any
) -> None:
    """Cancelled while queued / granted / streaming, origin 500s with retries, hedges, shared
    cache flights whose leader leaves: inflight and queued go back to 0."""
    import random

    cfg = admitted(origin, {"max_inflight": 3, "queue": 50, "queue_timeout": "2s"})
    cfg["upstreams"]["openai"]["endpoints"] = [{"url": origin.url + "/v1"}, {"url": origin2.url + "/v1"}]
    cfg["upstreams"]["openai"]["failover"] = {"hedge": "30ms", "retries": 2}
    cfg["upstreams"]["openai"]["cache"] = {"ttl": "1h"}
    p = await make_proxy(cfg)
    origin.latency, origin2.latency = 0.05, 0.08
    origin.events, origin.event_interval = 4, 0.02
    rnd = random.Random(7)

    async def one(i: int) -> None:
        kind = rnd.choice(["plain", "stream", "same", "prio"])
        tag = "same" if kind == "same" else f"r{i}"
        pr = rnd.choice(["high", "normal", "low"]) if kind == "prio" else None
        task = asyncio.ensure_future(ask(p, tag, pr, stream=kind == "stream"))
        if rnd.random() < 0.4:
            await asyncio.sleep(rnd.random() * 0.2)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    for round_ in range(4):
        if round_ == 2:
            origin.fail_status, origin.fail_times = 500, 15
        await asyncio.gather(*(one(round_ * 100 + i) for i in range(40)))
    await asyncio.sleep(1.0)
    queue = the_queue(p)
    assert (queue.inflight, queue.queued) == (0, 0)


# -- 7. "no key before your deadline: said at once" only holds when the queue is empty ------------
async def test_no_key_before_the_deadline_is_said_at_once_even_behind_a_waiter(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    """The at-once 429 was skipped when anyone waited (``not queue.queued``):
    the newcomer then sits out its whole queue_timeout (3 s) for a 429 it could have had at
    once (the key is ~5 s away), holding a place in the queue meanwhile."""
    p = await make_proxy(keyed(origin, {"max_inflight": 1, "queue_timeout": "3s"}))
    origin.limit_keys(KEYS, requests=1, window=5.0)
    origin.latency = 1.0
    holder = asyncio.ensure_future(ask(p, "holder"))
    await origin.wait_requests(1)
    waiter = asyncio.ensure_future(ask(p, "waiter"))  # waits for the cap
    await waiting(p, 1)
    assert (await holder)[0] == 200  # its answer's headers: the key's next request in ~5 s
    t0 = time.monotonic()
    status, headers, _ = await ask(p, "late")
    took = time.monotonic() - t0
    assert status == 429 and headers["x-edgeproxy-error"] == "rate_limited"
    assert took < 0.5, f"a 429 after {took:.1f}s"
    await waiter

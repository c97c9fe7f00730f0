"""The filter API from the outside: a toy filter added through the public interface only
(``edgeproxy.engine`` and ``Proxy(config, filters=...)``), on real sockets, on direct and `via`
paths, JSON and SSE answers, and across a reload. Plus what chains a config builds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeproxy.config import load_dict, load_file
from edgeproxy.engine import Ctx, Filter, Reply, Transform
from edgeproxy.filters import EdgeRole, KeyPools, Renames, UsageMeter, ViaHop
from edgeproxy.ops.server import Proxy
from edgeproxy.routing.state import Upstream
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_edge import TOKEN, edge_config, ready, sidecar_config

MakeProxy = Callable[..., Awaitable[RunningProxy]]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Seen:
    """What the toy filter saw of each request, in the order they ended."""

    def __init__(self) -> None:
        self.built: list[str] = []  # upstream names, once per (re)load
        self.ended: list[dict[str, Any]] = []


class _Counter(Transform):
    """Passes a stream through unchanged, counting its bytes."""

    def __init__(self, totals: dict[str, Any]) -> None:
        self.totals = totals

    def process(self, data: bytes) -> bytes:
        self.totals["bytes"] += len(data)
        return data

    def finish(self) -> bytes:
        return b""


class Toy(Filter):
    """Stamps every answer of its upstream and counts body bytes and SSE events."""

    def __init__(self, upstream: Upstream, seen: Seen, generation: int) -> None:
        self.name = upstream.name
        self.seen = seen
        self.generation = generation

    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        reply.headers.append(("x-toy", f"{self.name}/{self.generation}"))
        totals = ctx.keep(self, {"bytes": 0, "events": 0, "sse": reply.sse})
        if reply.body is not None:
            totals["bytes"] = len(reply.body)
            return
        reply.transforms.append(_Counter(totals))
        if reply.framed:
            reply.taps.append(lambda data: totals.__setitem__("events", totals["events"] + data.count(b"\n\n")))

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        totals = ctx.local(self)
        if totals is not None:
            status = reply.status if reply is not None else None
            self.seen.ended.append({**totals, "status": status, "clean": bool(reply and reply.clean)})


def toy_factory(seen: Seen) -> Callable[[Upstream], Filter | None]:
    def build(upstream: Upstream) -> Filter | None:
        if upstream.name != "openai":
            return None  # only where it is wanted: the other upstreams' chains never see it
        seen.built.append(upstream.name)
        return Toy(upstream, seen, len(seen.built))

    return build


async def start(cfg: dict[str, Any], seen: Seen, started: list[Proxy]) -> RunningProxy:
    proxy = Proxy(load_dict(cfg, env={}), filters=[toy_factory(seen)])
    await proxy.start()
    started.append(proxy)
    return RunningProxy(proxy)


@pytest.fixture
async def started() -> Any:
    proxies: list[Proxy] = []
    yield proxies
    for p in proxies:
        await p.stop(1.0)


async def chat(url: str, stream: bool) -> tuple[int, dict[str, str], bytes]:
    """The answer's bytes as they crossed (the app takes no coding: a hop's is undone for it)."""
    headers = {"Authorization": "Bearer sk-x", "Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        body = {**CHAT, "stream": True} if stream else CHAT
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


async def check_toy(url: str, seen: Seen, generation: int) -> None:
    """One JSON and one SSE answer through ``url``: stamped, counted as the client got them."""
    status, headers, body = await chat(url, stream=False)
    assert status == 200 and headers["x-toy"] == f"openai/{generation}"
    assert orjson.loads(body)["choices"]
    assert seen.ended[-1] == {"bytes": len(body), "events": 0, "sse": False, "status": 200, "clean": True}

    status, headers, body = await chat(url, stream=True)
    assert status == 200 and headers["x-toy"] == f"openai/{generation}"
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    assert seen.ended[-1] == {"bytes": len(body), "events": len(events), "sse": True, "status": 200, "clean": True}


async def test_a_toy_filter_on_a_direct_path(origin: FakeOrigin, started: list[Proxy]) -> None:
    seen = Seen()
    side = await start(proxy_config(origin.url), seen, started)
    await check_toy(side.url, seen, 1)
    # Its upstream only: an anthropic answer is not stamped.
    async with aiohttp.ClientSession() as s:
        body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(side.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": "k"}) as r:
            assert r.status == 200 and "x-toy" not in r.headers
    assert seen.built == ["openai"]


async def test_a_toy_filter_on_a_via_path(origin: FakeOrigin, make_proxy: MakeProxy, started: list[Proxy]) -> None:
    edge = await make_proxy(edge_config(origin))
    seen = Seen()
    side = await start(sidecar_config(origin, edge.url), seen, started)
    await ready(side)
    await check_toy(side.url, seen, 1)  # what it counts is what the app got: decoded, not the hop's bytes
    assert all(r.path_only == "/v1/chat/completions" for r in origin.requests if r.method == "POST")


async def test_a_toy_filter_at_the_edge_sees_answers_before_the_hops_compression(
    origin: FakeOrigin, make_proxy: MakeProxy, started: list[Proxy]
) -> None:
    seen = Seen()
    edge = await start(edge_config(origin), seen, started)
    side = await make_proxy(sidecar_config(origin, edge.url))
    await ready(side)
    status, headers, body = await chat(side.url, stream=True)
    assert status == 200 and headers["x-toy"] == "openai/1"  # stamped at the edge, passed on by the sidecar
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert seen.ended[-1]["events"] == len(events) and seen.ended[-1]["bytes"] == len(body)


async def test_a_toy_filter_is_built_again_at_a_reload(origin: FakeOrigin, tmp_path: Path) -> None:
    conf = tmp_path / "edgeproxy.yaml"
    cfg = proxy_config(origin.url)
    conf.write_bytes(orjson.dumps(cfg))
    seen = Seen()
    proxy = Proxy(load_file(str(conf)), filters=[toy_factory(seen)])
    await proxy.start()
    try:
        url = RunningProxy(proxy).url
        await check_toy(url, seen, 1)
        cfg["upstreams"]["openai"]["failover"] = {"retries": 1}
        conf.write_bytes(orjson.dumps(cfg))
        ok, summary = await proxy.reload()
        assert ok, summary
        await check_toy(url, seen, 2)  # the new config's filter, built for it
        assert seen.built == ["openai", "openai"]
    finally:
        await proxy.stop(1.0)


async def test_chains_hold_only_what_is_on(origin: FakeOrigin) -> None:
    """A request pays only for the capabilities its upstream and path have."""
    cfg = proxy_config(
        origin.url,
        lines={"direct": {}, "edge": {"via": "http://127.0.0.1:9", "token": TOKEN}},
    )
    cfg["upstreams"]["openai"]["endpoints"] = [
        {"url": origin.url + "/v1", "keys": ["sk-a", "sk-b"], "models": {"a": "b"}, "lines": ["direct", "edge"]},
    ]
    cfg["listen"] = f"127.0.0.1:{free_port()}"
    proxy = Proxy(load_dict(cfg, env={}))
    pipeline = proxy.pipeline
    openai_chain = pipeline.chains["openai"]
    assert [type(f) for f in openai_chain.filters] == [KeyPools, UsageMeter]
    anthropic_chain = pipeline.chains["anthropic"]
    assert [type(f) for f in anthropic_chain.filters] == [UsageMeter]
    assert not anthropic_chain.path and not anthropic_chain.answer  # no key hooks run there
    by_line = {p.line.name: [type(f) for f in openai_chain.at(p).filters] for p in proxy.state.upstream("openai").paths}  # type: ignore[union-attr]
    assert by_line == {"direct": [KeyPools, UsageMeter, Renames], "edge": [KeyPools, UsageMeter, Renames, ViaHop]}
    assert [type(f) for f in pipeline.routers] == [EdgeRole]


async def test_a_plain_on_answer_from_before_it_was_async_still_works(origin: FakeOrigin, started: list[Proxy]) -> None:
    """on_answer became async; a filter written against the old contract is wrapped, not
    left to fail every request."""
    seen: list[int] = []

    class Old(Filter):
        def on_answer(self, ctx: Ctx, attempt: Any, resp: Any) -> None:
            seen.append(resp.status)

    proxy = Proxy(load_dict(proxy_config(origin.url), env={}), filters=[lambda upstream: Old()])
    await proxy.start()
    started.append(proxy)
    status, _, _ = await chat(RunningProxy(proxy).url, stream=False)
    assert status == 200 and seen == [200]

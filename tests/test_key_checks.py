"""A 401/403 disables a key only when the key is at fault.

The origin may refuse a request for reasons of the request, not of the key: a restricted key
missing a scope, a model or a path only some keys may use. Before a refused key is disabled,
edgeproxy checks it (``GET <models>`` with that key, unbilled): refused too, the key is dead
and disabled; answered, the refusal was about the request: every key stays, the request goes
once more with another key, then the client gets the origin's answer. The fake origin's
``restricted_keys`` are such keys; its ``key_checks`` counts the checks it received.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from edgeproxy.config import key_id
from edgeproxy.filters.keycheck import DEAD, LIVE, UNKNOWN, verdict_of
from tests.fakes.origin import MISSING_SCOPE, FakeOrigin
from tests.test_keys import KEYS, key_pool, keyed, metrics, post

GPT4O = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MINI = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_NO_PERMISSION = (
    b'{"type":"error","error":{"type":"permission_error",'
    b'"message":"Your API key does not have permission to use the specified resource."}}'
)


def states(p: Any, origin: FakeOrigin) -> list[str]:
    return [k.state(time.monotonic()) for k in key_pool(p.proxy, origin.url + "/v1").keys]


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (401, b'{"error":{"code":"invalid_api_key","message":"Incorrect API key provided"}}', DEAD),
        (403, b'{"error":{"type":"permission_error","message":"Your account is suspended"}}', DEAD),
        (401, MISSING_SCOPE.encode(), LIVE),  # a restricted key that may not list models
        (403, ANTHROPIC_NO_PERMISSION, LIVE),
        (200, b'{"data":[]}', LIVE),
        (429, b"", LIVE),  # rate-limited: it authenticated
        (404, b"", UNKNOWN),  # a relay without a models list proves nothing
        (502, b"", UNKNOWN),
        (0, b"", UNKNOWN),  # no answer in time
    ],
)
def test_what_a_check_answer_says_about_the_key(status: int, body: bytes, verdict: str) -> None:
    assert verdict_of(status, body) == verdict
    assert verdict_of(status, body, edge_error=True) == UNKNOWN  # an edge's own answer, not the origin's


async def test_a_key_restricted_on_one_model_stays_enabled(origin: FakeOrigin, make_proxy: Any) -> None:
    """The issue's case: one request the origin answers 401 (a scope the key lacks) used to
    disable the key until the next reload. Now it costs that request one retry."""
    origin.restricted_keys[KEYS[0]] = {"gpt-4o"}
    p = await make_proxy(keyed(origin, KEYS))
    results = [await post(p.url, body=GPT4O) for _ in range(12)]
    assert [r[0] for r in results] == [200] * 12  # each refused request went once more, with another key
    refused = origin.key_restricted[KEYS[0]]
    assert refused >= 1
    assert len(origin.requests) == 12 + refused  # at most one retry per client request
    assert states(p, origin) == ["ready"] * 3
    assert origin.key_checks == {KEYS[0]: 1}  # one check, then its verdict stands a while
    text = await metrics(p)
    assert (
        f'edgeproxy_key_checks_total{{endpoint="{origin.url}/v1",key="{key_id(KEYS[0])}",'
        'result="ok",upstream="openai"} 1.0'
    ) in text
    # the key still serves what it may: a third of the other model's requests
    before = len(origin.requests)
    assert [(await post(p.url, body=MINI))[0] for _ in range(6)] == [200] * 6
    served = [r.headers["Authorization"][7:] for r in origin.requests[before:]]
    assert served.count(KEYS[0]) == 2 and len(served) == 6


async def test_a_request_no_key_may_make_gets_the_origins_answer(origin: FakeOrigin, make_proxy: Any) -> None:
    """No key may use the path: the client gets the origin's 401 (it says which scope is
    missing), each request costs two attempts, and every key stays enabled (it used to cost
    the whole pool: every key disabled, our keys_refused for every request after)."""
    for key in KEYS:
        origin.restricted_keys[key] = {"/v1/embeddings"}
    p = await make_proxy(keyed(origin, KEYS))
    for _ in range(5):
        status, headers, body = await post(p.url, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        assert status == 401 and "x-edgeproxy-error" not in headers
        assert orjson.loads(body)["error"]["message"] == MISSING_SCOPE
    assert len(origin.requests) == 10
    assert states(p, origin) == ["ready"] * 3
    assert sum(origin.key_checks.values()) <= 3 and max(origin.key_checks.values()) == 1
    assert (await post(p.url, body=GPT4O))[0] == 200


async def test_refusals_at_once_share_one_check_per_key(origin: FakeOrigin, make_proxy: Any) -> None:
    """Many requests refused at once launch no storm of checks: one per key, the others wait
    for its result. The revoked key is disabled, the restricted one is not, no client sees
    a refusal."""
    origin.restricted_keys[KEYS[0]] = {"gpt-4o"}
    origin.revoked_keys.add(KEYS[1])
    p = await make_proxy(keyed(origin, KEYS))
    results = await asyncio.gather(*(post(p.url, body=GPT4O) for _ in range(24)))
    assert [r[0] for r in results] == [200] * 24
    assert origin.key_checks == {KEYS[0]: 1, KEYS[1]: 1}
    assert states(p, origin) == ["ready", "disabled", "ready"]


async def test_a_restricted_key_that_may_not_list_models_stays_enabled(origin: FakeOrigin, make_proxy: Any) -> None:
    # Its check is refused too, but with "Missing scopes": the key authenticated.
    origin.restricted_keys[KEYS[0]] = {"gpt-4o", "/v1/models"}
    p = await make_proxy(keyed(origin, KEYS[:2]))
    assert [(await post(p.url, body=GPT4O))[0] for _ in range(4)] == [200] * 4
    assert origin.key_checks == {KEYS[0]: 1}
    assert states(p, origin) == ["ready", "ready"]


async def test_a_streamed_upload_refused_for_its_key_gets_the_origins_answer(
    origin: FakeOrigin, make_proxy: Any
) -> None:
    """A body too big to keep cannot go again: the client gets the origin's refusal as it
    is (not our keys_refused), and the key it was about stays enabled."""
    origin.restricted_keys[KEYS[0]] = {"/v1/files"}
    cfg = keyed(origin, KEYS[:2])
    cfg["limits"] = {"replay_body": "64KiB"}
    p = await make_proxy(cfg)
    data = b"x" * (256 << 10)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/files", data=data) as r:
            assert r.status == 401 and "x-edgeproxy-error" not in r.headers
            assert orjson.loads(await r.read())["error"]["message"] == MISSING_SCOPE
        async with s.post(p.url + "/v1/files", data=data) as r:
            assert r.status == 200  # the other key, in turn
    assert states(p, origin) == ["ready", "ready"]
    assert origin.key_checks == {KEYS[0]: 1}

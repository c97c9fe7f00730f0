"""Tokens that guard something: no placeholder or weak token off loopback, a guess throttle on
the admin that holds per address, and the CLI talking to a tokened admin."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from edgeproxy.config import ConfigError, load_dict, load_file
from edgeproxy.ops.server import Proxy
from tests.conftest import RunningProxy, free_port, proxy_config
from tests.fakes.origin import FakeOrigin
from tests.test_cli import ROOT, run_cli
from tests.test_edge import raw_request

MakeProxy = Callable[..., Awaitable[RunningProxy]]
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
WRONG = "wrong-" + secrets.token_hex(16)


def errors(cfg: dict[str, object], env: dict[str, str] | None = None) -> tuple[str, ...]:
    try:
        load_dict(cfg, env=env or {})
    except ConfigError as exc:
        return exc.errors
    return ()


# -- weak tokens off loopback ------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("local-try-out-token-change-me", "placeholder"),  # conf/edge.yaml's try-out default
        ("my-token-changeme-please", "placeholder"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "one character repeated"),
        ("0123456789012345", "about 53 bits"),  # 16 digits
        ("passwordpassword", "too easy to guess"),  # a short unit, repeated
        ("abababababababababababab", "too easy to guess"),
        ("deadbeefdeadbeef", "too easy to guess"),
    ],
)
def test_a_listener_other_hosts_reach_refuses_weak_tokens(token: str, why: str) -> None:
    cfg: dict[str, object] = {
        "listen": ["127.0.0.1:8787", {"address": "0.0.0.0:8443", "tokens": ["x" + secrets.token_hex(12), token]}],
        "admin": {"listen": {"address": "[::]:8788", "tokens": token}},
    }
    errs = errors(cfg)
    assert len(errs) == 2, errs
    assert errs[0].startswith("listen[1].tokens[1]: ") and why in errs[0]
    assert errs[1].startswith("admin.listen.tokens: ") and why in errs[1]
    assert "openssl rand -hex 24" in errs[0]  # how to make a good one
    assert not any(token in e for e in errs)  # the secret is never quoted
    # On loopback the same tokens are fine (at least 16 characters): the try-out stays easy.
    assert not errors({"listen": {"address": "127.0.0.1:8443", "tokens": [token]}})


@pytest.mark.parametrize(
    "token",
    [
        secrets.token_hex(24),  # what the docs say to use
        "3f9a0c1be2d47a65",  # 16 hex characters: 64 bits, just enough
        secrets.token_urlsafe(16),
        str(uuid.uuid4()),
        "correct-horse-battery-staple",
    ],
)
def test_generated_tokens_are_accepted(token: str) -> None:
    assert not errors({"listen": {"address": "0.0.0.0:8443", "tokens": [token]}})


def test_placeholder_from_the_environment_default_names_the_key(tmp_path: Path) -> None:
    """conf/edge.yaml with its listener moved off loopback and no EDGE_TOKEN set: the error
    names the key and the variable; with EDGE_TOKEN set it is fine."""
    text = (ROOT / "conf/edge.yaml").read_text().replace("address: 127.0.0.1:8443", "address: 0.0.0.0:8443", 1)
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    r = run_cli("check", "-c", str(path), env={"EDGE_TOKEN": ""})
    assert r.returncode == 1
    assert "listen[0].tokens[0]: this is a placeholder" in r.stderr and "EDGE_TOKEN" in r.stderr
    assert "local-try-out-token-change-me" not in r.stderr
    r = run_cli("check", "-c", str(path), env={"EDGE_TOKEN": secrets.token_hex(24)})
    assert r.returncode == 0, r.stderr
    r = run_cli("check", "-c", str(ROOT / "conf/edge.yaml"), env={"EDGE_TOKEN": ""})  # as shipped: loopback
    assert r.returncode == 0, r.stderr


# -- the guess throttle --------------------------------------------------------------------


def status_get(host: str, token: str) -> bytes:
    return f"GET /-/status HTTP/1.1\r\nHost: {host}\r\nx-edgeproxy-token: {token}\r\n\r\n".encode()


async def test_admin_slows_repeated_wrong_tokens_across_connections(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Each guess on a new connection, as a guesser would after we close one: the address is
    remembered, not the connection."""
    admin = {"address": f"127.0.0.1:{free_port()}", "tokens": [ADMIN_TOKEN]}
    p = await make_proxy(proxy_config(origin.url, admin={"listen": admin}))
    host = p.admin_url.removeprefix("http://")
    times = []
    for _ in range(9):
        started = time.monotonic()
        status, headers, body = await raw_request(p.admin_url, status_get(host, WRONG))
        times.append(time.monotonic() - started)
        assert status == 401 and b"upstreams" not in body
    # A few typos are answered at once (the very first answer may be slow on a busy machine:
    # the admin app's first request; generous bound for it).
    assert times[0] < 1.0 and max(times[1:5]) < 0.1, times
    assert times[-1] >= 0.7, times  # then 0.1, 0.2, 0.4, 0.8 s...
    assert headers.get("connection", "").lower() == "close"
    started = time.monotonic()
    status, _, body = await raw_request(p.admin_url, status_get(host, ADMIN_TOKEN))
    assert status == 200 and b"upstreams" in body and time.monotonic() - started < 0.5  # never slowed
    # Health checks stay open to orchestrators, whatever the address did.
    status, _, _ = await raw_request(p.admin_url, f"GET /-/ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status == 200


async def test_guessing_over_parallel_connections_gains_nothing(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Wrong guesses sent all at once on separate connections are answered one after another
    (0.1, 0.2, 0.4, 0.8 s apart), as if sent one by one: more connections, no more guesses."""
    listen = {"address": f"127.0.0.1:{free_port()}", "tokens": [ADMIN_TOKEN]}
    p = await make_proxy(proxy_config(origin.url, listen=listen))
    req = (f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-edgeproxy-token: {WRONG}\r\n\r\n").encode()
    for _ in range(5):  # the free ones
        status, _, _ = await raw_request(p.url, req)
        assert status == 401
    started = time.monotonic()

    async def guess() -> float:
        status, _, _ = await raw_request(p.url, req)
        assert status == 401
        return time.monotonic() - started

    took = sorted(await asyncio.gather(*(guess() for _ in range(4))))
    assert took[-1] >= 1.4, took  # 0.1 + 0.2 + 0.4 + 0.8 s; each alone would wait 0.8 s at most
    assert not origin.requests


async def test_one_guesser_has_one_budget_across_listeners(origin: FakeOrigin, make_proxy: MakeProxy) -> None:
    """Wrong tokens on a client listener count on the admin too (and the other way round):
    moving to another listener is no fresh start."""
    listen = {"address": f"127.0.0.1:{free_port()}", "tokens": [ADMIN_TOKEN]}
    admin = {"address": f"127.0.0.1:{free_port()}", "tokens": [ADMIN_TOKEN]}
    p = await make_proxy(proxy_config(origin.url, listen=listen, admin={"listen": admin}))
    req = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-edgeproxy-token: {WRONG}\r\n\r\n".encode()
    for _ in range(6):  # five free, the sixth waits 0.1 s
        status, _, _ = await raw_request(p.url, req)
        assert status == 401
    host = p.admin_url.removeprefix("http://")
    for _ in range(3):  # then 0.2, 0.4, 0.8 s on the admin
        started = time.monotonic()
        status, _, _ = await raw_request(p.admin_url, status_get(host, WRONG))
        took = time.monotonic() - started
        assert status == 401
    assert took >= 0.7, took


# -- the CLI and a tokened admin -----------------------------------------------------------


async def test_status_and_reload_take_the_admin_token(origin: FakeOrigin, tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "edgeproxy.yaml"
    admin = {"address": f"127.0.0.1:{port}", "tokens": [ADMIN_TOKEN]}
    path.write_text(yaml.safe_dump(proxy_config(origin.url, admin={"listen": admin})))
    proxy = Proxy(load_file(str(path), env={}))
    await proxy.start()
    url = f"http://127.0.0.1:{port}"
    no_env = {"EDGEPROXY_ADMIN_TOKEN": ""}

    async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        r = await asyncio.to_thread(run_cli, *args, "--admin", url, env=env or no_env)
        return r.returncode, r.stdout, r.stderr

    try:
        rc, out, err = await cli("status")
        assert rc == 1 and "wants an admin token" in err and "--token" in err and "EDGEPROXY_ADMIN_TOKEN" in err
        rc, out, err = await cli("status", "--token", ADMIN_TOKEN)
        assert rc == 0 and "openai" in out, err
        rc, out, err = await cli("status", "--json", env={"EDGEPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
        assert rc == 0 and '"upstreams"' in out, err
        rc, out, err = await cli("status", "--token", WRONG)
        assert rc == 1 and "refused the admin token" in err and WRONG not in err

        rc, out, err = await cli("reload")
        assert rc == 1 and "wants an admin token" in err and "reload failed" not in err
        rc, out, err = await cli("reload", "--token", WRONG)
        assert rc == 1 and "refused the admin token" in err and "reload failed" not in err
        assert proxy.generation == 1
        rc, out, err = await cli("reload", "--token", ADMIN_TOKEN)
        assert rc == 0 and "reloaded (generation 2)" in out, err
        rc, out, err = await cli("reload", env={"EDGEPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
        assert rc == 0 and "reloaded (generation 3)" in out, err
        # A file that no longer validates: that, and only that, is a failed reload.
        path.write_text("listen: nowhere\n")
        rc, out, err = await cli("reload", "--token", ADMIN_TOKEN)
        assert rc == 1 and "reload failed, still serving the previous config" in err and "listen" in err
    finally:
        await proxy.stop(0.5)

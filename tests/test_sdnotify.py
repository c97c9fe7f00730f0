"""sd_notify client: the exact datagrams systemd would receive, on a real AF_UNIX socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.ops.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd; $NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(2)


def test_messages(notify_socket: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready() is True
    assert recv(notify_socket) == "READY=1"
    assert n.stopping() is True
    assert recv(notify_socket) == "STOPPING=1"
    assert n.watchdog() is True
    assert recv(notify_socket) == "WATCHDOG=1"
    assert n.status("serving 3 upstreams") is True
    assert recv(notify_socket) == "STATUS=serving 3 upstreams"
    assert_nothing_pending(notify_socket)
    n.close()


def test_status_stays_on_one_line(notify_socket: socket.socket) -> None:
    n = Notifier()
    n.status("reload failed:\nlisten: bad address\nREADY=1")
    # Never a second assignment smuggled in by a newline.
    assert recv(notify_socket) == "STATUS=reload failed: listen: bad address READY=1"
    n.close()


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    n = Notifier()
    before = time.monotonic_ns() // 1000
    assert n.reloading() is True
    after = time.monotonic_ns() // 1000
    lines = recv(notify_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2 and lines[1].startswith("MONOTONIC_USEC=")
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after
    n.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgeproxy-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        n = Notifier()
        assert n.enabled
        assert n.ready() is True
        assert recv(sock) == "READY=1"
        n.close()
    finally:
        sock.close()


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    for call in (n.ready, n.reloading, n.stopping, n.watchdog):
        assert call() is False
    assert n.status("x") is False
    n.close()


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234"])
def test_unusable_socket_value_is_a_noop(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False


def test_send_failure_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    n = Notifier()
    assert n.enabled
    with caplog.at_level(logging.DEBUG, logger="edgeproxy.sdnotify"):
        assert n.ready() is False
        assert n.reloading() is False
    assert any("sd_notify" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    n.close()


def test_env_mapping_instead_of_environ(notify_socket: socket.socket) -> None:
    n = Notifier(env={})  # an explicit, empty environment: disabled whatever os.environ says
    assert not n.enabled
    assert n.ready() is False
    assert_nothing_pending(notify_socket)


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier().watchdog_interval() is None

    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert Notifier().watchdog_interval() == 15.0  # half of WatchdogSec=30s

    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 15.0

    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert Notifier().watchdog_interval() is None

    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier().watchdog_interval() is None


async def test_watchdog_loop_pings_until_cancelled(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms: a ping every 20 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.watchdog_interval() == pytest.approx(0.02)
    task = asyncio.create_task(watchdog_loop(n))
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = []
    notify_socket.setblocking(False)
    while True:
        try:
            pings.append(notify_socket.recv(4096).decode())
        except BlockingIOError:
            break
    assert len(pings) >= 3
    assert set(pings) == {"WATCHDOG=1"}
    n.close()


async def test_watchdog_loop_returns_without_watchdog(notify_socket: socket.socket) -> None:
    await asyncio.wait_for(watchdog_loop(Notifier()), timeout=1)  # WATCHDOG_USEC unset
    assert_nothing_pending(notify_socket)


async def test_watchdog_loop_returns_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "40000")
    await asyncio.wait_for(watchdog_loop(Notifier()), timeout=1)

"""Getting a byte stream to an origin through a line: TCP, then an HTTP CONNECT or SOCKS5
handshake when the line is a proxy. TLS to the origin comes after, over whatever this gave.

``Handshake`` is the protocol that owns a new socket until the stream reaches the origin; the
caller then hands the transport to the real protocol. Errors name the proxy by host and port
only: a proxy URL may carry a password.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import struct
from typing import Final
from urllib.parse import unquote, urlsplit

from ..proto.errors import ConnectError

__all__ = ["Handshake", "ProxySpec", "http_connect", "socks5_connect"]

# A proxy's answer to CONNECT is a few hundred bytes; more is not a proxy we understand.
MAX_PROXY_RESPONSE: Final = 16 * 1024


class ProxySpec:
    """A parsed proxy URL: scheme, host, port and optional credentials (never printed)."""

    __slots__ = ("host", "password", "port", "remote_dns", "scheme", "username")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.remote_dns = self.scheme == "socks5h"
        self.host = parts.hostname or ""
        self.port = parts.port or (1080 if self.scheme.startswith("socks") else 3128)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def __repr__(self) -> str:
        return f"<ProxySpec {self.scheme}://{self.host}:{self.port}>"

    @property
    def label(self) -> str:
        return f"{self.scheme} proxy {self.host}:{self.port}"


class Handshake(asyncio.Protocol):
    """Buffers what arrives on a fresh connection until the caller takes the transport over."""

    __slots__ = ("_buf", "_closed", "_exc", "_waiter", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _more(self, what: str) -> None:
        if self._closed:
            raise ConnectError(f"{what}: connection closed during the handshake")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exact(self, n: int, what: str) -> bytes:
        while len(self._buf) < n:
            await self._more(what)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read_until(self, sep: bytes, limit: int, what: str) -> bytes:
        while True:
            i = self._buf.find(sep)
            if i >= 0:
                data = bytes(self._buf[: i + len(sep)])
                del self._buf[: i + len(sep)]
                return data
            if len(self._buf) > limit:
                raise ConnectError(f"{what}: answer too long")
            await self._more(what)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def http_connect(hs: Handshake, proxy: ProxySpec, host: str, port: int) -> None:
    """Ask an HTTP proxy for a tunnel to host:port (RFC 9110 9.3.6)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.username is not None:
        cred = f"{proxy.username}:{proxy.password or ''}".encode()
        head += f"Proxy-Authorization: Basic {base64.b64encode(cred).decode()}\r\n"
    hs.write((head + "\r\n").encode())
    answer = await hs.read_until(b"\r\n\r\n", MAX_PROXY_RESPONSE, proxy.label)
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ConnectError(f"{proxy.label}: not an HTTP proxy answer: {status_line[:80]!r}")
    if parts[1] != "200":
        raise ConnectError(f"{proxy.label} refused the tunnel to {authority}: {status_line[9:80]}")


_SOCKS_REPLIES: Final = {
    1: "general failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


async def socks5_connect(hs: Handshake, proxy: ProxySpec, host: str, port: int) -> None:
    """SOCKS5 CONNECT (RFC 1928), with username/password auth (RFC 1929) when configured.

    ``host`` is an IP address unless the proxy resolves names (socks5h), then a name.
    """
    label = proxy.label
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    hs.write(b"\x05" + bytes([len(methods)]) + methods)
    ver, method = await hs.read_exact(2, label)
    if ver != 5:
        raise ConnectError(f"{label}: not a SOCKS5 proxy")
    if method == 0x02:
        if proxy.username is None:
            raise ConnectError(f"{label}: asks for a username and password; put them in the line's URL")
        user, pw = proxy.username.encode(), (proxy.password or "").encode()
        hs.write(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
        _, status = await hs.read_exact(2, label)
        if status != 0:
            raise ConnectError(f"{label}: username or password rejected")
    elif method != 0x00:
        raise ConnectError(f"{label}: no acceptable authentication method")
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" + ip.packed) if ip.version == 4 else (b"\x04" + ip.packed)
    except ValueError:
        name = host.encode("idna")
        addr = b"\x03" + bytes([len(name)]) + name
    hs.write(b"\x05\x01\x00" + addr + struct.pack("!H", port))
    ver, rep, _, atyp = await hs.read_exact(4, label)
    if ver != 5:
        raise ConnectError(f"{label}: malformed SOCKS5 reply")
    if rep != 0:
        reason = _SOCKS_REPLIES.get(rep, f"error {rep}")
        raise ConnectError(f"{label} could not reach {host}:{port}: {reason}")
    # Skip the bound address the proxy reports.
    if atyp == 1:
        await hs.read_exact(4 + 2, label)
    elif atyp == 4:
        await hs.read_exact(16 + 2, label)
    elif atyp == 3:
        (n,) = await hs.read_exact(1, label)
        await hs.read_exact(n + 2, label)
    else:
        raise ConnectError(f"{label}: malformed SOCKS5 reply")

"""Host names and IP addresses: normalizing a host, telling loopback from the rest."""

from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?"
)


def _is_loopback_host(host: str) -> bool:
    if host.rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def norm_host(host: str) -> str:
    """Lower-cased hostname or compressed IP; raises ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or not _HOSTNAME.fullmatch(host.lower()):
        raise ValueError(f"invalid host {host!r}")
    return host.lower()


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

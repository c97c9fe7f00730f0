"""The edge hop's wire protocol: the header names a sidecar and an edge speak to each other.

A `via` line sends each request to a peer edgeproxy with the endpoint's URL as its target
(absolute form) and the line's token in ``x-edgeproxy-token``. Both sides, and the prober,
use these names; the behaviour lives in ``filters.edge`` (the edge) and ``filters.hop`` (the
sidecar).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BASE_HEADER",
    "BASE_MISSING",
    "ENDPOINT_HEADER",
    "ORIGIN_RTT_HEADER",
    "PROBE_HEADER",
    "TOKEN_HEADER",
]

# The bearer token of the listener (the edge's, or a sidecar listener's own).
TOKEN_HEADER: Final = "x-edgeproxy-token"
# A probe over a `via` line: the edge answers it itself, with its own RTT to the origin.
PROBE_HEADER: Final = "x-edgeproxy-probe"
# The sidecar's endpoint URL, so an edge with two endpoints at one origin knows which is meant.
ENDPOINT_HEADER: Final = "x-edgeproxy-endpoint"
# The edge's smoothed RTT to the origin (seconds) on its best healthy path, in a probe answer.
ORIGIN_RTT_HEADER: Final = "x-edgeproxy-origin-rtt"
# A conversation delta: "<hash>:<prefix length>:<suffix length>" of a body the edge keeps.
BASE_HEADER: Final = "x-edgeproxy-base"
# The edge's answer (409, x-edgeproxy-error) when it no longer keeps that base.
BASE_MISSING: Final = "hop_base_unknown"

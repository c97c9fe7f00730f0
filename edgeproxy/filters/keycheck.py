"""Key checks: is a key the origin refused (401/403) dead, or was the refusal about the request?

One unbilled, authenticated request tells them apart: ``GET <models>`` (what a probe sends)
with that key, over the path the refusal came on. Refused too (401/403): the key is dead.
Answered (2xx; a 429 also means it authenticated): the refusal was about the request (a
restricted key missing a scope, a model or a path only some keys may use), and the key stays.
A refusal of the check that says the key lacks a permission ("insufficient permissions",
"missing scopes") is a live key too: a restricted key may not be allowed to list models.
Anything else (no answer within CHECK_TIMEOUT, a 5xx, a 404 from a relay without a models
list, an edge's own error on a `via` path) proves nothing: the key stays enabled.

Bounded: at most one check per key is in flight, and every refusal meanwhile waits for its
result; a verdict stands for FRESH seconds (a dead one too: a refusal that comes in after the
check ended, before a request that waited on it has disabled the key, is not checked again;
a reload builds new keys, so a verdict never outlives one). A burst of refused requests, or a
client sending only requests some keys may not make, costs one check per key per FRESH, however many requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from ..proto.errors import ProxyError
from ..proto.providers import probe_target

if TYPE_CHECKING:
    from ..net.client import Response
    from ..routing.lines import Path
    from ..telemetry.metrics import Metrics
    from .keypool import Key

__all__ = ["AGENT", "CHECK_TIMEOUT", "DEAD", "FRESH", "LIVE", "UNKNOWN", "KeyChecks", "verdict_of"]

log = logging.getLogger("edgeproxy")

# The verdicts, also the `result` label of edgeproxy_key_checks_total.
DEAD: Final = "refused"  # the check was refused too: disable the key
LIVE: Final = "ok"  # the key authenticated: the refusal was about the request
UNKNOWN: Final = "error"  # no conclusion: the key stays enabled

# A models list answers in a round trip or two; a check that takes longer proves nothing.
CHECK_TIMEOUT: Final = 5.0
# A key found live (or not checkable) is not checked again for this long.
FRESH: Final = 10.0
# How much of a refused check's body is read for the words that say "a permission is missing".
BODY_PEEK: Final = 4096
# Told apart from probes (which carry no key) in an origin's logs.
AGENT: Final = "edgeproxy-keycheck"
# What the refusal of a live key that lacks a permission says: OpenAI "You have insufficient
# permissions for this operation. Missing scopes: api.model.read"; Anthropic's permission_error
# "Your API key does not have permission to use the specified resource".
SCOPE_WORDS: Final = (b"insufficient permission", b"missing scope", b"does not have permission")
# Headers some providers want on every request, the models list included.
_PROVIDER_HEADERS: Final = {"anthropic": b"anthropic-version: 2023-06-01\r\n"}
EDGE_ERROR: Final = b"x-edgeproxy-error"


def verdict_of(status: int, body: bytes, edge_error: bool = False) -> str:
    """The verdict on a key from its check's answer (status 0: none came)."""
    if edge_error or status == 0:
        return UNKNOWN  # an edge's own answer (its keys, its limits) says nothing of our key
    if status in (401, 403):
        low = body[:BODY_PEEK].lower()
        return LIVE if any(word in low for word in SCOPE_WORDS) else DEAD
    if 200 <= status < 300 or status == 429:
        return LIVE
    return UNKNOWN


class KeyChecks:
    """The checks of one upstream's keys: one in flight per key, recent verdicts kept."""

    __slots__ = ("_inflight", "_known", "auth_header", "extra", "metrics", "name", "provider")

    def __init__(self, name: str, provider: str, auth_header: bytes, metrics: Metrics) -> None:
        self.name = name
        self.provider = provider
        self.auth_header = auth_header
        self.extra = _PROVIDER_HEADERS.get(provider, b"")
        self.metrics = metrics
        self._inflight: dict[Key, asyncio.Task[str]] = {}
        self._known: dict[Key, tuple[str, float]] = {}  # key -> (verdict, when found)

    async def verdict(self, path: Path, key: Key) -> str:
        """DEAD, LIVE or UNKNOWN for ``key``, refused on ``path``: a recent verdict, the
        result of the check in flight, or of a new one. Never raises but CancelledError (the
        check itself runs on, for the others waiting on it)."""
        if key.disabled is not None:
            return DEAD  # confirmed already (by a check another request waited on)
        known = self._known.get(key)
        if known is not None and time.monotonic() - known[1] < FRESH:
            return known[0]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check(path, key), name=f"key check {key.id}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    def head(self, path: Path, key: Key) -> bytes:
        """The check's request head on ``path``: the probe's target, with ``key`` (and the hop's
        headers on a `via` path, but not its probe mark: the edge must pass it on)."""
        target = probe_target(self.provider, path.endpoint.base_path)
        return b"".join(
            (
                f"GET {path.hop_origin}{target} HTTP/1.1\r\nHost: {path.host_header}\r\n".encode("latin-1"),
                path.hop_headers,
                self.auth_header + b": " + key.value + b"\r\n",
                self.extra,
                f"User-Agent: {AGENT}\r\nAccept-Encoding: identity\r\n\r\n".encode(),
            )
        )

    async def _check(self, path: Path, key: Key) -> str:
        status, body, edge_error, why = 0, b"", False, ""
        resp: Response | None = None
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                conn, _ = await path.pool.acquire(probe=True, timeout=CHECK_TIMEOUT)  # never queues
                resp = conn.send("GET", self.head(path, key), None, None)
                await resp.wait_head(CHECK_TIMEOUT)
                status = resp.status
                edge_error = path.hop is not None and resp.header(EDGE_ERROR) is not None
                while len(body) < BODY_PEEK:
                    chunk = await resp.read()
                    if not chunk:
                        break
                    body += chunk
        except ProxyError as exc:
            why = exc.message
        except TimeoutError:
            why = f"no answer within {CHECK_TIMEOUT:g}s"
        except Exception as exc:  # whatever it was, it proves nothing about the key
            why = str(exc) or type(exc).__name__
        finally:
            if resp is not None:
                resp.release()
        result = verdict_of(status, body, edge_error)
        self._known[key] = (result, time.monotonic())
        self.metrics.key_checks.inc((self.name, path.endpoint.url, key.id, result))
        if result == UNKNOWN:
            log.warning(
                "key %s of %s was refused, and its check proved nothing (%s): it stays enabled",
                key.id,
                path.endpoint.url,
                why or f"the models list answered {status}",
            )
        return result

"""The built-in filters, one capability each, and ``assemble``: the chains of one State.

| filter | module | on |
|---|---|---|
| ``Cache`` | cache.py (+ cachestore.py, redisstore.py) | upstreams with ``cache``: first on their chain |
| ``Admission`` | admission.py (+ fairqueue.py) | upstreams with ``admission``: after the cache |
| ``EdgeRole`` | edge.py | route filter of every listener; first on the chains of hop requests |
| ``KeyPools`` | keys.py (+ keypool.py, keycheck.py) | upstreams with an endpoint that has ``keys`` |
| ``UsageMeter`` | metering.py | every upstream |
| ``Fallbacks`` | fallbacks.py | upstreams with ``fallbacks`` (``GeminiFallbacks`` on a Gemini upstream) |
| ``Resume`` | resume.py (+ prefill.py) | Anthropic upstreams with ``failover.resume: on`` |
| ``Renames`` | renames.py | paths of endpoints with a ``models`` map |
| ``ViaHop`` | hop.py | paths on a `via` line |

A reload assembles a new pipeline for the new State; what must outlive it (key pools, the
bodies a `via` line sent lately, the edge's bases, the cache's store and answers in flight
while ``cache:`` stays the same, an upstream's admission queue) is taken over from the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..engine import Chain, Filter, Pipeline
from .admission import Admission
from .cache import Cache, SharedCache
from .deltas import Bases
from .edge import EdgeRole
from .fallbacks import Fallbacks, fallbacks_for
from .hop import ViaHop, sidecar_bases
from .keys import KeyPools
from .metering import UsageMeter
from .renames import Renames
from .resume import Resume

if TYPE_CHECKING:
    from ..routing.lines import Line, Path
    from ..routing.state import State, Upstream
    from ..telemetry.metrics import Metrics

__all__ = [
    "Admission",
    "Cache",
    "EdgeRole",
    "Fallbacks",
    "FilterFactory",
    "KeyPools",
    "Renames",
    "Resume",
    "UsageMeter",
    "ViaHop",
    "assemble",
]


# Builds an extra filter for an upstream (None: not on that one); called at every load and
# reload, so a filter sees the config it was built for.
FilterFactory = Callable[["Upstream"], Filter | None]


def assemble(
    state: State,
    metrics: Metrics,
    edge_bases: Bases,
    old: Pipeline | None = None,
    extra: Sequence[FilterFactory] = (),
) -> Pipeline:
    """The pipeline of ``state``: a chain per upstream, and the edge role as route filter.
    ``extra``: factories of filters added after the built-in ones on each upstream's chain
    (request side: last; response side: first, before compression for the hop)."""
    previous = [f for chain in old.chains.values() for f in chain.all_filters()] if old is not None else []
    old_keys = {f.name: f for f in previous if isinstance(f, KeyPools)}
    old_admission = {f.name: f for f in previous if isinstance(f, Admission)}
    old_hops = {(f.line, f.via_url): f for f in previous if isinstance(f, ViaHop)}
    edge = EdgeRole(metrics, edge_bases)
    cache = _shared_cache(state, previous)
    hops: dict[Line, ViaHop] = {}
    chains: dict[str, Chain] = {}
    for upstream in state.upstreams:
        filters: list[Filter] = []
        if upstream.config.cache is not None and cache is not None:
            filters.append(Cache(upstream.name, upstream.provider, upstream.config.cache, cache, metrics))
        if upstream.config.admission is not None:
            queue_of = old_admission.get(upstream.name)
            filters.append(Admission(upstream, upstream.config.admission, metrics, queue_of))
        if any(ep.keys for ep in upstream.config.endpoints):
            filters.append(KeyPools(upstream, metrics, old_keys.get(upstream.name)))
        filters.append(UsageMeter(upstream.name, metrics))
        fallbacks = fallbacks_for(upstream.config, metrics)
        if fallbacks is not None:
            filters.append(fallbacks)
        if upstream.config.failover.resume and upstream.provider == "anthropic":
            filters.append(Resume(upstream, metrics))  # (the only API whose answers can be continued)
        filters.extend(f for f in (factory(upstream) for factory in extra) if f is not None)
        per_path: dict[Path, list[Filter]] = {}
        for path in upstream.paths:
            # From the new config, not the path's fields: a path kept by a reload takes its
            # new endpoint and Line only at the swap (State.commit), after this.
            _, url, line_name = path.key
            endpoint, line = upstream.endpoint(url), state.lines[line_name]
            own: list[Filter] = []
            if endpoint.models:
                own.append(Renames(endpoint))
            if line.via is not None:
                hop = hops.get(line)
                if hop is None:
                    # The bodies this line sent its edge lately stay with it while it goes to
                    # the same edge (a new token or compression changes nothing there).
                    kept = old_hops.get((line.name, line.via.url))
                    bases = kept.bases if kept is not None else sidecar_bases()
                    hop = hops[line] = ViaHop(line, metrics, bases)
                own.append(hop)
            per_path[path] = own
        chains[upstream.name] = Chain(filters, per_path)
        edge.chains[upstream.name] = Chain([edge, *filters], per_path)
    return Pipeline(state, chains, (edge,))


def _shared_cache(state: State, previous: list[Filter]) -> SharedCache | None:
    """The cache's store, if any upstream caches: the old one while ``cache:`` is unchanged."""
    if not any(u.config.cache is not None for u in state.upstreams):
        return None
    config = state.config.cache
    kept = next((f.shared for f in previous if isinstance(f, Cache)), None)
    return kept if kept is not None and kept.config == config else SharedCache(config)

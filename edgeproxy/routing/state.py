"""The running state built from one Config: upstreams with their paths, in routing order.

A ``State`` is immutable in use: a reload builds a new one (``State.build(config, old)``),
taking over every old path that still exists, with its warm pool, RTT history and health, and
the server swaps one reference (after ``State.commit``). Requests keep the State they started
with to their end.

A path is (upstream, endpoint URL, line): while that exists and the line's connections go the
same way (``same_connections``: source address, proxy, edge, CA), the path is kept whatever
else changed: the endpoint's other settings (priority, models, keys and their limits, its
``lines`` list), a `via` line's token or compression, the upstream's provider. Those are
handed to the kept path by ``commit``, at the swap, not by ``build``: a reload can still fail
after building (a listener that cannot bind), and must then leave the running paths as they
were.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .budget import RetryBudget
from .lines import Line, Path, PathKey, same_connections
from .select import Candidate, order

if TYPE_CHECKING:
    from ..config import Config, EndpointConfig, UpstreamConfig
    from ..net.dns import Resolver

__all__ = ["State", "Upstream", "describe_changes"]


class Upstream:
    """An upstream at run time: where it is mounted and the paths that can serve it."""

    __slots__ = (
        "config",
        "name",
        "prefix",
        "provider",
        "paths",
        "order",
        "current",
        "switches",
        "tolerance",
        "injects_keys",
        "budget",
        "gate",
    )

    def __init__(self, config: UpstreamConfig, paths: list[Path], tolerance: float) -> None:
        self.config = config
        self.name = config.name
        self.prefix = "" if config.prefix == "/" else config.prefix
        self.provider = config.provider
        self.paths = paths  # config order
        self.tolerance = tolerance
        # Try order, best first: recomputed by reselect() when probes change what we know.
        self.order: tuple[Path, ...] = tuple(paths)
        self.current: PathKey | None = None
        self.switches = 0
        self.budget = RetryBudget()
        # Only when every endpoint brings its own keys may a client's credential header carry
        # our token instead (otherwise it must pass through to the origin untouched).
        self.injects_keys = all(ep.keys for ep in config.endpoints)
        # Set by a filter that can tell a path cannot take a request now whatever its health
        # (every key of its endpoint busy): plan() passes such paths over.
        self.gate: Callable[[Path, float], bool] | None = None
        self.reselect()

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.prefix or '/'} paths={len(self.paths)}>"

    def matches(self, raw_path: str) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] in "/?")

    def plan(self, tried: list[Path], retry: bool = False, take: bool = True, only: str | None = None) -> Path | None:
        """The next path to try: the first untried one in ``order`` that has room.

        A path whose in-flight requests fill its pool is passed over (spill to the next);
        it is still returned when every other path was tried or is full too. A retry never
        goes to an endpoint that asked us to wait (429). ``take=False`` only looks: it does
        not claim an ejected path's half-open trial. ``only``: paths of that endpoint URL
        only (a hop request names its endpoint; an edge never swaps it for another).
        """
        spill = fallback = None
        now = time.monotonic()
        gate = self.gate
        for path in self.order:
            if (
                path in tried
                or (retry and path.cooldown_until > now)
                or (only is not None and path.endpoint.url != only)
            ):
                continue
            if gate is not None and not gate(path, now):
                continue  # what it needs is short (every key busy): the gate's filter waits
            if path.inflight >= path.pool.max_size:
                spill = spill or path
                continue
            health = path.health
            if not (health.take_trial(now) if take else health.may_take_trial(now)):
                fallback = fallback or path  # ejected: only if nothing else is left
                continue
            return path
        return spill or fallback

    def reselect(self) -> bool:
        """Recompute ``order`` from the paths' estimates and health; True if the first changed."""
        now = time.monotonic()
        candidates = [
            Candidate(p.key, p.endpoint.priority, p.score(), p.is_usable(now), i, p.health.badness())
            for i, p in enumerate(self.paths)
        ]
        by_key = {p.key: p for p in self.paths}
        self.order = tuple(by_key[c.key] for c in order(candidates, self.current, self.tolerance))
        first = self.order[0].key if self.order else None
        switched = self.current is not None and first != self.current
        if switched:
            self.switches += 1
        self.current = first
        return switched

    def reselect_at(self, when: float) -> None:
        """Re-rank again at monotonic time ``when`` (an ejection or a cool-down ends)."""
        delay = max(0.0, when - time.monotonic()) + 0.001
        asyncio.get_running_loop().call_later(delay, self.reselect)

    def on_attempt(self, path: Path, outcome: str, started: float | None = None) -> bool:
        """Feed a real attempt's outcome ("ok", "local", "5xx") to the path's health; True
        if that ejected the path. ``started``: when the attempt began (monotonic)."""
        now = time.monotonic()
        if not path.health.on_attempt(outcome, now, started):
            return False
        self.reselect()
        if path.health.state == "ejected":
            self.reselect_at(path.health.ejected_until)
            return True
        return False

    def cool_down(self, endpoint: EndpointConfig, seconds: float) -> None:
        """The origin asked for a pause (429): no path of this endpoint gets traffic for it."""
        until = time.monotonic() + seconds
        for path in self.paths:
            if path.endpoint.url == endpoint.url:
                path.cooldown_until = max(path.cooldown_until, until)
        self.reselect()
        self.reselect_at(until)

    def endpoint(self, url: str) -> EndpointConfig:
        for ep in self.config.endpoints:
            if ep.url == url:
                return ep
        raise KeyError(url)


class State:
    """Everything a request needs, built from one Config."""

    __slots__ = ("config", "hops", "lines", "paths", "takeover", "upstreams")

    def __init__(
        self, config: Config, upstreams: list[Upstream], paths: dict[PathKey, Path], lines: dict[str, Line]
    ) -> None:
        self.config = config
        # Paths taken over from the previous State, with the config ``commit`` gives them.
        self.takeover: list[tuple[Path, UpstreamConfig, EndpointConfig, Line]] = []
        # Longest prefix first, so the first match is the longest match.
        self.upstreams = sorted(upstreams, key=lambda u: len(u.prefix), reverse=True)
        self.paths = paths
        self.lines = lines
        # For hop requests (edge role): (scheme, host, port) -> the endpoints at that origin,
        # longest base path first. The only origins an edge ever connects to.
        self.hops: dict[tuple[str, str, int], list[tuple[Upstream, EndpointConfig]]] = {}
        for upstream in self.upstreams:
            for ep in upstream.config.endpoints:
                self.hops.setdefault((ep.scheme, ep.host, ep.port), []).append((upstream, ep))
        for found in self.hops.values():
            found.sort(key=lambda u_ep: len(u_ep[1].base_path), reverse=True)

    @classmethod
    def build(cls, config: Config, resolver: Resolver, old: State | None = None) -> State:
        """A State for ``config``. With ``old``: its paths that still exist are taken over
        (not changed yet: ``commit`` does that at the swap); its Lines too, where unchanged."""
        lines: dict[str, Line] = {}
        for lc in config.lines:
            previous_line = old.lines.get(lc.name) if old is not None else None
            # One Line object per unchanged line: a `via` line's recent bodies go with it.
            lines[lc.name] = previous_line if previous_line is not None and previous_line.config == lc else Line(lc)
        paths: dict[PathKey, Path] = {}
        takeover: list[tuple[Path, UpstreamConfig, EndpointConfig, Line]] = []
        upstreams = []
        for uc in config.upstreams:
            ups_paths = []
            for ep in uc.endpoints:
                for line_name in ep.lines:
                    key = (uc.name, ep.url, line_name)
                    line = lines[line_name]
                    path = old.paths.get(key) if old is not None else None
                    if path is None or not same_connections(path.line.config, line.config):
                        path = Path(uc, ep, line, config.pool, resolver)
                    else:
                        takeover.append((path, uc, ep, line))  # its warm pool, RTT and health stay
                    paths[key] = path
                    ups_paths.append(path)
            upstream = Upstream(uc, ups_paths, config.route.tolerance)
            previous = old.upstream(uc.name) if old is not None else None
            if previous is not None:  # keep the current choice and its history across reloads
                upstream.current, upstream.switches, upstream.budget = (
                    previous.current,
                    previous.switches,
                    previous.budget,
                )
                # (ranked again by commit(), once the kept paths have their new priorities)
            upstreams.append(upstream)
        state = cls(config, upstreams, paths, lines)
        state.takeover = takeover
        return state

    def commit(self) -> None:
        """Hand the paths taken over from the previous State this State's config, then rank
        every upstream. Call once, just before this State replaces the previous one (no await
        in between): from here on requests of both States read the new settings on a kept
        path, which ``Path.retarget`` says why is safe. Pool settings apply in place
        (connections stay)."""
        for path, uc, ep, line in self.takeover:
            path.retarget(uc, ep, line)
            path.pool.reconfigure(self.config.pool)
        self.takeover = []
        for upstream in self.upstreams:
            upstream.reselect()

    def upstream(self, name: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    def route(self, raw_path: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.matches(raw_path):
                return upstream
        return None

    def hop_route(
        self, scheme: str, host: str, port: int, target: str, url: str | None = None
    ) -> tuple[Upstream, EndpointConfig] | None:
        """The upstream and endpoint a hop request to ``scheme://host:port<target>`` means:
        exactly that origin, and a target under the endpoint's base path; else None. With
        several endpoints there, the one whose URL is ``url`` (the sidecar's), if any, else
        the longest base path."""
        found = None
        for upstream, ep in self.hops.get((scheme, host, port), ()):
            base = ep.base_path
            if not base or target == base or (target.startswith(base) and target[len(base)] in "/?"):
                if url is None or ep.url == url:
                    return upstream, ep
                found = found or (upstream, ep)
        return found

    def start(self) -> None:
        for path in self.paths.values():
            path.pool.start()

    async def close(self) -> None:
        for path in self.paths.values():
            await path.pool.close()


def describe_changes(
    old: Config, new: Config, old_state: State, state: State, opened: list[Any], closed: list[Any]
) -> str:
    """One line saying what a reload changed."""
    kept = [k for k, p in state.paths.items() if old_state.paths.get(k) is p]
    # Still there but on a new pool: the line's connections go another way (same_connections).
    rebuilt = [k for k, p in state.paths.items() if k in old_state.paths and old_state.paths[k] is not p]
    added = [k for k in state.paths if k not in old_state.paths]
    removed = [k for k in old_state.paths if k not in state.paths]
    head = f"paths: {len(kept)} kept, {len(added)} new, {len(removed)} removed"
    parts = [head + (f", {len(rebuilt)} rebuilt" if rebuilt else "")]
    for what, keys in (("new", added), ("removed", removed), ("rebuilt (new line settings)", rebuilt)):
        if keys:
            parts.append(what + " " + ", ".join(f"{u}:{url} via {line}" for u, url, line in keys))
    if opened or closed:
        parts.append(
            "listeners: "
            + ", ".join([f"+{x.config.address}" for x in opened] + [f"-{x.config.address}" for x in closed])
        )
    sections = [
        name
        for name in ("admin", "probe", "route", "failover", "pool", "limits", "log", "drain_timeout")
        if getattr(old, name) != getattr(new, name)
    ]
    changed_upstreams = sorted(
        {u.name for u in new.upstreams} ^ {u.name for u in old.upstreams}
        | {u.name for u in new.upstreams for v in old.upstreams if u.name == v.name and u != v}
    )
    if changed_upstreams:
        parts.append("upstreams changed: " + ", ".join(changed_upstreams))
    old_lines, new_lines = {lc.name: lc for lc in old.lines}, {lc.name: lc for lc in new.lines}
    changed_lines = sorted(n for n in old_lines.keys() | new_lines.keys() if old_lines.get(n) != new_lines.get(n))
    if changed_lines:
        parts.append("lines changed: " + ", ".join(changed_lines))
    if sections:
        parts.append("sections changed: " + ", ".join(sections))
    if len(parts) == 1:
        parts.append("nothing else changed")
    return "; ".join(parts)

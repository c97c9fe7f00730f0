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
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from .budget import RetryBudget
from .health import OriginHealth, _Ejection
from .lines import Line, Path, PathKey, same_connections
from .select import Candidate, Split, order

if TYPE_CHECKING:
    from ..config import Config, EndpointConfig, Timeouts, UpstreamConfig
    from ..net.dns import Resolver

__all__ = ["State", "Upstream", "describe_changes", "release_trials"]

# Connections opened at once on the path that takes over from a failing one, at most.
PREWARM_MAX = 64
# Seconds of arrivals a standby path is kept ready for beyond the traffic in flight: finding a
# black hole (about 1.5 s) plus opening connections across a border (about 0.5 s).
STANDBY_WINDOW = 2.0
# Origin health entries per upstream (endpoint x model) at most; also the memo of timeouts.
MAX_ORIGINS = 256


def release_trials(claims: list[tuple[_Ejection, float]]) -> None:
    """A request is over: the half-open trials it claimed and whose outcome never came (its
    client left, a 429, a filter sent it on, a hedge lost, the line failed first) are let go,
    so the next request is the trial instead of everything waiting for TRIAL_LOST."""
    for entry, at in claims:
        if entry.trial and entry.trial_at == at:
            entry.trial = False


def _url_of(path: Path) -> str:
    return path.endpoint.url


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
        "ready_in",
        "origins",
        "_timeouts",
        "_arrivals",
        "split",
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
        # Set with ``gate``: seconds from ``now`` until some path can take a request (None:
        # never); the admission queue waits that long for keys.
        self.ready_in: Callable[[float], float | None] | None = None
        # The origin's health per (endpoint URL, model; None: the whole endpoint), only while
        # something is wrong there (empty: nothing to check on the hot path).
        self.origins: dict[tuple[str, str | None], OriginHealth] = {}
        self._timeouts: dict[tuple[str | None, bool], Timeouts] = {}
        self._arrivals: tuple[Path, float, int, float] | None = None  # (first path, when, its requests, rate)
        # Endpoint weights (only when one sets a weight): first attempts shared by weight.
        weights = {ep.url: ep.weight or 1 for ep in config.endpoints}
        self.split: Split[Path] | None = Split(weights) if any(ep.weight for ep in config.endpoints) else None
        self.reselect()

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.prefix or '/'} paths={len(self.paths)}>"

    def matches(self, raw_path: str) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] in "/?")

    def plan(
        self,
        tried: list[Path],
        retry: bool = False,
        take: bool = True,
        only: str | None = None,
        model: str | None = None,
        avoid: Collection[str] | None = None,
        claims: list[tuple[_Ejection, float]] | None = None,
        order: Sequence[Path] | None = None,
    ) -> Path | None:
        """The next path to try for a request for ``model``: the first untried one in
        ``order`` that has room, whose line and whose origin (for that model) are healthy.

        A path whose in-flight requests fill its pool is passed over (spill to the next);
        it is still returned when every other path was tried or is full too. A path whose
        line or origin is ejected (or cooling down after a 429, or of an endpoint in ``avoid``:
        its origin failed this request, or suspect: an urgent probe failed and its re-probe is
        out) is returned only when nothing else is left; a
        retry never goes to an endpoint that asked us to wait. ``take=False`` only looks:
        it does not claim a half-open trial; the trials it claims are added to ``claims``
        (``release_trials`` lets go of those whose outcome never came). ``only``: paths of that endpoint URL only (a
        hop request names its endpoint; an edge never swaps it for another). ``order``: the
        request's own order instead of ``order`` (``split.pick()``: picked once per request).
        """
        spill = fallback = None
        now = time.monotonic()
        gate = self.gate
        origins = self.origins
        for path in order or self.order:
            url = path.endpoint.url
            if path in tried or (only is not None and url != only):
                continue
            if gate is not None and not gate(path, now):
                continue  # what it needs is short (every key busy): the gate's filter waits
            origin_ok = True
            if origins:
                if retry and self.cooling(url, model, now) > 0:
                    continue
                origin_ok = self._origin_usable(url, model, now)
            if path.inflight >= path.pool.max_size:
                spill = spill or path
                continue
            health = path.health
            if not (
                origin_ok and not health.suspect and (avoid is None or url not in avoid) and health.may_take_trial(now)
            ):
                fallback = fallback or path  # only if nothing else is left
                continue
            if take:
                health.take_trial(now)
                if claims is not None and health.trial and health.trial_at == now:
                    claims.append((health, now))
                if origins:
                    self._take_origin_trial(url, model, now, claims)
            return path
        return spill or fallback

    def reselect(self) -> bool:
        """Recompute ``order`` from the paths' estimates and health; True if the first changed."""
        now = time.monotonic()
        origins = self.origins
        candidates = [
            Candidate(
                p.key,
                p.endpoint.priority,
                p.score(),
                p.health.is_healthy(now) and (not origins or self._origin_usable(p.endpoint.url, None, now)),
                i,
                p.health.badness(),
            )
            for i, p in enumerate(self.paths)
        ]
        by_key = {p.key: p for p in self.paths}
        self.order = tuple(by_key[c.key] for c in order(candidates, self.current, self.tolerance))
        if self.split is not None:
            healthy = [c for c in candidates if c.healthy]
            best = min((c.priority for c in healthy), default=None)
            members = {by_key[c.key].endpoint.url for c in healthy if c.priority == best}
            self.split.update(self.order, members, _url_of)
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

    def is_usable(self, path: Path, model: str | None, now: float) -> bool:
        """Would a request for ``model`` go to ``path`` now (line and origin healthy)?"""
        return path.health.is_healthy(now) and (not self.origins or self._origin_usable(path.endpoint.url, model, now))

    # -- the line: probes and local failures (per path) ----------------------------------------
    def on_attempt(self, path: Path, outcome: str, started: float | None = None) -> str | None:
        """Feed a real attempt's line outcome ("ok", "local") to the path's health; "ejected"
        or "restored" if that changed it. ``started``: when the attempt began (monotonic)."""
        now = time.monotonic()
        health = path.health
        event = health.on_attempt(outcome, now, started, self.config.failover.ejection)
        if event is not None:
            self.reselect()
            if event == "ejected":
                self.reselect_at(health.ejected_until)
        return event

    def keep_standby(self) -> None:
        """Keep the path that takes the preferred one's traffic if its line dies (``standby``)
        warm for that traffic. Across a border a request that lands on a cold pool pays TCP +
        TLS, two or three round trips: at a failover, every one of them would. Called at each
        probe result; idle connections past the need age out after the pool's keepalive."""
        first = self.order[0] if self.order else None
        standby = self.standby(first) if first is not None else None
        demand = 0
        if first is not None and standby is not None:
            now = time.monotonic()
            # At a failover, what lands there at once: the requests in flight on the dead line,
            # those that arrived while it was being found dead, and those arriving while new
            # connections would be opening (about STANDBY_WINDOW of arrivals, at the recent rate).
            seen = self._arrivals
            if seen is None or seen[0] is not first:
                self._arrivals = (first, now, first.requests, 0.0)
            elif now - seen[1] >= 1.0:
                self._arrivals = (first, now, first.requests, (first.requests - seen[2]) / (now - seen[1]))
            rate = self._arrivals[3]
            demand = min(max(first.peak, first.inflight) + math.ceil(rate * STANDBY_WINDOW), PREWARM_MAX)
            first.peak = max(first.inflight, first.peak // 2)  # a burst is remembered a little while
        for path in self.order:
            if path is standby:
                path.pool.stand_by(demand)
            else:
                path.pool.floor = 0  # (also a former standby, after a reload or a switch)

    def standby(self, failing: Path) -> Path | None:
        """Where ``failing``'s traffic goes if its line dies: the next usable path that is not
        suspect, on another line if there is one (a dead line takes every endpoint it reaches)."""
        now = time.monotonic()
        usable = [p for p in self.order if p is not failing and not p.health.suspect and self.is_usable(p, None, now)]
        return next((p for p in usable if p.key[2] != failing.key[2]), usable[0] if usable else None)

    def prewarm_standby(self, failing: Path) -> None:
        """A probe failed on ``failing``: the path its traffic moves to gets as many connections
        ready as ``failing`` has requests in flight, so they don't each pay a handshake (across
        a border, two round trips) when they land there."""
        demand = min(failing.inflight, PREWARM_MAX)
        standby = self.standby(failing) if demand > 1 else None
        if standby is not None:
            standby.pool.prewarm(demand)

    # -- the origin: per endpoint and model --------------------------------------------------------
    def on_origin(
        self, path: Path, model: str | None, ok: bool, started: float | None = None, silent: bool = False
    ) -> list[tuple[str | None, str]]:
        """Feed an origin outcome (ok: a good answer; else a 5xx, or ``silent``: a timeout on a
        healthy line, a stall, which ejects the model at once) for ``model`` at ``path``'s
        endpoint. What changed: (model, "ejected" or "restored"), model None meaning the whole
        endpoint."""
        origins = self.origins
        if ok and not origins:
            return []  # the common case: nothing is wrong anywhere
        now = time.monotonic()
        url = path.endpoint.url
        changed: list[tuple[str | None, str]] = []
        keys = [(url, None)] if model is None else [(url, model), (url, None)]
        if ok:
            for key in keys:
                entry = origins.get(key)
                if entry is None:
                    continue
                if entry.on_ok(now, started):
                    changed.append((key[1], "restored"))
                if entry.idle(now):
                    del origins[key]
        else:
            ejection = self.config.failover.ejection
            for key in keys:
                entry = self._origin(key)
                if entry is not None and entry.on_error(now, started, ejection, model, silent and key[1] == model):
                    changed.append((key[1], "ejected"))
                    self.reselect_at(entry.ejected_until)
        if changed:
            self.reselect()
        return changed

    def origin_recovered(self, url: str) -> list[str | None]:
        """A path of endpoint ``url`` answers probes again after being down: the outage was
        the origin's, and it is over; lift its ejections (models too). Those lifted."""
        now = time.monotonic()
        lifted = [model for (u, model), entry in self.origins.items() if u == url and entry.restore(now)]
        if lifted:
            self.reselect()
        return lifted

    def cool_down(self, url: str, model: str | None, seconds: float) -> None:
        """The origin asked for a pause (429) for ``model`` (None: for everything): no
        request for it goes to endpoint ``url`` meanwhile, unless nothing else is left."""
        entry = self._origin((url, model))
        if entry is None:
            return
        until = time.monotonic() + seconds
        entry.cooldown_until = max(entry.cooldown_until, until)
        self.reselect()
        self.reselect_at(until)

    def end_cool_down(self, url: str, model: str | None) -> None:
        entry = self.origins.get((url, model))
        if entry is not None:
            entry.cooldown_until = 0.0
            self.reselect()

    def cooling(self, url: str, model: str | None, now: float) -> float:
        """Seconds until endpoint ``url`` takes requests for ``model`` again after a 429 (0: now)."""
        origins = self.origins
        if not origins:
            return 0.0
        wide = origins.get((url, None))
        until = wide.cooldown_until if wide is not None else 0.0
        if model is not None:
            entry = origins.get((url, model))
            if entry is not None:
                until = max(until, entry.cooldown_until)
        return max(0.0, until - now)

    def _origin_usable(self, url: str, model: str | None, now: float) -> bool:
        origins = self.origins
        wide = origins.get((url, None))
        if wide is not None and not wide.usable(now):
            return False
        if model is not None:
            entry = origins.get((url, model))
            if entry is not None and not entry.usable(now):
                return False
        return True

    def _take_origin_trial(
        self, url: str, model: str | None, now: float, claims: list[tuple[_Ejection, float]] | None
    ) -> None:
        for key in ((url, None), (url, model)):
            entry = self.origins.get(key)
            if entry is not None:
                entry.take_trial(now)
                if claims is not None and entry.trial and entry.trial_at == now:
                    claims.append((entry, now))

    def _origin(self, key: tuple[str, str | None]) -> OriginHealth | None:
        """The entry for (endpoint, model), made if need be; None past MAX_ORIGINS (a storm
        of distinct failing models is then seen by the endpoint's own entry only). Entries are
        dropped only by a good answer for the same model there: at the cap, those neither
        ejected nor cooling (what is left of a pause, a short run of errors) make room."""
        entry = self.origins.get(key)
        if entry is None:
            if len(self.origins) >= MAX_ORIGINS and key[1] is not None:
                now = time.monotonic()
                for k in [k for k, e in self.origins.items() if k[1] is not None and e.status(now) == "up"]:
                    del self.origins[k]
            if len(self.origins) >= MAX_ORIGINS and key[1] is not None:
                return None
            entry = self.origins[key] = OriginHealth(wide=key[1] is None)
        return entry

    def origin_status(self) -> list[dict[str, object]]:
        """What /-/status shows of the origins' health: only what is not plainly up."""
        now = time.monotonic()
        out: list[dict[str, object]] = []
        for (url, model), entry in self.origins.items():
            state = entry.status(now)
            if state == "up" and not entry.errors:
                continue
            row: dict[str, object] = {"endpoint": url, "model": model or "*", "state": state, "errors": entry.errors}
            if state == "ejected":
                row["for_s"] = round(entry.ejected_until - now, 1)
            elif state == "cooling":
                row["for_s"] = round(entry.cooldown_until - now, 1)
            out.append(row)
        return out

    # -- timeouts ---------------------------------------------------------------------------------
    def timeouts(self, model: str | None, streaming: bool) -> Timeouts:
        """The timeouts of a request for ``model`` (``failover.models``), memoized."""
        key = (model, streaming)
        found = self._timeouts.get(key)
        if found is None:
            if len(self._timeouts) >= MAX_ORIGINS:
                self._timeouts.clear()  # (many distinct model names: start over)
            found = self._timeouts[key] = self.config.failover.timeouts(model, streaming)
        return found

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
                    if (
                        path is None
                        or not same_connections(path.line.config, line.config)
                        or path.endpoint.ca != ep.ca  # (its TLS context trusts other CAs)
                    ):
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
                urls = {ep.url for ep in uc.endpoints}
                upstream.origins = {k: v for k, v in previous.origins.items() if k[0] in urls}
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

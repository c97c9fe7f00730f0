"""Estimation, health and selection: pure decisions, scripted with an injected clock."""

from __future__ import annotations

import random

from edgeproxy.config import EjectionConfig
from edgeproxy.routing.estimator import Estimator
from edgeproxy.routing.health import Health, OriginHealth
from edgeproxy.routing.select import Candidate, order

MS = 0.001


def feed(est: Estimator, samples: list[float], start: float = 0.0, step: float = 5.0) -> float:
    now = start
    for s in samples:
        est.add(s, now)
        now += step
    return now


def test_srtt_converges_and_ignores_a_single_spike() -> None:
    est = Estimator()
    feed(est, [20 * MS] * 10)
    assert abs(est.srtt - 20 * MS) < 0.5 * MS  # type: ignore[operator]
    est.add(1.0, 100.0)  # one 1 s outlier
    assert abs(est.srtt - 20 * MS) < 1 * MS  # type: ignore[operator]
    feed(est, [20 * MS] * 3, start=105)
    assert abs(est.srtt - 20 * MS) < 1 * MS  # type: ignore[operator]


def test_level_shift_is_followed_within_two_samples() -> None:
    a, b = Estimator(), Estimator()
    feed(a, [20 * MS] * 10)
    feed(b, [80 * MS] * 10)
    for n in range(1, 3):
        a.add(80 * MS, 100 + n)
        b.add(20 * MS, 100 + n)
        if b.srtt < a.srtt - 10 * MS:  # type: ignore[operator]
            break
    else:
        raise AssertionError(f"still not swapped after 2 samples: a={a!r} b={b!r}")
    assert n <= 2


def test_a_slow_first_sample_does_not_stick() -> None:
    est = Estimator()
    feed(est, [0.4, 10 * MS, 11 * MS, 10 * MS])
    assert est.srtt < 12 * MS  # type: ignore[operator]


def test_jitter_does_not_look_like_a_shift() -> None:
    rng = random.Random(7)
    est = Estimator()
    feed(est, [20 * MS + rng.uniform(-2, 2) * MS for _ in range(200)])
    assert 18 * MS < est.srtt < 22 * MS  # type: ignore[operator]
    assert est.rttvar < 3 * MS  # type: ignore[operator]


def test_rto_is_bounded() -> None:
    est = Estimator()
    assert est.rto(0.1, 2.0) is None
    feed(est, [5 * MS] * 5)
    assert est.rto(0.1, 2.0) == 0.1
    feed(est, [5.0] * 5, start=100)
    assert est.rto(0.1, 2.0) == 2.0


def test_health_reprobes_quickly_after_failure() -> None:
    h = Health()
    assert h.is_healthy(0.0) and h.state == "unknown"
    assert h.on_probe(False, 1.0, "refused") is None  # one failure: suspect, looked at again soon
    assert h.is_healthy(1.0)
    assert h.next_probe_in(5.0) == 0.5
    assert h.on_probe(False, 1.5, "refused") == "down"  # the second in a row
    assert not h.is_healthy(1.5)
    assert h.next_probe_in(5.0) == 1.0
    for t in range(10):
        h.on_probe(False, 3.0 + t)
    assert h.state == "down"
    assert h.next_probe_in(5.0) == 2.0  # while down: at least every 2 s, to see it come back
    assert h.next_probe_in(1.0) == 1.0  # (or the interval, if shorter)
    assert h.on_probe(True, 20.0) == "up"
    assert h.is_healthy(20.0) and h.consecutive_failures == 0
    assert 4.5 <= h.next_probe_in(5.0, random.Random(1)) <= 5.5


def c(
    key: str, score: float | None, *, prio: int = 1, healthy: bool = True, index: int = 0, fails: int = 0
) -> Candidate:
    return Candidate(key, prio, score, healthy, index, fails)


def keys(cands: list[Candidate]) -> list[str]:
    return [x.key for x in cands]


def test_lowest_score_first_unmeasured_last() -> None:
    got = order([c("a", 80 * MS, index=0), c("b", None, index=1), c("c", 20 * MS, index=2)], None, 10 * MS)
    assert keys(got) == ["c", "a", "b"]


def test_unhealthy_paths_go_last_and_tiers_are_respected() -> None:
    got = order(
        [
            c("fast-down", 1 * MS, healthy=False, index=0),
            c("relay", 5 * MS, prio=2, index=1),
            c("official", 50 * MS, prio=1, index=2),
        ],
        None,
        10 * MS,
    )
    assert keys(got) == ["official", "relay", "fast-down"]


def test_lower_tier_used_when_best_tier_all_down() -> None:
    got = order([c("official", 10 * MS, healthy=False), c("relay", 50 * MS, prio=2, index=1)], None, 10 * MS)
    assert keys(got)[0] == "relay"


def test_all_down_uses_least_bad() -> None:
    got = order(
        [c("a", 10 * MS, healthy=False, fails=5), c("b", 90 * MS, healthy=False, index=1, fails=1)], None, 10 * MS
    )
    assert keys(got) == ["b", "a"]


def test_all_down_keeps_the_current_path_first() -> None:
    """Every path dead: their failure counts rise in turn with each probe round, which must
    not move the preference; a path that works again is taken at once."""
    current = "b"
    for fa, fb, fc in [(3, 2, 2), (3, 3, 2), (3, 3, 3), (4, 3, 3), (4, 4, 3)]:
        cands = [
            c("a", 10 * MS, healthy=False, fails=fa),
            c("b", 30 * MS, healthy=False, index=1, fails=fb),
            c("c", None, healthy=False, index=2, fails=fc),
        ]
        got = keys(order(cands, current, 10 * MS))
        assert got[0] == "b", (fa, fb, fc)
        assert got[1:] == [k for k, _ in sorted([("a", fa), ("c", fc)], key=lambda kv: kv[1])]  # least bad next
    back = [c("a", 10 * MS, fails=0), c("b", 30 * MS, healthy=False, index=1, fails=9)]
    assert keys(order(back, "b", 10 * MS))[0] == "a"
    gone = [c("a", 10 * MS, healthy=False, fails=5), c("c", None, healthy=False, index=2, fails=1)]
    assert keys(order(gone, "b", 10 * MS))[0] == "c"  # the current one was removed: least bad


def test_hysteresis_keeps_current_within_tolerance() -> None:
    cands = [c("a", 20 * MS, index=0), c("b", 25 * MS, index=1)]
    assert keys(order(cands, "b", 10 * MS))[0] == "b"  # a is better, but not by > 10 ms
    assert keys(order(cands, "b", 2 * MS))[0] == "a"  # with a tighter tolerance it switches
    assert keys(order([c("a", 10 * MS), c("b", 25 * MS, index=1)], "b", 10 * MS))[0] == "a"


def test_hysteresis_never_keeps_an_unhealthy_current() -> None:
    cands = [c("a", 20 * MS), c("b", 15 * MS, healthy=False, index=1)]
    assert keys(order(cands, "b", 10 * MS))[0] == "a"


def test_no_flapping_between_equal_lines() -> None:
    """Two lines within tolerance, jittery samples for an hour of probes: few switches."""
    rng = random.Random(3)
    ea, eb = Estimator(), Estimator()
    current = None
    switches = 0
    now = 0.0
    for _ in range(720):  # 1 h at 5 s
        ea.add(20 * MS + rng.uniform(-3, 3) * MS, now)
        eb.add(22 * MS + rng.uniform(-3, 3) * MS, now)
        first = order([c("a", ea.srtt, index=0), c("b", eb.srtt, index=1)], current, 10 * MS)[0].key
        switches += current is not None and first != current
        current = first
        now += 5
    assert switches <= 1


def test_attempt_failures_eject_with_growing_backoff_and_half_open_trial() -> None:
    h = Health()
    h.on_probe(True, 0.0)
    assert h.on_attempt("local", 1.0) is None
    assert h.on_attempt("local", 1.1) is None
    assert h.on_attempt("local", 1.2) == "ejected"  # third in a row
    assert h.state == "ejected" and not h.is_healthy(1.5) and not h.take_trial(1.5)
    assert h.on_attempt("local", 1.3) is None  # sent before the ejection: changes nothing
    assert h.is_healthy(1.2 + 2.0)  # base ejection 2 s over: half-open
    assert h.take_trial(3.3) is True and h.take_trial(3.3) is False  # one trial, the rest wait
    assert h.on_attempt("local", 3.4) == "ejected"  # the trial failed: ejected again, for longer
    assert not h.is_healthy(3.4 + 3.9) and h.is_healthy(3.4 + 4.0)
    assert h.take_trial(8.0)
    assert h.on_attempt("ok", 8.1) == "restored"  # the trial worked
    assert h.state == "up" and h.is_healthy(8.1) and h.take_trial(8.1)


def test_ejection_time_is_capped_and_its_backoff_forgotten_after_a_healthy_minute() -> None:
    ejection = EjectionConfig(local_failures=1, base_time=2.0, max_time=5.0)
    h = Health()
    now = 0.0
    spans = []
    for _ in range(4):  # every trial fails: 2, 4, then capped at 5
        assert h.on_attempt("local", now, ejection=ejection) == "ejected"
        spans.append(h.ejected_until - now)
        now = h.ejected_until
        assert h.take_trial(now)
    assert spans == [2.0, 4.0, 5.0, 5.0]
    assert h.on_attempt("ok", now) == "restored"
    h.on_attempt("ok", now + 61.0)  # a healthy minute: the back-off starts over
    assert h.on_attempt("local", now + 62.0, ejection=ejection) == "ejected"
    assert h.ejected_until - (now + 62.0) == 2.0


def test_a_probe_restores_an_ejected_line() -> None:
    h = Health()
    h.on_probe(True, 0.0)
    for t in (1.0, 1.1, 1.2):
        h.on_attempt("local", t)
    assert h.state == "ejected"
    assert h.on_probe(True, 1.5) == "up"  # the line answers: back at once, not at 3.2
    assert h.is_healthy(1.5)


def test_origin_errors_eject_one_model_and_the_endpoint_only_when_every_model_fails() -> None:
    ejection = EjectionConfig(origin_errors=3)
    model_x, wide = OriginHealth(wide=False), OriginHealth(wide=True)
    for t in range(3):  # model x fails three times in a row
        model_x.on_error(float(t), None, ejection, "x")
        wide.on_error(float(t), None, ejection, "x")
    assert model_x.state == "ejected" and not model_x.usable(2.5)
    assert wide.state == "up" and wide.usable(2.5)  # one model failing is that model's problem
    assert model_x.usable(2.0 + 2.0)  # half-open after base_time
    model_x.take_trial(4.0)
    assert model_x.on_ok(4.1) and model_x.state == "up"
    for t, model in ((5.0, "x"), (5.1, "y"), (5.2, "x")):  # two models fail in a row
        wide.on_error(t, None, ejection, model)
    assert wide.state == "ejected"
    unknown = OriginHealth(wide=True)  # a model that could not be told: the endpoint's
    for t in range(3):
        unknown.on_error(float(t), None, ejection, None)
    assert unknown.state == "ejected"
    assert unknown.restore(2.5) and unknown.usable(2.5)  # its probes answer again: lifted


def test_a_trial_whose_client_went_away_is_not_waited_for_ever() -> None:
    h = Health()
    for t in (1.0, 1.1, 1.2):
        h.on_attempt("local", t)
    assert h.take_trial(3.3)  # the trial goes out, and its client leaves: no outcome, ever
    assert not h.take_trial(10.0)  # meanwhile the others wait for it
    assert h.take_trial(3.3 + 30.1)  # then it is forgotten: another request may try


def test_two_requests_that_cannot_connect_take_the_line_down_and_a_probe_brings_it_back() -> None:
    h = Health()
    h.on_probe(True, 0.0)
    assert h.on_attempt("connect", 1.0) is None  # one: the line is probed at once (the engine)
    assert h.on_attempt("connect", 1.1) == "down"  # two in a row: no need to wait for the probe
    assert not h.is_healthy(1.2) and h.next_probe_in(60.0) == 0.5  # and looked at again soon
    assert h.on_probe(True, 1.7) == "up"


def test_a_failed_urgent_probe_makes_the_line_suspect_until_the_re_probe_says() -> None:
    h = Health()
    h.on_probe(True, 0.0)
    assert h.on_probe(False, 1.0, "no answer", urgent=True) is None
    assert h.suspect and h.state == "up"  # passed over by new requests; the route stays
    assert h.on_probe(True, 1.3) is None and not h.suspect  # a blip
    h.on_probe(False, 2.0, "no answer", urgent=True)
    assert h.on_probe(False, 2.3, "no answer", urgent=True) == "down"  # the line is dead

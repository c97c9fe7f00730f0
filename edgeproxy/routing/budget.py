"""Retry budget: retries are allowed up to a share of recent requests plus a small floor.

Without it, an origin failing every request receives (1 + retries) times the traffic exactly
when it can least take it. Envoy's retry budgets work the same way (budget_percent,
min_retry_concurrency). Counted per upstream over a sliding window of one-second buckets.
"""

from __future__ import annotations

from typing import Final

__all__ = ["RetryBudget"]

RATIO: Final = 0.2  # retries may add up to 20% to the requests of the last WINDOW seconds
FLOOR: Final = 5  # ... but a quiet upstream may always retry this many times per window
WINDOW: Final = 10  # seconds


class RetryBudget:
    __slots__ = ("_requests", "_retries", "_stamp", "exhausted")

    def __init__(self) -> None:
        self._requests = [0] * WINDOW
        self._retries = [0] * WINDOW
        self._stamp = [0] * WINDOW  # which second each bucket holds
        self.exhausted = 0  # retries refused, for metrics

    def _bucket(self, now: float) -> int:
        sec = int(now)
        i = sec % WINDOW
        if self._stamp[i] != sec:
            self._stamp[i] = sec
            self._requests[i] = self._retries[i] = 0
        return i

    def on_request(self, now: float) -> None:
        self._requests[self._bucket(now)] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows; False (and counted) if not."""
        i = self._bucket(now)
        oldest = int(now) - WINDOW
        requests = retries = 0
        for j in range(WINDOW):
            if self._stamp[j] > oldest:
                requests += self._requests[j]
                retries += self._retries[j]
        if retries >= max(FLOOR, RATIO * requests):
            self.exhausted += 1
            return False
        self._retries[i] += 1
        return True

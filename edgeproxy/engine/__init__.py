"""The engine: the request lifecycle as phases, and the filter API capabilities plug into.

What a filter may import (the public interface; see docs/architecture.md):
``Filter``, ``Chain``, ``PathChain``, ``Pipeline``, the verdicts ``ACCEPT`` and ``AGAIN``,
``SendAgain``, and the per-request objects ``Ctx``, ``Attempt``, ``Reply``, ``Transform``,
``Usage``, ``Continuation``. The engine imports no filter: whatever assembles a pipeline wires them
(``filters.assemble``).
"""

from .ctx import Attempt, Continuation, Ctx, Reply, Transform, Usage
from .filter import ACCEPT, AGAIN, Chain, Filter, PathChain, Pipeline, SendAgain, Verdict
from .flight import Flight

__all__ = [
    "ACCEPT",
    "AGAIN",
    "Attempt",
    "Chain",
    "Continuation",
    "Ctx",
    "Filter",
    "Flight",
    "PathChain",
    "Pipeline",
    "Reply",
    "SendAgain",
    "Transform",
    "Usage",
    "Verdict",
]

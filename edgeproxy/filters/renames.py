"""Model renames: an endpoint's ``models`` map applied to the body sent there.

Only on the paths of endpoints that have a map; only then is a body parsed (JSON), and only
when its top-level ``model`` is one the map names is it rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ..engine import Filter

if TYPE_CHECKING:
    from ..config import EndpointConfig
    from ..engine import Attempt, Ctx

__all__ = ["Renames"]


class Renames(Filter):
    """One endpoint's ``models`` map, on that endpoint's paths."""

    __slots__ = ("renames",)

    def __init__(self, endpoint: EndpointConfig) -> None:
        self.renames = endpoint.model_map()

    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        body = attempt.body
        if not body or ctx.body_coding:
            return  # nothing, or a coded body: not ours to read
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return  # not JSON: not ours to touch; the origin will say what is wrong
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
            return
        new = self.renames.get(doc["model"])
        if new is not None:
            doc["model"] = new
            attempt.body = orjson.dumps(doc)

"""Pages of a metric's history in the sidecar's order: by step, then timestamp.

MLflow orders a history by timestamp, then step, and pages it by offset in that order; it
has no other order. So every page reads the whole series, sorts it by (step, timestamp)
(stable: the order it came in breaks ties) and cuts the page after the position in the
token: the last page's (step, timestamp) and how many points of exactly that
(step, timestamp) came before. Keyset, not offset: points appended between two pages at
later steps neither repeat nor vanish.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from mlflow_sidecar.core import domain
from mlflow_sidecar.server.mlflow_gateway import page_tokens

_KIND = "metric-history"


def _position(token: str, run_id: str, key: str) -> tuple[tuple[int, int], int] | None:
    """((step, timestamp), points of it already sent) from a GetMetricHistory token."""
    if not token:
        return None
    decoded = page_tokens.decode(_KIND, token)
    if decoded.get("run") != run_id or decoded.get("key") != key:
        raise page_tokens.refuse("is a token of another run's or metric's history")
    step = page_tokens.int64(decoded.get("step"))
    timestamp = page_tokens.int64(decoded.get("ts"))
    seen = page_tokens.bounded_int(decoded.get("seen"), 1, page_tokens.MAX_OFFSET)
    return (step, timestamp), seen


def check_token(token: str, run_id: str, key: str) -> None:
    """Refuse a token that is not of this run's and metric's history (INVALID_ARGUMENT)."""
    _position(token, run_id, key)


def page(
    history: Iterable[domain.Metric], run_id: str, key: str, *, page_size: int, page_token: str
) -> domain.Page[domain.Metric]:
    """The page of `history` (every point of the metric) after the token's position."""
    after = _position(page_token, run_id, key)
    points = sorted(history, key=lambda m: (m.step, m.timestamp_ms))
    keys = [(m.step, m.timestamp_ms) for m in points]
    start = 0
    if after is not None:
        position, seen = after
        start = min(bisect.bisect_left(keys, position) + seen, bisect.bisect_right(keys, position))
    end = start + page_size
    items = tuple(points[start:end])
    if end >= len(points):
        return domain.Page(items, "")
    last = keys[end - 1]
    token = page_tokens.encode(
        _KIND,
        run=run_id,
        key=key,
        step=last[0],
        ts=last[1],
        seen=end - bisect.bisect_left(keys, last),
    )
    return domain.Page(items, token)

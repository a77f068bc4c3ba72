"""MLflow's `max_results` of a search, answered from the sidecar's bounded pages.

MLflow's stores return up to `max_results` items in one answer (10,000 model versions by
default), while one sidecar page holds at most MAX_PAGE_SIZE: the plugin fetches pages
until it holds `max_results` items or the results end, and hands back the token that
follows the last item it returns, as MLflow's stores do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from mlflow_sidecar.core.domain import Page
from mlflow_sidecar.core.limits import MAX_PAGE_SIZE

T = TypeVar("T")


def checked_max_results(max_results: int | None, default: int, ceiling: int | None) -> int:
    """`max_results` as MLflow's stores check it: a positive integer, at most `ceiling`
    (None: no ceiling); None means `default`. Anything else is MLflow's own
    INVALID_PARAMETER_VALUE."""
    if max_results is None:
        return default
    if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
        raise MlflowException(
            f"Invalid value {max_results} for parameter 'max_results' supplied. It must be "
            "a positive integer",
            error_code=databricks_pb2.INVALID_PARAMETER_VALUE,
        )
    if ceiling is not None and max_results > ceiling:
        raise MlflowException(
            f"Invalid value {max_results} for parameter 'max_results' supplied. It must be "
            f"at most {ceiling}",
            error_code=databricks_pb2.INVALID_PARAMETER_VALUE,
        )
    return max_results


def collect(
    fetch: Callable[[int, str], Page[T]], max_results: int, page_token: str | None
) -> tuple[list[T], str | None]:
    """Up to `max_results` items from `fetch(page_size, page_token)` pages starting at
    `page_token`, and the token of what follows them (None after the last item)."""
    items: list[T] = []
    token = page_token or ""
    while True:
        page = fetch(min(max_results - len(items), MAX_PAGE_SIZE), token)
        items.extend(page.items)
        token = page.next_page_token
        if not token or len(items) >= max_results:
            return items, token or None

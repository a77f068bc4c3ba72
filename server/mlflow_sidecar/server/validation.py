"""Request validation shared by the services; every failure names its field."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from mlflow_sidecar.core import names
from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError
from mlflow_sidecar.core.limits import (
    MAX_FILTER_LENGTH,
    MAX_ID_LENGTH,
    MAX_KEY_LENGTH,
    MAX_ORDER_BY_LENGTH,
    MAX_ORDER_BY_TERMS,
    MAX_PAGE_TOKEN_LENGTH,
    MAX_RUN_USER_LENGTH,
    MAX_TAG_VALUE_LENGTH,
)

T = TypeVar("T")

# The rules a client applies too (core.names), beside the checks of the services alone.
require = names.require
bounded = names.bounded
run_id = names.run_id
key = names.key

RESERVED_TAG_PREFIX = names.RESERVED_TAG_PREFIX
tag_key = names.tag_key
not_reserved = names.not_reserved

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def experiment_id(field: str, value: str, *, required: bool = True) -> str:
    """An experiment id as MLflow writes it. MLflow's stores read a numeric id as a
    number, so `007`, ` 7` or `+7` would name experiment 7, and a run id of zeros the
    Default experiment: a caller who mixed ids up would touch another experiment."""
    if required or value:
        require(field, value, max_length=MAX_ID_LENGTH)
    try:
        number = int(value)
    except ValueError:
        return value  # not a number: MLflow takes it as written
    if str(number) != value:
        raise InvalidArgumentError(field, f"must be written as MLflow writes it: {number}")
    if not _INT64_MIN <= number <= _INT64_MAX:
        # MLflow's stores keep ids as 64-bit integers and fail on others with a server
        # error that reads as an outage.
        raise InvalidArgumentError(field, f"{value} is outside the ids MLflow stores (int64)")
    return value


def tags(
    field: str, values: Mapping[str, str], *, max_value_length: int = MAX_TAG_VALUE_LENGTH
) -> None:
    """Tags a caller sets: every key a `tag_key`, every value within `max_value_length`
    (MLflow's limit for the entity: a run's by default)."""
    string_map(field, values, max_value_length=max_value_length)
    for k in values:
        tag_key(f"{field}.key", k)


RUN_NAME_TAG = "mlflow.runName"
RUN_USER_TAG = "mlflow.user"


def run_tags(field: str, values: Mapping[str, str], *, creating: bool = False) -> None:
    """A run's tags: `tags`, and the two MLflow copies into narrower columns of the run
    within those columns' widths: `mlflow.runName` (the run's name, as long as a
    `run_name`) and, when the run is created, `mlflow.user` (its user). A wider value fails
    the whole write in MLflow's SQL stores, after the tags of earlier batches landed."""
    tags(field, values)
    name = values.get(RUN_NAME_TAG)
    if name is not None:
        bounded(f"{field}[{RUN_NAME_TAG}]", name, MAX_KEY_LENGTH)
    user = values.get(RUN_USER_TAG)
    if creating and user is not None:
        bounded(f"{field}[{RUN_USER_TAG}]", user, MAX_RUN_USER_LENGTH)


def string_map(field: str, values: Mapping[str, str], *, max_value_length: int) -> None:
    """Every key valid, every value bounded."""
    for k, v in values.items():
        key(f"{field}.key", k)
        bounded(f"{field}[{k}]", v, max_value_length)


def metric_points(field: str, points: Iterable[tuple[str, int]]) -> None:
    """Keys valid and timestamps not negative, for (key, timestamp_ms) pairs.

    Values need no check: NaN and +-inf are legal in MLflow, and steps are int64 by type.
    """
    for index, (k, timestamp_ms) in enumerate(points):
        key(f"{field}[{index}].key", k)
        if timestamp_ms < 0:
            raise InvalidArgumentError(f"{field}[{index}].timestamp_ms", "must not be negative")


def search_terms(filter_string: str, order_by: Sequence[str]) -> None:
    """A search's filter and `order_by` terms within their limits (`filter`, `order_by[i]`)."""
    bounded("filter", filter_string, MAX_FILTER_LENGTH)
    order_by_count(len(order_by))
    for index, term in enumerate(order_by):
        bounded(f"order_by[{index}]", term, MAX_ORDER_BY_LENGTH)


def order_by_count(count: int) -> None:
    """At most `MAX_ORDER_BY_TERMS` terms to order a search by."""
    if count > MAX_ORDER_BY_TERMS:
        raise InvalidArgumentError(
            "order_by", f"{count} terms; a search orders by at most {MAX_ORDER_BY_TERMS}"
        )


_PAGE_TOKEN_RE = re.compile(r"^[A-Za-z0-9+/=_\-]*\Z")


def page_token(value: str) -> str:
    """An opaque page token as this server hands them out (base64 text), or empty."""
    if len(value) > MAX_PAGE_TOKEN_LENGTH or not _PAGE_TOKEN_RE.match(value):
        raise InvalidArgumentError(
            "page_token",
            "is not a token from a previous page",
            reason=ErrorReason.INVALID_PAGE_TOKEN,
        )
    return value


def page_size(value: int, *, default: int, maximum: int) -> int:
    """0 means `default`; otherwise 1..maximum."""
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise InvalidArgumentError("page_size", f"must be between 1 and {maximum}, got {value}")
    return value


def wait_seconds(field: str, value: float) -> float:
    """A length of time to wait: finite and not negative."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgumentError(field, f"must be a number of seconds, 0 or more, got {value}")
    return value


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

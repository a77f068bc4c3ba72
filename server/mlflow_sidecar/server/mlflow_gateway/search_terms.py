"""A search's filter and `order_by` as MLflow reads them: each field sorted by once, as
its SQL stores require, and which part of a search MLflow refused."""

from __future__ import annotations

import ast
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_SEARCH_JOINS
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals


@dataclass(frozen=True)
class SearchGrammar:
    """How MLflow parses one entity's filter, the field an `order_by` term sorts by, and
    whether sorting by it joins a table (each raises MlflowException for what MLflow
    cannot parse)."""

    parse_filter: Callable[[str], Sequence[Mapping[str, Any]]]
    order_field: Callable[[str], Hashable]
    order_joins: Callable[[str], bool] = lambda _term: False


RUNS = SearchGrammar(
    mlflow_internals.parse_runs_filter,
    mlflow_internals.run_order_field,
    lambda term: mlflow_internals.run_order_field(term)[0] != "attribute",
)
EXPERIMENTS = SearchGrammar(
    mlflow_internals.parse_experiments_filter, mlflow_internals.experiment_order_field
)
LOGGED_MODELS = SearchGrammar(
    mlflow_internals.parse_logged_models_filter,
    lambda field: field,
    lambda field: field.startswith("metrics."),
)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Tables MLflow's SQL stores join for one term of a filter, by its type; 1 for the rest.
_JOINS_BY_TYPE = {"attribute": 0, "dataset": 2}


def check_joins(grammar: SearchGrammar, filter_string: str, order_by: Sequence[str]) -> None:
    """Refuse a search that would join more than `MAX_SEARCH_JOINS` tables (INVALID_ARGUMENT
    on `filter`, or on `order_by` when the filter alone is within it).

    MLflow refuses it with 503 TEMPORARILY_UNAVAILABLE on SQLite, which reads as an
    outage. A filter or term MLflow cannot parse is left for MLflow to name."""
    try:
        in_filter = sum(
            _JOINS_BY_TYPE.get(str(term.get("type")), 1)
            for term in (grammar.parse_filter(filter_string) if filter_string else ())
        )
        in_order = sum(1 for term in order_by if grammar.order_joins(term))
    except MlflowException:
        return
    if in_filter + in_order <= MAX_SEARCH_JOINS:
        return
    counted = "metric, param, tag and dataset terms (a dataset term joins two tables)"
    if in_filter > MAX_SEARCH_JOINS:
        raise InvalidArgumentError(
            "filter",
            f"its {counted} join {in_filter} tables; a search joins at most"
            f" {MAX_SEARCH_JOINS} (SQLite joins at most 64 tables): split the search",
        )
    raise InvalidArgumentError(
        "order_by",
        f"the filter's and order_by's {counted} join {in_filter} + {in_order} tables; a"
        f" search joins at most {MAX_SEARCH_JOINS} (SQLite joins at most 64 tables):"
        " order by fewer metrics, params or tags",
    )


def check_logged_model_filter(filter_string: str) -> None:
    """Refuse a logged model filter that MLflow's SQL store would fail on with a server
    error, which reads as an outage (INVALID_ARGUMENT on `filter`): an attribute that is
    none of a logged model's, or a metric or time compared with a value that is not a
    number. What the store refuses itself is left for it to name."""
    for term in mlflow_internals.logged_model_filter_terms(filter_string):
        if term.kind == "attributes" and term.key not in mlflow_internals.LOGGED_MODEL_COLUMNS:
            raise InvalidArgumentError(
                "filter",
                f"a logged model has no attribute {term.identifier!r}; its attributes are"
                f" {', '.join(sorted(mlflow_internals.LOGGED_MODEL_COLUMNS))}, and without"
                f" 'attributes.' {', '.join(mlflow_internals.LOGGED_MODEL_COLUMN_ALIASES)}",
            )
        if term.numeric:
            try:
                float(term.value)
            except ValueError:
                raise InvalidArgumentError(
                    "filter",
                    f"{term.identifier} is compared as a number, not with {term.value}",
                ) from None
        elif term.value.startswith("(") and term.value.endswith(")"):
            # The store reads a list as a Python literal.
            try:
                ast.literal_eval(term.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise InvalidArgumentError(
                    "filter",
                    f"{term.identifier} is compared with {term.value}, which is not a list"
                    " of quoted strings",
                ) from None


REGISTERED_MODELS = SearchGrammar(
    mlflow_internals.parse_registered_models_filter,
    mlflow_internals.registered_model_order_field,
)
MODEL_VERSIONS = SearchGrammar(
    mlflow_internals.parse_model_versions_filter, mlflow_internals.model_version_order_field
)


def check_filter_reads(grammar: SearchGrammar, filter_string: str) -> None:
    """Refuse a filter that MLflow's parser fails on with an error of its own code rather
    than a refusal (`tags.x IS NULL` in a registry search), or that compares with an
    integer its database cannot hold: MLflow's server answers either with an untyped
    server error (HTTP 500), which reads as an outage. What MLflow refuses itself is left
    for it to name."""
    if not filter_string:
        return
    try:
        terms = grammar.parse_filter(filter_string)
    except MlflowException:
        return
    except Exception as exc:  # noqa: BLE001 - any error of the parser's is MLflow's 500
        raise InvalidArgumentError(
            "filter", f"{filter_string!r} is not a filter MLflow can read here ({exc})"
        ) from None
    for term in terms:
        value = term.get("value")
        # An integer past int64 fails MLflow's database (SQLite) the same way.
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidArgumentError(
                "filter", f"{term.get('key')} is compared with {value}, outside int64"
            )


def check_fields_distinct(order_by: Sequence[str], field_of: Callable[[str], Hashable]) -> None:
    """Refuse two terms that sort by one field (INVALID_ARGUMENT naming the second).

    MLflow refuses them too, but as an untyped server error that reads as an outage. A
    term MLflow cannot parse is left for MLflow to name.
    """
    first: dict[Hashable, int] = {}
    for index, term in enumerate(order_by):
        try:
            field = field_of(term)
        except MlflowException:
            return
        if field in first:
            earlier = first[field]
            raise InvalidArgumentError(
                f"order_by[{index}]",
                f"{term!r} sorts by the same field as order_by[{earlier}]"
                f" ({order_by[earlier]!r}); a search sorts by each field once",
            )
        first[field] = index


def refused_part(
    grammar: SearchGrammar | None,
    filter_string: str,
    order_by: Sequence[str],
    experiment_ids: Sequence[str],
    message: str,
) -> str:
    """The request field MLflow refused, by parsing each part as MLflow does; "" when no
    part fails that way (the page token, or a rule only the server knows)."""
    if grammar is not None and filter_string:
        try:
            grammar.parse_filter(filter_string)
        except MlflowException:
            return "filter"
    if grammar is not None:
        for index, term in enumerate(order_by):
            try:
                grammar.order_field(term)
            except MlflowException:
                return f"order_by[{index}]"
    for index, experiment_id in enumerate(experiment_ids):
        # MLflow quotes the id it refuses ("Invalid experiment ID 'abc'").
        if f"'{experiment_id}'" in message:
            return f"experiment_ids[{index}]"
    return ""

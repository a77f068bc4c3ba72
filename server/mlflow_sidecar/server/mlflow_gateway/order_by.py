"""A search's `order_by` names each field once, as MLflow's SQL stores require."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from mlflow.exceptions import MlflowException

from mlflow_sidecar.core.errors import InvalidArgumentError


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

"""Checks of the typed clients' arguments that their type hints promise but Python does
not enforce, made before anything is sent; each error names the argument."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

from mlflow_sidecar.core.errors import InvalidArgumentError


def strings(name: str, values: Sequence[str]) -> list[str]:
    """`values` as a list. A bare str (or bytes) is refused with TypeError: a str is a
    Sequence[str] of its characters, so `search_runs("26")` searched experiments 2 and 6."""
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of str, not one {type(values).__name__}"
            f" ({values!r}): pass [{values!r}]"
        )
    return list(values)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def int64(name: str, value: int) -> int:
    """`value` as a request's int64 field takes it: InvalidArgumentError naming `name` when
    it is outside 64 bits, TypeError when it is not an integer (protobuf's own errors name
    neither the argument nor the field)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidArgumentError(name, f"must fit in 64 bits (-2**63 to 2**63-1), got {number}")
    return number


def double(name: str, value: float) -> float:
    """`value` as a request's double field takes it: InvalidArgumentError naming `name` for
    an int too large for a float, TypeError for what is not a number."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a float, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise InvalidArgumentError(
            name, "is too large for a float (at most about 1.8e308)"
        ) from None


def string_map(name: str, values: Mapping[str, str]) -> dict[str, str]:
    """`values` as a dict of str to str; TypeError naming the entry that is not (protobuf's
    own error reads "bad argument type for built-in operation")."""
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, not {type(key).__name__} ({key!r})")
        if not isinstance(value, str):
            raise TypeError(
                f"{name}[{key!r}] must be a str, not {type(value).__name__} ({value!r}):"
                f" pass str(value)"
            )
    return dict(values)

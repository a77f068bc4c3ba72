"""Checks of the typed clients' arguments that their type hints promise but Python does
not enforce, made before anything is sent; each error names the argument."""

from __future__ import annotations

from collections.abc import Sequence


def strings(name: str, values: Sequence[str]) -> list[str]:
    """`values` as a list. A bare str (or bytes) is refused with TypeError: a str is a
    Sequence[str] of its characters, so `search_runs("26")` searched experiments 2 and 6."""
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of str, not one {type(values).__name__}"
            f" ({values!r}): pass [{values!r}]"
        )
    return list(values)

"""The base of the sidecar's and the client's settings models."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationInfo, field_validator

# The longest duration a `*_s` setting takes: a year outlasts any wait, and stays far from
# what grpc deadlines and thread waits overflow on (about 9.2e9 s), which would otherwise
# end every call at once or fail a stop.
MAX_DURATION_S = 365 * 86_400.0


class NumbersRefuseBooleans(BaseModel):
    """Settings whose number fields refuse booleans: pydantic reads `true` as 1, so a
    `port: true` would serve on port 1 and `max_attempts: true` would try once. Their
    durations (`*_s`) are finite and at most MAX_DURATION_S, except those listed in
    `_UNBOUNDED_DURATIONS`, whose documentation gives `inf` a meaning."""

    _UNBOUNDED_DURATIONS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if isinstance(value, bool) and name and cls.model_fields[name].annotation in _NUMBERS:
            raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _durations_are_bounded(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if (
            not name.endswith("_s")
            or name in cls._UNBOUNDED_DURATIONS
            or not isinstance(value, float)
        ):
            return value
        if not math.isfinite(value) or value > MAX_DURATION_S:
            raise ValueError(
                f"{value} is not a usable duration: seconds, at most {MAX_DURATION_S:.0f} (a year)"
            )
        return value


# A field's annotation as pydantic keeps it: `from __future__ import annotations` leaves
# strings in the class, which pydantic resolves to the types.
_NUMBERS: tuple[object, ...] = (int, float, int | None, float | None)

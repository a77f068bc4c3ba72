"""The base of the sidecar's and the client's settings models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


class NumbersRefuseBooleans(BaseModel):
    """Settings whose number fields refuse booleans: pydantic reads `true` as 1, so a
    `port: true` would serve on port 1 and `max_attempts: true` would try once."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if isinstance(value, bool) and name and cls.model_fields[name].annotation in _NUMBERS:
            raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value


# A field's annotation as pydantic keeps it: `from __future__ import annotations` leaves
# strings in the class, which pydantic resolves to the types.
_NUMBERS: tuple[object, ...] = (int, float, int | None, float | None)

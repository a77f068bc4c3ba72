"""`StrEnum` on every supported Python: the standard one from 3.11, the same behaviour
(str() and format() give the value) on 3.10."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, Enum):
        """An Enum whose members are strings and print as their value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return format(str(self.value), format_spec)


__all__ = ["StrEnum"]

"""The one wall clock of the project, in MLflow's unit: milliseconds since the epoch."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Now, in milliseconds since the epoch (MLflow's timestamps)."""
    return time.time_ns() // 1_000_000

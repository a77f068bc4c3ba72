"""The one wall clock of the project, in MLflow's unit: milliseconds since the epoch."""

from __future__ import annotations

import time
from datetime import datetime, timezone


def now_ms() -> int:
    """Now, in milliseconds since the epoch (MLflow's timestamps)."""
    return time.time_ns() // 1_000_000


def utc_timestamp(created: float) -> str:
    """`2026-01-31T23:59:59.123Z`: ISO 8601, UTC, to the millisecond (the logs' time)."""
    moment = datetime.fromtimestamp(created, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

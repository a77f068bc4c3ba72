"""Kubernetes' service link variables, which share the project's variable prefix.

Kubernetes gives every pod variables for each Service of its namespace, named after the
Service: one called `mlflow-sidecar` (or `mlflow-sidecar-metrics`) yields
`MLFLOW_SIDECAR_SERVICE_HOST=10.0.0.7`, `MLFLOW_SIDECAR_PORT=tcp://10.0.0.7:50051` and
the like. They are not misspelt settings, so the checks that refuse unknown
`MLFLOW_SIDECAR_*` variables let them pass, by name and value together: a setting written
with one underscore too few (`MLFLOW_SIDECAR_SERVER_PORT=50051`) is still refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

_SERVICE = r"^MLFLOW_SIDECAR_(?:[A-Z0-9_]+_)?"
_PORT_PROTO = r"PORT_\d+_(?:TCP|UDP|SCTP)"
_LINK_URL = re.compile(r"^(?:tcp|udp|sctp)://\S+:\d+\Z")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# Each name shape with the value Kubernetes gives it; a name may read as several shapes
# (`..._SERVICE_PORT` also ends in `_PORT`), so every one is tried.
_SHAPES: tuple[tuple[re.Pattern[str], Callable[[str], bool]], ...] = (
    (re.compile(_SERVICE + r"SERVICE_HOST\Z"), _is_ip),
    (re.compile(_SERVICE + r"SERVICE_PORT(?:_[A-Z0-9_]+)?\Z"), str.isdigit),
    (
        re.compile(_SERVICE + r"PORT(?:_\d+_(?:TCP|UDP|SCTP))?\Z"),
        lambda v: bool(_LINK_URL.match(v)),
    ),
    (re.compile(_SERVICE + _PORT_PROTO + r"_PROTO\Z"), lambda v: v in ("tcp", "udp", "sctp")),
    (re.compile(_SERVICE + _PORT_PROTO + r"_PORT\Z"), str.isdigit),
    (re.compile(_SERVICE + _PORT_PROTO + r"_ADDR\Z"), _is_ip),
)


def is_service_link(name: str, value: str) -> bool:
    """Whether `name=value` is one of the variables Kubernetes sets for a Service."""
    upper = name.upper()
    return any(shape.match(upper) and fits(value) for shape, fits in _SHAPES)

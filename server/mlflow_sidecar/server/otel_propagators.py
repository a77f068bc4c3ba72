"""The check of `OTEL_PROPAGATORS`, made before OpenTelemetry is imported.

OpenTelemetry loads the propagators that variable names when its `propagate` module is
first imported, and a name it does not know is a ValueError at that import, with a
traceback from wherever the import happened. `serve` checks the names first, so that a
misspelt one is refused in one line, as every other setting is."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points


def propagators_refusal(environ: Mapping[str, str]) -> str | None:
    """Why `OTEL_PROPAGATORS` cannot be used, or None when it can (or is unset)."""
    names = [n.strip() for n in environ.get("OTEL_PROPAGATORS", "").split(",") if n.strip()]
    known = {ep.name for ep in entry_points(group="opentelemetry_propagator")}
    for name in names:
        if name.lower() == "none":
            return None  # OpenTelemetry stops reading at "none": no propagator at all
        if name not in known:
            return (
                f"invalid OTEL_PROPAGATORS: no propagator named {name!r} is installed;"
                f" known: {', '.join(sorted(known)) or 'none'} (or none)"
            )
    return None

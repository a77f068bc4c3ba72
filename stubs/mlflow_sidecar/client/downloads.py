"""Where the gRPC clients put a download while its bytes are still being verified."""

from __future__ import annotations

import uuid
from pathlib import Path


def partial_path(final: Path) -> Path:
    """A hidden sibling of `final` to download into, renamed over `final` once verified.

    The name does not repeat `final`'s, which may already be as long as names can be."""
    return final.with_name(f".sidecar-{uuid.uuid4().hex}.partial")

"""The sidecar's page tokens, and MLflow's behind them.

MLflow's SQL stores page by offset: their token is base64 JSON `{"offset": N}` and they
trust it (a negative or huge offset reaches the database and fails there, as INTERNAL or,
behind a server, as a 500 that looks transient). The sidecar hands out its own tokens
instead: URL-safe base64 JSON naming the list they belong to (`kind`) and the position,
checked before anything reaches MLflow. A token that is not one of ours, of another list
(a search's list is its query's: `of_query`), or out of bounds is INVALID_ARGUMENT on
`page_token`, reason INVALID_PAGE_TOKEN.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from mlflow_sidecar.core.errors import ErrorReason, InternalError, InvalidArgumentError

# No list the sidecar pages through is anywhere near this long; larger offsets are forged.
MAX_OFFSET = 1_000_000_000
_INT64_MAX = 2**63 - 1


def refuse(
    problem: str = "is not a token from a previous page of this call",
) -> InvalidArgumentError:
    """The error for a page token the sidecar did not hand out for this call."""
    return InvalidArgumentError("page_token", problem, reason=ErrorReason.INVALID_PAGE_TOKEN)


def of_query(kind: str, *query: object) -> str:
    """The list `kind` as one query makes it (its experiments, filter, order, view): a token
    of this list is refused by the same search with another query, whose list it is not."""
    digest = hashlib.sha256(json.dumps(query, default=str).encode()).hexdigest()[:16]
    return f"{kind}/{digest}"


def encode(kind: str, **position: Any) -> str:
    """A token for the next page of the list `kind`."""
    raw = json.dumps({"kind": kind, **position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode(kind: str, token: str) -> dict[str, Any]:
    """The position in a token of `encode(kind, ...)`; refused when it is anything else."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        raise refuse() from None
    if not isinstance(decoded, dict) or decoded.get("kind") != kind:
        raise refuse()
    return decoded


def bounded_int(value: object, low: int, high: int) -> int:
    """An int (not a bool or float) within [low, high], or the token is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise refuse()
    return value


def offset(kind: str, token: str) -> int:
    """The offset in one of our tokens of the list `kind`; 0 for the first page (empty token)."""
    if not token:
        return 0
    return bounded_int(decode(kind, token).get("offset"), 1, MAX_OFFSET)


def to_mlflow(kind: str, token: str) -> str | None:
    """MLflow's offset token for one of ours; None for the first page (empty token)."""
    if not token:
        return None
    position = offset(kind, token)
    return base64.b64encode(json.dumps({"offset": position}).encode()).decode("ascii")


def from_mlflow(kind: str, mlflow_token: str | bytes | None) -> str:
    """Our token for MLflow's next-page token; empty on the last page."""
    if not mlflow_token:
        return ""
    try:
        text = mlflow_token.decode() if isinstance(mlflow_token, bytes) else mlflow_token
        offset = json.loads(base64.b64decode(text))["offset"]
        offset = int(offset) if isinstance(offset, (int, str)) else None
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeError):
        offset = None
    if offset is None or not 0 < offset <= MAX_OFFSET:
        raise InternalError(f"MLflow returned a page token of an unknown form: {mlflow_token!r}")
    return encode(kind, offset=offset)


def int64(value: object) -> int:
    """A step or timestamp from a token: any int64."""
    return bounded_int(value, -_INT64_MAX - 1, _INT64_MAX)

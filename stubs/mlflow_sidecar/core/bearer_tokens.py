"""What a bearer token may hold to travel in an HTTP/2 `authorization` header."""

from __future__ import annotations

# Printable ASCII without the space: grpc refuses other metadata characters at every call,
# and the sidecar strips what a client sends around its token.
_FIRST, _LAST = "!", "~"

UNSENDABLE = (
    "holds whitespace, a line break or a non-ASCII character, which a bearer token in an"
    " HTTP/2 header cannot"
)
"""Why a token fails `sendable`, for messages that must not show the token."""


def sendable(token: str) -> bool:
    """True when `token` can be sent, and matched, as a bearer token."""
    return all(_FIRST <= char <= _LAST for char in token)

"""What a gRPC target to the sidecar may look like, checked before grpc sees it.

grpc takes almost any text as a target and fails only at the first call, after the
call's whole deadline, or worse, not at all: a port past 65535 is taken modulo 65536
(`127.0.0.1:65537` reaches port 1), so a mistyped port reaches another service.
"""

from __future__ import annotations

import re

GRPC_SCHEMES = frozenset(
    {"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"}
)
"""The URI schemes grpc resolves; a target `other://...` is read as a DNS name."""

# `host:port` or `[v6]:port`, the part after the last colon taken as the port.
_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:\[\]]+):(?P<port>[^:]*)$")


def check_target(target: str) -> str:
    """`target` when grpc can reach a sidecar through it; ValueError saying what is wrong:
    a port that is not a number from 1 to 65535, or a URI scheme grpc does not resolve
    (`http://`, an MLflow `sidecar://` URI)."""
    scheme, sep, rest = target.partition("://")
    if sep:
        if scheme.lower() not in GRPC_SCHEMES:
            raise ValueError(
                f"{target!r}: grpc resolves no {scheme}:// target (it would look the whole"
                " text up as a host name); give HOST:PORT, e.g. 127.0.0.1:50051, or a gRPC"
                f" target URI ({', '.join(sorted(GRPC_SCHEMES))})"
            )
        if scheme.lower() != "dns":
            return target
        address = rest.partition("/")[2]  # dns://[authority]/host:port
    elif target.split(":", 1)[0].lower() in GRPC_SCHEMES:
        return target
    else:
        address = target
    _check_port(target, address)
    return target


def _check_port(target: str, address: str) -> None:
    found = _HOST_PORT.match(address)
    if found is None:
        return  # no port (grpc's default, 443) or a bare IPv6 address
    port = found["port"]
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"{target!r}: the port {port!r} is not a number from 1 to 65535 (grpc would"
            " connect to another port, or to none)"
        )

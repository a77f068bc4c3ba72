"""The client's TLS files, checked when its settings are: grpc reads them only when the
channel is made, and then either raises a bare FileNotFoundError or, for a file that is
not PEM, fails every handshake, so that each call waits its whole deadline and reports
the sidecar unreachable."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal; grpc takes none.
    return b""


def _check(setting: str, path: str, problem: str, load: Callable[[ssl.SSLContext], None]) -> None:
    read_pem(setting, path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Whether the file is usable at all, not this system's OpenSSL policy (which refuses,
    # say, a 1024-bit key): grpc's own TLS library takes it.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        load(context)
    except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
        reason = str(getattr(exc, "reason", None) or exc).strip() or type(exc).__name__
        raise ValueError(f"{setting}: {path} {problem} ({reason}): {_fix(setting)}") from None


def read_pem(setting: str, path: str) -> bytes:
    """The bytes of the file `setting` names; ValueError naming both if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{setting}: cannot read {path} ({reason}): {_fix(setting)}") from None


def _fix(setting: str) -> str:
    if setting == "root_certificates_file":
        return (
            "set it to the PEM CA bundle that signed the sidecar's certificate, or leave it"
            " empty for the system's roots"
        )
    return "set client_cert_file and client_key_file to the PEM certificate and its key"


def check_tls_files(root_certificates: str, client_cert: str, client_key: str) -> None:
    """ValueError naming the setting and the file when `root_certificates` (if set) holds
    no PEM certificate, or `client_cert` and `client_key` (if both set) are not a PEM
    certificate and its unencrypted PEM key."""
    if root_certificates:
        _check(
            "root_certificates_file",
            root_certificates,
            "holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)",
            lambda context: context.load_verify_locations(cafile=root_certificates),
        )
    if client_cert and client_key:
        _check(
            "client_cert_file",
            client_cert,
            "holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)",
            lambda context: context.load_verify_locations(cafile=client_cert),
        )
        _check(
            "client_key_file",
            client_key,
            "is not the unencrypted PEM key of client_cert_file",
            lambda context: context.load_cert_chain(client_cert, client_key, _no_password),
        )

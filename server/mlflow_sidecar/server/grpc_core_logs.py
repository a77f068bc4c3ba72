"""What grpc's C core writes to stderr, decided by the sidecar's `log_level` and `log_format`.

grpc's core logs on its own, past Python's logging, straight to the process's stderr and as
plain text (`I1206 11:21:00.112203 16956 ssl_transport_security.cc:2563] Handshake failed
...`, one line per plaintext connection to a TLS listener: anyone reaching the port can
write them). Its only switch is `GRPC_VERBOSITY`, which the core reads once, when `grpc` is
imported: so it is set before that, from the configuration.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

GRPC_VERBOSITY = "GRPC_VERBOSITY"

# grpc's core knows DEBUG, INFO, ERROR and NONE. INFO is absent on purpose: left unset, the
# core logs from INFO up already, without the "not suitable for production" line that an
# explicit INFO adds to every start.
_TEXT_VERBOSITY = {"DEBUG": "DEBUG", "WARNING": "ERROR", "ERROR": "ERROR"}


def grpc_verbosity(log_level: str, log_format: str, environ: Mapping[str, str]) -> str | None:
    """The `GRPC_VERBOSITY` the sidecar runs with (None: leave it unset).

    JSON logs get NONE whatever the environment says: the core's lines cannot be JSON.
    Text logs take a `GRPC_VERBOSITY` of the environment as it is; without one, the core
    writes nothing below `log_level` (WARNING and ERROR: ERROR, as the core has no
    WARNING)."""
    if log_format == "json":
        return "NONE"
    explicit = environ.get(GRPC_VERBOSITY)
    if explicit:
        return explicit
    return _TEXT_VERBOSITY.get(log_level)


def set_grpc_verbosity(
    log_level: str, log_format: str, environ: MutableMapping[str, str] = os.environ
) -> bool:
    """Set `GRPC_VERBOSITY` for this process; False when one is wanted but grpc is imported
    already, so that its core has read the variable and the setting comes too late to
    count (True when grpc's default is what the settings ask for)."""
    verbosity = grpc_verbosity(log_level, log_format, environ)
    if verbosity is None:
        return True
    environ[GRPC_VERBOSITY] = verbosity
    return "grpc" not in sys.modules

"""A model's content identity (`ModelManifest.digest`), computed the same way by the
sidecar (from a manifest) and by a client (from a directory it holds).

The digest is the lowercase hex sha256 of the UTF-8 lines "<sha256> <path>\\n" of every
file, sorted by path (code point order, which is the order of the paths' UTF-8 bytes):
what `sha256sum` prints for the files, so any language can compute it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_DIGEST_LENGTH
from mlflow_sidecar.core.transfer import collect_files, file_digest

_HEX_RE = re.compile(r"^[0-9a-fA-F]*\Z")


def model_digest(files: Iterable[tuple[str, str]]) -> str:
    """The digest of a model's (path, sha256) pairs, in any order."""
    digest = hashlib.sha256()
    for path, sha256 in sorted(files):
        digest.update(f"{sha256.lower()} {path}\n".encode())
    return digest.hexdigest()


def directory_digest(root: Path) -> str:
    """The digest of every file under `root` (as `collect_files` finds them)."""
    return model_digest((f.relpath, file_digest(f.path)[1]) for f in collect_files(root))


def check_digest(field: str, value: str) -> str:
    """A digest a caller sends back (`if_none_match`): empty, or at most 64 hex digits;
    returned in lowercase, the form digests are compared in."""
    if len(value) > MAX_DIGEST_LENGTH:
        raise InvalidArgumentError(
            field, f"is {len(value)} characters long; a digest has {MAX_DIGEST_LENGTH}"
        )
    if not _HEX_RE.match(value):
        raise InvalidArgumentError(field, "must be the hex digits of a ModelManifest.digest")
    return value.lower()

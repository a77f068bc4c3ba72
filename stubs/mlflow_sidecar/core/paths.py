"""The rules every artifact and model file path obeys, on both sides of the wire.

A path names a file (or directory) relative to a run's artifact root or a model
directory: POSIX separators, no way up, no way out. The sidecar checks every path
a caller sends before it writes a byte; the client checks every path the sidecar
sends before it writes into a destination directory.
"""

from __future__ import annotations

import pathlib
import re
import urllib.parse

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_PATH_BYTES, MAX_SEGMENT_BYTES

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# MLflow's artifact proxy takes a stored file's path from a URL, unquoted, and so does
# MLflow's own client: these would name another file than the one sent (`a%2Fb` is
# stored as `a/b`, `m.pt?v=2` as `m.pt`, overwriting it).
_URL_SYNTAX = ("%", "?", "#")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
# MLflow's server writes a file in progress under this prefix beside its destination: it
# refuses to store a name with it (after making the file's directory) and leaves any such
# name, a directory too, out of every listing.
_MLFLOW_IN_PROGRESS_PREFIX = ".artifact.uploading."


def _shown(value: str) -> str:
    text = value if len(value) <= 80 else value[:77] + "..."
    return repr(text)


def check_relative_path(field: str, value: str, *, allow_empty: bool = False) -> str:
    """Return `value` if it is a safe relative POSIX path, else raise InvalidArgumentError.

    Refused: empty (unless `allow_empty`), absolute, `.` or `..` segments, empty segments
    (`a//b`, a trailing `/`), backslashes, NUL and other control characters (C0, DEL and
    C1), more than 1024 bytes in UTF-8, or a segment of more than 255 bytes.
    """
    if not value:
        if allow_empty:
            return value
        raise InvalidArgumentError(field, "must not be empty")
    _check_characters(field, value)
    size = _utf8_size(value)
    if size > MAX_PATH_BYTES:
        raise InvalidArgumentError(
            field, f"{_shown(value)} is {size} bytes long; at most {MAX_PATH_BYTES}"
        )
    if value.startswith("/"):
        raise InvalidArgumentError(field, f"{_shown(value)} must be relative, not absolute")
    for segment in value.split("/"):
        _check_segment(field, value, segment)
    return value


def check_stored_path(field: str, value: str) -> str:
    """`check_relative_path` for a path a file is stored under in MLflow: also refused are
    `%`, `?` and `#`, which MLflow's artifact proxy would read as URL syntax and store the
    file under another name, names MLflow lists as others, and names MLflow reserves for
    its files in progress (`.artifact.uploading.*`)."""
    check_relative_path(field, value)
    for character in _URL_SYNTAX:
        if character in value:
            raise InvalidArgumentError(
                field,
                f"{_shown(value)} must not contain {character!r}: MLflow's artifact proxy reads"
                " '%', '?' and '#' in a path as URL syntax and would store the file under"
                " another name",
            )
    # MLflow's client passes each listed name through a URL parser, which strips spaces
    # around it and lower-cases what reads as a scheme ('Config:' of 'Config:v1.txt'); a
    # file stored under such a name is listed under another one and cannot be read back.
    for segment in value.split("/"):
        if urllib.parse.urlunparse(urllib.parse.urlparse(segment)) != segment:
            raise InvalidArgumentError(
                field,
                f"{_shown(value)}: MLflow lists the name {_shown(segment)} as another one"
                " (spaces around a name, or a 'scheme:' prefix, are URL syntax to it)",
            )
    for segment in value.split("/"):
        if segment.startswith(_MLFLOW_IN_PROGRESS_PREFIX):
            raise InvalidArgumentError(
                field,
                f"{_shown(value)}: MLflow reserves names beginning with"
                f" {_MLFLOW_IN_PROGRESS_PREFIX!r} for files it is still receiving, refuses"
                " to store them and leaves them out of its listings",
            )
    if pathlib.PureWindowsPath(value).is_absolute():
        raise InvalidArgumentError(
            field, f"{_shown(value)} must be relative: MLflow reads a drive ('C:/') as absolute"
        )
    return value


def _utf8_size(text: str) -> int:
    # surrogatepass: a lone surrogate (from a non-UTF-8 file name) is measured, not an error.
    return len(text.encode("utf-8", errors="surrogatepass"))


def _check_characters(field: str, value: str) -> None:
    """Refuse characters that make a path mean something else elsewhere.

    NUL ends the path for the operating system, other control characters hide in logs
    and terminals, and a backslash is a separator on Windows but not on POSIX.
    """
    if "\x00" in value:
        raise InvalidArgumentError(field, "must not contain NUL characters")
    if _CONTROL_RE.search(value):
        raise InvalidArgumentError(field, f"{_shown(value)} must not contain control characters")
    if "\\" in value:
        raise InvalidArgumentError(
            field, f"{_shown(value)} must use '/' as separator, not backslashes"
        )


def _check_segment(field: str, value: str, segment: str) -> None:
    # The message shows the whole path (`value`), not the segment, so the caller can find it.
    if segment in ("", ".", ".."):
        raise InvalidArgumentError(
            field,
            f"{_shown(value)} must not contain empty, '.' or '..' segments",
        )
    if _utf8_size(segment) > MAX_SEGMENT_BYTES:
        raise InvalidArgumentError(
            field, f"{_shown(value)} has a segment longer than {MAX_SEGMENT_BYTES} bytes"
        )


def is_sha256(value: str) -> bool:
    """True for a lowercase hex sha256 digest."""
    return bool(_SHA256_RE.match(value))


class FileTree:
    """The file paths of one directory tree, checked as they are added.

    Refuses unsafe paths, a path given twice, and a path that would have to be both a
    file and a directory ("a" and "a/b"), so that writing the tree can never fail halfway
    or overwrite one of its own files. `stored`: the tree is to be stored in MLflow, and
    its paths obey `check_stored_path`.
    """

    def __init__(self, *, stored: bool = False) -> None:
        self._check = check_stored_path if stored else check_relative_path
        self._files: set[str] = set()
        self._dirs: set[str] = set()

    def add(self, field: str, path: str) -> str:
        """Check `path` against the rules and the paths added before; return it."""
        self._check(field, path)
        if path in self._files:
            raise InvalidArgumentError(field, f"{_shown(path)} appears twice")
        if path in self._dirs:
            raise InvalidArgumentError(field, f"{_shown(path)} is also a directory of other files")
        parts = path.split("/")
        prefixes = ["/".join(parts[:end]) for end in range(1, len(parts))]
        for prefix in prefixes:
            if prefix in self._files:
                raise InvalidArgumentError(
                    field, f"{_shown(path)} needs {_shown(prefix)} as a directory, but it is a file"
                )
        self._dirs.update(prefixes)
        self._files.add(path)
        return path

    def __len__(self) -> int:
        return len(self._files)

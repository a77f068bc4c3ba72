"""What makes a storage URI unsafe to check and use as written, with no import of grpc:
the configuration checks its `artifacts.allowed_uris` with it before `serve` sets up
grpc's logging."""

from __future__ import annotations

import re
import urllib.parse

# Percent-encoded dot, slash, backslash and NUL: spelled so they slip past a plain `..` check.
_ENCODED_TRICK_RE = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def uri_syntax_problem(uri: str) -> str:
    """What is wrong with `uri` (`..` segments, backslashes, NUL, percent-encoded dots or
    slashes, a scheme not in lower case, a query or fragment), or "" when nothing is."""
    # As written: urlsplit gives the scheme lower-cased.
    written = _SCHEME_RE.match(uri)
    scheme = written[1] if written else ""
    if "\x00" in uri or "\\" in uri:
        return "must not contain backslashes or NUL"
    if scheme != scheme.lower():
        # MLflow tells stores apart by the scheme in any case, but reads a local path
        # only after a lower-case `file:`: `FILE:/x` would be checked as /x and used as
        # a path relative to the working directory.
        return f"must write its scheme in lower case ({scheme.lower()}:)"
    if "?" in uri or "#" in uri:
        # MLflow drops a location's query and fragment, and what follows a `#` with them:
        # files stored below it would be read from elsewhere.
        return "must not contain '?' or '#'"
    if _ENCODED_TRICK_RE.search(uri):
        return "must not contain percent-encoded dots, slashes, backslashes or NUL"
    if ".." in _path_part(uri).split("/"):
        return "must not contain '..' segments"
    return ""


def _path_part(uri: str) -> str:
    """The part of a URI that names a location: all of it but the query and fragment."""
    parsed = urllib.parse.urlsplit(uri)
    # models:/name@alias and runs:/id/path keep their names in the path; so does a plain path.
    return f"{parsed.netloc}/{parsed.path}" if parsed.scheme else uri

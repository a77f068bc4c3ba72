"""Credentials out of text the sidecar shows: answers to callers and log lines.

MLflow builds request URLs from the tracking URI, `user:password@` included, and puts
them in its exception messages; presigned object store URLs carry their signature in
the query. Any such text passes through `redact` before a caller or a log sees it.
"""

from __future__ import annotations

import re

# `scheme://user:password@host`: everything between `://` and `@` within one URL.
_USERINFO = re.compile(r"(?<=://)[^/@\s\"'<>]*@")
# Query parameters that grant access by themselves: presigned S3 (SigV4 and V2), Azure
# SAS, GCS signed URLs, bearer tokens passed in a query.
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature"
    r"|x-goog-signature|x-goog-credential|sig|token|access_token|password)=)[^&#\s\"'<>]*"
)
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with URL credentials (`user:password@`) and signed-URL secrets as `***`."""
    return _SECRET_QUERY.sub(rf"\g<1>{REDACTED}", _USERINFO.sub(f"{REDACTED}@", text))

"""The sidecar's errors, re-exported from `mlflow_sidecar.core.errors`, where they live.

Kept because trainer code catches `mlflow_sidecar.client.errors.NotFoundError` and
friends; the classes are the very same objects, so either import path catches them.
"""

from mlflow_sidecar.core import errors as _core
from mlflow_sidecar.core.errors import *  # noqa: F403

__all__ = _core.__all__

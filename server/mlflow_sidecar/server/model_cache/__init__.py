"""The model cache: verified copies of downloaded model versions in `<data_dir>/models`."""

from mlflow_sidecar.server.model_cache.cache import CacheDisk, ModelCache
from mlflow_sidecar.server.model_cache.lease import ModelLease, scratch_lease
from mlflow_sidecar.server.model_cache.manifest import CacheKey, Manifest, ManifestFile

__all__ = [
    "CacheDisk",
    "CacheKey",
    "Manifest",
    "ManifestFile",
    "ModelCache",
    "ModelLease",
    "scratch_lease",
]

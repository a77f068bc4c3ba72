"""Every limit of the contract, in one place: what a request may carry and how big a page,
a batch, a path or a chunk may be. Client and server read them from here; the README's
Limits section (held to these by tests/unit/test_readme_limits.py) and the proto comments
state the same figures.

Most are MLflow's own (`mlflow.utils.validation`): the sidecar checks them first so that a
caller learns which field is wrong, in the sidecar's words, before anything is sent.
"""

from __future__ import annotations

# -- strings (MLflow's limits) ---------------------------------------------------------

MAX_KEY_LENGTH = 250
"""A param, metric or tag key; also a run name."""
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
"""A run's or logged model's tag value."""
MAX_EXPERIMENT_TAG_VALUE_LENGTH = 20_000
"""An experiment's tag value."""
MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH = 5000
"""A registered model's tag value: its database column's width (MLflow's validation says
100,000, which only SQLite, ignoring widths, takes)."""
MAX_MODEL_VERSION_TAG_VALUE_LENGTH = 100_000
"""A model version's tag value."""
MAX_NAME_LENGTH = 500
"""An experiment, registered model or logged model name."""
MAX_ALIAS_LENGTH = 255
"""A registered model alias."""
MAX_DESCRIPTION_LENGTH = 5000
"""A registered model's or model version's description."""
MAX_CREATED_NAME_LENGTH = 256
"""The name of an experiment or registered model the sidecar creates (or renames to): its
MLflow database column. MLflow's validation allows 500, which only SQLite, ignoring
column widths, holds; names up to MAX_NAME_LENGTH are still looked up."""
MAX_MODEL_TYPE_LENGTH = 500
"""A logged model's type: its MLflow database column."""
MAX_RUN_USER_LENGTH = 256
"""The `mlflow.user` tag a run is created with: MLflow copies it into the run's user
column."""
MAX_ARTIFACT_LOCATION_LENGTH = 157
"""A new experiment's artifact location. Its own column holds 256 characters, but MLflow
makes each run's artifact URI of it (`<location>/<32-hex run id>/artifacts`, 43 more) in a
column of 200: past 157 no run could be started in the experiment on PostgreSQL or MySQL."""
MAX_SOURCE_LENGTH = 500
"""A new model version's source: its MLflow database column."""
MAX_FILTER_LENGTH = 10_000
"""A search filter in MLflow's syntax."""
MAX_ORDER_BY_TERMS = 32
"""A search's `order_by` terms. MLflow sets none; its database does: each metric, param or
tag term is a join, and SQLite joins at most 64 tables (past that MLflow answers with a
server error, which reads as an outage)."""
MAX_SEARCH_JOINS = 63
"""The tables a search of runs, experiments or logged models joins to its entity's own, its
filter and `order_by` together: MLflow's SQL stores join one for each metric, param or tag
term (two for a dataset term), and SQLite joins at most 64 tables; past that MLflow answers
503 TEMPORARILY_UNAVAILABLE, which reads as an outage."""
MAX_ORDER_BY_LENGTH = 1000
"""One `order_by` term ("metrics.`key` DESC"; a key is at most 250)."""
DATASET_FIELD_LENGTHS = {
    "name": 500,
    "digest": 36,
    "source_type": 36,
    "source": 65_535,
    "schema": 1_048_575,
    "profile": 16_777_215,
}
"""A run input dataset's fields and their lengths in MLflow (mlflow.utils.validation; the
source type's is its database column)."""
MAX_INPUT_TAG_KEY_LENGTH = 255
"""A key of a dataset input's tags, in MLflow."""
MAX_INPUT_TAG_VALUE_LENGTH = 500
"""A value of a dataset input's tags, in MLflow."""

# -- ids ---------------------------------------------------------------------------------

MAX_ID_LENGTH = 64
"""An experiment, run or logged model id (MLflow makes 32-hex run ids, small integers for
experiments, `m-` and 32 hex for logged models)."""
MAX_RUN_ID_LENGTH = MAX_ID_LENGTH
MAX_REQUEST_ID_LENGTH = 200
"""A `request_id` (and the deprecated `client_request_id`)."""
MAX_PAGE_TOKEN_LENGTH = 4096

# -- batches and pages (MLflow's limits) -------------------------------------------------

MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_METRIC_PAGE_SIZE = 1000
MAX_METRIC_PAGE_SIZE = 25000

# -- artifact paths ------------------------------------------------------------------------

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
"""One path segment: most filesystems refuse longer names (NAME_MAX); refusing them here
names the field."""

# -- transfer chunks -----------------------------------------------------------------------

MIB = 1024 * 1024
DEFAULT_CHUNK_BYTES = MIB
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = MIB
# The smallest chunk a download may ask for (`max_chunk_bytes`): below it, the messages'
# framing would outweigh the bytes they carry.
MIN_REQUESTED_CHUNK_BYTES = 4096
CHUNK_FRAMING_BYTES = 1024
"""Room for the protobuf framing around a chunk (oneof tag, length, file index)."""

# -- model digests -------------------------------------------------------------------------

MAX_DIGEST_LENGTH = 64
"""`DownloadModelRequest.if_none_match`: the 64 hex digits of a `ModelManifest.digest`."""

# -- alias watches -------------------------------------------------------------------------

MAX_WATCH_ALIASES = 16
"""Distinct aliases one WatchModelAlias stream watches."""

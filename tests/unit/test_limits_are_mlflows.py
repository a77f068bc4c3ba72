"""The limits the sidecar checks before MLflow are MLflow's own: a value either accepts is
accepted by both, and a refusal names the field instead of arriving in MLflow's words.

`core.limits` keeps its own copies because a client-only install has no MLflow."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelTag
from mlflow.store.tracking.dbmodels.models import SqlDataset
from mlflow.utils import validation

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.names import LOGGED_MODEL_NAME_BAD_CHARS


def test_run_and_registry_limits_are_mlflows() -> None:
    assert limits.MAX_KEY_LENGTH == validation.MAX_ENTITY_KEY_LENGTH
    assert limits.MAX_PARAM_VALUE_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert limits.MAX_TAG_VALUE_LENGTH == validation.MAX_TAG_VAL_LENGTH
    assert limits.MAX_EXPERIMENT_TAG_VALUE_LENGTH == validation.MAX_EXPERIMENT_TAG_VAL_LENGTH
    assert (
        limits.MAX_MODEL_VERSION_TAG_VALUE_LENGTH == validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
    )
    # MLflow's validation allows more than a registered model tag's column holds: databases
    # that keep widths (PostgreSQL, MySQL) refuse the rest.
    assert (
        limits.MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH
        == SqlRegisteredModelTag.value.type.length
        < validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
    )
    assert limits.MAX_KEY_LENGTH == validation.MAX_EXPERIMENT_TAG_KEY_LENGTH
    assert limits.MAX_KEY_LENGTH == validation.MAX_MODEL_REGISTRY_TAG_KEY_LENGTH
    assert limits.MAX_NAME_LENGTH == validation.MAX_EXPERIMENT_NAME_LENGTH
    assert limits.MAX_ALIAS_LENGTH == validation.MAX_REGISTERED_MODEL_ALIAS_LENGTH


def test_dataset_limits_are_mlflows() -> None:
    assert {
        "name": validation.MAX_DATASET_NAME_SIZE,
        "digest": validation.MAX_DATASET_DIGEST_SIZE,
        "source_type": SqlDataset.dataset_source_type.type.length,
        "source": validation.MAX_DATASET_SOURCE_SIZE,
        "schema": validation.MAX_DATASET_SCHEMA_SIZE,
        "profile": validation.MAX_DATASET_PROFILE_SIZE,
    } == limits.DATASET_FIELD_LENGTHS
    assert limits.MAX_INPUT_TAG_KEY_LENGTH == validation.MAX_INPUT_TAG_KEY_SIZE
    assert limits.MAX_INPUT_TAG_VALUE_LENGTH == validation.MAX_INPUT_TAG_VALUE_SIZE


def test_what_the_sidecar_creates_fits_mlflows_columns() -> None:
    # MLflow's validation allows longer names than its columns hold: PostgreSQL and MySQL
    # refuse the rest with an opaque error, SQLite ignores widths.
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersion, SqlRegisteredModel
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun

    assert SqlExperiment.name.type.length == limits.MAX_CREATED_NAME_LENGTH
    assert SqlRegisteredModel.name.type.length == limits.MAX_CREATED_NAME_LENGTH
    # A run's artifact URI is its experiment's location and `/<32-hex run id>/artifacts`.
    run_suffix = len(f"/{'0' * 32}/artifacts")
    assert (
        limits.MAX_ARTIFACT_LOCATION_LENGTH + run_suffix
        == SqlRun.artifact_uri.type.length
        < SqlExperiment.artifact_location.type.length + run_suffix
    )
    assert SqlModelVersion.source.type.length == limits.MAX_SOURCE_LENGTH


def test_the_characters_a_logged_model_name_refuses_are_mlflows() -> None:
    for char in LOGGED_MODEL_NAME_BAD_CHARS:
        with pytest.raises(MlflowException):
            validation._validate_logged_model_name(f"a{char}b")
    for char in "-_ @+=,;!()[]{}~":
        validation._validate_logged_model_name(f"a{char}b")

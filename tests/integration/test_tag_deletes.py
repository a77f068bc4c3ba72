"""Deleting a tag that is not there: a run's is TAG_NOT_FOUND, told apart from a missing
run; a registered model's or version's is done already (as MLflow has it), and a missing
model or version is named as such."""

from __future__ import annotations

import pytest

from mlflow_sidecar.client.errors import ErrorReason, NotFoundError

pytestmark = pytest.mark.integration


def _reason(call) -> str:
    with pytest.raises(NotFoundError) as err:
        call()
    return str(err.value.reason)


def test_a_missing_run_tag_and_a_missing_run_are_told_apart(client_container, unique):
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"tags-{unique}")
    run = tracking.start_run(exp.experiment_id)
    assert _reason(lambda: tracking.delete_run_tag(run.run_id, "nope")) == ErrorReason.TAG_NOT_FOUND
    assert _reason(lambda: tracking.delete_run_tag("f" * 32, "nope")) == ErrorReason.RUN_NOT_FOUND


def test_deleting_a_missing_model_or_version_tag_is_done_and_a_missing_owner_is_named(
    client_container, unique, run_id
):
    registry = client_container.model_registry()
    name = f"tags-{unique}"
    registry.create_registered_model(name)
    registry.create_model_version(name, source=f"runs:/{run_id}/model")
    registry.delete_registered_model_tag(name, "nope")  # MLflow: deleting nothing is done
    assert _reason(lambda: registry.delete_registered_model_tag(f"x-{unique}", "nope")) == (
        ErrorReason.MODEL_NOT_FOUND
    )
    registry.delete_model_version_tag(name, 1, "nope")
    assert _reason(lambda: registry.delete_model_version_tag(name, 9, "nope")) == (
        ErrorReason.MODEL_VERSION_NOT_FOUND
    )

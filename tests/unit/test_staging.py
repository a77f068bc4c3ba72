"""`Staging` keeps working when its directory is removed under it, and says what is wrong
when it cannot create a transfer directory at all."""

from __future__ import annotations

import shutil

import pytest

from mlflow_sidecar.core.errors import FailedPreconditionError
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.staging import Staging


def test_a_staging_directory_removed_while_running_is_created_again(tmp_path):
    staging = Staging(load_config(data_dir=tmp_path))
    shutil.rmtree(staging.root)
    with staging.directory("download-model") as path:
        (path / "file").write_bytes(b"staged")
        assert path.parent == staging.root
    assert staging.in_flight() == []


def test_a_staging_path_that_is_no_directory_is_failed_precondition_naming_it(tmp_path):
    staging = Staging(load_config(data_dir=tmp_path))
    shutil.rmtree(staging.root)
    staging.root.write_bytes(b"not a directory")
    with pytest.raises(FailedPreconditionError) as refused, staging.directory("upload"):
        pass
    assert str(staging.root) in refused.value.message
    assert "make it a directory the sidecar can write to" in refused.value.message


def test_a_data_dir_removed_as_a_whole_is_not_made_again(tmp_path):
    # A new data dir would be one no restart of this sidecar knows, and one a second
    # sidecar could lock for its own while this one serves.
    data_dir = tmp_path / "data"
    staging = Staging(load_config(data_dir=data_dir))
    shutil.rmtree(data_dir)
    with pytest.raises(FailedPreconditionError) as refused, staging.directory("upload"):
        pass
    assert "data dir was removed" in refused.value.message
    assert not data_dir.exists()

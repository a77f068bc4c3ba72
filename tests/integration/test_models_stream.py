"""Model directories streamed through the sidecar, and interop with stock MLflow both ways."""

from __future__ import annotations

import os
import random
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient

from mlflow_sidecar.core.domain import RunStatus
from mlflow_sidecar.core.errors import InvalidArgumentError, NotFoundError
from tests.support.files import random_file, tree_digests

# What stock MLflow adds when it downloads a registered MLflow model (it has an MLmodel file).
REGISTERED_MODEL_META = "registered_model_meta"


class Doubler(mlflow.pyfunc.PythonModel):
    """The smallest useful pyfunc model."""

    def predict(self, context, model_input: list[int], params=None) -> list[int]:
        return [2 * x for x in model_input]


@pytest.fixture()
def tracking(client_container):
    return client_container.experiment_tracking()


@pytest.fixture()
def registry(client_container):
    return client_container.model_registry()


@pytest.fixture()
def experiment_id(tracking, unique) -> str:
    return tracking.create_experiment(f"models-{unique}").experiment_id


@pytest.fixture()
def plain_mlflow(mlflow_server, monkeypatch):
    """Stock MLflow's fluent API pointed at the same tracking server as the sidecar.

    MLflow's setters also export MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI: monkeypatch
    puts both back as they were, so no later client or config of this process reads them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    yield MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def model_dir(root: Path, files: int = 200, seed: int = 7) -> Path:
    """A model directory of `files` files in nested directories, some of them empty files."""
    rng = random.Random(seed)
    for index in range(files):
        depth = index % 4
        parts = [f"layer_{index % 7}", f"block_{index % 3}", "shards"][:depth]
        size = 0 if index % 25 == 0 else rng.randint(1, 96 * 1024)
        random_file(root.joinpath(*parts, f"part_{index:03d}.bin"), size)
    return root


def test_200_file_model_round_trip(
    registry, tracking, experiment_id, unique, tmp_path, mlflow_server
):
    source = model_dir(tmp_path / "model")
    # A symlink inside the directory is uploaded as the file it points to.
    os.symlink("layer_1/part_001.bin", source / "alias.bin")
    expected = tree_digests(source)
    assert len(expected) == 201
    progress: list[tuple[int, int]] = []

    version = registry.upload_model(
        f"policy-{unique}",
        source,
        experiment_id=experiment_id,
        description="ppo policy",
        tags={"algo": "ppo"},
        aliases=["champion", "candidate"],
        progress=lambda done, total: progress.append((done, total)),
    )

    assert version.name == f"policy-{unique}"
    assert version.version == 1
    assert version.description == "ppo policy"
    assert version.tags["algo"] == "ppo"
    assert sorted(version.aliases) == ["candidate", "champion"]
    assert version.source.startswith(f"runs:/{version.run_id}/models/")
    total = sum((source / rel).stat().st_size for rel in expected)
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    run = tracking.get_run(version.run_id)
    assert run.info.experiment_id == experiment_id
    assert run.info.status is RunStatus.FINISHED
    # Tagged in MLflow; the sidecar's own tags stay out of what it returns.
    assert "mlflow_sidecar.uploaded_model" not in run.tags
    in_mlflow = MlflowClient(tracking_uri=mlflow_server.url).get_run(version.run_id)
    assert in_mlflow.data.tags["mlflow_sidecar.uploaded_model"] == f"policy-{unique}"

    by_version = registry.download_model(f"policy-{unique}", tmp_path / "v1", version=1)
    by_alias = registry.download_model(f"policy-{unique}", tmp_path / "champ", alias="champion")
    assert by_version == tmp_path / "v1"
    assert tree_digests(by_version) == expected
    assert tree_digests(by_alias) == expected
    # Nothing but the model: no staging directories left in the destination.
    assert sorted(p.name for p in by_alias.iterdir() if p.name.startswith(".")) == []


def test_upload_into_an_existing_run_and_a_second_version(
    registry, tracking, experiment_id, unique, tmp_path
):
    run_id = tracking.start_run(experiment_id).run_id
    first = registry.upload_model(
        f"agent-{unique}", model_dir(tmp_path / "a", files=3), run_id=run_id, aliases=["prod"]
    )
    second = registry.upload_model(
        f"agent-{unique}",
        model_dir(tmp_path / "b", files=4, seed=9),
        run_id=run_id,
        aliases=["prod"],
    )
    assert (first.version, second.version) == (1, 2)
    assert first.run_id == second.run_id == run_id
    assert registry.get_model_version_by_alias(f"agent-{unique}", "prod").version == 2
    models = tracking.list_artifacts(run_id, "models")
    assert len(models.items) == 2 and all(f.is_dir for f in models.items)
    # The run the caller owns stays as it was.
    assert tracking.get_run(run_id).info.status is RunStatus.RUNNING
    fetched = registry.download_model(f"agent-{unique}", tmp_path / "prod", alias="prod")
    assert tree_digests(fetched) == tree_digests(tmp_path / "b")


def test_stock_mlflow_downloads_a_model_uploaded_through_the_sidecar(
    registry, experiment_id, unique, tmp_path, plain_mlflow, mlflow_server
):
    source = model_dir(tmp_path / "model", files=40)
    registry.upload_model(
        f"interop-{unique}", source, experiment_id=experiment_id, aliases=["champion"]
    )

    fetched = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/interop-{unique}@champion",
        dst_path=str(tmp_path / "stock"),
        tracking_uri=mlflow_server.url,
    )

    assert tree_digests(Path(fetched)) == tree_digests(source)


def test_saved_pyfunc_model_uploaded_through_the_sidecar_loads_in_stock_mlflow(
    registry, experiment_id, unique, tmp_path, plain_mlflow
):
    saved = tmp_path / "saved"
    mlflow.pyfunc.save_model(saved, python_model=Doubler(), pip_requirements=["mlflow"])

    registry.upload_model(f"saved-{unique}", saved, experiment_id=experiment_id, aliases=["prod"])

    loaded = mlflow.pyfunc.load_model(f"models:/saved-{unique}@prod")
    assert loaded.predict([1, 2, 3]) == [2, 4, 6]


def test_model_logged_by_stock_mlflow_downloads_through_the_sidecar(
    registry, unique, tmp_path, plain_mlflow, mlflow_server
):
    mlflow.set_experiment(f"stock-{unique}")
    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model",
            python_model=Doubler(),
            registered_model_name=f"stock-{unique}",
            pip_requirements=["mlflow"],
        )
    plain_mlflow.set_registered_model_alias(f"stock-{unique}", "champion", "1")
    stock = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/stock-{unique}@champion",
        dst_path=str(tmp_path / "stock"),
        tracking_uri=mlflow_server.url,
    )

    local = registry.download_model(f"stock-{unique}", tmp_path / "sidecar", alias="champion")

    expected = tree_digests(Path(stock), ignore=frozenset({REGISTERED_MODEL_META}))
    assert "MLmodel" in expected
    assert tree_digests(local) == expected
    loaded = mlflow.pyfunc.load_model(str(local))
    assert loaded.predict([5, 6]) == [10, 12]


def test_upload_model_refuses_a_symlink_leaving_the_directory(
    registry, experiment_id, unique, tmp_path
):
    source = model_dir(tmp_path / "model", files=2)
    secret = random_file(tmp_path / "elsewhere" / "secret.txt", 10)
    os.symlink(secret, source / "leak.txt")

    with pytest.raises(InvalidArgumentError) as err:
        registry.upload_model(f"leak-{unique}", source, experiment_id=experiment_id)

    assert err.value.field == "local_dir"
    with pytest.raises(NotFoundError):
        registry.get_registered_model(f"leak-{unique}")


def test_download_model_needs_exactly_one_selector(registry, unique, tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        registry.download_model(f"x-{unique}", tmp_path)
    assert err.value.field == "selector"
    with pytest.raises(InvalidArgumentError):
        registry.download_model(f"x-{unique}", tmp_path, version=1, alias="prod")


def test_download_model_of_an_unknown_alias_is_not_found(registry, experiment_id, unique, tmp_path):
    registry.upload_model(
        f"known-{unique}", model_dir(tmp_path / "m", files=1), experiment_id=experiment_id
    )
    with pytest.raises(NotFoundError):
        registry.download_model(f"known-{unique}", tmp_path / "out", alias="nobody")
    # Nothing made: no destination, and no sibling directory beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        # Named as the UploadModel request spells them (fields of its header).
        ({}, "header.run_id"),
        ({"run_id": "abc", "experiment_id": "1"}, "header.experiment_id"),
        ({"experiment_id": "1", "aliases": ["latest"]}, "header.aliases[0]"),
        ({"experiment_id": "1", "aliases": ["ok", "has space"]}, "header.aliases[1]"),
        ({"experiment_id": "01"}, "header.experiment_id"),
        # Not a number: MLflow's refusal, named as the request spells the field too.
        ({"experiment_id": "0x1"}, "header.experiment_id"),
    ],
)
def test_upload_model_header_is_checked_before_any_file(registry, unique, tmp_path, kwargs, field):
    with pytest.raises(InvalidArgumentError) as err:
        registry.upload_model(f"bad-{unique}", model_dir(tmp_path / "m", files=2), **kwargs)
    assert err.value.field == field
    with pytest.raises(NotFoundError):
        registry.get_registered_model(f"bad-{unique}")


def test_upload_model_to_an_unknown_run_is_not_found(registry, unique, tmp_path):
    with pytest.raises(NotFoundError):
        registry.upload_model(
            f"orphan-{unique}", model_dir(tmp_path / "m", files=2), run_id="f" * 32
        )
    with pytest.raises(NotFoundError):
        registry.get_registered_model(f"orphan-{unique}")


def test_a_version_whose_source_holds_nothing_is_not_found_and_the_copy_stays(
    registry, tracking, experiment_id, unique, tmp_path
):
    run = tracking.start_run(experiment_id)
    name = f"hollow-{unique}"
    model = tmp_path / "model"
    (model / "data").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "data" / "w.bin").write_bytes(os.urandom(4096))
    registry.upload_model(name, model, run_id=run.info.run_id, aliases=["champion"])
    served = registry.download_model(name, tmp_path / "served", alias="champion")
    before = tree_digests(served)
    # A mistaken registration: a runs:/ source under which nothing was ever logged.
    registry.create_registered_model(name, get_if_exists=True)
    hollow = registry.create_model_version(name, source=f"runs:/{run.info.run_id}/nothing")
    registry.set_model_alias(name, "champion", hollow.version)
    with pytest.raises(NotFoundError) as err:
        registry.sync_model(name, served, alias="champion")
    assert err.value.reason == "ARTIFACT_NOT_FOUND"
    assert "nothing is stored at its source" in err.value.message
    assert tree_digests(served) == before


def test_a_file_the_artifact_proxy_refuses_is_its_refusal_not_an_internal_error(
    registry, mlflow_server, experiment_id, unique, tmp_path
):
    version = registry.upload_model(
        f"proxied-{unique}", model_dir(tmp_path / "m", files=2), experiment_id=experiment_id
    )
    run_id, _, path = version.source.removeprefix("runs:/").partition("/")
    run_artifacts = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).info.artifact_uri
    stored = Path(mlflow_server.artifacts) / run_artifacts.removeprefix("mlflow-artifacts:/") / path
    outside = tmp_path / "outside"
    outside.write_text("not for the sidecar")
    # Put there by someone with access to the proxy's disk: the proxy refuses to serve it.
    (stored / "stray").symlink_to(outside)
    with pytest.raises(InvalidArgumentError) as err:
        registry.download_model(f"proxied-{unique}", tmp_path / "out", version=version.version)
    assert "400" in err.value.message or "refused" in err.value.message
    assert not (tmp_path / "out").exists()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write_model(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


@pytest.mark.parametrize("odd", ["@bar", "?x", "@b@c", "@"])
def test_a_name_that_reads_as_uri_syntax_downloads_its_own_files(
    registry, experiment_id, unique, tmp_path, odd
):
    # A models:/NAME/1 URI would read '@bar' as an alias of another model and '1' as a
    # folder of its files, '?x' as a query, a trailing '@' as a malformed URI.
    other = f"other-{unique}"
    registry.upload_model(
        other,
        write_model(tmp_path / "other", {"1/secret.txt": b"the other model's"}),
        experiment_id=experiment_id,
        aliases=["bar"],
    )
    name = f"{other}{odd}"
    own = {"mine.txt": b"this model's own"}
    registry.upload_model(name, write_model(tmp_path / "own", own), experiment_id=experiment_id)
    synced = registry.sync_model(name, tmp_path / "out", version=1)
    assert synced.model_version.name == name
    assert files_of(tmp_path / "out") == own
    # Served again from the cache: the same files, never the other model's.
    registry.download_model(name, tmp_path / "again", version=1)
    assert files_of(tmp_path / "again") == own


def test_a_models_source_naming_no_version_is_not_found(registry, unique):
    name = f"empty-{unique}"
    registry.create_registered_model(name)
    for source in (f"models:/{name}/latest", f"models:/{name}/Production"):
        with pytest.raises(NotFoundError) as err:
            registry.create_model_version(name, source=source)
        assert err.value.reason == "MODEL_VERSION_NOT_FOUND"

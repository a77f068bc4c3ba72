"""An answer that must go out whatever its size leaves its entity's bulk out, part after
part, until it fits, and says which parts."""

from mlflow_sidecar.server.answer_bulk import leave_out_bulk
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb


def _version() -> reg_pb.ModelVersion:
    return reg_pb.ModelVersion(
        name="m",
        version=3,
        source="runs:/r/model",
        description="d" * 3000,
        tags={"notes": "t" * 5000},
        aliases=["a" * 2000],
    )


def test_only_as_many_parts_go_as_the_limit_needs_in_order():
    answer = reg_pb.UpdateModelVersionResponse(model_version=_version())
    whole = answer.ByteSize()
    assert leave_out_bulk(answer, whole) == []
    assert leave_out_bulk(answer, whole - 1) == ["model_version.tags"]
    assert answer.model_version.aliases and answer.model_version.description
    assert leave_out_bulk(answer, 3500) == ["model_version.aliases"]
    assert leave_out_bulk(answer, 100) == ["model_version.description"]
    kept = answer.model_version
    assert (kept.name, kept.version, kept.source) == ("m", 3, "runs:/r/model")


def test_parts_that_are_empty_are_not_named():
    run = pb.Run(
        info=pb.RunInfo(run_id="r1"),
        outputs=pb.RunOutputs(models=[pb.ModelOutput(model_id="x" * 4000)]),
    )
    answer = pb.StartRunResponse(run=run)
    assert leave_out_bulk(answer, 200) == ["run.outputs"]
    assert answer.run.info.run_id == "r1" and not answer.run.HasField("outputs")


def test_an_answer_that_cannot_fit_keeps_the_entity_identity():
    model = reg_pb.RegisteredModel(name="n" * 500, tags={"k": "v" * 900}, aliases=[])
    answer = reg_pb.RenameRegisteredModelResponse(registered_model=model)
    assert leave_out_bulk(answer, 10) == ["registered_model.tags"]
    assert answer.registered_model.name == "n" * 500 and answer.ByteSize() > 10


def test_entities_in_lists_are_left_alone():
    answer = pb.SearchRunsResponse(runs=[pb.Run(data=pb.RunData(tags={"k": "v"}))])
    assert leave_out_bulk(answer, 1) == []
    assert answer.runs[0].data.tags == {"k": "v"}

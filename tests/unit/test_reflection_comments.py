"""Reflection serves the sidecar's files with their comments, taken from the descriptor set
generated beside the stubs, and only where that set describes the stubs loaded."""

from __future__ import annotations

import logging

from google.protobuf import descriptor_pb2

from mlflow_sidecar.server.reflection import commented_files, descriptor_set
from mlflow_sidecar.v1 import registry_pb2, tracking_pb2

OURS = {tracking_pb2.DESCRIPTOR.name, registry_pb2.DESCRIPTOR.name}


def served(name: str) -> bytes:
    proto = descriptor_pb2.FileDescriptorProto()
    (tracking_pb2 if name == tracking_pb2.DESCRIPTOR.name else registry_pb2).DESCRIPTOR.CopyToProto(
        proto
    )
    return proto.SerializeToString()


def test_the_generated_set_holds_every_file_with_its_comments():
    described = descriptor_set()
    assert {file.name for file in described.file} == OURS
    commented = commented_files(described)
    assert len(commented) == len(OURS)
    for name in OURS:
        with_comments = descriptor_pb2.FileDescriptorProto.FromString(commented[served(name)])
        assert with_comments.name == name
        assert any(
            "UNSPECIFIED means FINISHED" in location.leading_comments
            for location in with_comments.source_code_info.location
        ) == (name == tracking_pb2.DESCRIPTOR.name)
        assert with_comments.source_code_info.location


def test_a_file_that_no_longer_matches_the_stubs_is_served_bare(caplog):
    described = descriptor_set()
    stale = next(file for file in described.file if file.name == tracking_pb2.DESCRIPTOR.name)
    stale.message_type[0].field[0].name = "renamed_since"
    with caplog.at_level(logging.WARNING):
        commented = commented_files(described)
    assert served(tracking_pb2.DESCRIPTOR.name) not in commented
    assert served(registry_pb2.DESCRIPTOR.name) in commented
    assert "does not match the stubs" in caplog.text


def test_a_file_the_process_has_not_loaded_is_left_out():
    described = descriptor_pb2.FileDescriptorSet()
    described.file.add(name="elsewhere/unknown.proto", package="elsewhere")
    assert commented_files(described) == {}


def test_a_package_without_a_descriptor_set_gives_none(caplog):
    with caplog.at_level(logging.WARNING):
        assert list(descriptor_set("mlflow_sidecar.server").file) == []
    assert "without comments" in caplog.text

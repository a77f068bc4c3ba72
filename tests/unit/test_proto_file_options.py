"""Every contract file carries the options other languages' code generators expect, with
one value for the package (buf lint's PACKAGE_SAME_* rules check agreement; this checks
that none is missing). Their values are frozen by the first release (buf breaking)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROTOS = sorted((Path(__file__).resolve().parents[2] / "protos").rglob("*.proto"))
OPTION = re.compile(r'^option (\w+) = ("(?:[^"\\]|\\.)*"|\w+);$', re.MULTILINE)
PACKAGE_WIDE = {
    "csharp_namespace": '"MlflowSidecar.V1"',
    "go_package": '"mlflow_sidecar/v1;mlflowsidecarv1"',
    "java_multiple_files": "true",
    "java_package": '"com.mlflow_sidecar.v1"',
    "objc_class_prefix": '"MXX"',
    "php_namespace": '"MlflowSidecar\\\\V1"',
    "ruby_package": '"MlflowSidecar::V1"',
}


def _options(proto: Path) -> dict[str, str]:
    return dict(OPTION.findall(proto.read_text()))


def test_there_are_contracts() -> None:
    assert [p.name for p in PROTOS] == ["registry.proto", "tracking.proto"]


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_file_sets_the_generator_options(proto: Path) -> None:
    options = _options(proto)
    assert {k: options.get(k) for k in PACKAGE_WIDE} == PACKAGE_WIDE
    # Java: one outer class per file, named after it, so two files never collide.
    outer = "".join(part.title() for part in proto.stem.split("_")) + "Proto"
    assert options.get("java_outer_classname") == f'"{outer}"'

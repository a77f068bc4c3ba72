"""GRPC_VERBOSITY follows log_format and log_level; text logs honour one the user set."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.grpc_core_logs import GRPC_VERBOSITY, grpc_verbosity, set_grpc_verbosity


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_json_logs_silence_the_core_even_against_the_environment(level):
    assert grpc_verbosity(level, "json", {}) == "NONE"
    assert grpc_verbosity(level, "json", {GRPC_VERBOSITY: "DEBUG"}) == "NONE"


@pytest.mark.parametrize(
    ("level", "verbosity"),
    [("DEBUG", "DEBUG"), ("INFO", None), ("WARNING", "ERROR"), ("ERROR", "ERROR")],
)
def test_text_logs_map_the_level_unless_the_user_chose(level, verbosity):
    assert grpc_verbosity(level, "text", {}) == verbosity
    assert grpc_verbosity(level, "text", {GRPC_VERBOSITY: "INFO"}) == "INFO"


def test_setting_it_after_grpc_is_imported_is_reported_as_too_late():
    import grpc  # noqa: F401 - imported to be already there, as in an embedding process

    environ: dict[str, str] = {}
    assert set_grpc_verbosity("ERROR", "json", environ) is False
    assert environ == {GRPC_VERBOSITY: "NONE"}

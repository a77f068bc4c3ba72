"""The path rules of artifacts and model files, and the file tree of one model upload."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.paths import FileTree, check_relative_path, check_stored_path, is_sha256

UNSAFE = {
    "absolute": "/etc/passwd",
    "parent": "../outside.bin",
    "parent inside": "models/../../outside.bin",
    "parent at end": "models/..",
    "dot segment": "./model.bin",
    "empty segment": "models//model.bin",
    "trailing slash": "models/",
    "backslash": "models\\model.bin",
    "windows parent": "..\\outside.bin",
    "nul": "model\x00.bin",
    "newline": "model\n.bin",
    "c1 control": "model\x85.bin",
    "too long": "a/" * 512 + "b",
    "segment too long": "d/" + "x" * 256,
    "multibyte over 1024 bytes": "é" * 513,
}


@pytest.mark.parametrize("path", UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_paths_are_refused_with_the_field_named(path):
    with pytest.raises(InvalidArgumentError) as err:
        check_relative_path("header.artifact_path", path)
    assert err.value.field == "header.artifact_path"
    assert err.value.message.startswith("header.artifact_path: ")
    # The message never carries a raw NUL back to the caller.
    assert "\x00" not in err.value.message


def test_empty_path_is_refused_unless_allowed():
    with pytest.raises(InvalidArgumentError):
        check_relative_path("artifact_path", "")
    assert check_relative_path("path", "", allow_empty=True) == ""


@pytest.mark.parametrize(
    "path",
    [
        "model.bin",
        "checkpoints/step_100/weights.pt",
        "with space/ünïcode ✓.bin",
        ".hidden/file",
        "a..b/c...d",
        "x" * 255,
        "/".join(["y" * 254] * 4),  # 1019 bytes, every segment within 255
    ],
)
def test_safe_paths_pass_unchanged(path):
    assert check_relative_path("p", path) == path


URL_SYNTAX = {
    "escaped slash": "a%2Fb.bin",
    "escaped letter": "p%41q.bin",
    "bare percent": "100%.bin",
    "query": "model.pt?v=2",
    "fragment": "model#1.pt",
}


@pytest.mark.parametrize("path", URL_SYNTAX.values(), ids=URL_SYNTAX.keys())
def test_stored_paths_refuse_what_a_url_would_change(path):
    # Readable under these names (files MLflow got from elsewhere), never stored under them.
    assert check_relative_path("artifact_path", path) == path
    with pytest.raises(InvalidArgumentError, match="another name") as err:
        check_stored_path("artifact_path", path)
    assert err.value.field == "artifact_path"
    tree = FileTree(stored=True)
    with pytest.raises(InvalidArgumentError):
        tree.add("files[0].path", f"dir/{path}")
    assert FileTree().add("files[0].path", f"dir/{path}") == f"dir/{path}"


LISTED_AS_ANOTHER = {
    "blank name": " ",
    "blank directory": "dir/ /w.bin",
    "leading space": " lead.txt",
    "scheme-like prefix below a directory": "dir/Config:v1.txt",
    "scheme-like prefix": "Config:v1.txt",
    "drive": "C:/x.bin",
    "lower-case drive": "c:/x.bin",
}


@pytest.mark.parametrize("path", LISTED_AS_ANOTHER.values(), ids=LISTED_AS_ANOTHER.keys())
def test_stored_paths_refuse_names_mlflow_lists_as_others(path):
    # MLflow's client parses every listed name as a URL: stored under these, a file is
    # listed under another name and cannot be read back, alone or as part of a model.
    assert check_relative_path("artifact_path", path) == path
    with pytest.raises(InvalidArgumentError) as err:
        check_stored_path("artifact_path", path)
    assert err.value.field == "artifact_path"
    with pytest.raises(InvalidArgumentError):
        FileTree(stored=True).add("files[0].path", path)


MLFLOW_IN_PROGRESS = {
    "in-progress file name": "ckpt/.artifact.uploading.w.bin",
    "in-progress directory name": ".artifact.uploading.d/w.bin",
}


@pytest.mark.parametrize("path", MLFLOW_IN_PROGRESS.values(), ids=MLFLOW_IN_PROGRESS.keys())
def test_stored_paths_refuse_names_mlflow_keeps_for_files_in_progress(path):
    # MLflow's server refuses such a file name after making its directory, and lists no
    # such name, so a directory of that name would hold files nobody sees.
    assert check_relative_path("artifact_path", path) == path
    with pytest.raises(InvalidArgumentError, match="reserves") as err:
        check_stored_path("artifact_path", path)
    assert err.value.field == "artifact_path"
    with pytest.raises(InvalidArgumentError):
        FileTree(stored=True).add("files[0].path", path)
    assert check_stored_path("artifact_path", "ckpt/artifact.uploading.w.bin")


def test_stored_paths_take_what_any_store_keeps():
    for path in (
        "with space/ünïcode ✓.bin",
        "a+b=c;d,e@f!.pt",
        "x" * 255,
        "step:100/w.bin",
        "dir/config:v1.txt",
        "dir/trailing space ",
    ):
        assert check_stored_path("artifact_path", path) == path


def test_file_tree_refuses_duplicates_and_file_directory_clashes():
    tree = FileTree()
    tree.add("files[0].path", "a/b.bin")
    tree.add("files[1].path", "a/c.bin")
    with pytest.raises(InvalidArgumentError, match="twice") as err:
        tree.add("files[2].path", "a/b.bin")
    assert err.value.field == "files[2].path"
    with pytest.raises(InvalidArgumentError, match="also a directory"):
        tree.add("files[2].path", "a")
    with pytest.raises(InvalidArgumentError, match="it is a file"):
        tree.add("files[2].path", "a/b.bin/c.bin")
    with pytest.raises(InvalidArgumentError):
        tree.add("files[2].path", "a/../x")
    assert len(tree) == 2


def test_sha256_shape():
    assert is_sha256("0" * 64)
    assert not is_sha256("0" * 63)
    assert not is_sha256("G" * 64)
    assert not is_sha256("A" * 64)  # callers lower-case first

"""`replace_directory`: a complete directory put in place of another, the destination
naming a whole copy after every step, with and without Linux's atomic exchange."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from mlflow_sidecar.client import directory_swap

OLD = {"MLmodel": b"flavors: {}\n", "data/weights.bin": bytes(range(256)) * 40, "empty": b""}
NEW = {"MLmodel": b"flavors: {}\n", "weights/new.bin": b"\x01" * 5000}


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def populated(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_linux_has_the_atomic_exchange():
    assert directory_swap._renameat2() is not None, "Linux with glibc 2.28+ has renameat2"


def test_the_destination_names_a_whole_model_after_every_step_of_the_swap(tmp_path, monkeypatch):
    new, destination = populated(tmp_path / "new", NEW), populated(tmp_path / "dst", OLD)
    seen: list[dict[str, bytes]] = []

    def watched(source: Path, target: Path) -> None:
        try:
            os.rename(source, target)
        finally:
            seen.append(files_under(destination) if destination.is_dir() else {})

    monkeypatch.setattr(directory_swap, "_rename", watched)
    directory_swap.replace_directory(new, destination)
    assert files_under(destination) == NEW
    assert all(s in (OLD, NEW) for s in seen), seen
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_without_an_atomic_exchange_the_old_copy_goes_aside_first(tmp_path):
    new, destination = populated(tmp_path / "new", NEW), populated(tmp_path / "dst", OLD)
    directory_swap.replace_directory(new, destination, atomic=False)
    assert files_under(destination) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_an_unsupported_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    def unsupported(*args: object) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(directory_swap, "_renameat2", lambda: unsupported)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y").write_bytes(b"b")
    assert directory_swap.exchange(tmp_path / "a", tmp_path / "b") is False
    directory_swap.replace_directory(tmp_path / "a", tmp_path / "b")
    assert files_under(tmp_path) == {"b/x": b"a"}

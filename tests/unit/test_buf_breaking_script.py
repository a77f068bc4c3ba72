"""scripts/buf-breaking.sh compares the contracts with the last release tag (`v*`), or with
the previous commit before the first release; real git and the project's pinned buf."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
# A field every release has had: removing it breaks wire and generated code.
FIELD = "  string run_name = 2;\n"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def _commit(repo: Path, message: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", message)


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/buf-breaking.sh"], cwd=repo, capture_output=True, text=True, check=False
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository holding the contracts and the script, its first commit as it is now."""
    assert BUF.exists(), "run `make node_modules/.bin/buf` first"
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copytree(ROOT / "protos", work / "protos")
    shutil.copy(ROOT / "buf.yaml", work / "buf.yaml")
    shutil.copy(ROOT / "scripts" / "buf-breaking.sh", work / "scripts" / "buf-breaking.sh")
    (work / "node_modules").symlink_to(ROOT / "node_modules")
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / ".gitignore").write_text("node_modules\n.venv\n")
    _git(work, "init", "-q")
    _commit(work, "contracts")
    return work


def _remove_field(repo: Path) -> None:
    proto = repo / "protos" / "mlflow_sidecar" / "v1" / "tracking.proto"
    text = proto.read_text()
    assert FIELD in text
    proto.write_text(text.replace(FIELD, "", 1))


def _change_java_package(repo: Path) -> None:
    for proto in (repo / "protos" / "mlflow_sidecar" / "v1").glob("*.proto"):
        text = proto.read_text()
        assert 'option java_package = "' in text
        proto.write_text(text.replace('option java_package = "', 'option java_package = "org.', 1))


def _touch_readme(repo: Path) -> None:
    (repo / "README.md").write_text("later work\n")


def test_a_break_since_the_release_tag_fails_even_commits_later(repo: Path) -> None:
    _git(repo, "tag", "-a", "v0.1.0", "-m", "release 0.1.0")
    _remove_field(repo)
    _commit(repo, "break")
    _touch_readme(repo)
    _commit(repo, "later")
    result = _check(repo)
    assert result.returncode != 0, result.stdout
    assert "run_name" in result.stdout + result.stderr


def test_a_fresh_clone_sees_the_release_tag(repo: Path, tmp_path: Path) -> None:
    _git(repo, "tag", "-a", "v0.1.0", "-m", "release 0.1.0")
    _touch_readme(repo)
    _commit(repo, "later")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    (clone / "node_modules").symlink_to(ROOT / "node_modules")
    (clone / ".venv").symlink_to(ROOT / ".venv")
    result = _check(clone)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against the last release v0.1.0" in result.stdout


def test_without_a_tag_the_previous_commit_is_the_baseline(repo: Path) -> None:
    _touch_readme(repo)
    _commit(repo, "later")
    assert "HEAD~1 (no release tag yet)" in _check(repo).stdout
    _remove_field(repo)
    _commit(repo, "break")
    result = _check(repo)
    assert result.returncode != 0, result.stdout
    assert "run_name" in result.stdout + result.stderr


def test_generated_code_options_are_frozen_by_the_first_release(repo: Path) -> None:
    _change_java_package(repo)
    _commit(repo, "options may still move before the first release")
    before = _check(repo)
    assert before.returncode == 0, before.stdout + before.stderr
    _git(repo, "tag", "-a", "v0.1.0", "-m", "release 0.1.0")
    _change_java_package(repo)
    _commit(repo, "options moved after the release")
    after = _check(repo)
    assert after.returncode != 0, after.stdout
    assert "java_package" in after.stdout + after.stderr

"""What a cache entry holds: its key, every file's path, size and sha256, and the digest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlflow_sidecar.core.errors import FailedPreconditionError, InvalidArgumentError
from mlflow_sidecar.core.model_digest import model_digest
from mlflow_sidecar.core.transfer import collect_files, file_digest

_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One version's content: a model deleted and created again reuses version numbers,
    so the version's creation time tells the new one's files from the old one's. `scope`
    names the registry and the artifact storage policy the files were fetched and checked
    under: another registry, or a narrower policy, never gets them."""

    name: str
    version: int
    creation_time_ms: int
    scope: str = ""

    def slug(self) -> str:
        """A file name for the key (names may hold any character)."""
        text = f"{self.scope}\0{self.name}\0{self.version}\0{self.creation_time_ms}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a model: its relative POSIX path, size and lowercase hex sha256."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of one version, in path order, and their digest (`ModelManifest.digest`)."""

    key: CacheKey
    files: tuple[ManifestFile, ...]
    digest: str

    @property
    def size_bytes(self) -> int:
        """The bytes of all files together."""
        return sum(f.size_bytes for f in self.files)

    @classmethod
    def describe(cls, key: CacheKey, root: Path, chunk_bytes: int) -> Manifest:
        """The manifest of the model directory `root` (the files of version `key`), every
        file hashed. FailedPreconditionError, naming the file, for a file that no path of
        a download could carry: the version was made elsewhere, and nothing of the request
        is at fault."""
        try:
            found = collect_files(root)
        except InvalidArgumentError as exc:
            raise FailedPreconditionError(
                f"{key.name} version {key.version} holds a stored file the sidecar cannot"
                f" send: {exc.problem}"
            ) from None
        files = []
        for local in found:
            size, sha256 = file_digest(local.path, chunk_bytes)
            files.append(ManifestFile(local.relpath, size, sha256))
        return cls(key, tuple(files), model_digest((f.path, f.sha256) for f in files))

    def to_json(self) -> bytes:
        """The manifest as the cache stores it."""
        return json.dumps(
            {
                "format": _FORMAT,
                "name": self.key.name,
                "version": self.key.version,
                "creation_time_ms": self.key.creation_time_ms,
                "scope": self.key.scope,
                "digest": self.digest,
                "files": [[f.path, f.size_bytes, f.sha256] for f in self.files],
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """A stored manifest; ValueError when it is not one (damaged, or another format)."""
        try:
            raw = json.loads(data)
            if raw["format"] != _FORMAT:
                raise ValueError(f"manifest format {raw['format']!r}")
            key = CacheKey(
                str(raw["name"]),
                int(raw["version"]),
                int(raw["creation_time_ms"]),
                str(raw["scope"]),
            )
            files = tuple(ManifestFile(str(p), int(s), str(h)) for p, s, h in raw["files"])
            manifest = cls(key, files, str(raw["digest"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a cache manifest: {exc}") from exc
        if manifest.digest != model_digest((f.path, f.sha256) for f in files):
            raise ValueError("the manifest's digest does not match its files")
        return manifest

"""What an artifact is: a canonical manifest whose sha256 is the artifact's identity.

The manifest lists every file's relative path, sha256 and size, plus the artifact's
`kind` and `meta`; the whole canonical JSON (sorted keys, no spaces, UTF-8) is hashed,
so identical content with a different kind or meta is a different artifact. Nothing
time-dependent goes in, so putting the same directory twice yields the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from prunelab.errors import IntegrityError, InvalidArgument

SCHEME = "artifact://"
MANIFEST_FORMAT = "prunelab-artifact/1"
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRef:
    """A published artifact as callers see it."""

    digest: str  # 64 hex: sha256 of the canonical manifest
    uri: str  # artifact://<digest>
    kind: str
    size: int  # total bytes of all files
    files: int  # number of files
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ref:
    """A mutable named pointer to an artifact (e.g. `datasets/wikitext2`)."""

    name: str
    uri: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return parse_artifact_uri(self.uri)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative POSIX path inside the artifact
    sha256: str
    size: int


def parse_artifact_uri(value: str) -> str:
    """The digest in `artifact://<64 hex>` or in a bare 64-hex digest."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument("artifact URI is empty", field="uri")
    digest = value[len(SCHEME):] if value.startswith(SCHEME) else value
    if "://" in digest:
        raise InvalidArgument(f"{value!r} is not an artifact URI (expected artifact://<64 hex digits>)", field="uri")
    if not DIGEST_PATTERN.fullmatch(digest):
        raise InvalidArgument(
            f"{value!r} is not an artifact digest: expected 64 lowercase hex digits, got {len(digest)} characters",
            field="uri",
        )
    return digest


def artifact_uri(digest: str) -> str:
    return SCHEME + digest


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise InvalidArgument(
            f"artifact kind {kind!r} must be lowercase letters, digits, '.', '_' or '-', starting with a letter",
            field="kind",
        )
    return kind


def safe_relative_path(path: str) -> PurePosixPath:
    """`path` as a relative path that cannot leave the artifact directory."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise IntegrityError(f"unsafe file path {path!r} in manifest (absolute, empty or with '..')", field="path")
    return pure


@dataclass(frozen=True)
class Manifest:
    kind: str
    meta: dict[str, Any]
    files: tuple[FileEntry, ...]  # sorted by path

    def canonical_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "meta": self.meta,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def ref(self) -> ArtifactRef:
        digest = self.digest
        return ArtifactRef(
            digest=digest,
            uri=artifact_uri(digest),
            kind=self.kind,
            size=sum(f.size for f in self.files),
            files=len(self.files),
            meta=self.meta,
        )

    @classmethod
    def build(cls, kind: str, meta: dict[str, Any] | None, sources: dict[str, Path]) -> Manifest:
        """Hash each source file; `sources` maps relative path -> file on disk."""
        meta = dict(meta or {})
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"meta must be plain JSON (strings, numbers, lists, dicts): {err}", field="meta") from None
        entries = tuple(
            FileEntry(rel, sha256_file(src), src.stat().st_size) for rel, src in sorted(sources.items())
        )
        return cls(check_kind(kind), meta, entries)

    @classmethod
    def parse(cls, data: bytes, digest: str) -> Manifest:
        """The manifest stored for `digest`, checked against it and for safe paths."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise IntegrityError(f"manifest of artifact {digest} hashes to {actual}", field="manifest")
        try:
            doc = json.loads(data)
            files = tuple(FileEntry(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in doc["files"])
            manifest = cls(str(doc["kind"]), dict(doc["meta"]), files)
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"manifest of artifact {digest} is malformed: {err!r}", field="manifest") from None
        for entry in files:
            safe_relative_path(entry.path)
        return manifest


def collect_files(path: Path) -> dict[str, Path]:
    """Every regular file below directory `path`, keyed by its relative POSIX path."""
    if not path.is_dir():
        raise InvalidArgument(f"{path} is not a directory", field="path")
    sources = {
        Path(root, name).relative_to(path).as_posix(): Path(root, name)
        for root, _dirs, names in os.walk(path)
        for name in names
        if Path(root, name).is_file()
    }
    if not sources:
        raise InvalidArgument(f"{path} holds no files to store", field="path")
    return sources


def check_file(digest: str, entry: FileEntry, sha256: str, size: int) -> None:
    """Raise IntegrityError naming the file unless its bytes match the manifest."""
    if size != entry.size:
        raise IntegrityError(
            f"artifact {digest}: file {entry.path!r} is {size} bytes, the manifest says {entry.size}", field="path"
        )
    if sha256 != entry.sha256:
        raise IntegrityError(
            f"artifact {digest}: file {entry.path!r} has sha256 {sha256}, the manifest says {entry.sha256}",
            field="path",
        )

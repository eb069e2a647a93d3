"""The artifact store contract, written once over a tiny object layer.

Layout, identical in both backends (keys relative to the store root):

    artifacts/<digest>/files/<relative path>   the artifact's files
    artifacts/<digest>/manifest.json           written last: the artifact exists iff this does
    refs/<name>.json                           mutable pointers {"name", "uri", "meta"}

Publishing uploads every file first and the manifest last, so a reader never sees a
partial artifact; an interrupted upload leaves orphan files under a digest with no
manifest, invisible to readers and simply overwritten by the next attempt. A digest
whose manifest exists is never written again, except that putting the same files
again repairs any of its files the store lost or truncated (checked by size).
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunelab.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from prunelab.store.manifest import (
    DIGEST_PATTERN,
    ArtifactRef,
    Manifest,
    Ref,
    artifact_uri,
    collect_files,
    parse_artifact_uri,
)

log = logging.getLogger(__name__)

_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
ARTIFACTS = "artifacts"
REFS = "refs"


def manifest_key(digest: str) -> str:
    return f"{ARTIFACTS}/{digest}/manifest.json"


def file_key(digest: str, relative_path: str) -> str:
    return f"{ARTIFACTS}/{digest}/files/{relative_path}"


def ref_key(name: str) -> str:
    return f"{REFS}/{name}.json"


def check_ref_name(name: str) -> str:
    if not isinstance(name, str) or not _REF_NAME.fullmatch(name) or len(name) > 200:
        raise InvalidArgument(
            f"ref name {name!r} must be '/'-separated segments of letters, digits, '.', '_' or '-' "
            "(each starting with a letter or digit)",
            field="name",
        )
    return name


def _file_signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ArtifactStore(ABC):
    """Content-addressed, immutable, verified artifacts plus small named pointers.

    Backends implement the `_`-prefixed object layer and `_materialize`; everything
    about identity, atomic publication and verification lives here.
    """

    location: str  # where the store is, for messages

    # ---- object layer (keys are '/'-separated, relative to the store root) ----

    @abstractmethod
    def _put_object(self, key: str, source: Path) -> None:
        """Store the bytes of file `source` at `key`, replacing any object there."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` at `key` atomically (readers see old or new, never half)."""

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes:
        """The object at `key`; NotFound if absent."""

    @abstractmethod
    def _has_object(self, key: str) -> bool: ...

    @abstractmethod
    def _object_size(self, key: str) -> int | None:
        """The size of the object at `key`; None if absent."""

    @abstractmethod
    def _list_keys(self, prefix: str) -> Iterator[str]:
        """Every key that starts with `prefix` (a '/'-terminated folder or a name prefix)."""

    @abstractmethod
    def _artifact_digests(self) -> Iterator[str]:
        """Digests that have a folder under artifacts/ (published or orphaned)."""

    @abstractmethod
    def _materialize(self, manifest: Manifest, digest: str) -> Path:
        """A local directory holding exactly the manifest's files, each verified."""

    # ---- artifacts ----

    def put_dir(self, path: Path, kind: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Publish every file below directory `path` as one artifact."""
        return self._publish(kind, meta, collect_files(Path(path)))

    def put_file(self, path: Path, kind: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Publish one file as an artifact whose directory holds just that file."""
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a file", field="path")
        return self._publish(kind, meta, {path.name: path})

    def get_dir(self, uri_or_digest: str) -> Path:
        """A verified local directory with the artifact's files. Treat it as read-only:
        it may be the store's own copy (local backend) or the shared cache (S3)."""
        digest = parse_artifact_uri(uri_or_digest)
        return self._materialize(self._manifest(digest), digest)

    def get_file(self, uri_or_digest: str) -> Path:
        """The single file of a one-file artifact (as made by `put_file`), verified."""
        digest = parse_artifact_uri(uri_or_digest)
        manifest = self._manifest(digest)
        if len(manifest.files) != 1:
            raise InvalidArgument(f"artifact {digest} holds {len(manifest.files)} files, not one", field="uri")
        return self._materialize(manifest, digest) / manifest.files[0].path

    def stat(self, uri: str) -> ArtifactRef:
        digest = parse_artifact_uri(uri)
        return self._manifest(digest).ref()

    def exists(self, uri: str) -> bool:
        return self._has_object(manifest_key(parse_artifact_uri(uri)))

    def list(self, kind: str | None = None) -> list[ArtifactRef]:
        """Published artifacts, by digest. Orphans of interrupted uploads are skipped
        silently, artifacts with a corrupted manifest with a warning."""
        refs = []
        for digest in sorted(filter(DIGEST_PATTERN.fullmatch, self._artifact_digests())):
            try:
                ref = self._manifest(digest).ref()
            except NotFound:
                continue
            except IntegrityError as err:
                log.warning("skipping artifact %s in %s: %s", digest, self.location, err.reason)
                continue
            if kind is None or ref.kind == kind:
                refs.append(ref)
        return refs

    # ---- refs ----

    def set_ref(self, name: str, uri: str, meta: dict[str, Any] | None = None) -> Ref:
        """Point `name` at an existing artifact (replacing any previous target)."""
        check_ref_name(name)
        digest = parse_artifact_uri(uri)
        if not self.exists(digest):
            raise NotFound(f"cannot point ref {name!r} at {artifact_uri(digest)}: no such artifact", field="uri")
        ref = Ref(name, artifact_uri(digest), dict(meta or {}))
        try:
            data = json.dumps({"name": ref.name, "uri": ref.uri, "meta": ref.meta}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"ref meta must be plain JSON: {err}", field="meta") from None
        self._put_bytes(ref_key(name), data.encode())
        return ref

    def get_ref(self, name: str) -> Ref:
        check_ref_name(name)
        try:
            data = self._get_bytes(ref_key(name))
        except NotFound:
            raise NotFound(f"no ref named {name!r} in store {self.location}", field="name") from None
        return self._parse_ref(name, data)

    def list_refs(self, prefix: str = "") -> list[Ref]:
        """Refs whose name starts with `prefix` (e.g. "datasets/"), sorted by name."""
        keys = self._list_keys(f"{REFS}/{prefix}")
        names = sorted(key[len(REFS) + 1 : -len(".json")] for key in keys if key.endswith(".json"))
        return [self.get_ref(name) for name in names if _REF_NAME.fullmatch(name)]

    # ---- internals ----

    def _manifest(self, digest: str) -> Manifest:
        try:
            data = self._get_bytes(manifest_key(digest))
        except NotFound:
            raise NotFound(f"artifact {artifact_uri(digest)} not found in store {self.location}", field="uri") from None
        return Manifest.parse(data, digest)

    def _publish(self, kind: str, meta: dict[str, Any] | None, sources: dict[str, Path]) -> ArtifactRef:
        signatures = {rel: _file_signature(src) for rel, src in sources.items()}
        manifest = Manifest.build(kind, meta, sources)
        ref = manifest.ref()
        published = self._has_object(manifest_key(ref.digest))
        # Over a published manifest only what is missing or the wrong size is put again
        # (a file lost or truncated on the store is repaired by the next identical put).
        to_put = [e for e in manifest.files if self._object_size(file_key(ref.digest, e.path)) != e.size] if published else manifest.files
        if published and not to_put:
            log.debug("artifact %s already stored and whole; not uploading again", ref.uri)
            return ref
        if published:
            log.warning("artifact %s was stored with %d file(s) missing or damaged; repairing them", ref.uri, len(to_put))
        try:
            for entry in to_put:
                self._put_object(file_key(ref.digest, entry.path), sources[entry.path])
            changed = [rel for rel, src in sources.items() if _file_signature(src) != signatures[rel]]
        except FileNotFoundError as err:
            if any(not src.exists() for src in sources.values()):
                raise FailedPrecondition(f"a source file vanished while being stored: {err}", field="path") from None
            raise
        if changed:
            raise FailedPrecondition(f"{changed[0]} changed while it was being stored; put it again", field="path")
        if published:
            return ref
        self._put_bytes(manifest_key(ref.digest), manifest.canonical_bytes())
        log.info("stored %s artifact %s (%d files, %d bytes) in %s", kind, ref.uri, ref.files, ref.size, self.location)
        return ref

    def _parse_ref(self, name: str, data: bytes) -> Ref:
        try:
            doc = json.loads(data)
            return Ref(name, artifact_uri(parse_artifact_uri(doc["uri"])), dict(doc.get("meta") or {}))
        except (ValueError, KeyError, TypeError, InvalidArgument) as err:
            raise IntegrityError(f"ref {name!r} in store {self.location} is malformed: {err}", field="name") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location})"

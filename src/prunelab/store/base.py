"""The artifact store contract, written once over a tiny object layer.

Layout, identical in both backends (keys relative to the store root):

    artifacts/<digest>/files/<relative path>   the artifact's files
    artifacts/<digest>/manifest.json           written last: the artifact exists iff this does
    refs/<name>.json                           mutable pointers {"name", "uri", "meta"}
    results/evaluator/artifacts/..., .../refs/...   the same, written with a key that may write only there

A store whose `write_area` is one of RESULT_AREAS (PRUNELAB_STORE_WRITE_AREA) writes
only below it, so its S3 key needs write access to that prefix alone (the evaluator's
least-privilege key: it reads everything and writes only its records). Every store
reads all areas: an artifact is found wherever it was published (its URI is its
content's digest, so an area can add artifacts but never change one), a ref in the
root or, for the names an area may hold ("evaluations/..." for the evaluator's), there:
a key confined to an area cannot make a dataset or model name point anywhere.

Publishing uploads every file first and the manifest last, so a reader never sees a
partial artifact; an interrupted upload leaves orphan files under a digest with no
manifest, invisible to readers and simply overwritten by the next attempt. A digest
whose manifest exists is never written again, except that putting the same files
again repairs any of its files the store lost or truncated (checked by size).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StoreAudit:
    """What `ArtifactStore.audit` found."""

    verified: list[ArtifactRef]
    orphans: list[str]  # digests with files but no manifest: interrupted uploads, invisible to readers
    damaged: dict[str, str]  # digest -> why it does not verify


_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
ARTIFACTS = "artifacts"
REFS = "refs"
ROOT_AREA = ""
RESULT_AREAS = {"results/evaluator": "evaluations/"}  # folders a restricted writer can be confined to -> the refs they hold
AREAS = (ROOT_AREA, *RESULT_AREAS)  # where reads look, the root first: it holds nearly everything read


def under(area: str, key: str) -> str:
    return f"{area}/{key}" if area else key


def manifest_key(digest: str, area: str = ROOT_AREA) -> str:
    return under(area, f"{ARTIFACTS}/{digest}/manifest.json")


def files_folder(digest: str, area: str = ROOT_AREA) -> str:
    return under(area, f"{ARTIFACTS}/{digest}/files")


def file_key(digest: str, relative_path: str, area: str = ROOT_AREA) -> str:
    return f"{files_folder(digest, area)}/{relative_path}"


def ref_key(name: str, area: str = ROOT_AREA) -> str:
    return under(area, f"{REFS}/{name}.json")


def check_write_area(area: str) -> str:
    if area not in AREAS:
        raise InvalidArgument(f"PRUNELAB_STORE_WRITE_AREA={area!r}: use '' (the store's root) or one of {', '.join(RESULT_AREAS)}",
                              field="PRUNELAB_STORE_WRITE_AREA")
    return area


def _may_hold(area: str, ref_name: str) -> bool:
    return area == ROOT_AREA or ref_name.startswith(RESULT_AREAS[area])


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
    write_area: str = ROOT_AREA  # where puts go: the root or one of RESULT_AREAS

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
    def _artifact_digests(self, area: str) -> Iterator[str]:
        """Digests that have a folder under the area's artifacts/ (published or orphaned)."""

    @abstractmethod
    def _materialize(self, manifest: Manifest, digest: str) -> Path:
        """A local directory holding exactly the manifest's files, each verified."""

    @abstractmethod
    def _check_stored(self, manifest: Manifest, digest: str) -> None:
        """IntegrityError (or NotFound) unless the store's own copy of every file, read
        now and not from a cache, matches the manifest."""

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
        return self._published_area(parse_artifact_uri(uri)) is not None

    def list(self, kind: str | None = None) -> list[ArtifactRef]:
        """Published artifacts, by digest. Orphans of interrupted uploads are skipped
        silently, artifacts with a corrupted manifest with a warning."""
        refs = []
        digests = {digest for area in AREAS for digest in self._artifact_digests(area)}
        for digest in sorted(filter(DIGEST_PATTERN.fullmatch, digests)):
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

    def audit(self) -> StoreAudit:
        """Every folder under artifacts/ checked: a published artifact's files read back
        from the store and hashed against its manifest (verified or damaged); a folder
        without a manifest is an orphan of an interrupted upload, which readers never see."""
        verified, orphans, damaged = [], [], {}
        folders = sorted({(area, digest) for area in AREAS for digest in self._artifact_digests(area)})
        for area, digest in folders:
            try:
                manifest = self._manifest_in(digest, area)
            except NotFound:
                orphans.append(digest)
                continue
            except IntegrityError as err:
                damaged[digest] = err.reason
                continue
            try:
                self._check_stored(manifest, digest)
            except (NotFound, IntegrityError) as err:
                damaged[digest] = err.reason
                continue
            verified.append(manifest.ref())
        return StoreAudit(verified, orphans, damaged)

    # ---- refs ----

    def set_ref(self, name: str, uri: str, meta: dict[str, Any] | None = None) -> Ref:
        """Point `name` at an existing artifact (replacing any previous target)."""
        check_ref_name(name)
        digest = parse_artifact_uri(uri)
        if not self.exists(digest):
            raise NotFound(f"cannot point ref {name!r} at {artifact_uri(digest)}: no such artifact", field="uri")
        if not _may_hold(self.write_area, name):
            raise InvalidArgument(f"ref {name!r} cannot be set from {self.write_area}/, which holds only "
                                  f"{RESULT_AREAS[self.write_area]}* refs", field="name")
        ref = Ref(name, artifact_uri(digest), dict(meta or {}))
        try:
            data = json.dumps({"name": ref.name, "uri": ref.uri, "meta": ref.meta}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"ref meta must be plain JSON: {err}", field="meta") from None
        self._put_bytes(ref_key(name, self.write_area), data.encode())
        return ref

    def get_ref(self, name: str) -> Ref:
        check_ref_name(name)
        for area in self._ref_areas(name):
            try:
                return self._parse_ref(name, self._get_bytes(ref_key(name, area)))
            except NotFound:
                continue
        raise NotFound(f"no ref named {name!r} in store {self.location}", field="name")

    def list_refs(self, prefix: str = "") -> list[Ref]:
        """Refs whose name starts with `prefix` (e.g. "datasets/"), sorted by name."""
        names = set()
        for area in AREAS:
            folder = under(area, REFS)
            listed = (key[len(folder) + 1 : -len(".json")] for key in self._list_keys(f"{folder}/{prefix}") if key.endswith(".json"))
            names.update(name for name in listed if _may_hold(area, name))
        return [self.get_ref(name) for name in sorted(names) if _REF_NAME.fullmatch(name)]

    # ---- internals ----

    def _ref_areas(self, name: str) -> list[str]:
        """Where ref `name` may be, the root first: an area's own write wins only for its own refs."""
        return [area for area in AREAS if _may_hold(area, name)]

    @functools.cached_property
    def _areas(self) -> dict[str, str]:
        """digest -> the area its manifest was read from (a published artifact never moves)."""
        return {}

    def _area_of(self, digest: str) -> str:
        """The area the artifact's manifest was read from: where its files are."""
        return self._areas.get(digest, ROOT_AREA)

    def _manifest(self, digest: str) -> Manifest:
        for area in AREAS:
            try:
                return self._manifest_in(digest, area)
            except NotFound:
                continue
        raise NotFound(f"artifact {artifact_uri(digest)} not found in store {self.location}", field="uri")

    def _manifest_in(self, digest: str, area: str) -> Manifest:
        manifest = Manifest.parse(self._get_bytes(manifest_key(digest, area)), digest)
        self._areas[digest] = area
        return manifest

    def _published_area(self, digest: str) -> str | None:
        return next((area for area in AREAS if self._has_object(manifest_key(digest, area))), None)

    def _publish(self, kind: str, meta: dict[str, Any] | None, sources: dict[str, Path]) -> ArtifactRef:
        signatures = {rel: _file_signature(src) for rel, src in sources.items()}
        manifest = Manifest.build(kind, meta, sources)
        ref = manifest.ref()
        area = self._published_area(ref.digest)
        if area not in (None, self.write_area):
            return ref  # published where every reader finds it, outside what this store writes
        published, write_area = area is not None, self.write_area
        # Over a published manifest only what is missing or the wrong size is put again
        # (a file lost or truncated on the store is repaired by the next identical put).
        to_put = [e for e in manifest.files if self._object_size(file_key(ref.digest, e.path, write_area)) != e.size] if published else manifest.files
        if published and not to_put:
            log.debug("artifact %s already stored and whole; not uploading again", ref.uri)
            return ref
        if published:
            log.warning("artifact %s was stored with %d file(s) missing or damaged; repairing them", ref.uri, len(to_put))
        try:
            for entry in to_put:
                self._put_object(file_key(ref.digest, entry.path, write_area), sources[entry.path])
            changed = [rel for rel, src in sources.items() if _file_signature(src) != signatures[rel]]
        except FileNotFoundError as err:
            if any(not src.exists() for src in sources.values()):
                raise FailedPrecondition(f"a source file vanished while being stored: {err}", field="path") from None
            raise
        if changed:
            raise FailedPrecondition(f"{changed[0]} changed while it was being stored; put it again", field="path")
        if published:
            return ref
        self._put_bytes(manifest_key(ref.digest, write_area), manifest.canonical_bytes())
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

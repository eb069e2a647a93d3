"""The embedded store: the artifact layout as plain files under one root directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from prunelab.errors import IntegrityError, NotFound
from prunelab.store.base import ARTIFACTS, ArtifactStore
from prunelab.store.manifest import Manifest, check_file, sha256_file

READ_ONLY = 0o444

# Artifacts verified in this process: files dir -> the stat signature they had then.
# `get_dir` re-hashes only when a file's size, mtime or inode changed since, so a
# checkpoint is hashed once per process yet any edit to it is still caught.
_verified: dict[Path, tuple] = {}
_verified_lock = threading.Lock()


class LocalStore(ArtifactStore):
    """Writes go to a temporary name beside the target and are moved into place with
    `os.replace` after an fsync, so a crash never leaves a half-written object under
    its real name. Stored files are made read-only to discourage editing them through
    the paths `get_dir` returns (which are the store's own files, not copies)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _put_object(self, key: str, source: Path) -> None:
        with self._replacing(self._path(key)) as temp:
            shutil.copyfile(source, temp)
            _fsync(temp)
            temp.chmod(READ_ONLY)

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self._replacing(self._path(key)) as temp:
            temp.write_bytes(data)
            _fsync(temp)

    def _get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.location}") from None

    def _has_object(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list_keys(self, prefix: str) -> Iterator[str]:
        folder = self._path(prefix.rpartition("/")[0])
        for root, _dirs, names in os.walk(folder):
            for name in names:
                key = Path(root, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def _artifact_digests(self) -> Iterator[str]:
        folder = self.root / ARTIFACTS
        return (entry.name for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else iter(())

    def _materialize(self, manifest: Manifest, digest: str) -> Path:
        files_dir = self._path(f"{ARTIFACTS}/{digest}/files")
        signature = _signature(files_dir)
        with _verified_lock:
            if _verified.get(files_dir) == signature:
                return files_dir
        _verify_in_place(files_dir, manifest, digest, signature)
        with _verified_lock:
            _verified[files_dir] = signature
        return files_dir

    @contextlib.contextmanager
    def _replacing(self, target: Path) -> Iterator[Path]:
        """Yield a temp path that replaces `target` if the block succeeds. Temps live
        in one folder outside artifacts/ and refs/, so a killed writer's leftovers
        never show up inside an artifact or as a ref."""
        temp_dir = self.root / ".tmp"
        temp_dir.mkdir(exist_ok=True)
        temp = temp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            yield temp
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _signature(files_dir: Path) -> tuple:
    """Path, size, mtime and inode of every file present, so an edited, added or
    removed file changes it."""
    files = sorted(p for p in files_dir.rglob("*") if p.is_file())
    return tuple((p.relative_to(files_dir).as_posix(), *_stat_key(p)) for p in files)


def _stat_key(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _verify_in_place(files_dir: Path, manifest: Manifest, digest: str, signature: tuple) -> None:
    listed = {entry.path for entry in manifest.files}
    present = {item[0] for item in signature}
    for missing in sorted(listed - present):
        raise IntegrityError(f"artifact {digest}: file {missing!r} is missing from {files_dir}", field="path")
    for extra in sorted(present - listed):
        raise IntegrityError(f"artifact {digest}: file {extra!r} in {files_dir} is not in the manifest", field="path")
    for entry in manifest.files:
        path = files_dir / entry.path
        check_file(digest, entry, sha256_file(path), path.stat().st_size)

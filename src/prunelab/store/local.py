"""The embedded store: the artifact layout as plain files under one root directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from prunelab.errors import NotFound
from prunelab.store.base import ARTIFACTS, ArtifactStore, files_folder, under
from prunelab.store.manifest import Manifest
from prunelab.store.verify import check_folder, fsync_dir, fsync_file, verified_folder

READ_ONLY = 0o444


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
            fsync_file(temp)
            temp.chmod(READ_ONLY)

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self._replacing(self._path(key)) as temp:
            temp.write_bytes(data)
            fsync_file(temp)

    def _get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.location}") from None

    def _has_object(self, key: str) -> bool:
        return self._path(key).is_file()

    def _object_size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def _list_keys(self, prefix: str) -> Iterator[str]:
        folder = self._path(prefix.rpartition("/")[0])
        for root, _dirs, names in os.walk(folder):
            for name in names:
                key = Path(root, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def _artifact_digests(self, area: str) -> Iterator[str]:
        folder = self._path(under(area, ARTIFACTS))
        return (entry.name for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else iter(())

    def _materialize(self, manifest: Manifest, digest: str) -> Path:
        return verified_folder(self._path(files_folder(digest, self._area_of(digest))), manifest, digest)

    def _check_stored(self, manifest: Manifest, digest: str) -> None:
        check_folder(self._path(files_folder(digest, self._area_of(digest))), manifest, digest)

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
            fsync_dir(target.parent)  # the rename itself survives a crash
        finally:
            temp.unlink(missing_ok=True)

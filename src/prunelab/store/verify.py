"""Files as they reach and leave the disk: written durably (fsynced, then renamed, then
the folder fsynced, so a crash leaves the old name or the whole new file), and read
back verified (a folder of an artifact's files hashed once per process, then trusted
while no file's size, mtime or inode changes: any edit, addition or removal is caught)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prunelab.errors import IntegrityError
from prunelab.store.manifest import Manifest, check_file, sha256_file

# Folders verified in this process -> the stat signature they had then.
_verified: dict[Path, tuple] = {}
_verified_lock = threading.Lock()


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename into `path` (or out of it) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def verified_folder(files_dir: Path, manifest: Manifest, digest: str) -> Path:
    """`files_dir`, once its files match the manifest (hashing them only when this
    process has not seen them unchanged before); IntegrityError otherwise."""
    signature = folder_signature(files_dir)
    with _verified_lock:
        if _verified.get(files_dir) == signature:
            return files_dir
    check_folder(files_dir, manifest, digest, signature)
    with _verified_lock:
        _verified[files_dir] = signature
    return files_dir


def folder_signature(files_dir: Path) -> tuple:
    """Path, size, mtime and inode of every file present, so an edited, added or
    removed file changes it."""
    files = sorted(p for p in files_dir.rglob("*") if p.is_file())
    return tuple((p.relative_to(files_dir).as_posix(), *stat_key(p)) for p in files)


def stat_key(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def check_folder(files_dir: Path, manifest: Manifest, digest: str, signature: tuple | None = None) -> None:
    """IntegrityError unless `files_dir` holds exactly the manifest's files, each hashed now."""
    signature = folder_signature(files_dir) if signature is None else signature
    listed = {entry.path for entry in manifest.files}
    present = {item[0] for item in signature}
    for missing in sorted(listed - present):
        raise IntegrityError(f"artifact {digest}: file {missing!r} is missing from {files_dir}", field="path")
    for extra in sorted(present - listed):
        raise IntegrityError(f"artifact {digest}: file {extra!r} in {files_dir} is not in the manifest", field="path")
    for entry in manifest.files:
        path = files_dir / entry.path
        check_file(digest, entry, sha256_file(path), path.stat().st_size)

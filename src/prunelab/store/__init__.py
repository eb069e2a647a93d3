"""Content-addressed artifact store: checkpoints, adapters, datasets and reports move
between services as `artifact://<sha256>` URIs, never as bytes in messages.

`open_store()` picks the backend from PRUNELAB_STORE: a plain path or `file:///...`
gives the embedded `LocalStore`; `s3://bucket[/prefix]` gives `S3Store` (MinIO,
SeaweedFS, any S3). Both share one layout and one contract (see `base.py`):
immutable, published atomically, verified on every read.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from prunelab.config import Settings, settings
from prunelab.errors import InvalidArgument
from prunelab.store.base import ArtifactStore, check_write_area
from prunelab.store.local import LocalStore
from prunelab.store.manifest import ArtifactRef, Ref, parse_artifact_uri
from prunelab.store.s3 import S3Store

__all__ = ["ArtifactRef", "ArtifactStore", "LocalStore", "Ref", "S3Store", "open_store", "parse_artifact_uri"]


def open_store(cfg: Settings | None = None) -> ArtifactStore:
    """The store PRUNELAB_STORE names (a new client each call; creating one is cheap
    for the local backend and one bucket check for S3), writing where
    PRUNELAB_STORE_WRITE_AREA says."""
    cfg = cfg or settings()
    store = _backend(cfg)
    store.write_area = check_write_area(cfg.store_write_area)
    return store


def _backend(cfg: Settings) -> ArtifactStore:
    location = cfg.store
    parts = urlsplit(location)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise InvalidArgument(f"PRUNELAB_STORE={location!r} names no bucket (use s3://bucket[/prefix])", field="PRUNELAB_STORE")
        return S3Store(parts.netloc, parts.path, cfg.s3, cfg.cache_dir)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise InvalidArgument(
                f"PRUNELAB_STORE={location!r}: a file URI needs an absolute local path (file:///abs/path)",
                field="PRUNELAB_STORE",
            )
        return LocalStore(Path(unquote(parts.path)))
    if "://" in location:
        raise InvalidArgument(
            f"PRUNELAB_STORE={location!r}: use a path, file:///abs/path or s3://bucket[/prefix]", field="PRUNELAB_STORE"
        )
    return LocalStore(Path(location))

"""The artifact layout in an S3 bucket (MinIO in production, SeaweedFS in tests)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from prunelab.config import S3Settings
from prunelab.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, PrunelabError, Unavailable
from prunelab.store.base import ARTIFACTS, ArtifactStore, file_key, under
from prunelab.store.manifest import HASH_CHUNK, FileEntry, Manifest, check_file
from prunelab.store.verify import fsync_dir, verified_folder

log = logging.getLogger(__name__)

# Multipart part size: a multi-GB checkpoint is a few dozen parts, and minio's 3
# parallel part uploads buffer about 128 MB. (16/32/64 MB measured alike on SeaweedFS.)
PART_SIZE = 32 * 1024 * 1024
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # backoff while S3 is unreachable (PRUNELAB_S3_RETRY_S in all)
T = TypeVar("T")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}


def _http_client() -> urllib3.PoolManager:
    """minio's default pool, but with a 10 s connect timeout (its default is 5 min per
    try, so an unreachable endpoint would hang a job for half an hour) and 3 retries."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=300),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class S3Store(ArtifactStore):
    """Objects under `s3://bucket/prefix/`; downloads are verified into
    `cache_dir/artifacts/<digest>`."""

    def __init__(self, bucket: str, prefix: str, s3: S3Settings, cache_dir: Path):
        if not s3.access_key or not s3.secret_key:
            raise FailedPrecondition(
                "PRUNELAB_STORE is an s3:// URI but PRUNELAB_S3_ACCESS_KEY or PRUNELAB_S3_SECRET_KEY is not set",
                field="PRUNELAB_S3_ACCESS_KEY",
            )
        try:
            self.client = Minio(
                s3.endpoint, s3.access_key, s3.secret_key, secure=s3.secure, region=s3.region, http_client=_http_client()
            )
        except ValueError as err:
            raise InvalidArgument(
                f"PRUNELAB_S3_ENDPOINT={s3.endpoint!r} is not host:port ({err})", field="PRUNELAB_S3_ENDPOINT"
            ) from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = s3.endpoint
        self.artifact_cache = Path(cache_dir) / "artifacts"
        self.retry_s = s3.retry_s
        scheme = "https" if s3.secure else "http"
        path = f"{bucket}/{self.prefix}" if self.prefix else bucket
        self.location = f"s3://{path} at {scheme}://{s3.endpoint}"
        self._ensure_bucket(s3.region)

    # ---- error translation ----

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        """`action` under `_call`, tried again with exponential backoff while S3 is
        unreachable, for up to PRUNELAB_S3_RETRY_S: a store restarting or a network
        blip costs time, not the job. Safe because every write is idempotent (objects
        are content-addressed; a manifest is written last and never changes)."""
        deadline, delay = time.monotonic() + self.retry_s, RETRY_FIRST_S
        while True:
            try:
                with self._call(what):
                    return action()
            except Unavailable as err:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"{err.reason} (still, after {self.retry_s:g} s of retries: PRUNELAB_S3_RETRY_S)",
                                      field=err.field) from None
                log.warning("S3 at %s: %s; retrying in %.0f s", self.endpoint, err.reason, delay)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turn S3 and network failures into domain errors that say what to check."""
        try:
            yield
        except S3Error as err:
            raise self._s3_error(err, what) from None
        except (urllib3.exceptions.HTTPError, MinioException) as err:
            raise Unavailable(
                f"cannot reach S3 at {self.endpoint} to {what} ({type(err).__name__}: {err}); "
                "check PRUNELAB_S3_ENDPOINT and that the server is up",
                field="PRUNELAB_S3_ENDPOINT",
            ) from None

    def _s3_error(self, err: S3Error, what: str) -> PrunelabError:
        if err.code in _MISSING_CODES:
            return NotFound(f"{err.object_name or what}: not found in {self.location}")
        if err.code in _CREDENTIAL_CODES:
            return FailedPrecondition(
                f"S3 at {self.endpoint} refused to {what} ({err.code}: {err.message}); "
                "check PRUNELAB_S3_ACCESS_KEY and PRUNELAB_S3_SECRET_KEY",
                field="PRUNELAB_S3_ACCESS_KEY",
            )
        if err.code == "NoSuchBucket":
            return FailedPrecondition(f"bucket {self.bucket!r} does not exist at {self.endpoint}", field="PRUNELAB_STORE")
        return Unavailable(f"S3 at {self.endpoint} failed to {what}: {err.code}: {err.message}")

    def _ensure_bucket(self, region: str | None) -> None:
        try:
            with self._call(f"check bucket {self.bucket!r}"):
                if self.client.bucket_exists(self.bucket):
                    return
                log.info("creating bucket %s at %s", self.bucket, self.endpoint)
                try:
                    self.client.make_bucket(self.bucket, location=region)
                except S3Error as err:
                    if err.code != "BucketAlreadyOwnedByYou":  # i.e. another process just made it
                        raise
        except ValueError as err:
            raise InvalidArgument(f"bucket name {self.bucket!r} is invalid: {err}", field="PRUNELAB_STORE") from None

    # ---- object layer ----

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _put_object(self, key: str, source: Path) -> None:
        self._retrying(f"upload {key}", lambda: self.client.fput_object(self.bucket, self._key(key), str(source), part_size=PART_SIZE))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._retrying(f"upload {key}", lambda: self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data)))

    def _get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retrying(f"read {key}", read)

    def _has_object(self, key: str) -> bool:
        return self._object_size(key) is not None

    def _object_size(self, key: str) -> int | None:
        try:
            return self._retrying(f"look up {key}", lambda: self.client.stat_object(self.bucket, self._key(key)).size)
        except NotFound:
            return None

    def _list_keys(self, prefix: str) -> Iterator[str]:
        strip = len(self._key(""))
        with self._call(f"list {prefix}"):
            objects = list(self.client.list_objects(self.bucket, prefix=self._key(prefix), recursive=True))
        return (obj.object_name[strip:] for obj in objects)

    def _artifact_digests(self, area: str) -> Iterator[str]:
        with self._call("list artifacts"):
            folders = list(self.client.list_objects(self.bucket, prefix=self._key(under(area, ARTIFACTS) + "/")))
        return (obj.object_name.rstrip("/").rpartition("/")[2] for obj in folders if obj.is_dir)

    def _materialize(self, manifest: Manifest, digest: str) -> Path:
        """Download into a staging folder beside the cache entry, verify every file,
        then rename it into place: the cache only ever holds verified copies, so a
        cache hit is returned without hashing again."""
        final = self.artifact_cache / digest
        if final.is_dir():
            try:
                return verified_folder(final, manifest, digest)  # hashed once per process, then by size/mtime/inode
            except IntegrityError as err:
                log.warning("cached copy of %s is damaged (%s); downloading it again", digest, err.reason)
                shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=final.parent))
        try:
            for entry in manifest.files:
                self._download_verified(digest, entry, staging / entry.path)
            try:
                staging.rename(final)
                fsync_dir(final.parent)
            except OSError:
                if not final.is_dir():  # not "another process finished first"
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return verified_folder(final, manifest, digest)

    def _check_stored(self, manifest: Manifest, digest: str) -> None:
        with tempfile.TemporaryDirectory(prefix=f"prunelab-audit-{digest[:16]}-") as staging:
            for entry in manifest.files:
                self._download_verified(digest, entry, Path(staging) / entry.path)

    def _download_verified(self, digest: str, entry: FileEntry, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        def download() -> tuple[str, int]:
            hasher, size = hashlib.sha256(), 0  # afresh on every try
            response = self.client.get_object(self.bucket, self._key(file_key(digest, entry.path, self._area_of(digest))))
            try:
                with dest.open("wb") as out:
                    for chunk in response.stream(HASH_CHUNK):
                        hasher.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
                response.release_conn()
            return hasher.hexdigest(), size

        try:
            digest_seen, size = self._retrying(f"download {entry.path}", download)
        except NotFound:
            raise IntegrityError(f"artifact {digest}: file {entry.path!r} is missing from {self.location}", field="path") from None
        check_file(digest, entry, digest_seen, size)
        dest.chmod(0o444)

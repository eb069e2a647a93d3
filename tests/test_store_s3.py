"""What only the S3 backend has: multipart uploads of checkpoint-sized files, the
download cache, bucket handling and connection/credential errors. Against a real
SeaweedFS server."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from prunelab.config import settings
from prunelab.errors import FailedPrecondition, InvalidArgument, Unavailable
from prunelab.store import S3Store, open_store
from prunelab.store.seaweed import free_ports

pytestmark = pytest.mark.s3

MB = 1024 * 1024


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(cache))
    settings.cache_clear()
    return cache


def reopen(monkeypatch, **env: str) -> S3Store:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    return open_store()


def write_random(path: Path, size: int) -> str:
    """`size` random bytes in 16 MB blocks; returns their sha256."""
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, 16 * MB):
            block = os.urandom(min(16 * MB, size - offset))
            hasher.update(block)
            out.write(block)
    return hasher.hexdigest()


def test_checkpoint_sized_file_round_trips_verified(private_cache, monkeypatch, tmp_path, s3_store):
    source = tmp_path / "model.safetensors"
    expected = write_random(source, 300 * MB)

    started = time.perf_counter()
    ref = s3_store.put_file(source, "checkpoint")
    uploaded = time.perf_counter()
    copy = s3_store.get_file(ref.uri)
    downloaded = time.perf_counter()

    assert ref.size == 300 * MB
    assert copy.parent == private_cache / "artifacts" / ref.digest
    with copy.open("rb") as handle:
        assert hashlib.file_digest(handle, "sha256").hexdigest() == expected
    # Multipart: the object is stored in parts of PART_SIZE (its ETag says how many).
    etag = s3_store.client.stat_object(s3_store.bucket, f"artifacts/{ref.digest}/files/model.safetensors").etag
    assert etag.endswith("-10")
    print(f"300 MB: upload {300 / (uploaded - started):.0f} MB/s, download+verify {300 / (downloaded - uploaded):.0f} MB/s")


def test_cache_hit_serves_without_the_server(private_cache, tmp_path, s3_store):
    (tmp_path / "a.txt").write_bytes(os.urandom(1000))
    ref = s3_store.put_file(tmp_path / "a.txt", "report")
    first = s3_store.get_dir(ref.uri)

    for obj in s3_store.client.list_objects(s3_store.bucket, prefix=f"artifacts/{ref.digest}/files/", recursive=True):
        s3_store.client.remove_object(s3_store.bucket, obj.object_name)

    assert s3_store.get_dir(ref.uri) == first
    assert (first / "a.txt").read_bytes() == (tmp_path / "a.txt").read_bytes()


def test_bucket_is_created_and_prefixes_keep_stores_apart(monkeypatch, tmp_path, s3_server, s3_store):
    (tmp_path / "a.txt").write_text("only in the first prefix")
    left = reopen(monkeypatch, PRUNELAB_STORE=f"s3://{s3_store.bucket}/team-a")
    ref = left.put_file(tmp_path / "a.txt", "report")
    right = reopen(monkeypatch, PRUNELAB_STORE=f"s3://{s3_store.bucket}/team-b/nested")

    assert s3_server.client().bucket_exists(s3_store.bucket)
    assert left.list() == [ref] and right.list() == [] and not right.exists(ref.uri)
    keys = [o.object_name for o in s3_server.client().list_objects(s3_store.bucket, recursive=True)]
    assert all(key.startswith("team-a/artifacts/") for key in keys)


def test_wrong_secret_names_the_credentials(monkeypatch, s3_store):
    with pytest.raises(FailedPrecondition, match="SignatureDoesNotMatch.*check PRUNELAB_S3_ACCESS_KEY") as err:
        reopen(monkeypatch, PRUNELAB_S3_SECRET_KEY="not-the-secret")
    assert err.value.field == "PRUNELAB_S3_ACCESS_KEY"


def test_unknown_access_key_names_the_credentials(monkeypatch, s3_store):
    with pytest.raises(FailedPrecondition, match="InvalidAccessKeyId.*check PRUNELAB_S3_ACCESS_KEY"):
        reopen(monkeypatch, PRUNELAB_S3_ACCESS_KEY="nobody")


def test_missing_credentials_are_a_clear_error(monkeypatch, s3_store):
    monkeypatch.delenv("PRUNELAB_S3_SECRET_KEY")
    with pytest.raises(FailedPrecondition, match="PRUNELAB_S3_ACCESS_KEY or PRUNELAB_S3_SECRET_KEY is not set"):
        reopen(monkeypatch)


def test_unreachable_endpoint_is_unavailable_quickly(monkeypatch, s3_store):
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach S3 .* check PRUNELAB_S3_ENDPOINT"):
        reopen(monkeypatch, PRUNELAB_S3_ENDPOINT=f"127.0.0.1:{free_ports(1)[0]}")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "env, field",
    [
        ({"PRUNELAB_STORE": "s3://Bad_Bucket!"}, "PRUNELAB_STORE"),
        ({"PRUNELAB_S3_ENDPOINT": "http://127.0.0.1:9000/path"}, "PRUNELAB_S3_ENDPOINT"),
    ],
)
def test_malformed_location_is_invalid_argument(monkeypatch, s3_store, env, field):
    with pytest.raises(InvalidArgument) as err:
        reopen(monkeypatch, **env)
    assert err.value.field == field

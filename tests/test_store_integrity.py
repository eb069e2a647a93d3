"""Stored data under faults, on real stores: an S3 store that goes away and comes back
costs time, not the upload; a put over a published artifact repairs what the store lost;
a damaged cached copy is noticed and fetched again; a local publish is durable."""

from __future__ import annotations

import os
import secrets
import threading
import time

import pytest

from prunelab.config import settings
from prunelab.store import open_store
from prunelab.store.base import file_key
from prunelab.store.seaweed import start_seaweed

pytestmark = pytest.mark.s3


def checkpoint(folder, megabytes: int = 40):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(megabytes * 2**20))  # multipart: several parts
    (folder / "config.json").write_text('{"layers": 2}')
    return folder


def test_an_upload_waits_out_a_stopped_store_and_lands_whole(tmp_path, monkeypatch, s3_server):
    """The store stops, the put starts, the store comes back 8 s later on its data."""
    key = secrets.token_hex(20)
    server = start_seaweed(tmp_path / "weed", "outage-test", key)
    for name, value in {"PRUNELAB_STORE": "s3://outage", "PRUNELAB_S3_ENDPOINT": server.endpoint, "PRUNELAB_S3_ACCESS_KEY": "outage-test",
                        "PRUNELAB_S3_SECRET_KEY": key, "PRUNELAB_S3_SECURE": "false", "PRUNELAB_CACHE": str(tmp_path / "cache"),
                        "PRUNELAB_S3_RETRY_S": "120"}.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    store = open_store()
    source = checkpoint(tmp_path / "ckpt")
    server.stop()
    outcome: dict = {}
    upload = threading.Thread(target=lambda: outcome.update(ref=store.put_dir(source, kind="model")))
    started = time.monotonic()
    upload.start()
    time.sleep(8)
    assert upload.is_alive(), "the put gave up while the store was down"
    restarted = start_seaweed(tmp_path / "weed", "outage-test", key, ports=server.ports)
    try:
        upload.join(120)
        assert "ref" in outcome and time.monotonic() - started >= 8
        copy = store.get_dir(outcome["ref"].uri)  # downloaded and verified against the manifest
        assert (copy / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    finally:
        restarted.stop()


def test_a_put_over_a_published_artifact_repairs_a_lost_or_truncated_file(s3_store, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    settings.cache_clear()
    source = checkpoint(tmp_path / "ckpt", megabytes=1)
    ref = s3_store.put_dir(source, kind="model")
    client, bucket = s3_server.client(), s3_store.bucket
    client.remove_object(bucket, s3_store._key(file_key(ref.digest, "model.safetensors")))
    assert s3_store.put_dir(source, kind="model") == ref
    assert (s3_store.get_dir(ref.uri) / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_a_local_put_over_a_published_artifact_repairs_it(tmp_path):
    store = open_store()
    source = checkpoint(tmp_path / "ckpt", megabytes=1)
    ref = store.put_dir(source, kind="model")
    stored = store.get_dir(ref.uri) / "model.safetensors"
    stored.chmod(0o644)
    stored.write_bytes(b"truncated")
    assert store.put_dir(source, kind="model") == ref
    assert store.get_dir(ref.uri).joinpath("model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_a_damaged_cached_copy_is_fetched_again(s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    settings.cache_clear()
    source = checkpoint(tmp_path / "ckpt", megabytes=1)
    ref = s3_store.put_dir(source, kind="model")
    cached = s3_store.get_dir(ref.uri) / "config.json"
    cached.chmod(0o644)
    cached.write_text('{"layers": 99}')  # an edit: size the same or not, mtime changes
    again = s3_store.get_dir(ref.uri)
    assert (again / "config.json").read_text() == '{"layers": 2}'

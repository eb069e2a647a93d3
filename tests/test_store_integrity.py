"""Stored data under faults, on real stores: an S3 store that goes away and comes back
costs time, not the upload; a put over a published artifact repairs what the store lost;
a damaged cached copy is noticed and fetched again; a local publish is durable."""

from __future__ import annotations

import io
import os
import secrets
import threading
import time

import pytest

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound
from prunelab.store import open_store
from prunelab.store.base import file_key
from prunelab.store.seaweed import scoped_identity, start_seaweed

pytestmark = pytest.mark.s3
RESULT_AREAS_FOLDER = "results/evaluator"


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


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_verify_reads_every_artifact_back_and_names_the_damaged_one_and_the_orphan(backend, request, tmp_path, capsys):
    store = request.getfixturevalue("s3_store") if backend == "s3" else open_store()
    whole = store.put_dir(checkpoint(tmp_path / "whole", megabytes=1), kind="model")
    damaged = store.put_dir(checkpoint(tmp_path / "damaged", megabytes=1), kind="model")
    assert store.get_dir(damaged.uri)  # a cached copy (S3) must not hide the damage below
    flipped = bytearray((tmp_path / "damaged" / "model.safetensors").read_bytes())
    flipped[1000] ^= 0xFF  # same size: only hashing finds it
    orphan = "ab" * 32  # files of an upload killed before its manifest
    if backend == "s3":
        client, bucket = request.getfixturevalue("s3_server").client(), store.bucket
        client.put_object(bucket, store._key(file_key(damaged.digest, "model.safetensors")), io.BytesIO(flipped), len(flipped))
        client.put_object(bucket, store._key(file_key(orphan, "config.json")), io.BytesIO(b"{}"), 2)
    else:
        stored = store.root / file_key(damaged.digest, "model.safetensors")
        stored.chmod(0o644)
        stored.write_bytes(flipped)
        (store.root / file_key(orphan, "config.json")).parent.mkdir(parents=True)
        (store.root / file_key(orphan, "config.json")).write_text("{}")

    audit = store.audit()
    assert [ref.digest for ref in audit.verified] == [whole.digest]
    assert list(audit.damaged) == [damaged.digest] and "model.safetensors" in audit.damaged[damaged.digest]
    assert audit.orphans == [orphan]
    assert cli_main(["artifact", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {damaged.uri}" in out and "1 verified, 1 damaged, 1 orphans" in out


def test_an_evaluator_key_writes_only_its_area_and_every_reader_finds_what_it_wrote(tmp_path, monkeypatch):
    """Least privilege on a real S3 server: the evaluator's key reads everything and
    writes only below results/evaluator/ (PRUNELAB_STORE_WRITE_AREA); the profiler's reads."""
    keys = {name: secrets.token_hex(20) for name in ("admin", "evaluator", "profiler")}
    bucket, prefix = "least-privilege", "team"
    server = start_seaweed(tmp_path / "weed", "admin", keys["admin"], identities=[
        scoped_identity("evaluator", "evaluator", keys["evaluator"], bucket, f"{prefix}/{RESULT_AREAS_FOLDER}"),
        scoped_identity("profiler", "profiler", keys["profiler"], bucket),
    ])

    def store_of(name: str, area: str = ""):
        for key, value in {"PRUNELAB_STORE": f"s3://{bucket}/{prefix}", "PRUNELAB_S3_ENDPOINT": server.endpoint,
                           "PRUNELAB_S3_ACCESS_KEY": name, "PRUNELAB_S3_SECRET_KEY": keys[name], "PRUNELAB_S3_SECURE": "false",
                           "PRUNELAB_CACHE": str(tmp_path / f"cache-{name}"), "PRUNELAB_STORE_WRITE_AREA": area,
                           "PRUNELAB_S3_RETRY_S": "5"}.items():
            monkeypatch.setenv(key, value)
        settings.cache_clear()
        return open_store()

    try:
        model = store_of("admin").put_dir(checkpoint(tmp_path / "model", megabytes=1), kind="model")
        evaluator = store_of("evaluator", RESULT_AREAS_FOLDER)
        assert (evaluator.get_dir(model.uri) / "config.json").read_text() == '{"layers": 2}'
        (tmp_path / "evaluation.json").write_text('{"ppl": 12.5}')
        record = evaluator.put_file(tmp_path / "evaluation.json", "evaluation")
        evaluator.set_ref("evaluations/abc/record", record.uri)
        with pytest.raises(InvalidArgument, match="holds only evaluations/"):
            evaluator.set_ref("datasets/wikitext2", record.uri)
        with pytest.raises(FailedPrecondition, match="refused"):  # its key, writing the root: S3 says no
            store_of("evaluator").put_dir(checkpoint(tmp_path / "forged", megabytes=1), kind="model")
        # a ref planted in its area under another area's name is never read
        server.client().put_object(bucket, f"{prefix}/{RESULT_AREAS_FOLDER}/refs/datasets/planted.json", io.BytesIO(b"{}"), 2)
        profiler = store_of("profiler")
        assert profiler.get_dir(model.uri).is_dir()
        with pytest.raises(FailedPrecondition, match="refused"):
            profiler.set_ref("evaluations/abc/forged", model.uri)

        admin = store_of("admin")  # any other reader (the orchestrator, the CLI) finds the record and its ref
        assert admin.get_file(record.uri).read_text() == '{"ppl": 12.5}'
        assert [ref.uri for ref in admin.list_refs("evaluations/")] == [record.uri] and admin.list_refs("datasets/") == []
        with pytest.raises(NotFound):
            admin.get_ref("datasets/planted")
        assert {ref.digest for ref in admin.list()} == {model.digest, record.digest}
        assert {ref.digest for ref in admin.audit().verified} == {model.digest, record.digest}
        objects = [o.object_name for o in server.client().list_objects(bucket, recursive=True)]
        assert all(name.startswith(f"{prefix}/artifacts/{model.digest}/") for name in objects
                   if not name.startswith(f"{prefix}/{RESULT_AREAS_FOLDER}/"))
    finally:
        server.stop()

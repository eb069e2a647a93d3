"""The artifact store contract, run against both backends: the embedded local store
and a real SeaweedFS S3 server."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from prunelab.config import settings
from prunelab.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from prunelab.store import ArtifactStore, LocalStore, open_store, parse_artifact_uri
from prunelab.store.base import file_key, manifest_key
from prunelab.store.manifest import FileEntry, Manifest, collect_files

DIGEST = "ab" * 32


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path, monkeypatch) -> ArtifactStore:
    # A private cache, so a verified copy from an earlier run can never stand in
    # for the download a test means to exercise.
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    settings.cache_clear()
    return open_store() if request.param == "local" else request.getfixturevalue("s3_store")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A directory shaped like a small checkpoint: nested folders, binary and text
    files, an empty file and a non-ASCII name; random bytes so digests differ per run."""
    root = tmp_path / "checkpoint"
    (root / "shards" / "deep").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "shards" / "model-00001.safetensors").write_bytes(os.urandom(200_000))
    (root / "shards" / "deep" / "notes ü.txt").write_text("pruned 20%\n")
    (root / "empty.bin").write_bytes(b"")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def overwrite_stored(store: ArtifactStore, key: str, data: bytes) -> None:
    """Change stored bytes behind the store's back, as disk rot or a stray writer
    would: on disk for the local store, a new object at the same key for S3."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        store.client.put_object(store.bucket, store._key(key), io.BytesIO(data), len(data))


def delete_stored(store: ArtifactStore, key: str) -> None:
    if isinstance(store, LocalStore):
        (store.root / key).unlink()
    else:
        store.client.remove_object(store.bucket, store._key(key))


class FailingUploads:
    """Mixin over a real backend: after `uploads_left` files, the next upload fails
    the way a dropped connection would (or runs `before_upload` first)."""

    uploads_left: int = 0
    before_upload = None

    def _put_object(self, key: str, source: Path) -> None:
        if self.before_upload:
            self.before_upload(source)
        if self.uploads_left == 0:
            raise ConnectionResetError("connection reset by peer (injected)")
        self.uploads_left -= 1
        super()._put_object(key, source)


def interrupted(store: ArtifactStore, uploads_before_failure: int = 0, before_upload=None) -> ArtifactStore:
    """The same store (same root or bucket, same client) with failing uploads."""
    cls = type(f"Interrupted{type(store).__name__}", (FailingUploads, type(store)), {})
    flaky = object.__new__(cls)
    flaky.__dict__.update(vars(store))
    flaky.uploads_left = uploads_before_failure
    flaky.before_upload = before_upload
    return flaky


def test_dir_round_trips_with_stat_exists_and_list(store, checkpoint):
    ref = store.put_dir(checkpoint, "checkpoint", {"ratio": 0.2})

    assert ref.uri == f"artifact://{ref.digest}" and len(ref.digest) == 64
    assert (ref.kind, ref.files, ref.meta) == ("checkpoint", 4, {"ratio": 0.2})
    assert ref.size == sum(len(b) for b in tree(checkpoint).values())
    assert tree(store.get_dir(ref.uri)) == tree(checkpoint)
    assert tree(store.get_dir(ref.digest)) == tree(checkpoint)  # a bare digest works too
    assert store.stat(ref.uri) == ref
    assert store.exists(ref.uri) and not store.exists(DIGEST)
    assert store.list() == [ref] and store.list("checkpoint") == [ref] and store.list("dataset") == []


def test_put_file_is_a_one_file_artifact(store, tmp_path):
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(os.urandom(5000))

    ref = store.put_file(weights, "adapter")

    assert ref.files == 1 and ref.size == 5000
    assert store.get_file(ref.uri).read_bytes() == weights.read_bytes()
    assert tree(store.get_dir(ref.uri)) == {"adapter.safetensors": weights.read_bytes()}


def test_identity_is_content_kind_and_meta(store, checkpoint):
    first = store.put_dir(checkpoint, "checkpoint", {"step": 1})

    assert store.put_dir(checkpoint, "checkpoint", {"step": 1}) == first
    assert store.put_dir(checkpoint, "checkpoint", {"step": 2}).digest != first.digest
    assert store.put_dir(checkpoint, "adapter", {"step": 1}).digest != first.digest
    (checkpoint / "config.json").write_text("{}")
    assert store.put_dir(checkpoint, "checkpoint", {"step": 1}).digest != first.digest


def test_a_second_put_repairs_a_file_of_the_wrong_size_and_leaves_the_rest(store, checkpoint):
    ref = store.put_dir(checkpoint, "checkpoint")
    overwrite_stored(store, file_key(ref.digest, "config.json"), b"tampered")
    assert store.put_dir(checkpoint, "checkpoint") == ref  # the manifest stands; the file is put again
    assert (store.get_dir(ref.uri) / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()

    # A same-size change is not seen by the put (it compares sizes, not hashes), and
    # is never used: the local store's read re-hashes and refuses it; S3 readers keep
    # serving the copy they verified when they downloaded it.
    original = (checkpoint / "config.json").read_bytes()
    overwrite_stored(store, file_key(ref.digest, "config.json"), bytes(len(original)))
    assert store.put_dir(checkpoint, "checkpoint") == ref
    if isinstance(store, LocalStore):
        with pytest.raises(IntegrityError, match="config.json"):
            store.get_dir(ref.uri)
    else:
        assert (store.get_dir(ref.uri) / "config.json").read_bytes() == original


@pytest.mark.parametrize("replacement", [b'{"hidden_size": 65}', b"x"], ids=["same-size", "other-size"])
def test_corrupted_file_is_refused_and_not_cached(store, checkpoint, replacement):
    ref = store.put_dir(checkpoint, "checkpoint")
    overwrite_stored(store, file_key(ref.digest, "config.json"), replacement)

    with pytest.raises(IntegrityError, match=r"file 'config.json'"):
        store.get_dir(ref.uri)
    cache = settings().cache_dir / "artifacts"
    assert not cache.exists() or list(cache.iterdir()) == []  # no entry, no staging leftovers


def test_corrupted_manifest_is_refused(store, checkpoint):
    ref = store.put_dir(checkpoint, "checkpoint", {"ratio": 0.2})
    overwrite_stored(store, manifest_key(ref.digest), store._get_bytes(manifest_key(ref.digest)).replace(b"0.2", b"0.5"))

    with pytest.raises(IntegrityError, match="manifest of artifact .* hashes to"):
        store.stat(ref.uri)
    with pytest.raises(IntegrityError):
        store.get_dir(ref.uri)


def test_missing_file_is_an_integrity_error(store, checkpoint):
    ref = store.put_dir(checkpoint, "checkpoint")
    delete_stored(store, file_key(ref.digest, "shards/deep/notes ü.txt"))

    with pytest.raises(IntegrityError, match="notes ü.txt' is missing"):
        store.get_dir(ref.uri)


def test_manifest_with_unsafe_path_is_refused(store, tmp_path):
    escape = Manifest("checkpoint", {}, (FileEntry("../../escaped.txt", "0" * 64, 1),))
    store._put_bytes(manifest_key(escape.digest), escape.canonical_bytes())

    with pytest.raises(IntegrityError, match="unsafe file path"):
        store.get_dir(escape.digest)
    assert not any(tmp_path.rglob("escaped.txt"))


def test_interrupted_upload_is_invisible_and_a_retry_succeeds(store, checkpoint):
    digest = Manifest.build("checkpoint", None, collect_files(checkpoint)).digest

    with pytest.raises(ConnectionResetError):
        interrupted(store, uploads_before_failure=2).put_dir(checkpoint, "checkpoint")

    orphans = list(store._list_keys(f"artifacts/{digest}/"))
    assert len(orphans) == 2 and manifest_key(digest) not in orphans  # files landed, the manifest did not
    assert not store.exists(digest) and store.list() == []
    with pytest.raises(NotFound):
        store.get_dir(digest)

    ref = store.put_dir(checkpoint, "checkpoint")
    assert ref.digest == digest
    assert tree(store.get_dir(ref.uri)) == tree(checkpoint)


def test_source_changing_during_upload_is_refused(store, checkpoint):
    def grow(source: Path) -> None:
        if source.name == "config.json":
            with source.open("a") as handle:
                handle.write(" ")

    flaky = interrupted(store, uploads_before_failure=99, before_upload=grow)
    with pytest.raises(FailedPrecondition, match="config.json changed while it was being stored"):
        flaky.put_dir(checkpoint, "checkpoint")
    assert store.list() == []


def test_source_vanishing_during_upload_is_refused(store, checkpoint):
    flaky = interrupted(store, uploads_before_failure=99, before_upload=lambda source: source.unlink())
    with pytest.raises(FailedPrecondition, match="vanished"):
        flaky.put_dir(checkpoint, "checkpoint")
    assert store.list() == []


def test_refs_point_at_artifacts_and_can_move(store, checkpoint, tmp_path):
    first = store.put_dir(checkpoint, "dataset")
    second = store.put_file(checkpoint / "config.json", "dataset")

    store.set_ref("datasets/wikitext2", first.uri, {"format": "text"})
    store.set_ref("datasets/ptb", first.digest)
    store.set_ref("models/tiny", second.uri)
    assert store.get_ref("datasets/wikitext2").meta == {"format": "text"}
    store.set_ref("datasets/wikitext2", second.uri)

    assert store.get_ref("datasets/wikitext2").uri == second.uri
    assert store.get_ref("datasets/ptb").uri == first.uri  # a bare digest is normalised
    assert [r.name for r in store.list_refs("datasets/")] == ["datasets/ptb", "datasets/wikitext2"]
    assert [r.name for r in store.list_refs("")] == ["datasets/ptb", "datasets/wikitext2", "models/tiny"]
    assert store.list_refs("nothing/") == []


def test_ref_errors(store, checkpoint):
    ref = store.put_dir(checkpoint, "dataset")
    with pytest.raises(NotFound, match="no such artifact"):
        store.set_ref("datasets/x", DIGEST)
    with pytest.raises(NotFound, match="no ref named 'datasets/absent'"):
        store.get_ref("datasets/absent")
    for bad in ("../escape", "/abs", "a//b", "", "a/.hidden", "sp ace"):
        with pytest.raises(InvalidArgument) as err:
            store.set_ref(bad, ref.uri)
        assert err.value.field == "name"


def test_absent_artifact_is_not_found(store):
    for call in (store.stat, store.get_dir):
        with pytest.raises(NotFound, match=f"artifact://{DIGEST} not found"):
            call(f"artifact://{DIGEST}")


def test_bad_inputs_to_put(store, tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: store.put_dir(tmp_path / "absent", "checkpoint"), "path", "not a directory"),
        (lambda: store.put_dir(tmp_path / "empty", "checkpoint"), "path", "no files"),
        (lambda: store.put_file(checkpoint, "checkpoint"), "path", "not a file"),
        (lambda: store.put_dir(checkpoint, "Bad Kind"), "kind", "lowercase"),
        (lambda: store.put_dir(checkpoint, "checkpoint", {"when": object()}), "meta", "plain JSON"),
        (lambda: store.put_dir(checkpoint, "checkpoint", {"x": float("nan")}), "meta", "plain JSON"),
    ]
    for call, field, reason in cases:
        with pytest.raises(InvalidArgument, match=reason) as err:
            call()
        assert err.value.field == field
    assert store.list() == []


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "empty"),
        ("artifact://abc", "64 lowercase hex digits, got 3"),
        ("AB" * 32, "64 lowercase hex"),
        (f"artifact://{DIGEST}/config.json", "64 lowercase hex"),
        (f"s3://bucket/{DIGEST}", "not an artifact URI"),
        ("g" * 64, "64 lowercase hex"),
    ],
)
def test_parse_artifact_uri_rejects_with_reason(value, reason):
    with pytest.raises(InvalidArgument, match=reason) as err:
        parse_artifact_uri(value)
    assert err.value.field == "uri"


def test_parse_artifact_uri_accepts_uri_and_bare_digest():
    assert parse_artifact_uri(f"artifact://{DIGEST}") == DIGEST == parse_artifact_uri(DIGEST)


def test_local_get_dir_rehashes_after_an_edit(tmp_path, checkpoint):
    store = LocalStore(tmp_path / "store")
    ref = store.put_dir(checkpoint, "checkpoint")
    files = store.get_dir(ref.uri)  # verified and remembered
    assert files == store.root / "artifacts" / ref.digest / "files"
    assert stat.S_IMODE((files / "config.json").stat().st_mode) == 0o444  # a hint not to edit it

    overwrite_stored(store, file_key(ref.digest, "config.json"), b'{"hidden_size": 99}')
    with pytest.raises(IntegrityError, match="config.json"):
        store.get_dir(ref.uri)


def test_local_get_dir_refuses_unlisted_files(tmp_path, checkpoint):
    store = LocalStore(tmp_path / "store")
    ref = store.put_dir(checkpoint, "checkpoint")
    (store.get_dir(ref.uri) / "planted.py").write_text("print('hi')")

    with pytest.raises(IntegrityError, match="planted.py"):
        store.get_dir(ref.uri)


@pytest.mark.parametrize("location", ["{tmp}/store", "file://{tmp}/store", "file://localhost{tmp}/store"])
def test_open_store_local_locations(tmp_path, monkeypatch, location):
    monkeypatch.setenv("PRUNELAB_STORE", location.format(tmp=tmp_path))
    settings.cache_clear()
    store = open_store()
    assert isinstance(store, LocalStore) and store.root == tmp_path / "store"


@pytest.mark.parametrize(
    "location, reason",
    [
        ("gs://bucket", "use a path, file:///abs/path or s3://"),
        ("s3://", "names no bucket"),
        ("file://otherhost/x", "absolute local path"),
    ],
)
def test_open_store_rejects_bad_locations(monkeypatch, location, reason):
    monkeypatch.setenv("PRUNELAB_STORE", location)
    settings.cache_clear()
    with pytest.raises(InvalidArgument, match=reason) as err:
        open_store()
    assert err.value.field == "PRUNELAB_STORE"


def test_default_store_lives_under_home(prunelab_home):
    store = open_store()
    assert isinstance(store, LocalStore) and store.root == prunelab_home / "store"

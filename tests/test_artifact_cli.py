"""Data in and artifacts out of a deployment over the orchestrator's gRPC API, on a
real socket: `prunelab data import --orchestrator`, `prunelab artifact list/get`
(through the orchestrator, from the configured store and from an S3 store named
by URL), refused uploads that store nothing, and a download whose bytes do not
match the manifest refused by the client. The local cluster runs the same against
SeaweedFS in tests/test_deployment_io.py."""

from __future__ import annotations

import grpc
import pytest

from prunelab.cli import main
from prunelab.config import settings
from prunelab.data import get_dataset, list_datasets, resolve_text
from prunelab.errors import IntegrityError
from prunelab.orchestrate import StudyDB
from prunelab.orchestrate.service import SERVICE_NAME, OrchestratorServicer, registration
from prunelab.orchestrate.transfer import download_artifact
from prunelab.rpc import error_detail, make_channel
from prunelab.store import open_store
from prunelab.v1 import orchestrator_pb2 as pb2
from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("the quick brown fox\njumps over the lazy dog\n")
    (folder / "validation.txt").write_text("pruning removes heads\nand channels\n")
    return folder


@pytest.fixture
def serve_orchestrator(grpc_server, tmp_path):
    """`serve_orchestrator(servicer_class=OrchestratorServicer)` -> "host:port"."""
    def start(servicer_class=OrchestratorServicer) -> str:
        db = StudyDB(tmp_path / "orchestrator.db")
        return grpc_server(registration(servicer_class(db)), [SERVICE_NAME]).target
    return start


def test_a_dataset_goes_in_and_its_artifact_comes_out_through_the_orchestrator(serve_orchestrator, corpus, tmp_path, capsys):
    target = serve_orchestrator()
    assert main(["data", "import", "corpus", str(corpus), "--orchestrator", target]) == 0
    out = capsys.readouterr().out
    assert "corpus: text, train (2 rows, 9 words), validation (2 rows, 5 words) -> artifact://" in out
    dataset = get_dataset("corpus")
    assert dataset.uri in out and resolve_text("corpus", "validation") == resolve_text(str(corpus), "validation")

    assert main(["artifact", "list", "--kind", "dataset", "--orchestrator", target]) == 0
    assert dataset.uri in capsys.readouterr().out
    assert main(["artifact", "list", "--kind", "report", "--orchestrator", target, "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"

    for where in (["--orchestrator", target], []):  # the deployment's store over gRPC; the configured store
        out_dir = tmp_path / f"out{len(where)}"
        assert main(["artifact", "get", dataset.uri, "--out", str(out_dir), *where]) == 0
        assert "2 files verified" in capsys.readouterr().out
        assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == {
            "train.txt": (corpus / "train.txt").read_bytes(), "validation.txt": (corpus / "validation.txt").read_bytes()}


def _upload(stub: OrchestratorStub, *requests: pb2.ImportDatasetRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        stub.ImportDataset(iter(requests))
    return failed.value


def test_bad_uploads_are_refused_with_the_reason_and_store_nothing(serve_orchestrator, corpus, monkeypatch, capsys):
    header = pb2.ImportDatasetRequest(header=pb2.ImportDatasetHeader(name="bad", split="validation"))
    chunk = lambda path, data: pb2.ImportDatasetRequest(chunk=pb2.FileChunk(path=path, data=data))  # noqa: E731
    monkeypatch.setenv("PRUNELAB_MAX_UPLOAD_BYTES", "64")
    settings.cache_clear()
    with make_channel(serve_orchestrator()) as channel:
        stub = OrchestratorStub(channel)
        refusals = {
            "no header": _upload(stub, chunk("valid.txt", b"text\n")),
            "unsafe path": _upload(stub, header, chunk("../valid.txt", b"text\n")),
            "too large": _upload(stub, header, chunk("valid.txt", b"x" * 40), chunk("valid.txt", b"x" * 40)),
            "two files, no folder": _upload(stub, header, chunk("a.txt", b"a\n"), chunk("b.txt", b"b\n")),
            "unreadable": _upload(stub, pb2.ImportDatasetRequest(header=pb2.ImportDatasetHeader(name="bad", format="jsonl")),
                                  chunk("valid.jsonl", b"{not json\n")),
        }
    for why, error in refusals.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (why, error.details())
    assert "header" in refusals["no header"].details()
    assert error_detail(refusals["unsafe path"]).field == "chunk.path"
    assert "PRUNELAB_MAX_UPLOAD_BYTES" in refusals["too large"].details()
    assert open_store().list() == [] and list_datasets() == []

    # the CLI reports the server's reason as it would a local one
    assert main(["data", "import", "corpus", str(corpus), "--orchestrator", serve_orchestrator()]) == 2
    assert "PRUNELAB_MAX_UPLOAD_BYTES" in capsys.readouterr().err


class _CorruptingServicer(OrchestratorServicer):
    """Sends an artifact's chunks with one byte flipped, as a broken proxy or disk would."""

    def GetArtifact(self, request, context):
        for response in super().GetArtifact(request, context):
            if response.WhichOneof("part") == "chunk":
                response.chunk.data = bytes([response.chunk.data[0] ^ 1]) + response.chunk.data[1:]
            yield response


def test_a_download_that_does_not_match_its_manifest_is_refused_and_leaves_nothing(serve_orchestrator, corpus, tmp_path):
    uri = open_store().put_dir(corpus, "dataset").uri
    with make_channel(serve_orchestrator(_CorruptingServicer)) as channel:
        with pytest.raises(IntegrityError, match="sha256"):
            download_artifact(OrchestratorStub(channel), uri, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.s3
def test_artifact_list_and_get_from_an_s3_store_named_by_url(s3_store, corpus, tmp_path, monkeypatch, capsys):
    uri = s3_store.put_dir(corpus, "model").uri
    url = settings().store
    monkeypatch.delenv("PRUNELAB_STORE")  # the configured store is now the local one; the keys stay in the env
    settings.cache_clear()
    assert main(["artifact", "list", "--store", url]) == 0
    assert uri in capsys.readouterr().out
    assert main(["artifact", "list"]) == 0
    assert uri not in capsys.readouterr().out
    assert main(["artifact", "get", uri, "--store", url, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "train.txt").read_bytes() == (corpus / "train.txt").read_bytes()


@pytest.mark.s3
def test_data_import_and_list_into_an_s3_store_named_by_url(s3_store, corpus, monkeypatch, capsys):
    url = settings().store
    monkeypatch.delenv("PRUNELAB_STORE")  # the configured store is the local one; the deployment's keys stay in the env
    settings.cache_clear()
    assert main(["data", "import", "notes", str(corpus / "train.txt"), "--store", url]) == 0
    assert main(["data", "list", "--store", url]) == 0
    assert "notes" in capsys.readouterr().out.split("\n", 1)[1]
    assert main(["data", "list"]) == 0
    assert "notes" not in capsys.readouterr().out
    assert get_dataset("notes", s3_store).splits["train"].rows > 0

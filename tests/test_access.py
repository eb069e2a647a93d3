"""Workers read only what they are given (prunelab.access): over a real socket a request
may name local files only under the read roots, symlinks resolved, and is refused
PERMISSION_DENIED otherwise, alike for files that exist and files that do not; the
embedded mode (in-process calls, the CLI) still reads any path."""

from __future__ import annotations

import os

import grpc
import pytest

from prunelab.access import confined, local_path, remote_request
from prunelab.cli.study import _save_files
from prunelab.config import settings
from prunelab.errors import IntegrityError, PermissionDenied
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.rpc import call_in_process
from prunelab.rpc.status import error_detail
from prunelab.store import open_store
from prunelab.tune.service import SERVICE_NAME as TUNER
from prunelab.tune.service import TunerServicer
from prunelab.tune.service import registration as tuner_registration
from prunelab.v1 import tuner_pb2, tuner_pb2_grpc
from prunelab.v1.evaluator_pb2 import EvaluateRequest
from prunelab.v1.evaluator_pb2_grpc import EvaluatorStub
from prunelab.v1.orchestrator_pb2 import GetReportResponse, ReportFile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECRET = "s3cret-in-the-environment"


@pytest.fixture
def roots(tmp_path, monkeypatch, tiny_checkpoint):
    """Read roots: a data folder and the checkpoint's folder only; `outside` is a folder
    next to them holding a file a hostile request would like to read."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "validation.txt").write_text("the allowed text is read .\n" * 40)
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}\n" * 40)
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(data))
    monkeypatch.setenv("PRUNELAB_READ_ROOTS", str(tiny_checkpoint.parent))
    settings.cache_clear()
    return {"data": data, "outside": outside}


@pytest.fixture
def evaluator(grpc_server, grpc_channel) -> EvaluatorStub:
    running = grpc_server(evaluator_registration(EvaluatorServicer()), [EVALUATOR])
    return EvaluatorStub(grpc_channel(running.target))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert SECRET not in caught.value.details()
    return caught.value


def evaluate(stub: EvaluatorStub, model: str, corpus: str):
    return lambda: list(stub.Evaluate(EvaluateRequest(model=model, ppl_corpora=[corpus], seq_len=8), timeout=120))


HOSTILE_CORPORA = ["/proc/self/environ", "{outside}/secret.txt", "{outside}/no-such-file.txt", "{outside}",
                   "../outside/secret.txt", "~/.bashrc", "/etc/../etc/passwd"]


@pytest.mark.parametrize("corpus", HOSTILE_CORPORA)
def test_evaluator_refuses_corpora_outside_the_read_roots(evaluator, roots, tiny_checkpoint, corpus):
    corpus = corpus.format(outside=roots["outside"])
    error = refusal(evaluate(evaluator, str(tiny_checkpoint), corpus))
    assert error_detail(error).field == "dataset"
    assert "is not readable by this service" in error.details()


def test_the_refusal_does_not_tell_whether_a_path_exists(evaluator, roots, tiny_checkpoint):
    there = refusal(evaluate(evaluator, str(tiny_checkpoint), f"{roots['outside']}/secret.txt")).details()
    absent = refusal(evaluate(evaluator, str(tiny_checkpoint), f"{roots['outside']}/absent.txt")).details()
    assert there.replace("secret", "X") == absent.replace("absent", "X")


def test_a_symlink_out_of_the_data_folder_is_refused_and_one_inside_is_read(evaluator, roots, tiny_checkpoint):
    (roots["data"] / "leak").symlink_to(roots["outside"], target_is_directory=True)
    (roots["outside"] / "validation.txt").write_text(f"{SECRET}\n" * 40)
    refusal(evaluate(evaluator, str(tiny_checkpoint), "leak"))
    refusal(evaluate(evaluator, str(tiny_checkpoint), str(roots["data"] / "leak" / "validation.txt")))
    (roots["data"] / "alias").symlink_to(roots["data"] / "corpus", target_is_directory=True)
    for corpus in ("corpus", "alias", str(roots["data"] / "corpus" / "validation.txt")):
        result = evaluate(evaluator, str(tiny_checkpoint), corpus)()[-1].result
        assert result.perplexity[0].ppl > 1, corpus


@pytest.mark.parametrize("model", ["/etc", "{outside}", "../model", "~/model.gguf"])
def test_evaluator_refuses_models_outside_the_read_roots(evaluator, roots, model):
    error = refusal(evaluate(evaluator, model.format(outside=roots["outside"]), "corpus"))
    assert error_detail(error).field == "model"


def test_hub_ids_are_refused_offline_and_outside_the_allowed_orgs(evaluator, roots, monkeypatch):
    assert "PRUNELAB_OFFLINE is on" in refusal(evaluate(evaluator, "some-org/some-model", "corpus")).details()
    monkeypatch.setenv("PRUNELAB_OFFLINE", "false")
    monkeypatch.setenv("PRUNELAB_HUB_ORGS", "trusted-org,HuggingFaceTB")
    settings.cache_clear()
    assert "hub org 'some-org' is not in PRUNELAB_HUB_ORGS" in refusal(evaluate(evaluator, "some-org/some-model", "corpus")).details()
    error = refusal(evaluate(evaluator, "HuggingFaceTB/SmolLM2-135M", "some-org/some-dataset"))
    assert error_detail(error).field == "dataset"


def test_tuner_refuses_training_text_outside_the_read_roots_and_stores_nothing(grpc_server, grpc_channel, roots, tiny_checkpoint):
    server = grpc_server(tuner_registration(TunerServicer(max_concurrent_jobs=1, device="cpu")), [TUNER])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    for data in ("/proc/self/environ", str(roots["outside"] / "secret.txt")):
        request = tuner_pb2.TuneRequest(model=str(tiny_checkpoint), data=data, steps=2, max_length=8)
        refusal(lambda request=request: list(stub.Tune(request, timeout=120)))
    assert open_store().list("model") == [] and open_store().list("adapter") == []


def test_in_process_calls_and_the_cli_read_any_path(roots, tiny_checkpoint):
    """The embedded mode: the user owns the machine."""
    request = EvaluateRequest(model=str(tiny_checkpoint), ppl_corpora=[str(roots["outside"] / "secret.txt")], seq_len=8)
    events = list(call_in_process(EvaluatorServicer().Evaluate, request))
    assert events[-1].result.perplexity[0].ppl > 1


def test_confinement_is_per_request_and_by_process(roots, monkeypatch):
    secret = str(roots["outside"] / "secret.txt")
    assert not confined() and local_path(secret, "dataset") is not None
    with remote_request():
        assert confined()
        with pytest.raises(PermissionDenied):
            local_path(secret, "dataset")
        assert local_path("org/name", "model") is None  # not a path: a name or a hub id
    monkeypatch.setenv("PRUNELAB_CONFINED", "1")  # a service's main program and its children
    with pytest.raises(PermissionDenied):
        local_path(secret, "dataset")
    assert os.environ["PRUNELAB_CONFINED"] == "1"


@pytest.mark.parametrize("name", ["../escaped.md", "/tmp/escaped.md", "a/../../escaped.md", "link/escaped.md", ""])
def test_report_out_writes_only_inside_its_folder(tmp_path, name):
    """`prunelab report --out`: the server names the files; a name that leaves the folder
    fails the copy before anything is written."""
    out, elsewhere = tmp_path / "report", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out).mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    report = GetReportResponse(files=[ReportFile(name="report.md", content=b"fine"), ReportFile(name=name, content=b"bad")])
    with pytest.raises(IntegrityError):
        _save_files(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["link"] and list(elsewhere.iterdir()) == []
    assert not (tmp_path / "escaped.md").exists()
    _save_files(GetReportResponse(files=[ReportFile(name="plots/a.png", content=b"png")]), out)
    assert (out / "plots" / "a.png").read_bytes() == b"png"

"""The Evaluator over a real socket (stream, errors, admission, cancellation), the
same servicer in-process, its entry point as a process, and `prunelab evaluate`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from fixtures.evaluate import SENTENCES
from google.protobuf import json_format

from prunelab.cli import main as cli_main
from prunelab.evaluate.service import SERVICE_NAME, EvaluatorServicer, registration
from prunelab.rpc import call_in_process, check_health, error_detail, job_metadata
from prunelab.store import open_store
from prunelab.v1.evaluator_pb2 import EvaluateRequest
from prunelab.v1.evaluator_pb2_grpc import EvaluatorStub

# Registered here until tests/conftest.py lists it with the other fixture plugins.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
MISSING_ARTIFACT = "artifact://" + "0" * 64


@pytest.fixture
def evaluator(grpc_server, grpc_channel) -> EvaluatorStub:
    running = grpc_server(registration(EvaluatorServicer()), [SERVICE_NAME])
    return EvaluatorStub(grpc_channel(running.target))


def quick_request(checkpoint: Path, text: Path, **fields) -> EvaluateRequest:
    return EvaluateRequest(model=str(checkpoint), ppl_corpora=[str(text)], seq_len=8, **fields)


def test_evaluate_streams_progress_then_the_stored_result(evaluator, tiny_checkpoint, stored_tasks, text_file):
    request = quick_request(tiny_checkpoint, text_file, job_id="job-1", tasks=["arc_easy"], limit=4)
    *progress, last = evaluator.Evaluate(request, metadata=job_metadata("job-1"))

    assert {event.WhichOneof("event") for event in progress} == {"progress"}
    assert [event.progress.phase for event in progress][0] == "load"
    assert {event.progress.phase for event in progress} == {"load", f"ppl:{text_file}", "task:arc_easy", "store"}
    assert {event.progress.job_id for event in progress} == {"job-1"}
    result = last.result
    [score] = result.tasks
    assert (score.task, score.n, score.num_fewshot, score.version) == ("arc_easy", 4, 0, "1.0")
    assert score.acc == score.metrics["acc,none"] and score.acc_norm_stderr == score.metrics["acc_norm_stderr,none"]
    [ppl] = result.perplexity
    assert (ppl.corpus, ppl.split, ppl.seq_len, ppl.dtype) == (str(text_file), "validation", 8, "float32")
    assert ppl.tokens == ppl.windows * 7 and math.isclose(ppl.ppl, math.exp(ppl.mean_nll))
    assert not result.HasField("average")  # one study task of five
    assert (result.evaluation.kind, open_store().exists(result.evaluation.uri)) == ("evaluation", True)
    data = json_format.MessageToDict(result.report.data)
    assert data["lm_eval"]["n-samples"]["arc_easy"] == {"original": 10.0, "effective": 4.0}
    provenance = result.report.provenance
    assert (provenance.producer, provenance.job_id, provenance.params["limit"]) == ("evaluator", "job-1", "4")
    assert provenance.inputs[0].digest == result.checkpoint_sha256 == data["checkpoint"]["sha256"]


@pytest.mark.parametrize(
    ("fields", "code", "field", "reason_parts"),
    [
        ({"model": "m", "tasks": ["helaswag"]}, "INVALID_ARGUMENT", "tasks", ["closest: hellaswag"]),
        (
            {"model": "m", "tasks": ["boolq"]},
            "FAILED_PRECONDITION",
            "tasks",
            ["aps/super_glue/boolq", "prunelab data import boolq PATH.jsonl --split validation"],
        ),
        ({"model": MISSING_ARTIFACT, "ppl_corpora": ["wikitext2"]}, "NOT_FOUND", "uri", ["not found in store"]),
        ({"tasks": ["boolq"]}, "INVALID_ARGUMENT", "model", ["name the checkpoint"]),
        ({"model": "m", "tasks": ["boolq"], "seq_len": -1}, "INVALID_ARGUMENT", "seq_len", ["at least 2"]),
    ],
    ids=["unknown-task", "data-missing-offline", "checkpoint-missing", "no-model", "bad-seq-len"],
)
def test_errors_have_their_status_remotely_and_in_process(evaluator, fields, code, field, reason_parts):
    request = EvaluateRequest(**fields)
    failures = []
    for call in (lambda: list(evaluator.Evaluate(request)), lambda: list(call_in_process(EvaluatorServicer().Evaluate, request))):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        failures.append(caught.value)
    for failure in failures:
        assert failure.code().name == code
        assert all(part in failure.details() for part in reason_parts), failure.details()
        assert error_detail(failure).field == field


def test_admits_max_concurrent_jobs_and_frees_the_slot_when_a_job_is_cancelled(evaluator, tiny_checkpoint, text_file, tmp_path):
    long_text = tmp_path / "long.txt"
    long_text.write_text("\n".join(SENTENCES * 100))  # thousands of 2-token windows: minutes
    running = evaluator.Evaluate(EvaluateRequest(model=str(tiny_checkpoint), ppl_corpora=[str(long_text)], seq_len=2, batch_size=1))
    assert next(running).progress.phase == "load"  # the job holds this replica's one slot

    with pytest.raises(grpc.RpcError) as caught:
        list(evaluator.Evaluate(quick_request(tiny_checkpoint, text_file)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PRUNELAB_MAX_CONCURRENT_JOBS" in caught.value.details()

    running.cancel()  # the job stops at its next window and gives the slot back
    deadline = time.monotonic() + 30
    while True:
        try:
            *_, last = evaluator.Evaluate(quick_request(tiny_checkpoint, text_file))
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)
    assert last.result.perplexity[0].windows > 0


def test_entry_point_serves_the_evaluator_and_stops_on_sigterm(tmp_path):
    log_path = tmp_path / "evaluator.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "services/evaluator/main.py"],
            cwd=REPO,
            stderr=log_file,
            env={**os.environ, "PRUNELAB_GRPC_PORT": "0", "PRUNELAB_LOG_LEVEL": "INFO"},
        )
    try:
        deadline = time.monotonic() + 120  # importing torch, transformers and lm-eval on a busy machine
        while "serving prunelab.v1.Evaluator on" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        port = log_path.read_text().split("serving prunelab.v1.Evaluator on 127.0.0.1:")[1].split()[0]
        assert check_health(f"127.0.0.1:{port}", SERVICE_NAME) == "SERVING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_prints_one_json_document_of_ppl_and_task_scores(tiny_checkpoint, stored_tasks, text_file, capsys):
    argv = ["evaluate", "--model", str(tiny_checkpoint), "--ppl", str(text_file), "--seq-len", "8"]
    assert cli_main([*argv, "--tasks", "piqa,boolq", "--limit", "3", "--json"]) == 0

    document = json.loads(capsys.readouterr().out)
    assert set(document["tasks"]) == {"piqa", "boolq"}
    assert set(document["tasks"]["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert document["tasks"]["piqa"]["n"] == 3 and document["tasks"]["boolq"]["acc_norm"] is None
    assert document["ppl"][str(text_file)]["seq_len"] == 8
    assert open_store().exists(document["evaluation"])


def test_cli_unknown_task_exits_2_with_the_closest_names(tiny_checkpoint, capsys):
    assert cli_main(["evaluate", "--model", str(tiny_checkpoint), "--tasks", "arc_chalenge"]) == 2
    assert "unknown lm-eval task 'arc_chalenge'; closest: arc_challenge" in capsys.readouterr().err

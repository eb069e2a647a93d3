"""Recovery by distillation and full-parameter tuning on tiny models: the kd loss against
a hand computation, the teacher frozen and untouched, the teacher found through the
pruned checkpoint's provenance, full-parameter runs that resume exactly, keep a sparse
model's zeros and still return the input when every step is worse, two torchrun
processes (gloo) that match one, and a kd job through the tuner service over a socket."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import grpc
import psutil
import pytest
import torch
from fixtures.models import tiny_causal_lm
from test_tune import corpus, half_trained_llama, job_dirs, one_thread, tiny_dir, tiny_settings, weights  # noqa: F401 (fixtures)
from test_tune_sparse import sparse_dir  # noqa: F401 (fixture)

from prunelab.errors import InvalidArgument
from prunelab.models import read_provenance
from prunelab.prune import PruneSettings, run_prune
from prunelab.rpc import error_detail
from prunelab.store import open_store
from prunelab.tune import job as tune_job
from prunelab.tune import run_tune
from prunelab.tune.data import IGNORE_INDEX
from prunelab.tune.objective import Objective
from prunelab.tune.service import SERVICE_NAME, TunerServicer, registration
from prunelab.tune.sparsity import decoder_linears
from prunelab.v1 import tuner_pb2, tuner_pb2_grpc


def kd_by_hand(student_logits, teacher_logits, labels, temperature: float) -> float:
    """sum over labelled positions t of T^2 * sum_v p(v) * (log p(v) - log q(v)), with p
    the teacher's and q the student's softmax of logits / T at position t - 1."""
    total = 0.0
    for row in range(labels.size(0)):
        for t in range(1, labels.size(1)):
            if labels[row, t] == IGNORE_INDEX:
                continue
            p = [math.exp(x / temperature) for x in teacher_logits[row, t - 1].tolist()]
            q = [math.exp(x / temperature) for x in student_logits[row, t - 1].tolist()]
            p_sum, q_sum = sum(p), sum(q)
            total += sum(pv / p_sum * (math.log(pv / p_sum) - math.log(qv / q_sum)) for pv, qv in zip(p, q, strict=True))
    return temperature**2 * total


def test_kd_loss_equals_the_hand_computed_kl():
    student, teacher = tiny_causal_lm("llama", seed=1), tiny_causal_lm("llama", seed=2)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a masked prompt: its positions carry no loss
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        student_logits, teacher_logits = student(ids).logits.double(), teacher(ids).logits.double()
        kd = Objective("kd", teacher, temperature=2.0)(student, batch).item()
        both = Objective("kd+ce", teacher, temperature=2.0, kd_weight=0.25)(student, batch).item()
        ce = Objective("ce")(student, batch).item()
    expected = kd_by_hand(student_logits, teacher_logits, labels, 2.0)
    assert expected > 0.1 and math.isclose(kd, expected, rel_tol=1e-4)
    assert math.isclose(both, 0.25 * expected + 0.75 * ce, rel_tol=1e-4)
    with torch.no_grad():
        assert Objective("kd", student)(student, batch).item() == pytest.approx(0.0, abs=1e-4)  # its own teacher: KL 0


@pytest.fixture
def pruned(tiny_dir):  # noqa: F811 (tiny_dir is the imported fixture)
    """The tiny Llama with 30 % of its parameters removed: its provenance names tiny_dir as its base."""
    settings = PruneSettings(ratio=0.3, method="l2", attn_layers="0:4", mlp_layers="0:4", calibration="corpus", samples=4,
                             seq_len=16, correction=False)
    return run_prune(str(tiny_dir), settings).artifact.uri


def test_kd_distils_from_the_model_it_was_pruned_from_which_stays_frozen(pruned, tiny_dir, monkeypatch):  # noqa: F811
    loaded_teachers = []

    def record_teacher(*args):
        teacher = load_teacher(*args)
        loaded_teachers.append((teacher, {k: v.clone() for k, v in teacher.model.state_dict().items()}))
        return teacher

    load_teacher = tune_job.load_teacher
    monkeypatch.setattr(tune_job, "load_teacher", record_teacher)
    outcome = run_tune(pruned, tiny_settings(objective="kd", temperature=2.0))
    [(teacher, before)] = loaded_teachers
    assert teacher.source.spec == str(tiny_dir) and outcome.teacher == {"spec": str(tiny_dir), "sha256": teacher.source.sha256}
    assert not teacher.model.training and all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(value, before[name]) for name, value in teacher.model.state_dict().items())
    # kd lowers the student's next-token perplexity on text that chose nothing
    assert outcome.best_step > 0 and outcome.heldout_ppl_after < outcome.heldout_ppl_before
    assert outcome.objective == "kd" and outcome.trained == "lora" and outcome.memory["teacher_bytes"] > 0
    assert 0 < outcome.trainable_params < 0.2 * sum(p.numel() for p in teacher.model.parameters())  # the adapters only
    assert outcome.tokens_seen == 12 * 4 * 31  # steps x examples x predicted tokens per 32-token window
    record = read_provenance(open_store().get_dir(outcome.artifact.uri))
    assert record["objective"] == "kd" and record["teacher"]["spec"] == str(tiny_dir) and record["tokens_seen"] == outcome.tokens_seen


def test_kd_of_a_model_with_no_recorded_base_asks_for_a_teacher(tiny_dir):  # noqa: F811
    with pytest.raises(InvalidArgument, match="records no model it was pruned from; name a teacher"):
        run_tune(str(tiny_dir), tiny_settings(objective="kd"))
    assert open_store().list(kind="model") == []


def test_full_parameter_tuning_resumes_after_an_interruption_as_if_never_stopped(pruned):
    settings = tiny_settings(full=True, objective="kd+ce", lr=1e-3)

    def crash_at_step_8(update):
        if update.training is not None and update.training.step == 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_tune(pruned, settings, progress=crash_at_step_8)
    resumed = run_tune(pruned, settings)
    uninterrupted = run_tune(pruned, settings)
    assert resumed.resumed_from_step == 6 and uninterrupted.resumed_from_step is None
    assert resumed.adapter is None and resumed.trained == "full" and resumed.tokens_seen == uninterrupted.tokens_seen
    # AdamW: two fp32 moments per weight, and a step count per tensor
    assert 0 < resumed.memory["optimizer_bytes"] - 2 * resumed.memory["student_bytes"] < 1024
    for a, b in zip(resumed.curve, uninterrupted.curve, strict=True):
        assert math.isclose(a.val_ppl, b.val_ppl, rel_tol=1e-5)
    first, second = weights(resumed.artifact.uri), weights(uninterrupted.artifact.uri)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    assert resumed.best_step > 0 and any(not torch.equal(first[k], weights(pruned)[k]) for k in first)  # every weight trains


def test_full_parameter_tuning_with_a_harmful_learning_rate_returns_the_input(pruned):
    outcome = run_tune(pruned, tiny_settings(full=True, objective="kd", lr=10.0, schedule="constant"))
    assert outcome.best_step == 0 and outcome.heldout_ppl_after == outcome.heldout_ppl_before
    tuned, original = weights(outcome.artifact.uri), weights(pruned)
    assert all(torch.equal(tuned[k], original[k]) for k in original)


def test_full_parameter_tuning_keeps_a_sparse_models_zeros(sparse_dir):  # noqa: F811
    outcome = run_tune(str(sparse_dir), tiny_settings(full=True, steps=6))
    assert outcome.best_step > 0
    tuned = tune_job.load_model(outcome.artifact.uri).model
    source = tune_job.load_model(str(sparse_dir)).model
    for (key, linear), (_, original) in zip(decoder_linears(tuned), decoder_linears(source), strict=True):
        assert torch.equal(linear.weight == 0, original.weight == 0), key
        assert not torch.equal(linear.weight, original.weight), key  # the kept weights trained


# ---- data-parallel over processes ----


def prunelab_json(*command: str) -> dict:
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("trained", [["--dropout", "0"], ["--full", "--objective", "kd+ce"]], ids=["lora-ce", "full-kd+ce"])
def test_two_torchrun_processes_match_one_with_the_same_global_batch(pruned, trained):
    """Each step's 4 examples split 2 + 2 over two gloo processes, gradients summed:
    the curve within 1e-5 (relative) and the weights within 1e-4 of one process's
    (measured: at most 1.3e-5 apart after 6 full-parameter AdamW steps, from the order
    of float additions). LoRA dropout is off: its draws differ between ranks."""
    argv = ["-m", "prunelab.cli", "tune", "--model", pruned, "--data", "corpus", "--steps", "6", "--eval-every", "3",
            "--lr", "3e-3", "--max-length", "32", "--batch-size", "4", "--json", *trained]
    one = prunelab_json(*argv)
    two = prunelab_json("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv)
    assert two["tokens_seen"] == one["tokens_seen"] == 6 * 4 * 31 and two["best_step"] == one["best_step"] > 0
    for a, b in zip(one["curve"], two["curve"], strict=True):
        assert math.isclose(a["val_ppl"], b["val_ppl"], rel_tol=1e-5)
    first, second = weights(one["artifact"]), weights(two["artifact"])
    assert all(torch.allclose(first[k], second[k], atol=1e-4) for k in first)
    assert job_dirs() == []  # rank 0 removed the snapshots once published


# ---- the service ----


def test_service_runs_a_kd_job_with_progress(pruned, grpc_server, grpc_channel, tiny_dir):  # noqa: F811
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu")), [SERVICE_NAME])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    request = tuner_pb2.TuneRequest(job_id="kd1", model=pruned, data="corpus", steps=6, eval_every=3, lr=3e-3, max_length=32,
                                    objective="kd", temperature=2.0, full=True)
    events = list(stub.Tune(request, timeout=120))
    assert [e.metrics.step for e in events if e.HasField("metrics")] == list(range(7))
    result = events[-1].result
    assert result.objective == "kd" and result.trained == "full" and result.teacher == str(tiny_dir)
    assert not result.HasField("adapter") and result.tokens_seen == 6 * 4 * 31 and result.teacher_bytes > 0
    assert result.trainable_params == sum(p.numel() for p in tune_job.load_model(pruned).model.parameters())
    assert result.best_step > 0 and result.heldout_ppl_after < result.heldout_ppl_before


def test_a_two_process_tuner_service_streams_the_job_of_its_torchrun_ranks(pruned, grpc_server, grpc_channel, tiny_dir):  # noqa: F811
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu", processes=2)), [SERVICE_NAME])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    request = tuner_pb2.TuneRequest(job_id="kd2", model=pruned, data="corpus", steps=6, eval_every=3, lr=3e-3, max_length=32,
                                    objective="kd", full=True)
    events = list(stub.Tune(request, timeout=300))
    assert [e.metrics.step for e in events if e.HasField("metrics")] == list(range(7))
    assert {e.progress.phase for e in events if e.HasField("progress")} == {"load", "train", "save", "done"}
    result = events[-1].result
    assert result.job_id == "kd2" and result.trained == "full" and result.teacher == str(tiny_dir)
    assert result.tokens_seen == 6 * 4 * 31 and result.best_step > 0 and open_store().exists(result.artifact.uri)
    assert result.heldout_ppl_after < result.heldout_ppl_before and job_dirs() == []


def test_cancelling_a_two_process_job_stops_its_processes(pruned, grpc_server, grpc_channel):
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu", processes=2)), [SERVICE_NAME])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    call = stub.Tune(tuner_pb2.TuneRequest(model=pruned, data="corpus", steps=500, eval_every=100, max_length=32), timeout=300)
    for event in call:
        if event.HasField("metrics") and event.metrics.step >= 2:
            break
    assert torchrun_children()  # training, in its own processes
    call.cancel()
    deadline = time.monotonic() + 30
    while torchrun_children() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not torchrun_children()
    assert open_store().list(kind="model") == [open_store().stat(pruned)]  # nothing published


def torchrun_children() -> list[str]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            found += [" ".join(child.cmdline())] if "torch.distributed.run" in child.cmdline() else []
        except psutil.Error:  # ended while looked at
            pass
    return found


def test_a_two_process_job_that_fails_reports_the_ranks_error(corpus, grpc_server, grpc_channel, tmp_path):  # noqa: F811
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu", processes=2)), [SERVICE_NAME])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Tune(tuner_pb2.TuneRequest(model=str(tmp_path / "no-model"), data=corpus, steps=2), timeout=300))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "no-model" in caught.value.details()


@pytest.mark.parametrize("fields, field", [
    ({"objective": "distil"}, "objective"),
    ({"teacher": "smollm2-135m"}, "teacher"),  # a teacher with the ce objective
    ({"objective": "kd+ce", "kd_weight": 1.5}, "kd_weight"),
    ({"objective": "kd", "temperature": -1.0}, "temperature"),
])
def test_service_refuses_bad_distillation_settings(corpus, tmp_path, grpc_server, grpc_channel, fields, field):  # noqa: F811
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu")), [SERVICE_NAME])
    stub = tuner_pb2_grpc.TunerStub(grpc_channel(server.target))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Tune(tuner_pb2.TuneRequest(model=str(tmp_path / "never-read"), data=corpus, **fields), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_detail(caught.value).field == field

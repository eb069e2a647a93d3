"""The tuner on tiny models: the guard (step 0 wins over a harmful learning rate, a
NaN stops training and keeps the best state), merged models equal base + adapter and
reload in plain transformers (per-layer widths too), interrupted jobs resume, the
data (Alpaca prompt masking, held-out text), the CLI and the service over a socket."""

from __future__ import annotations

import json
import math

import grpc
import pytest
import torch
from fixtures.models import tiny_causal_lm
from peft import PeftModel
from safetensors import safe_open

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.data import import_dataset
from prunelab.models import load_model, read_provenance, save_checkpoint
from prunelab.prune import PruneSettings, run_prune
from prunelab.rpc import error_detail
from prunelab.store import open_store
from prunelab.tune import ALPACA_PROMPT_NO_INPUT, TuneSettings, run_tune
from prunelab.tune.data import IGNORE_INDEX, build_tune_data
from prunelab.tune.service import SERVICE_NAME, TunerServicer, registration
from prunelab.tune.trainer import learning_rate
from prunelab.v1 import tuner_pb2, tuner_pb2_grpc

TEXT = " ".join(
    f"the {a} {b} jumps over the lazy {c} while pruning removes heads and channels number {n}."
    for n, (a, b, c) in enumerate([("quick", "brown", "dog"), ("slow", "red", "cat"), ("small", "grey", "fox")] * 40)
)
ANIMALS = [("quick brown", "fox"), ("lazy", "dog"), ("slow red", "cat"), ("small grey", "fox")]


@pytest.fixture(autouse=True)
def one_thread(torch_single_thread):
    yield


def half_trained_llama(tokenizer, **overrides):
    """A tiny Llama given 20 AdamW steps on TEXT: past random (so a harmful learning
    rate can make it worse) but with room to improve (validation ppl ~4.4)."""
    model = tiny_causal_lm("llama", **overrides)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        batch = windows[torch.randint(0, len(windows), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def corpus(tmp_path) -> str:
    """TEXT stored in the registry as the text dataset `corpus` (train split)."""
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    import_dataset("corpus", path, split="train")
    return "corpus"


@pytest.fixture
def tiny_dir(corpus, tiny_tokenizer, tmp_path):
    """The half-trained tiny Llama as a checkpoint directory."""
    return save_checkpoint(half_trained_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "tiny", {"method": "none"})


def tiny_settings(**overrides) -> TuneSettings:
    base = dict(data="corpus", steps=12, lr=3e-3, eval_every=3, max_length=32, batch_size=4, patience=3)
    return TuneSettings(**{**base, **overrides})


def weights(spec: str) -> dict[str, torch.Tensor]:
    return load_model(spec).model.state_dict()


def job_dirs() -> list:
    jobs = settings().home / "jobs"
    return sorted(jobs.iterdir()) if jobs.is_dir() else []


# ---- the guard ----


def test_tuning_improves_validation_and_records_the_curve(tiny_dir):
    outcome = run_tune(str(tiny_dir), tiny_settings())
    assert [p.step for p in outcome.curve] == [0, 3, 6, 9, 12]
    assert outcome.best_step == 12 and outcome.stop == "completed"
    assert outcome.reason == "step 12: best of 5 evaluations; ran all 12 steps"
    assert outcome.precision == "float32"
    assert math.isclose(outcome.val_ppl_after, outcome.curve[-1].val_ppl, rel_tol=1e-5)  # measured again once merged
    # the held-out split chose nothing: the recovery it shows is not selected for (measured: 4.32 -> 3.84)
    assert outcome.heldout_ppl_after < 0.92 * outcome.heldout_ppl_before
    assert outcome.data["val_examples"] == 9 and outcome.data["heldout_examples"] == 9
    record = read_provenance(open_store().get_dir(outcome.artifact.uri))
    assert record["input_model"]["sha256"] == outcome.input_sha256 and record["method"] == "lora"
    assert [p["val_ppl"] for p in record["curve"]] == [p.val_ppl for p in outcome.curve]
    assert record["settings"]["rank"] == 8 and record["data"]["data"] == "corpus"
    assert job_dirs() == []  # published: the resumable state is gone


def test_a_harmful_learning_rate_returns_the_input_weights_and_says_so(tiny_dir):
    outcome = run_tune(str(tiny_dir), tiny_settings(lr=10.0, schedule="constant"))
    assert outcome.best_step == 0 and outcome.stop == "early_stop"
    assert outcome.reason == "step 0: no evaluated step improved validation perplexity; stopped early after 3 without improvement"
    assert all(p.val_ppl > outcome.val_ppl_before for p in outcome.curve[1:])
    # measured again on the returned model, on the split that chose nothing: the input's exactly
    assert outcome.heldout_ppl_after == outcome.heldout_ppl_before
    tuned, original = weights(outcome.artifact.uri), weights(str(tiny_dir))
    assert tuned.keys() == original.keys() and all(torch.equal(tuned[k], original[k]) for k in original)


def test_a_nan_stops_training_and_keeps_the_best_state(tiny_dir):
    """A forward hook (installed through the documented before_step test hook) turns
    step 7's logits into NaN: training stops there and returns step 6, which is
    exactly what a 6-step run of the same settings returns."""

    def poison_step_7(step, model):
        if step == 7:
            handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, output: poison(handle, output))

    def poison(handle, output):
        handle.remove()  # once: step 7 has a single forward pass
        return output * float("nan")

    settings_ = tiny_settings(schedule="constant", patience=0)
    outcome = run_tune(str(tiny_dir), settings_, before_step=poison_step_7)
    assert outcome.stop == "non_finite" and outcome.reason == "nan loss at step 7; kept step 6"
    assert outcome.best_step == 6 and outcome.steps_run == 7 and outcome.val_ppl_after < outcome.val_ppl_before
    six_steps = run_tune(str(tiny_dir), tiny_settings(schedule="constant", patience=0, steps=6))
    nan_run, clean_run = weights(outcome.artifact.uri), weights(six_steps.artifact.uri)
    assert all(torch.equal(nan_run[k], clean_run[k]) for k in clean_run)


# ---- what is published ----


def test_merged_model_equals_input_plus_adapter(tiny_dir, tiny_tokenizer):
    outcome = run_tune(str(tiny_dir), tiny_settings(steps=6))
    adapter_dir = open_store().get_dir(outcome.adapter.uri)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    assert not [p for p in adapter_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    ids = tiny_tokenizer(TEXT[:200], return_tensors="pt").input_ids
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(load_model(str(tiny_dir)).model, str(adapter_dir)).eval()(ids).logits
        merged = load_model(outcome.artifact.uri).model(ids).logits
        original = load_model(str(tiny_dir)).model(ids).logits
    assert torch.allclose(with_adapter, merged, atol=1e-4)
    assert (merged - original).abs().max() > 1e-2  # the adapter is in there


def test_a_per_layer_pruned_checkpoint_tunes_and_reloads_in_plain_transformers(
    tiny_dir, tiny_tokenizer, plain_transformers_run, tmp_path
):
    prune = PruneSettings(ratio=0.3, allocation="global", attn_layers="1:3", mlp_layers="1:3", calibration="corpus",
                          samples=4, seq_len=16, correction=False)
    pruned = run_prune(str(tiny_dir), prune).artifact.uri
    assert "layer_widths" in load_model(pruned).model.config.to_dict()  # really per-layer widths
    outcome = run_tune(pruned, tiny_settings(steps=6), out_dir=tmp_path / "tuned")
    assert outcome.best_step > 0 and read_provenance(tmp_path / "tuned")["input_model"]["uri"] == pruned
    ids = tiny_tokenizer("the quick brown fox jumps", return_tensors="pt").input_ids
    [plain] = plain_transformers_run([tmp_path / "tuned"], ids, max_new_tokens=4)
    assert not plain.prunelab_importable
    with torch.no_grad():
        assert torch.equal(plain.logits, load_model(outcome.artifact.uri).model(ids).logits)


# ---- resuming ----


class Interrupt(Exception):
    pass


def test_an_interrupted_job_resumes_from_its_last_evaluation(tiny_dir):
    def crash_at_step_8(update):
        if update.training is not None and update.training.step == 8:
            raise Interrupt("killed")

    with pytest.raises(Interrupt):
        run_tune(str(tiny_dir), tiny_settings(), progress=crash_at_step_8)
    [job] = job_dirs()
    [snapshot] = job.glob("snapshot-*")
    assert sorted(p.suffix for p in snapshot.iterdir()) == [".json"] + [".safetensors"] * 4  # nothing pickled
    assert json.loads((snapshot / "state.json").read_text())["state"]["step"] == 6

    steps_seen = []
    resumed = run_tune(str(tiny_dir), tiny_settings(), progress=lambda u: u.training and steps_seen.append(u.training.step))
    assert resumed.resumed_from_step == 6 and steps_seen[0] == 7
    assert [p.step for p in resumed.curve] == [0, 3, 6, 9, 12]

    uninterrupted = run_tune(str(tiny_dir), tiny_settings())
    assert uninterrupted.resumed_from_step is None
    for a, b in zip(resumed.curve, uninterrupted.curve, strict=True):
        assert math.isclose(a.val_ppl, b.val_ppl, rel_tol=1e-5)
    first, second = weights(resumed.artifact.uri), weights(uninterrupted.artifact.uri)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


# ---- data ----


def import_alpaca(name: str, records: list[dict], folder) -> None:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    import_dataset(name, path, split="train", kind="alpaca")


def test_alpaca_records_are_trained_on_their_responses_only(tiny_tokenizer, tmp_path):
    records = [{"instruction": f"Which animal is {adj}?", "input": "", "output": f"the {animal}"} for adj, animal in ANIMALS * 5]
    import_alpaca("instruct", records, tmp_path)
    data = build_tune_data(tiny_tokenizer, TuneSettings(data="instruct", max_length=256, val_fraction=0.25))
    assert data.format == "alpaca" and len(data.train) == 15 and (len(data.validation), len(data.heldout)) == (3, 2)
    first = data.train[0]
    learned = first.labels[first.labels != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == "the fox</s>"
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Which animal is quick brown?")
    assert tiny_tokenizer.decode(first.input_ids[: first.input_ids.numel() - learned.numel()]) == prompt


def test_alpaca_tuning_validates_on_a_separately_named_set(tiny_dir, tmp_path):
    records = [{"instruction": "Name the animal.", "input": f"the {adj} one", "output": f"the {animal}"} for adj, animal in ANIMALS]
    import_alpaca("instruct", records * 6, tmp_path)
    import_alpaca("instruct-val", records[::-1], tmp_path)
    outcome = run_tune(str(tiny_dir), tiny_settings(data="instruct", val_data="instruct-val", val_split="train", max_length=256, steps=6))
    assert outcome.data["format"] == "alpaca" and outcome.data["val_data"] == "instruct-val"
    assert outcome.data["train_examples"] == 24 and outcome.data["val_examples"] == outcome.data["heldout_examples"] == 2
    assert outcome.val_ppl_after < outcome.val_ppl_before


def test_bf16_training_returns_a_bf16_model(tiny_dir):
    outcome = run_tune(str(tiny_dir), tiny_settings(precision="bf16", steps=6))
    assert outcome.precision == "bfloat16"
    with safe_open(str(open_store().get_dir(outcome.artifact.uri) / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(name).dtype for name in stored.keys()} == {torch.bfloat16}


def test_text_validation_is_the_held_out_tail(corpus, tiny_tokenizer):
    data = build_tune_data(tiny_tokenizer, tiny_settings(val_fraction=0.2, heldout_fraction=0.25, max_val_examples=1000))
    ids = tiny_tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids.numel() // 32
    tail = round(windows * 0.2)
    assert len(data.train) + len(data.validation) + len(data.heldout) == windows
    assert len(data.heldout) == round(tail * 0.25) and len(data.validation) == tail - len(data.heldout)
    # selection first, the held-out part last: the three parts are disjoint and in file order
    assert torch.equal(data.validation[-1].input_ids, ids[(windows - len(data.heldout) - 1) * 32 : (windows - len(data.heldout)) * 32])
    assert torch.equal(data.heldout[-1].input_ids, ids[(windows - 1) * 32 : windows * 32])
    assert data.identity["validation"] == f"last {tail} of {windows} windows of corpus"


def test_learning_rate_schedules():
    warm = TuneSettings(data="x", lr=1.0, warmup_steps=4, schedule="cosine")
    assert [learning_rate(warm, s, 14) for s in (1, 4, 5)] == [0.25, 1.0, 1.0]
    assert math.isclose(learning_rate(warm, 10, 14), 0.5)  # half way through the decay
    linear = TuneSettings(data="x", lr=1.0, schedule="linear")
    assert [learning_rate(linear, s, 4) for s in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    assert learning_rate(TuneSettings(data="x", lr=0.1, schedule="constant"), 99, 100) == 0.1


# ---- CLI ----


def test_cli_json_reports_before_after_and_where_the_results_are(tiny_dir, tmp_path, capsys):
    code = cli_main(["tune", "--model", str(tiny_dir), "--data", "corpus", "--steps", "3", "--eval-every", "3",
                     "--lr", "3e-3", "--max-length", "32", "--rank", "4", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"val_ppl_before", "val_ppl_after", "heldout_ppl_before", "heldout_ppl_after", "best_step", "artifact", "adapter",
            "curve", "reason"} <= doc.keys()
    assert [p["step"] for p in doc["curve"]] == [0, 3]
    assert open_store().stat(doc["adapter"]).kind == "adapter" and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("argv, reason", [
    (["--lr", "0"], "lr must be a positive number"),
    (["--rank", "-1"], "rank must be a positive integer"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--target-modules", "q_proj,qkv_proj"], "unknown target module(s) 'qkv_proj'"),
    (["--precision", "fp16"], "use bf16 or fp32"),
    (["--val-data", "corpus", "--val-split", "train"], "val_data names the training split itself"),
])
def test_cli_bad_input_exits_2_with_the_reason(corpus, tmp_path, capsys, argv, reason):
    # refused before the model is read: a missing one would fail differently (exit 1)
    assert cli_main(["tune", "--model", str(tmp_path / "never-read"), "--data", corpus, *argv]) == 2
    assert reason in capsys.readouterr().err
    assert open_store().list(kind="model") == [] and job_dirs() == []


def test_cli_unknown_dataset_is_refused(tmp_path, capsys):
    assert cli_main(["tune", "--model", str(tmp_path / "never-read"), "--data", "no-such-data"]) == 2
    assert "(data): unknown dataset 'no-such-data'" in capsys.readouterr().err


# ---- service ----


@pytest.fixture
def tuner_stub(grpc_server, grpc_channel):
    server = grpc_server(registration(TunerServicer(max_concurrent_jobs=1, device="cpu")), [SERVICE_NAME])
    return tuner_pb2_grpc.TunerStub(grpc_channel(server.target))


def test_service_streams_progress_with_metrics_then_the_result(tiny_dir, tuner_stub):
    request = tuner_pb2.TuneRequest(job_id="t1", model=str(tiny_dir), data="corpus", steps=6, eval_every=3, lr=3e-3,
                                    max_length=32, rank=4, patience=0, heldout_fraction=0.4)
    events = list(tuner_stub.Tune(request, timeout=120))
    assert events[-1].WhichOneof("event") == "result"
    training = [e for e in events if e.HasField("metrics")]
    assert [e.metrics.step for e in training] == list(range(7))
    assert all(e.progress.done == e.metrics.step and e.progress.total == 6 and e.progress.job_id == "t1" for e in training)
    assert all(e.progress.HasField("eta_seconds") for e in training[1:])
    assert [e.metrics.HasField("val_ppl") for e in training] == [True, False, False, True, False, False, True]
    fractions = [e.progress.fraction for e in events if e.HasField("progress")]
    assert fractions == sorted(fractions)
    result = events[-1].result
    assert result.job_id == "t1" and result.best_step == 6 and result.val_ppl_after < result.val_ppl_before
    assert [p.step for p in result.curve] == [0, 3, 6] and not result.curve[0].HasField("train_loss")
    assert result.artifact.kind == "model" and result.adapter.kind == "adapter" and open_store().exists(result.adapter.uri)
    assert not result.HasField("resumed_from_step") and result.report["data"]["data"] == "corpus"
    assert (result.heldout_ppl_before, result.heldout_ppl_after) == (result.report["heldout_ppl_before"], result.report["heldout_ppl_after"])
    assert result.heldout_ppl_after < result.heldout_ppl_before


@pytest.mark.parametrize("fields, field", [
    ({"lr": -1.0}, "lr"),
    ({"rank": -2}, "rank"),
    ({"steps": -5}, "steps"),
    ({"data": "no-such-data"}, "data"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
    ({"model": ""}, "model"),
])
def test_service_rejects_bad_requests_with_invalid_argument(corpus, tmp_path, tuner_stub, fields, field):
    request = tuner_pb2.TuneRequest(**{"model": str(tmp_path / "never-read"), "data": corpus, **fields})
    with pytest.raises(grpc.RpcError) as caught:
        list(tuner_stub.Tune(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail(caught.value).field == field
    assert open_store().list(kind="model") == []


# ---- the real model ----


@pytest.mark.slow
def test_tuning_a_pruned_smollm2_lowers_held_out_perplexity(shared_data, tmp_path):
    """SmolLM2-135M with 30 % removed by l2 (no correction), then 20 LoRA steps on the
    first 90 % of WikiText-2 validation's lines; the last 10 % is validation, whose
    second half (the held-out split) chooses nothing. l2 without the correction leaves
    the model badly broken, so there is much to recover. Measured (2 cores, ~3-6 min):
    held-out perplexity 16,893 -> 147 (selection split 23,554 -> 355); asserted: at
    least 10x lower."""
    lines = (shared_data / "wikitext2" / "valid.tokens").read_text().splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "train.txt").write_text("".join(lines[:cut]))
    (tmp_path / "wt" / "valid.txt").write_text("".join(lines[cut:]))
    import_dataset("wt", tmp_path / "wt")
    pruned = run_prune("smollm2-135m", PruneSettings(ratio=0.3, method="l2", attn_layers="4:28", mlp_layers="4:28",
                                                     correction=False))
    outcome = run_tune(pruned.artifact.uri, TuneSettings(
        data="wt", val_data="wt", steps=20, lr=2e-3, max_length=64, batch_size=4, eval_every=10, max_val_examples=16))
    assert outcome.best_step > 0 and outcome.data["heldout_examples"] == 16
    assert outcome.heldout_ppl_after < 0.1 * outcome.heldout_ppl_before, (outcome.heldout_ppl_before, outcome.heldout_ppl_after)

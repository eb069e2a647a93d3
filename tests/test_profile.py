"""The profiler: parameter and MAC counts against their formulas, generation timing
against `generate`, profiles with a baseline (speedups from the same run's paired
rounds), nonzero parameters and MACs of a model with zero weights, memory in child
processes, the CLI and the gRPC service."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import grpc
import pytest
import torch
from fixtures.models import TINY_LLAMA_LINEAR_WEIGHTS, TINY_LLAMA_PARAMS, half_zeroed, tiny_causal_lm

from prunelab.cli import main
from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter, save_checkpoint
from prunelab.profile import (
    DENSE_KERNELS_NOTE,
    ProfileOptions,
    Spread,
    analytic_macs,
    count_parameters,
    profile_models,
    ptflops_macs,
    render_markdown,
    report_rows,
)
from prunelab.profile.latency import prompt_ids, time_generation, timed_round
from prunelab.profile.messages import result_message
from prunelab.profile.service import SERVICE_NAME, ProfilerServicer, registration
from prunelab.rpc import call_in_process, error_detail
from prunelab.v1 import profiler_pb2, profiler_pb2_grpc

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
HIDDEN, HEAD_DIM, VOCAB = 64, 16, 320  # the tiny configs' shape (fixtures.models)
# Small and quick: one thread, because on a shared machine several OpenMP threads
# wait on each other far longer than tiny matmuls take.
QUICK = ProfileOptions(seq_len=8, batch_sizes=(1, 3), gen_tokens=3, repeats=3, warmup=1, threads=1, measure_memory=False)


def shrink_unevenly(model: torch.nn.Module) -> torch.nn.Module:
    """Different widths per layer: layer 1 keeps one of its two KV groups, layer 2 ten MLP channels."""
    adapter = LlamaFamilyAdapter(model)
    adapter.keep_kv_groups(1, [1])
    adapter.keep_mlp_channels(2, list(range(0, 40, 4)))
    return model


def expected_params(model: torch.nn.Module, family: str) -> dict[str, int]:
    """The parameter formula per part, from each layer's widths."""
    biases = family == "qwen2"  # q, k, v biases
    qk_norms = family == "qwen3"  # one head_dim-sized norm each for q and k
    attention = mlp = 0
    for widths in LlamaFamilyAdapter(model).layer_widths():
        q, kv = widths.num_attention_heads * HEAD_DIM, widths.num_key_value_heads * HEAD_DIM
        attention += 2 * HIDDEN * q + 2 * HIDDEN * kv + biases * (q + 2 * kv) + qk_norms * 2 * HEAD_DIM
        mlp += 3 * HIDDEN * widths.intermediate_size
    layers = len(LlamaFamilyAdapter(model).layers)
    tied = model.config.tie_word_embeddings
    return {
        "embeddings": VOCAB * HIDDEN,
        "lm_head": 0 if tied else VOCAB * HIDDEN,
        "attention": attention,
        "mlp": mlp,
        "norms": (2 * layers + 1) * HIDDEN,
    }


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (see QUICK); the setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wide_llama() -> torch.nn.Module:
    """13 M parameters, almost all in the MLPs: big enough for memory to tell apart."""
    return tiny_causal_lm("llama", hidden_size=256, intermediate_size=4096)


def narrowed(model: torch.nn.Module) -> torch.nn.Module:
    """Layer i keeps 8 (i + 1) MLP channels; layer 1 one KV group: a per-layer-width model."""
    adapter = LlamaFamilyAdapter(model)
    for layer in range(adapter.num_layers):
        adapter.keep_mlp_channels(layer, list(range(8 * (layer + 1))))
    adapter.keep_kv_groups(1, [0])
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """A small base model and a copy with 95 % of its MLP channels cut, unevenly."""
    root = tmp_path_factory.mktemp("profile-checkpoints")
    base = save_checkpoint(wide_llama(), tiny_tokenizer, root / "base", {})
    small = save_checkpoint(narrowed(wide_llama()), tiny_tokenizer, root / "small", {})
    return {"base": str(base), "small": str(small)}


# --- static figures


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uneven", [False, True], ids=["uniform", "per-layer"])
def test_parameter_counts_follow_the_formula_and_add_up(family, uneven):
    model = tiny_causal_lm(family)
    if uneven:
        shrink_unevenly(model)
    counts = count_parameters(model)
    parts = {"embeddings": counts.embeddings, "lm_head": counts.lm_head, "attention": counts.attention}
    parts |= {"mlp": counts.mlp, "norms": counts.norms}
    assert parts == expected_params(model, family)
    assert counts.total == sum(parts.values()) == sum(p.numel() for p in model.parameters())
    assert counts.tied_embeddings == model.config.tie_word_embeddings
    assert [layer.intermediate_size for layer in counts.layers] == [96, 96, 10 if uneven else 96, 96]


@pytest.mark.parametrize(
    ("family", "uneven", "seq_len", "batch_size"),
    [(family, uneven, 7, 2) for family in FAMILIES for uneven in (False, True)] + [("llama", True, 1, 1)],
)
def test_ptflops_macs_equal_the_analytic_formula(family, uneven, seq_len, batch_size, one_thread):
    model = tiny_causal_lm(family)
    if uneven:
        shrink_unevenly(model)
    assert ptflops_macs(model, seq_len, batch_size) == analytic_macs(model, seq_len, batch_size).total


def test_analytic_macs_of_the_tiny_llama_worked_by_hand():
    """4 layers of 8 query / 2 KV heads of 16 (q, o: 64x128; k, v: 64x32), MLP 96, vocab 320, T = 5."""
    breakdown = analytic_macs(tiny_causal_lm("llama"), seq_len=5)
    assert breakdown.attention_projections == 5 * 4 * (64 * 128 * 2 + 64 * 32 * 2)
    assert breakdown.attention_matmuls == 4 * 8 * (5 * 5 * 16) * 2
    assert breakdown.mlp == 5 * 4 * 3 * 64 * 96
    assert breakdown.lm_head == 5 * 64 * 320


def test_counting_macs_leaves_the_model_as_it_was(one_thread):
    """ptflops forces eager attention and hooks modules: neither may stay behind."""
    model = tiny_causal_lm("llama")
    before = model.config._attn_implementation
    ptflops_macs(model, 4)
    assert model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_half_zeroed_model_keeps_its_dense_figures_beside_its_nonzero_ones(tmp_path, tiny_tokenizer):
    base = save_checkpoint(tiny_causal_lm("llama"), tiny_tokenizer, tmp_path / "base", {})
    half = save_checkpoint(half_zeroed(tiny_causal_lm("llama")), tiny_tokenizer, tmp_path / "half", {})
    report = profile_models([str(half)], baseline=str(base), options=QUICK)
    dense, [sparse] = report.baseline, report.models

    zeros, seq_len = TINY_LLAMA_LINEAR_WEIGHTS // 2, QUICK.seq_len
    dense_macs = seq_len * 4 * (2 * 64 * 128 + 2 * 64 * 32 + 3 * 64 * 96) + 4 * 8 * (seq_len * seq_len * 16) * 2 + seq_len * 64 * 320
    assert dense.params.total == dense.params.nonzero == sparse.params.total == TINY_LLAMA_PARAMS
    assert sparse.params.nonzero == TINY_LLAMA_PARAMS - zeros
    assert dense.macs == dense.nonzero_macs == sparse.macs == dense_macs
    assert sparse.nonzero_macs == dense_macs - seq_len * zeros  # one MAC per token per zero weight

    base_row, sparse_row = report_rows(report)
    assert (base_row.nonzero_params_ratio, base_row.nonzero_macs_ratio) == (1.0, 1.0)
    assert (sparse_row.params_ratio, sparse_row.macs_ratio) == (1.0, 1.0)
    assert sparse_row.nonzero_params_ratio == (TINY_LLAMA_PARAMS - zeros) / TINY_LLAMA_PARAMS
    assert sparse_row.nonzero_macs_ratio == (dense_macs - seq_len * zeros) / dense_macs
    table = render_markdown([base_row, sparse_row])
    assert table.endswith(DENSE_KERNELS_NOTE) and "| Nonzero MACs |" in table.splitlines()[0]
    assert DENSE_KERNELS_NOTE not in render_markdown([base_row])

    message = result_message(report, "job-1")
    assert (message.model.params.nonzero, message.model.nonzero_macs) == (TINY_LLAMA_PARAMS - zeros, dense_macs - seq_len * zeros)
    assert (message.baseline.params.nonzero, message.baseline.nonzero_macs) == (TINY_LLAMA_PARAMS, dense_macs)
    assert [row["nonzero_params"] for row in message.report.data["rows"]] == [TINY_LLAMA_PARAMS, TINY_LLAMA_PARAMS - zeros]


# --- timing


@pytest.mark.parametrize("uneven", [False, True], ids=["uniform", "per-layer"])
def test_timed_generation_is_greedy_decoding_with_the_cache(uneven, one_thread):
    model = tiny_causal_lm("llama")
    if uneven:
        shrink_unevenly(model)
    input_ids = prompt_ids(batch_size=2, seq_len=6, vocab_size=VOCAB, device=torch.device("cpu"))
    timing = time_generation(model, input_ids, decode_steps=4)
    generated = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), min_new_tokens=5, max_new_tokens=5, do_sample=False
    )
    assert torch.equal(timing.tokens, generated[:, 6:])
    assert timing.prefill_s > 0 and timing.decode_s > 0
    assert timing.decode_tokens_per_s == pytest.approx(2 * 4 / timing.decode_s)


def test_spread_reports_median_quartiles_and_extremes():
    assert Spread.of([5.0, 1.0, 4.0, 2.0, 3.0]) == Spread(3.0, 2.0, 4.0, 1.0, 5.0, [5.0, 1.0, 4.0, 2.0, 3.0])
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0, 7.0, 7.0, [7.0])


# --- profiles


def test_profile_against_a_baseline_pairs_the_rounds(checkpoints):
    threads_before = torch.get_num_threads()
    report = profile_models([checkpoints["small"]], baseline=checkpoints["base"], options=QUICK)
    base, [small] = report.baseline, report.models
    assert (base.spec, small.spec) == (checkpoints["base"], checkpoints["small"])
    assert small.params.total < base.params.total
    for profile in (base, small):
        assert profile.macs == profile.macs_analytic.total > 0
        assert profile.checkpoint_bytes == sum(f.stat().st_size for f in Path(profile.spec).iterdir())
        assert profile.memory is None  # not asked for
        assert [latency.batch_size for latency in profile.latency] == [1, 3]
    for own, theirs in zip(small.latency, base.latency, strict=False):
        assert theirs.speedup is None
        for spread in (own.prefill_ms, own.decode_tokens_per_s, theirs.prefill_ms, theirs.decode_tokens_per_s):
            assert len(spread.samples) == QUICK.repeats and spread.min > 0
        # each ratio comes from one round, where the two models ran back to back
        prefill = [b / s for s, b in zip(own.prefill_ms.samples, theirs.prefill_ms.samples, strict=False)]
        decode = [s / b for s, b in zip(own.decode_tokens_per_s.samples, theirs.decode_tokens_per_s.samples, strict=False)]
        assert own.speedup.prefill.samples == pytest.approx(prefill)
        assert own.speedup.decode.samples == pytest.approx(decode)
    assert report.environment.threads == 1 and report.environment.device == "cpu"
    assert torch.get_num_threads() == threads_before  # restored after the run


def test_report_rows_are_table_7_with_speed(checkpoints):
    report = profile_models([checkpoints["small"]], baseline=checkpoints["base"], options=QUICK)
    base_row, small_row = report_rows(report)
    assert (base_row.role, base_row.model, small_row.model) == ("baseline", "base", "small")
    assert base_row.params_ratio == base_row.macs_ratio == 1.0
    assert small_row.params_ratio == report.models[0].params.total / report.baseline.params.total
    assert small_row.macs_ratio == report.models[0].macs / report.baseline.macs
    assert small_row.memory_bytes is None and small_row.memory_ratio is None
    assert [b.decode_speedup for b in small_row.batches] == [latency.speedup.decode.median for latency in report.models[0].latency]
    assert [b.decode_speedup for b in base_row.batches] == [None, None]
    table = render_markdown([base_row, small_row]).splitlines()
    assert len(table) == 4 and "b3 decode tok/s" in table[0] and table[3].startswith("| small |")


def test_rounds_alternate_which_model_goes_first(one_thread):
    """Each round starts one model later; timings still come back in the models' order."""
    models = [tiny_causal_lm("llama", seed=seed) for seed in (0, 1)]
    calls = []
    for name, model in zip("ab", models, strict=True):
        model.register_forward_pre_hook(lambda _module, _args, name=name: calls.append(name))
    ids = prompt_ids(1, 8, VOCAB, torch.device("cpu"))
    orders = []
    for round_index in range(4):
        calls.clear()
        timings = timed_round([functools.partial(time_generation, m) for m in models], ids, decode_steps=2, round_index=round_index)
        orders.append("".join(dict.fromkeys(calls)))  # first call of each model: prefill
        for model, timing in zip(models, timings, strict=True):
            assert torch.equal(timing.tokens, time_generation(model, ids, 2).tokens)
    assert orders == ["ab", "ba", "ab", "ba"]


SELF_TIMING = ProfileOptions(seq_len=16, batch_sizes=(1,), gen_tokens=8, repeats=20, warmup=2, threads=1, measure_memory=False)


def test_a_model_against_itself_is_about_as_fast(checkpoints):
    """The same checkpoint as model and baseline: with positions balanced, the median of
    20 paired rounds lands near 1. The band (0.7-1.4) leaves room for a loaded 2-core
    machine; a position effect or a mis-paired ratio lands outside it."""
    report = profile_models([checkpoints["base"]], baseline=checkpoints["base"], options=SELF_TIMING)
    assert report.baseline.params == report.models[0].params
    [latency] = report.models[0].latency
    assert len(latency.speedup.decode.samples) == SELF_TIMING.repeats
    assert 0.7 <= latency.speedup.prefill.median <= 1.4, latency.speedup.prefill
    assert 0.7 <= latency.speedup.decode.median <= 1.4, latency.speedup.decode


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_sizes": (1, 0)}, "batch_sizes"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"seq_len": 0}, "seq_len"),
        ({"gen_tokens": -1}, "gen_tokens"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"engine": "vllm"}, "engine"),
        ({"engine": "llama.cpp", "gguf_type": "q4_0", "batch_sizes": (1,)}, "gguf_type"),
        ({"engine": "llama.cpp", "batch_sizes": (1, 8)}, "batch_sizes"),
    ],
)
def test_bad_options_are_refused_before_loading(change, field):
    with pytest.raises(InvalidArgument) as caught:
        profile_models(["no-such-model"], options=ProfileOptions(**change))
    assert caught.value.field == field


def test_an_unknown_model_is_an_invalid_argument():
    with pytest.raises(InvalidArgument, match="unknown model name 'no-such-model'"):
        profile_models(["no-such-model"], options=QUICK)


# --- memory, through the CLI


def test_cli_json_has_every_headline_figure(checkpoints, capsys):
    args = ["profile", "--model", checkpoints["small"], "--baseline", checkpoints["base"], "--seq-len", "8"]
    args += ["--batch-sizes", "1,2", "--gen-tokens", "2", "--repeats", "2", "--threads", "1", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    for figures in (summary, summary["baseline"]):
        assert figures["params"] > 0 and figures["macs"] > 0 and figures["checkpoint_bytes"] > 0
        assert 0 < figures["nonzero_params"] <= figures["params"] and 0 < figures["nonzero_macs"] <= figures["macs"]
        assert figures["memory_bytes"] >= 4 * figures["params"]  # at its peak the child held the weights
        assert sorted(figures["latency"]) == ["1", "2"]
        for batch in figures["latency"].values():
            assert batch["prefill_ms"] > 0 and batch["decode_tokens_per_s"] > 0
    assert all(batch["speedup"]["prefill"] > 0 and batch["speedup"]["decode"] > 0 for batch in summary["latency"].values())
    assert all("speedup" not in batch for batch in summary["baseline"]["latency"].values())
    assert summary["environment"]["threads"] == 1
    # each child measured itself alone (not, say, this process's size): the two
    # models' peaks differ by about their weights' difference, float32
    weights_gap = 4 * (summary["baseline"]["params"] - summary["params"])
    assert summary["baseline"]["memory_bytes"] - summary["memory_bytes"] == pytest.approx(weights_gap, rel=0.25)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--batch-sizes", "1,0"], "error (batch_sizes): batch sizes must be positive, got [1, 0]"),
        (["--seq-len", "0"], "error (seq_len): seq_len must be positive, got 0"),
    ],
)
def test_cli_refuses_bad_settings_with_the_reason(checkpoints, capsys, args, reason):
    assert main(["profile", "--model", checkpoints["small"], *args]) == 2
    assert reason in capsys.readouterr().err


def test_cli_refuses_an_unknown_model(capsys):
    assert main(["profile", "--model", "no-such-model"]) == 2
    assert "error (model): unknown model name 'no-such-model'" in capsys.readouterr().err


# --- service


def quick_request(model: str, baseline: str = "", **fields) -> profiler_pb2.ProfileRequest:
    settings = dict(seq_len=8, batch_sizes=[1], gen_tokens=2, repeats=2, threads=1, skip_memory=True)
    return profiler_pb2.ProfileRequest(job_id="job-1", model=model, baseline=baseline, **{**settings, **fields})


def test_service_streams_progress_then_the_result(checkpoints):
    events = list(call_in_process(ProfilerServicer().Profile, quick_request(checkpoints["small"], checkpoints["base"])))
    *progress, last = events
    assert progress and all(event.HasField("progress") and event.progress.job_id == "job-1" for event in progress)
    fractions = [event.progress.fraction for event in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    result = last.result
    assert result.job_id == "job-1" and result.model.spec == checkpoints["small"] and result.baseline.spec == checkpoints["base"]
    assert result.model.macs == result.model.macs_analytic.total
    params = result.model.params
    assert params.total == params.embeddings + params.lm_head + params.attention + params.mlp + params.norms
    assert not result.model.HasField("memory")
    [latency] = result.model.latency
    assert latency.HasField("speedup") and len(latency.speedup.decode.samples) == 2
    assert not result.baseline.latency[0].HasField("speedup")
    rows = result.report.data["rows"]
    assert [row["model"] for row in rows] == ["base", "small"] and result.report.provenance.producer == "profiler"


def test_service_runs_one_profile_at_a_time(checkpoints):
    servicer = ProfilerServicer()
    running = call_in_process(servicer.Profile, quick_request(checkpoints["small"]))
    next(running)  # started: holds the profiler
    with pytest.raises(grpc.RpcError) as caught:
        next(call_in_process(servicer.Profile, quick_request(checkpoints["small"])))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.close()  # a cancelled call frees it
    assert list(call_in_process(servicer.Profile, quick_request(checkpoints["small"])))[-1].HasField("result")


@pytest.fixture
def profiler_stub(grpc_server, grpc_channel) -> profiler_pb2_grpc.ProfilerStub:
    server = grpc_server(registration(ProfilerServicer()), [SERVICE_NAME])
    return profiler_pb2_grpc.ProfilerStub(grpc_channel(server.target))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"seq_len": 0}, "seq_len"),
        ({"model": "no-such-model"}, "model"),
        ({"model": ""}, "model"),
        ({"engine": "llama.cpp", "batch_sizes": [1, 2]}, "batch_sizes"),
    ],
)
def test_bad_requests_over_a_socket_are_invalid_argument(profiler_stub, checkpoints, fields, field):
    request = quick_request(**{"model": checkpoints["small"], **fields})
    with pytest.raises(grpc.RpcError) as caught:
        list(profiler_stub.Profile(request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail(caught.value).field == field and caught.value.details()


def test_profile_over_a_socket(profiler_stub, checkpoints):
    *_, last = profiler_stub.Profile(quick_request(checkpoints["small"], checkpoints["base"]))
    assert last.result.model.latency[0].speedup.prefill.median > 0
    assert last.result.environment.threads == 1


"""Structured pruning that reads activations (structured.py): FLAP's criteria, the
adaptive allocation, the layer-by-layer refit with its measured ridge, and FLAP's
bias compensation. On the tiny random Llama, and on SmolLM2's real activations."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter, load_model
from prunelab.prune import PruneSettings, run_prune
from prunelab.prune.calibration import calibration_windows
from prunelab.prune.correction import DAMPING_GRID, GramAccumulator, measured_damping, refit_kept_columns
from prunelab.prune.pruner import layer_shapes
from prunelab.prune.sequential import layer_by_layer
from prunelab.prune.structured import MIN_KEPT_SHARE, adaptive_plan, column_scores, prune_sequentially
from prunelab.prune.targets import RemovalPlan
from prunelab.store import open_store


def settings(**overrides) -> PruneSettings:
    base = dict(ratio=0.3, method="flap", calibration="calib", samples=4, seq_len=16, correction_samples=6, correction_seq_len=16)
    return PruneSettings(**{**base, **overrides})


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "taylor"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_adaptive_allocation_lands_on_the_asked_share_and_empties_no_layer(tiny_dir, method, ratio):
    outcome = run_prune(str(tiny_dir), settings(method=method, ratio=ratio, allocation="adaptive", attn_layers="0:", mlp_layers="0:"))
    report = outcome.report
    assert abs(report.ratio_got - ratio) <= 0.005
    assert report.ratio_got == 1 - report.params_after / report.params_before
    for widths in report.layer_widths:
        assert widths["num_key_value_heads"] >= 1
        assert widths["intermediate_size"] >= math.ceil(MIN_KEPT_SHARE * 128)


def test_adaptive_plan_standardises_each_module_type_and_keeps_floors(tiny_model):
    """One layer's MLP scores far below every other's: the plan cuts it down to the
    floor and no further, and attention units are ranked on their own scale."""
    shapes = layer_shapes(LlamaFamilyAdapter(tiny_model))
    generator = torch.Generator().manual_seed(0)
    scores = {(i, "mlp_channels"): torch.rand(shapes[i].mlp_channels, generator=generator) + 10.0 for i in range(len(shapes))}
    scores[(2, "mlp_channels")] -= 10.0  # layer 2's channels are the least important of all
    scores |= {(i, "kv_groups"): torch.rand(shapes[i].kv_groups, generator=generator) * 1e6 for i in range(len(shapes))}
    target = int(0.5 * sum(s.mlp_channels * s.channel_params for s in shapes))
    plan = adaptive_plan(scores, shapes, target)
    width = shapes[2].mlp_channels
    assert plan.mlp_channels[2] == width - math.ceil(MIN_KEPT_SHARE * width)
    assert all(kept >= 1 for kept in (s.kv_groups - g for s, g in zip(shapes, plan.kv_groups, strict=True)))
    assert abs(plan.removed_params(shapes) - target) <= shapes[0].channel_params


def _captured_inputs(model, linear, windows) -> torch.Tensor:
    seen = []
    handle = linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat(seen).float()


@pytest.mark.parametrize("criterion", ["flap", "wanda-sp"])
def test_flap_and_wanda_sp_scores_match_their_definitions(tiny_model, tiny_tokenizer, criterion):
    from fixtures.models import CALIBRATION_TEXT

    windows = calibration_windows(tiny_tokenizer, CALIBRATION_TEXT, 4, 16, seed=0)
    down = LlamaFamilyAdapter(tiny_model).projections(1).down
    x = _captured_inputs(tiny_model, down, windows)
    w = down.weight.detach().float()
    expected = x.var(0, unbiased=False) * w.pow(2).sum(0) if criterion == "flap" else w.abs().sum(0) * x.norm(dim=0) / math.sqrt(x.shape[0])
    measured = {}
    layer_by_layer(tiny_model, windows, lambda i, _layer, lp: measured.setdefault(i, lp.statistics({"down": down}, gram=False)) if i == 1 else None)
    assert torch.allclose(column_scores(criterion, down.weight, measured[1], "down"), expected, rtol=1e-4, atol=1e-7)


def test_bias_compensation_keeps_the_mean_output_and_loads_in_plain_transformers(tiny_dir, tmp_path, plain_transformers_run):
    outcome = run_prune(str(tiny_dir), settings(correction="bias", allocation="uniform"), out_dir=tmp_path / "pruned")
    config = (tmp_path / "pruned" / "config.json").read_text()
    assert '"attention_bias": true' in config and '"mlp_bias": true' in config
    ours = load_model(outcome.artifact.uri)
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = ours.model(input_ids).logits
    [plain] = plain_transformers_run([tmp_path / "pruned"], input_ids)
    assert torch.allclose(plain.logits, expected, atol=1e-5)


def test_bias_compensation_restores_the_mean_of_the_output():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=generator) + torch.linspace(-2, 2, 12)  # inputs with nonzero means
    weight = torch.randn(5, 12, generator=generator)
    kept = torch.tensor([0, 3, 4, 8, 11])
    from prunelab.prune.correction import bias_compensation

    bias = bias_compensation(weight, x.mean(0), kept)
    assert torch.allclose((x[:, kept] @ weight[:, kept].T + bias).mean(0), (x @ weight.T).mean(0), atol=1e-4)


def test_measured_damping_is_small_when_the_data_pin_the_fit_and_large_when_they_do_not():
    generator = torch.Generator().manual_seed(0)
    d, kept = 40, torch.arange(0, 40, 2)
    weight = torch.randn(8, d, generator=generator)

    def folds(tokens: int) -> list[torch.Tensor]:
        shared = torch.randn(tokens, 4, generator=generator) @ torch.randn(4, d, generator=generator)  # correlated inputs
        x = shared + 0.3 * torch.randn(tokens, d, generator=generator)
        return [part.T @ part for part in x.chunk(2)]

    plenty, scarce = measured_damping(weight, folds(20000), kept), measured_damping(weight, folds(48), kept)
    assert plenty < scarce and {plenty, scarce} <= set(DAMPING_GRID)


@pytest.mark.slow  # ~1 min idle: SmolLM2, two prunes of every MLP
def test_sequential_refit_reconstructs_the_mlp_outputs_better_than_the_one_pass_refit(smollm2, shared_data):
    """The same channels removed from every MLP of SmolLM2, refit two ways on the same
    calibration windows of raw Wikipedia text: from the unpruned model's activations
    in one pass (the old way), or layer by layer on inputs that went through the
    pruned layers before. On the inputs each pruned model really feeds its MLPs, the
    sequential refit's MLP outputs are closer to the unpruned MLPs' outputs."""
    text = (shared_data / "wikipassages" / "train.txt").read_text()
    windows = calibration_windows(smollm2.tokenizer, text, 16, 64, seed=0)
    dense = smollm2.model
    shapes = layer_shapes(LlamaFamilyAdapter(dense))
    plan = RemovalPlan([0] * len(shapes), [s.mlp_channels // 3 for s in shapes])
    dense_mlps = [layer.mlp for layer in LlamaFamilyAdapter(dense).layers]
    scores = {(i, "mlp_channels"): mlp.down_proj.weight.detach().pow(2).sum(0) for i, mlp in enumerate(dense_mlps)}

    one_pass = load_model("smollm2-135m").model
    adapter = LlamaFamilyAdapter(one_pass)
    downs = [adapter.projections(i).down for i in range(len(shapes))]
    accumulator = GramAccumulator(folds=2)
    with accumulator.watching(downs), accumulator.recording(), torch.no_grad():
        for batch in windows.split(8):
            one_pass.get_decoder()(input_ids=batch)
    for i, down in enumerate(downs):
        kept = torch.topk(scores[(i, "mlp_channels")], shapes[i].mlp_channels - plan.mlp_channels[i]).indices.sort().values
        refit = refit_kept_columns(down.weight.detach(), accumulator.grams[down], kept,
                                   measured_damping(down.weight.detach(), accumulator.fold_grams[down], kept))
        adapter.keep_mlp_channels(i, kept.tolist())
        with torch.no_grad():
            down.weight.copy_(refit)

    sequential = load_model("smollm2-135m").model
    prune_sequentially(sequential, windows, plan, lambda key, *_: scores[key], "refit")

    def mlp_error(model) -> float:
        error = 0.0

        def compare(index):
            def hook(mlp, args, output):
                nonlocal error
                error += (output - dense_mlps[index](args[0])).pow(2).sum().item()
            return hook

        handles = [layer.mlp.register_forward_hook(compare(i)) for i, layer in enumerate(LlamaFamilyAdapter(model).layers)]
        with torch.no_grad():
            model.get_decoder()(input_ids=windows)
        for handle in handles:
            handle.remove()
        return error

    errors = {"one pass": mlp_error(one_pass), "sequential": mlp_error(sequential)}
    assert errors["sequential"] < 0.9 * errors["one pass"], errors


def test_activation_criteria_refuse_channel_mode(tiny_dir):
    with pytest.raises(InvalidArgument, match="use mode block"):
        run_prune(str(tiny_dir), settings(mode="channel"))


def test_no_method_runs_the_best_configuration_and_a_named_one_its_recipe():
    from prunelab.prune.pruner import BEST, RECIPES

    best = PruneSettings(ratio=0.2)
    assert best.method == BEST["method"] and {k: getattr(best, k) for k in BEST} == BEST
    taylor = PruneSettings(ratio=0.2, method="taylor")
    assert (taylor.samples, taylor.seq_len, taylor.attn_layers) == (10, 64, "4:-2")
    flap = PruneSettings(ratio=0.2, method="flap", samples=7)
    assert flap.samples == 7 and flap.allocation == RECIPES["flap"]["allocation"]


def test_flap_checkpoint_round_trips_through_the_store(tiny_dir):
    outcome = run_prune(str(tiny_dir), settings(allocation="uniform"))
    stored = open_store().get_dir(outcome.artifact.uri)
    assert (stored / "model.safetensors").exists()
    assert LlamaFamilyAdapter(load_model(outcome.artifact.uri).model).num_parameters() == outcome.report.params_after


def test_mlp_first_removes_only_mlp_channels_while_the_cap_allows_then_kv_groups_too(tiny_dir):
    def widths(ratio):
        report = run_prune(str(tiny_dir), settings(ratio=ratio, allocation="mlp-first", attn_layers="0:", mlp_layers="0:")).report
        assert abs(report.ratio_got - ratio) <= 0.005
        return report.layer_widths

    light, heavy = widths(0.1), widths(0.4)
    assert all(w["num_key_value_heads"] == 2 and w["intermediate_size"] >= 64 for w in light)
    assert any(w["num_key_value_heads"] < 2 for w in heavy)

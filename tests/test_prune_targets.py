"""Target semantics: params_ratio lands on the whole-model share asked for; layer_ratio
is LLM-Pruner's arithmetic. Checked on real pruned models (tiny, TinyLlama-shaped)
and, for LLM-Pruner's published arithmetic, on SmolLM2-135M's shapes."""

from __future__ import annotations

import pytest
from fixtures.models import tiny_causal_lm

from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter
from prunelab.prune import BlockPruner, PruneSettings
from prunelab.prune.pruner import layer_shapes
from prunelab.prune.targets import (
    TOLERANCE,
    LayerShape,
    layer_ratio_plan,
    max_reachable_ratio,
    mlp_first_plan,
    params_ratio_plan,
    spare_layers,
)

# The study's TinyLlama-1.1B printout scaled down: 22 layers, 32 query / 4 KV heads,
# MLP 2.75x hidden (5632 / 2048), untied head; head_dim 4 keeps it fast.
TINYLLAMA_SHAPE = dict(
    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, head_dim=4,
    hidden_size=128, intermediate_size=352, vocab_size=320, tie_word_embeddings=False,
)


def tinyllama_like():
    return tiny_causal_lm("llama", **TINYLLAMA_SHAPE)


def prune_l2(model, **overrides) -> object:
    settings = PruneSettings(**{"method": "l2", "correction": False, **overrides})
    return BlockPruner(model, tokenizer=None, settings=settings, calibration_text="").run()


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("layers", ["4:18", "0:22", "2:-2"])
def test_params_ratio_lands_within_half_a_point_of_the_whole_model(torch_single_thread, ratio, layers):
    model = tinyllama_like()
    total = sum(p.numel() for p in model.parameters())
    report = prune_l2(model, ratio=ratio, attn_layers=layers, mlp_layers=layers)
    after = sum(p.numel() for p in model.parameters())  # counted on the model itself, not the report
    assert report.params_before == total and report.params_after == after
    assert abs((1 - after / total) - ratio) <= 0.005
    assert report.ratio_got == pytest.approx(1 - after / total)


def test_global_allocation_also_lands_on_the_ratio(torch_single_thread):
    model = tinyllama_like()
    total = sum(p.numel() for p in model.parameters())
    report = prune_l2(model, ratio=0.3, attn_layers="4:18", mlp_layers="4:18", allocation="global")
    assert abs(report.ratio_got - 0.3) <= 0.005
    widths = {w["intermediate_size"] for w in report.layer_widths[4:18]}
    assert len(widths) > 1, "global ranking should cut layers unevenly"
    assert 1 - sum(p.numel() for p in model.parameters()) / total == pytest.approx(report.ratio_got)


def test_unreachable_ratio_fails_naming_the_largest_reachable(torch_single_thread):
    model = tinyllama_like()
    reachable = max_reachable_ratio(layer_shapes(LlamaFamilyAdapter(model)), range(4, 18), range(4, 18),
                                    sum(p.numel() for p in model.parameters()))
    before = [p.shape for p in model.parameters()]
    with pytest.raises(InvalidArgument, match=f"largest reachable is {reachable:.4f}") as caught:
        prune_l2(model, ratio=0.7, attn_layers="4:18", mlp_layers="4:18")
    assert caught.value.field == "ratio"
    assert [p.shape for p in model.parameters()] == before, "a refused request must leave the model alone"


def test_layer_ratio_follows_llm_pruner_rounding(torch_single_thread):
    """torch_pruning keeps int(width * (1 - ratio)) channels of each chosen layer and
    rounds k_proj rows down to whole KV heads."""
    model = tinyllama_like()
    report = prune_l2(model, ratio=0.3, semantics="layer_ratio", attn_layers="4:18", mlp_layers="4:18")
    for i, widths in enumerate(report.layer_widths):
        inside = 4 <= i < 18
        kv_rows_kept = int(4 * 4 * 0.7) if inside else 16  # 11 rows -> 5 pruned -> 1 whole head
        assert widths["num_key_value_heads"] == (4 - (16 - kv_rows_kept) // 4 if inside else 4)
        assert widths["intermediate_size"] == (int(352 * 0.7) if inside else 352)


def smollm2_shapes() -> tuple[list[LayerShape], int]:
    hidden, head_dim, vocab = 576, 64, 49152
    group = 3 * head_dim * hidden * 2 + 2 * head_dim * hidden  # q and o of 3 heads, k and v of one
    shapes = [LayerShape(3, group, 1536, 3 * hidden)] * 30
    total = vocab * hidden + 30 * (3 * group + 1536 * 3 * hidden + 2 * hidden) + hidden
    assert total == 134_515_008
    return shapes, total


@pytest.mark.parametrize("ratio, kv_groups", [(0.2, 0), (0.289, 0), (0.5, 1)])
def test_mlp_first_takes_the_fewest_kv_groups_that_keep_each_mlp_under_the_cap(ratio, kv_groups):
    """SmolLM2-135M: MLP channels alone reach 20 % and 28.9 % of the model with at most
    3/4 of each MLP; 50 % would take 84.5 % of it, so one KV group of three goes too."""
    shapes, total = smollm2_shapes()
    every = range(30)
    plan = mlp_first_plan(shapes, every, every, ratio, total, cap=0.75)
    assert set(plan.kv_groups) == {kv_groups} and len(set(plan.mlp_channels)) == 1
    assert plan.mlp_channels[0] <= 0.75 * 1536
    assert abs(plan.removed_params(shapes) - ratio * total) <= TOLERANCE * total
    if kv_groups:  # one group fewer would have taken more than the cap
        fewer = mlp_first_plan(shapes, every, every, ratio, total, cap=plan.mlp_channels[0] / 1536 - 0.01)
        assert fewer is None or fewer.kv_groups[0] > kv_groups


def test_mlp_first_has_no_plan_when_every_attention_amount_leaves_the_mlp_over_the_cap():
    shapes, total = smollm2_shapes()
    assert mlp_first_plan(shapes, range(30), range(30), 0.6, total, cap=0.75) is None
    assert params_ratio_plan(shapes, range(30), range(30), 0.6, total).kv_groups[0] == 2  # the split the pruner falls back to


def test_spared_layers_give_their_channels_evenly_to_the_others_and_the_ratio_stays():
    shapes, total = smollm2_shapes()
    plan = mlp_first_plan(shapes, range(30), range(30), 0.5, total, cap=0.75)
    spared = spare_layers(plan, shapes, {0, 1, 29}, share=0.5)
    assert spared.removed_params(shapes) == plan.removed_params(shapes)
    assert spared.kv_groups == plan.kv_groups
    assert [spared.mlp_channels[i] for i in (0, 1, 29)] == [768] * 3 < [plan.mlp_channels[0]] * 3
    others = {spared.mlp_channels[i] for i in range(2, 29)}
    assert max(others) - min(others) <= 1 and min(others) > plan.mlp_channels[0]


def test_sparing_changes_nothing_where_the_plan_already_stays_under_the_share():
    shapes, total = smollm2_shapes()
    plan = mlp_first_plan(shapes, range(30), range(30), 0.2, total, cap=0.75)
    assert spare_layers(plan, shapes, {0, 1, 29}, share=0.5) == plan


def test_layer_ratio_reproduces_llm_pruner_on_smollm2_shapes():
    """LLM-Pruner's llama3.py on SmolLM2-135M (layers 4-27) measured 134.5M -> 95.6M
    parameters (28.9 %) at pruning_ratio 0.5 and 9.5 % removed at 0.2."""
    head_dim = 64
    shapes, total = smollm2_shapes()
    removed_at = {r: layer_ratio_plan(shapes, range(4, 28), range(4, 28), r, head_dim).removed_params(shapes) for r in (0.5, 0.2)}
    assert round((total - removed_at[0.5]) / 1e6, 1) == 95.6
    assert round(removed_at[0.5] / total, 3) == 0.289
    assert round(removed_at[0.2] / total, 3) == 0.095


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 0.3, "method": "wandda"}, "method"),
        ({"ratio": 0.3, "method": "wanda", "pattern": "3:4"}, "ratio"),
        ({"ratio": 0.5, "method": "wanda", "semantics": "params_ratio"}, "semantics"),
        ({"ratio": 0.5, "method": "magnitude", "mode": "channel"}, "mode"),
        ({"ratio": 0.3, "method": "taylor", "variant": "element3"}, "variant"),
        ({"ratio": 0.3, "attn_layers": "4:40"}, "attn_layers"),
        ({"ratio": 0.3, "mlp_layers": "x:y"}, "mlp_layers"),
        ({"ratio": 0.3, "semantics": "exact"}, "semantics"),
    ],
)
def test_bad_settings_are_refused_with_the_field(torch_single_thread, overrides, field):
    model = tinyllama_like()
    with pytest.raises(InvalidArgument) as caught:
        prune_l2(model, **{"attn_layers": "4:18", "mlp_layers": "4:18", **overrides})
    assert caught.value.field == field

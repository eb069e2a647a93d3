"""The importance criteria against a hand computation.

For a tiny Llama (2 layers, 8 query / 2 KV heads of 16, 24 MLP channels) in float64,
the pruner's score of every KV group and MLP channel is compared with one written
out here from the definitions in LLM-Pruner: the exact rows and columns of each
group, the element salience summed over them, and the module scores aggregated.
Gradients come from `torch.autograd.grad` on windows of three tokens (two predicted
tokens each: with one, its query attends only to itself and k_proj's gradient is
zero), independent of the pruner's calibration pass; the Fisher term is the mean
over windows of each window's squared gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import tiny_causal_lm

from prunelab.prune import BlockPruner, PruneSettings
from prunelab.prune.calibration import calibration_windows

TEXT = "the quick brown fox jumps over the lazy dog while pruning removes heads and channels " * 4
HEAD_DIM, QUERIES_PER_GROUP, KV_GROUPS, CHANNELS = 16, 4, 2, 24
WINDOWS, WINDOW_TOKENS = 3, 3

# Element salience, written from LLM-Pruner's definitions (w weight, g gradient, f Fisher).
HAND_SALIENCE = {
    ("l1", ""): lambda w, g, f: w.abs().sum(),
    ("l2", ""): lambda w, g, f: (w * w).sum(),
    ("taylor", "element1"): lambda w, g, f: (w * g).abs().sum(),
    ("taylor", "element2"): lambda w, g, f: (w * f * w / 2).abs().sum(),
    ("taylor", "mix"): lambda w, g, f: (-(w * g) + w * f * w / 2).abs().sum(),
    ("taylor", "vector"): lambda w, g, f: (w * g).sum().abs(),
}
HAND_AGGREGATION = {
    "sum": sum,
    "mean": lambda values: sum(values) / len(values),
    "max": max,
    "first": lambda values: values[0],
}


@pytest.fixture(autouse=True)
def one_thread(torch_single_thread):
    yield


def tiny_float64(family: str = "llama"):
    return tiny_causal_lm(family, num_hidden_layers=2, intermediate_size=CHANNELS).double()


def settings(method: str, variant: str = "", aggregation: str = "sum") -> PruneSettings:
    return PruneSettings(ratio=0.2, method=method, variant=variant or "element1", aggregation=aggregation,
                         attn_layers="0:2", mlp_layers="0:2", samples=WINDOWS, seq_len=WINDOW_TOKENS, correction=False)


def pruner_scores(model, tokenizer, prune_settings: PruneSettings) -> dict[tuple[int, str], torch.Tensor]:
    scores = BlockPruner(model, tokenizer, prune_settings, TEXT)._importance()
    return scores


def hand_gradients(model, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per parameter name: the gradient of the mean next-token loss over `windows`, and
    the mean over windows of each window's squared gradient."""
    names = [n for n, p in model.named_parameters() if "layers." in n and "norm" not in n]
    params = [model.get_parameter(n) for n in names]
    per_window = []
    for window in windows:
        logits = model(input_ids=window.unsqueeze(0)).logits[0]  # (3, vocab)
        loss = F.cross_entropy(logits[:-1], window[1:])  # tokens 1 and 2 predict 2 and 3
        per_window.append(torch.autograd.grad(loss, params))
    grad = {n: sum(g[i] for g in per_window) / len(per_window) for i, n in enumerate(names)}
    fisher = {n: sum(g[i] ** 2 for g in per_window) / len(per_window) for i, n in enumerate(names)}
    return grad, fisher


def kv_group_entries(prefix: str, group: int) -> list[tuple[str, tuple[slice, slice]]]:
    """The weights (and biases) of KV group `group`, root first: k rows, the rows of
    its query heads, v rows, and those heads' o_proj columns."""
    kv = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
    queries = slice(group * QUERIES_PER_GROUP * HEAD_DIM, (group + 1) * QUERIES_PER_GROUP * HEAD_DIM)
    every = slice(None)
    return [(f"{prefix}.k_proj.weight", (kv, every)), (f"{prefix}.q_proj.weight", (queries, every)),
            (f"{prefix}.v_proj.weight", (kv, every)), (f"{prefix}.o_proj.weight", (every, queries))]


def mlp_channel_entries(prefix: str, channel: int) -> list[tuple[str, tuple[slice, slice]]]:
    """gate row, up row, down column of one channel; gate (the root) first."""
    row, every = slice(channel, channel + 1), slice(None)
    return [(f"{prefix}.gate_proj.weight", (row, every)), (f"{prefix}.up_proj.weight", (row, every)),
            (f"{prefix}.down_proj.weight", (every, row))]


def hand_scores(model, criterion: tuple[str, str], aggregation: str, grad: dict, fisher: dict,
                entries_of=lambda prefix, group: []) -> dict[tuple[int, str], torch.Tensor]:
    salience, aggregate = HAND_SALIENCE[criterion], HAND_AGGREGATION[aggregation]
    params = dict(model.named_parameters())

    def group_score(entries):
        module_scores = []
        for name, index in entries:
            w = params[name].detach()[index]
            g = grad[name][index] if criterion[0] == "taylor" else None
            f = fisher[name][index] if criterion[0] == "taylor" else None
            module_scores.append(salience(w, g, f))
        return aggregate(module_scores)

    scores = {}
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        scores[(layer, "kv_groups")] = torch.stack(
            [group_score(kv_group_entries(attn, g) + entries_of(attn, g)) for g in range(KV_GROUPS)])
        scores[(layer, "mlp_channels")] = torch.stack([group_score(mlp_channel_entries(mlp, c)) for c in range(CHANNELS)])
    return scores


def windows_for(tokenizer) -> torch.Tensor:
    return calibration_windows(tokenizer, TEXT, WINDOWS, WINDOW_TOKENS, seed=0)


def assert_scores_match(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=1e-5, atol=0, msg=lambda m, k=key: f"{k}: {m}")


CRITERIA = [("l1", ""), ("l2", ""), ("taylor", "element1"), ("taylor", "element2"), ("taylor", "mix"), ("taylor", "vector")]


@pytest.mark.parametrize("aggregation", ["sum", "mean", "max", "first"])
@pytest.mark.parametrize("criterion", CRITERIA, ids=lambda c: "-".join(filter(None, c)))
def test_block_scores_equal_the_hand_computation(tiny_tokenizer, criterion, aggregation):
    model = tiny_float64()
    grad, fisher = hand_gradients(model, windows_for(tiny_tokenizer))
    expected = hand_scores(model, criterion, aggregation, grad, fisher)
    assert_scores_match(pruner_scores(model, tiny_tokenizer, settings(*criterion, aggregation)), expected)


def test_biases_count_in_their_kv_group(tiny_tokenizer):
    """Qwen2 has q/k/v biases: each group's bias rows belong to its score."""
    model = tiny_float64("qwen2")
    grad, fisher = hand_gradients(model, windows_for(tiny_tokenizer))

    def bias_entries(prefix, group):
        kv = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
        queries = slice(group * QUERIES_PER_GROUP * HEAD_DIM, (group + 1) * QUERIES_PER_GROUP * HEAD_DIM)
        return [(f"{prefix}.k_proj.bias", (kv,)), (f"{prefix}.q_proj.bias", (queries,)), (f"{prefix}.v_proj.bias", (kv,))]

    expected = hand_scores(model, ("taylor", "element1"), "sum", grad, fisher, entries_of=bias_entries)
    assert_scores_match(pruner_scores(model, tiny_tokenizer, settings("taylor", "element1")), expected)


def test_first_reads_only_the_root_module(tiny_tokenizer):
    """Rescaling every non-root module (q, v, o; up, down) changes the summed l1 scores
    but not "first", which is the l1 of k_proj's rows for attention and of gate_proj's
    rows for the MLP."""
    model = tiny_float64()
    first_before = pruner_scores(model, tiny_tokenizer, settings("l1", aggregation="first"))
    sum_before = pruner_scores(model, tiny_tokenizer, settings("l1"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.up_proj,
                           layer.mlp.down_proj):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator, dtype=torch.float64) * 3)
    first_after = pruner_scores(model, tiny_tokenizer, settings("l1", aggregation="first"))
    sum_after = pruner_scores(model, tiny_tokenizer, settings("l1"))
    for (layer, kind), first in first_after.items():
        assert not torch.allclose(sum_before[(layer, kind)], sum_after[(layer, kind)], rtol=1e-3)
        torch.testing.assert_close(first, first_before[(layer, kind)], rtol=1e-6, atol=0)
        block = model.model.layers[layer]
        root, span = (block.self_attn.k_proj, HEAD_DIM) if kind == "kv_groups" else (block.mlp.gate_proj, 1)
        by_hand = root.weight.detach().abs().reshape(-1, span, root.weight.shape[1]).sum(dim=(1, 2))
        torch.testing.assert_close(first.double(), by_hand, rtol=1e-6, atol=0)

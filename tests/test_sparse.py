"""Sparse pruning (magnitude, Wanda, SparseGPT; unstructured, N:M, OWL) and the
layer-by-layer calibration engine: exact zeros in the saved tensors, the masks and
updates the papers' formulas give, layer inputs taken from the pruned layers before,
memory that does not grow with depth, and checkpoints plain transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fixtures.models import tiny_causal_lm

from prunelab.models import LlamaFamilyAdapter, read_provenance
from prunelab.prune import PruneSettings, run_prune
from prunelab.prune.calibration import calibration_windows
from prunelab.prune.sequential import LayerPass, layer_by_layer
from prunelab.prune.sparse import (
    Pattern,
    SparsePruner,
    magnitude_mask,
    owl_sparsities,
    row_mask,
    saved_linear_zeros,
    sparsegpt_weights,
    wanda_mask,
)
from prunelab.store import open_store


@pytest.fixture(autouse=True)
def one_thread(torch_single_thread):
    yield


def sparse_settings(**overrides) -> PruneSettings:
    base = dict(ratio=0.5, method="wanda", calibration="calib", samples=4, seq_len=16)
    return PruneSettings(**{**base, **overrides})


def linear_weights(model) -> dict[tuple[int, str], torch.Tensor]:
    adapter = LlamaFamilyAdapter(model)
    return {(i, n): m.weight.detach().clone() for i in range(adapter.num_layers) for n, m in adapter.linears(i).items()}


# ---- exact zeros in the saved weights


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern, ratio", [("unstructured", 0.5), ("unstructured", 0.37), ("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.25)])
def test_saved_weights_hold_exactly_the_asked_zeros(tiny_dir, tmp_path, method, pattern, ratio):
    outcome = run_prune(str(tiny_dir), sparse_settings(method=method, pattern=pattern, ratio=ratio), out_dir=tmp_path / "out")
    parsed = Pattern.parse(pattern)
    zeros, total, groups_exact = saved_linear_zeros(tmp_path / "out", parsed)
    assert groups_exact
    assert abs(zeros / total - ratio) < 0.001 and outcome.report.ratio_got == zeros / total
    if not parsed.unstructured:  # every group of M, not only the total
        assert zeros == total * parsed.zeros // parsed.group
    record = read_provenance(open_store().get_dir(outcome.artifact.uri))["sparsity"]
    assert record["pattern"] == pattern and record["linear_weights"] == total
    assert outcome.report.params_after == outcome.report.params_before  # dense architecture
    assert outcome.report.nonzero_params == outcome.report.params_before - zeros - _incidental_zeros(tiny_dir)


def _incidental_zeros(checkpoint_dir) -> int:
    """Zeros the unpruned model already has outside the decoder's linear weights."""
    from prunelab.models import load_model

    model = load_model(str(checkpoint_dir)).model
    linear = sum(int((w == 0).sum()) for w in linear_weights(model).values())
    return sum(int((p == 0).sum()) for p in model.parameters()) - linear


def test_plain_transformers_loads_sparse_checkpoints_in_a_fresh_process(tiny_dir, tmp_path, plain_transformers_run):
    dirs = []
    for method, pattern in (("wanda", "2:4"), ("sparsegpt", "unstructured")):
        out = tmp_path / f"{method}-{pattern.replace(':', '-')}"
        run_prune(str(tiny_dir), sparse_settings(method=method, pattern=pattern), out_dir=out)
        dirs.append(out)
    config = json.loads((dirs[0] / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config  # the stock class
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    runs = plain_transformers_run(dirs, ids, max_new_tokens=4)
    for run in runs:
        assert run.model_class.endswith("LlamaForCausalLM") and run.generated.shape == (1, 9)
        assert torch.isfinite(run.logits).all()


# ---- the formulas


def test_wanda_masks_follow_the_formula_on_inputs_from_the_pruned_layers_before(tiny_tokenizer):
    """Layer 0 sees the embeddings; layer 1 sees layer 0 *after* its pruning. The mask
    of each linear map is |W| * ||x_j|| compared within each output row, with x from
    the layer before any of its own maps is pruned (as the reference)."""
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = linear_weights(model)
    SparsePruner(model, "wanda", 0.5, Pattern(), "uniform").run(windows)
    pruned = linear_weights(model)
    adapter = LlamaFamilyAdapter(model)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def record(index: int, _layer, layer_pass: LayerPass) -> None:
        """Layer `index` dense, fed by the pruned layers before it; pruned again after."""
        linears = adapter.linears(index)
        for name, linear in linears.items():
            linear.weight.data = dense[(index, name)]
        stats = layer_pass.statistics(linears, gram=True)
        seen.update({(index, n): stats.of(n) for n in linears})
        for name, linear in linears.items():
            linear.weight.data = pruned[(index, name)]

    layer_by_layer(model, windows, record)
    for key, weight in dense.items():
        norms = torch.diagonal(seen[key])  # ||x_j||^2 over all tokens
        score = weight.abs() * norms.sqrt()
        expected = torch.zeros_like(weight, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1)[:, : weight.shape[1] // 2], True)
        assert torch.equal(pruned[key] == 0, expected), key
        assert torch.equal(pruned[key][~expected], weight[~expected])  # Wanda only masks
    # and the sequence matters: layer 1's inputs through the dense layer 0 give another mask
    dense_model = tiny_causal_lm("llama", num_hidden_layers=2)
    first = {}
    layer_by_layer(dense_model, windows, lambda i, _l, lp: first.update(
        {i: lp.statistics(LlamaFamilyAdapter(dense_model).linears(i), gram=False).of("q")}))
    assert not torch.allclose(first[1], torch.diagonal(seen[(1, "q")]))


def test_row_mask_spreads_an_uneven_count_over_rows_by_one_at_most():
    metric = torch.rand(6, 10, generator=torch.Generator().manual_seed(1))
    mask = row_mask(metric, 31)
    per_row = mask.sum(1)
    assert mask.sum() == 31 and set(per_row.tolist()) == {5, 6}
    # within a row, every masked entry is below every kept one
    for row, m in zip(metric, mask, strict=True):
        assert row[m].max() < row[~m].min()


def test_magnitude_compares_across_the_whole_matrix():
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    assert magnitude_mask(weight, 0.5, Pattern()).tolist() == [[True] * 4, [False] * 4]
    assert magnitude_mask(weight, 0.5, Pattern(2, 4)).tolist() == [[True, True, False, False]] * 2


def _naive_obs(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The OBS update column by column with an explicit inverse of the Hessian of the
    columns not yet visited (SparseGPT, eq. 3 and 4), no Cholesky trick, no blocks."""
    w = weight.double().clone()
    h = hessian.double()
    for i in range(w.shape[1]):
        inverse = torch.linalg.inv(h[i:, i:])
        error = (w[:, i] * mask[:, i]) / inverse[0, 0]  # only pruned weights move the rest
        w[:, i:] -= error.unsqueeze(1) * inverse[0].unsqueeze(0)
        w[mask[:, i], i] = 0
    return w


def test_sparsegpt_update_equals_the_obs_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    x[:, 3] += x[:, 1]  # correlated inputs, so the update matters
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    pruned = sparsegpt_weights(weight, gram, 0.5, Pattern(), block=12, damping=0.0)
    mask = pruned == 0
    assert mask.sum() == 30
    # the mask: the lowest w^2 / [H^-1]_jj^2 over the block, with [H^-1]_jj of the columns left at j
    diag = torch.tensor([torch.linalg.inv(gram[j:, j:])[0, 0] for j in range(12)], dtype=torch.float64)
    scores = weight.pow(2) / diag.unsqueeze(0)  # the Cholesky factor's diagonal squared is [H^-1]_jj
    assert torch.equal(mask, scores <= scores.flatten().kthvalue(30).values)
    torch.testing.assert_close(pruned, _naive_obs(weight, gram, mask), rtol=1e-5, atol=1e-6)  # float32 inside


def test_sparsegpt_blocks_and_lazy_updates_give_the_same_weights():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    one_block = sparsegpt_weights(weight, x.T @ x, 0.5, Pattern(2, 4), block=32)
    blocks = sparsegpt_weights(weight, x.T @ x, 0.5, Pattern(2, 4), block=8)
    torch.testing.assert_close(one_block, blocks, rtol=1e-5, atol=1e-6)
    assert ((one_block == 0).reshape(6, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_reconstructs_a_real_layer_better_than_wanda_and_magnitude(smollm2, shared_data):
    """On SmolLM2's real activations (PTB text), at the same sparsity, SparseGPT's
    output error ||XW^T - XW'^T|| is the smallest, and Wanda's beats magnitude's."""
    from prunelab.data import resolve_text

    model, tokenizer = smollm2.model, smollm2.tokenizer
    windows = calibration_windows(tokenizer, resolve_text("ptb", split="validation"), 8, 128, 0)
    adapter = LlamaFamilyAdapter(model)
    grams = {}

    def collect(index, _layer, layer_pass):
        if index == 5:
            stats = layer_pass.statistics(adapter.linears(5), gram=True)
            grams.update({n: stats.of(n) for n in ("q", "down")})

    layer_by_layer(model, windows[:, :], collect)
    for name in ("q", "down"):
        weight = adapter.linears(5)[name].weight.detach()
        gram = grams[name]
        candidates = {
            "magnitude": weight.masked_fill(magnitude_mask(weight, 0.5, Pattern()), 0),
            "wanda": weight.masked_fill(wanda_mask(weight, torch.diagonal(gram), 0.5, Pattern()), 0),
            "sparsegpt": sparsegpt_weights(weight, gram, 0.5, Pattern()),
        }
        # ||X (W - W')^T||^2 = tr((W - W') G (W - W')^T)
        error = {m: float(((w - weight) @ gram * (w - weight)).sum()) for m, w in candidates.items()}
        assert error["sparsegpt"] < error["wanda"] < error["magnitude"], (name, error)


# ---- OWL


def test_owl_keeps_more_of_layers_with_more_outliers_and_the_mean_sparsity():
    sparsities = owl_sparsities([0.01, 0.05, 0.02, 0.03], 0.6, spread=0.08)
    assert abs(sum(sparsities) / 4 - 0.6) < 1e-12
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sorted(range(4), key=lambda i: sparsities[i]) == [1, 3, 2, 0]  # most outliers, least pruned


def test_owl_prune_varies_layer_sparsity_around_the_target(tiny_dir):
    outcome = run_prune(str(tiny_dir), sparse_settings(ratio=0.6, allocation="owl"))
    layers = outcome.report.sparsity["layers"]
    assert abs(outcome.report.ratio_got - 0.6) < 0.001
    assert 0.05 < max(layers) - min(layers) < 0.161 and all(0.6 - 0.161 < s < 0.6 + 0.161 for s in layers)


# ---- the engine's memory


_DEPTH_PROBE = r"""
import sys, resource, torch
from transformers import LlamaConfig, LlamaForCausalLM
from prunelab.prune.sparse import Pattern, SparsePruner
torch.manual_seed(0)
torch.set_num_threads(1)
layers = int(sys.argv[1])
config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=2048, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
model = LlamaForCausalLM(config).eval()
windows = torch.randint(0, 64, (4, 32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
SparsePruner(model, "sparsegpt", 0.5, Pattern(), "uniform").run(windows)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_sequential_statistics_memory_does_not_grow_with_depth():
    """SparseGPT's Grams are the largest statistics (down_proj's alone is 2048^2 floats,
    16 MiB): held for every layer at once, 12 layers would add ~11 x 33 MiB over 1."""

    def peak_growth(layers: int) -> int:
        done = subprocess.run([sys.executable, "-c", _DEPTH_PROBE, str(layers)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    shallow, deep = peak_growth(1), peak_growth(12)
    assert deep < shallow + 40 * 2**20, (shallow, deep)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_models_prune_with_float32_statistics(method):
    model = tiny_causal_lm("llama", num_hidden_layers=2).to(torch.bfloat16)
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    SparsePruner(model, method, 0.5, Pattern(2, 4), "uniform").run(windows)
    for weight in linear_weights(model).values():
        assert weight.dtype == torch.bfloat16
        assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all()
    assert torch.isfinite(model(windows).logits).all()

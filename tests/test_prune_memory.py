"""Memory that scales with one layer, not the model: the Taylor importance taken in
gradient hooks equals the one from full gradients and never holds them all, and the
layer-by-layer statistics hold one layer's Grams whatever the depth."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref

import pytest
import torch
from fixtures.models import CALIBRATION_TEXT, tiny_causal_lm

from prunelab.models import LlamaFamilyAdapter
from prunelab.prune import ChannelPruner, PruneSettings
from prunelab.prune import sequential as sequential_module
from prunelab.prune.calibration import calibration_windows, taylor_group_scores
from prunelab.prune.correction import GramAccumulator
from prunelab.prune.importance import Criterion, aggregate, attention_slices, mlp_slices, salience_fn, slice_scores
from prunelab.prune.sequential import layer_by_layer

VARIANTS = ("element1", "element2", "mix", "vector")


@pytest.fixture(autouse=True)
def one_thread(torch_single_thread):
    yield


def block_slices(model) -> dict:
    """BlockPruner's blocks: every layer's KV groups and MLP channels."""
    adapter = LlamaFamilyAdapter(model)
    blocks = {}
    for i, layer in enumerate(adapter.layers):
        per_group = model.config.num_attention_heads // model.config.num_key_value_heads
        blocks[(i, "kv_groups")] = attention_slices(layer.self_attn, adapter.head_dim, per_group)
        blocks[(i, "mlp_channels")] = mlp_slices(layer.mlp)
    return blocks


def channel_slices(model, tokenizer) -> dict:
    """ChannelPruner's one block: every parameter with a hidden axis, the tied
    embedding (read twice by the graph) first."""
    settings = PruneSettings(ratio=0.1, method="taylor", mode="channel", samples=4, seq_len=16)
    return {"hidden": ChannelPruner(model, tokenizer, settings, CALIBRATION_TEXT)._hidden_slices()}


def full_gradient_scores(model, blocks: dict, windows: torch.Tensor, criterion: Criterion) -> dict:
    """The straightforward way: the whole gradient of the mean loss over all windows,
    the Fisher as the mean of each window's squared gradient, both held in full."""
    params = list({id(s.param): s.param for slices in blocks.values() for s in slices}.values())
    gradient = torch.autograd.grad(model(input_ids=windows, labels=windows).loss, params)
    fisher = [torch.zeros_like(p) for p in params]
    for window in windows:
        for total, g in zip(fisher, torch.autograd.grad(model(input_ids=window[None], labels=window[None]).loss, params),
                            strict=True):
            total += g.pow(2) / len(windows)
    of = {id(p): i for i, p in enumerate(params)}
    salience, vector = salience_fn(criterion), criterion.variant == "vector"
    return {key: aggregate([slice_scores(s, salience, vector, gradient[of[id(s.param)]], fisher[of[id(s.param)]])
                            for s in slices], criterion.aggregation) for key, slices in blocks.items()}


@pytest.mark.parametrize("mode", ["block", "channel"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_scores_equal_the_full_gradient_scores(tiny_tokenizer, variant, mode):
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    blocks = block_slices(model) if mode == "block" else channel_slices(model, tiny_tokenizer)
    windows = calibration_windows(tiny_tokenizer, CALIBRATION_TEXT, 4, 16, seed=0)
    criterion = Criterion("taylor", variant, "sum")
    expected = full_gradient_scores(model, blocks, windows, criterion)
    got = taylor_group_scores(model, blocks, windows, criterion)
    assert got.keys() == expected.keys()
    for key, scores in expected.items():
        assert scores.abs().sum() > 0, key  # the comparison is not between zeros
        torch.testing.assert_close(got[key], scores, rtol=1e-5, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_at_most_one_gradient_is_alive_at_a_time(tiny_tokenizer, variant):
    """A hook registered before the pruner's runs first on every accumulated gradient:
    by then every other prunable parameter's gradient must be gone."""
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    blocks = block_slices(model)
    params = [s.param for slices in blocks.values() for s in slices]
    alive = []
    handles = [p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None for q in params)))
               for p in params]
    windows = calibration_windows(tiny_tokenizer, CALIBRATION_TEXT, 4, 16, seed=0)
    taylor_group_scores(model, blocks, windows, Criterion("taylor", variant))
    for handle in handles:
        handle.remove()
    passes = 1 + 4 * (variant in ("element2", "mix")) - (variant == "element2")
    assert len(alive) == passes * len(params)
    assert max(alive) == 1
    assert all(p.grad is None for p in params)


_GRADIENT_PROBE = r"""
import re, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from prunelab.prune.calibration import taylor_group_scores
from prunelab.prune.importance import Criterion, attention_slices, mlp_slices

def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=4096, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
model = LlamaForCausalLM(config).eval()
blocks = {}
for i, layer in enumerate(model.model.layers):
    blocks[(i, "kv")] = attention_slices(layer.self_attn, 128, 1)
    blocks[(i, "mlp")] = mlp_slices(layer.mlp)
prunable = sum(s.param.numel() * 4 for slices in blocks.values() for s in slices)
windows = torch.randint(0, 64, (2, 8))  # few tokens: activations are small beside the weights
with torch.no_grad():
    model(input_ids=windows)  # torch's one-time allocations happen before the measurement
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = kib("VmRSS")
taylor_group_scores(model, blocks, windows, Criterion("taylor", sys.argv[1]))
print(kib("VmHWM") - before, prunable)
"""


@pytest.mark.parametrize("variant", ["element1", "element2"])
def test_taylor_pass_peak_is_a_fraction_of_the_prunable_weights(variant):
    """In a fresh process, the whole Taylor pass over 8 layers (234 MB of prunable
    weights) peaks a small fraction of them above where it started; holding every
    gradient (the full-gradient way) would add all 234 MB."""
    # A fixed mmap threshold makes glibc hand every freed tensor of 64 KiB or more back
    # at once, so RSS follows the live tensors rather than what the heap keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", _GRADIENT_PROBE, variant], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, prunable = map(int, done.stdout.split()[-2:])
    assert growth < 0.25 * prunable, (growth, prunable)


class _MeasuredAccumulator(GramAccumulator):
    """A GramAccumulator that, after every batch it adds, counts the bytes of the
    tensors held by every such accumulator still alive, and keeps the peak."""

    alive: weakref.WeakSet = weakref.WeakSet()
    peak_bytes = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _MeasuredAccumulator.alive.add(self)

    def hook(self, *args) -> None:
        super().hook(*args)
        live = sum(_held_bytes(vars(accumulator)) for accumulator in list(_MeasuredAccumulator.alive))
        _MeasuredAccumulator.peak_bytes = max(_MeasuredAccumulator.peak_bytes, live)


def _held_bytes(value) -> int:
    """Bytes of the tensors in `value`, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_held_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_held_bytes(v) for v in value)
    return 0


def statistics_peak(layers: int, monkeypatch) -> int:
    """Peak bytes of live Grams while `layer_by_layer` takes the full statistics of
    every linear map of every layer and releases them."""
    monkeypatch.setattr(sequential_module, "GramAccumulator", _MeasuredAccumulator)
    _MeasuredAccumulator.peak_bytes = 0
    model = tiny_causal_lm("llama", num_hidden_layers=layers)
    adapter = LlamaFamilyAdapter(model)
    seen = []

    def step(index, _layer, layer_pass):
        stats = layer_pass.statistics(adapter.linears(index), gram=True)
        for name in adapter.linears(index):
            seen.append(stats.of(name).shape)
            stats.release(name)

    windows = torch.randint(2, 300, (6, 24), generator=torch.Generator().manual_seed(0))
    layer_by_layer(model, windows, step, batch_size=2)  # 3 batches: each statistic is summed from 3 parts
    assert len(seen) == 7 * layers
    return _MeasuredAccumulator.peak_bytes


def test_layer_by_layer_statistics_peak_does_not_grow_with_depth(monkeypatch):
    """Two layers and eight of the same widths peak at the same bytes of statistics,
    at least one layer's Grams (q/k/v share 64^2, o 128^2, gate/up 64^2, down 96^2
    floats); holding every layer's would be 4x more at 8 layers than at 2."""
    one_layer = 4 * (64**2 + 128**2 + 64**2 + 96**2)
    shallow, deep = statistics_peak(2, monkeypatch), statistics_peak(8, monkeypatch)
    assert shallow >= one_layer
    assert deep == shallow

"""The Llama-family adapter: widths, and shrinks that do exactly what removing the
units means (checked against masking them in an untouched copy) for every family."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fixtures.models import tiny_causal_lm
from transformers import GPT2Config, GPT2LMHeadModel

from prunelab.errors import InvalidArgument
from prunelab.models import LayerWidths, LlamaFamilyAdapter

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32]])
HEAD_DIM = 16


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _assert_generation_consistent(model) -> None:
    """Cached greedy decoding equals recomputing the whole prefix at every step."""
    cached = model.generate(PROMPT, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(PROMPT, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape[1] > PROMPT.shape[1]
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_widths_and_structure_match_the_config(family):
    adapter = LlamaFamilyAdapter(tiny_causal_lm(family))

    assert adapter.family == family
    assert (adapter.num_layers, adapter.hidden_size, adapter.head_dim) == (4, 64, HEAD_DIM)
    assert adapter.layer_widths() == [LayerWidths(8, 2, 96)] * 4
    projections = adapter.projections(2)
    assert projections.q is adapter.model.model.layers[2].self_attn.q_proj
    assert projections.down is adapter.model.model.layers[2].mlp.down_proj


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_kv_groups_equals_silencing_the_dropped_heads(family):
    model = tiny_causal_lm(family)
    masked = copy.deepcopy(model)
    # group 0 of layer 1 = KV head 0 with query heads 0-3: zeroing their o_proj columns
    # removes exactly their contribution
    with torch.no_grad():
        masked.model.layers[1].self_attn.o_proj.weight[:, : 4 * HEAD_DIM] = 0

    adapter = LlamaFamilyAdapter(model)
    adapter.keep_kv_groups(1, [1])

    assert adapter.layer_widths()[1] == LayerWidths(4, 1, 96)
    assert adapter.layer_widths()[0] == LayerWidths(8, 2, 96)
    torch.testing.assert_close(_logits(model), _logits(masked), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(model), _logits(tiny_causal_lm(family)), atol=1e-3)  # the heads mattered
    _assert_generation_consistent(model)


def test_qwen2_biases_follow_their_rows():
    model = tiny_causal_lm("qwen2")
    attention = model.model.layers[0].self_attn
    q_bias, k_bias = attention.q_proj.bias.detach().clone(), attention.k_proj.bias.detach().clone()

    LlamaFamilyAdapter(model).keep_kv_groups(0, [1])

    assert torch.equal(attention.q_proj.bias, q_bias[4 * HEAD_DIM :])
    assert torch.equal(attention.k_proj.bias, k_bias[HEAD_DIM:])
    assert attention.o_proj.weight.shape == (64, 4 * HEAD_DIM)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_mlp_channels_equals_silencing_the_dropped_ones(family):
    model = tiny_causal_lm(family)
    kept = list(range(0, 96, 3))
    masked = copy.deepcopy(model)
    with torch.no_grad():
        dropped = [c for c in range(96) if c not in kept]
        masked.model.layers[3].mlp.down_proj.weight[:, dropped] = 0

    LlamaFamilyAdapter(model).keep_mlp_channels(3, kept)

    assert LlamaFamilyAdapter(model).layer_widths()[3] == LayerWidths(8, 2, 32)
    assert model.model.layers[3].mlp.intermediate_size == 32
    torch.testing.assert_close(_logits(model), _logits(masked), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_hidden_channels_slices_every_reader_writer_and_norm(family):
    model = tiny_causal_lm(family)
    original = copy.deepcopy(model)
    kept = [c for c in range(64) if c % 4 != 1]
    adapter = LlamaFamilyAdapter(model)
    tied = adapter.tied_embeddings

    adapter.keep_hidden_channels(kept)

    assert adapter.hidden_size == len(kept) == model.config.hidden_size
    assert adapter.tied_embeddings == tied
    index = torch.tensor(kept)
    embeddings = original.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, embeddings[:, index])
    assert torch.equal(model.lm_head.weight, original.lm_head.weight[:, index])
    assert torch.equal(model.model.norm.weight, original.model.norm.weight[index])
    layer, before = model.model.layers[2], original.model.layers[2]
    assert torch.equal(layer.self_attn.k_proj.weight, before.self_attn.k_proj.weight[:, index])
    assert torch.equal(layer.mlp.down_proj.weight, before.mlp.down_proj.weight[index])
    assert torch.equal(layer.post_attention_layernorm.weight, before.post_attention_layernorm.weight[index])
    assert _logits(model).shape == (1, PROMPT.shape[1], 320)
    _assert_generation_consistent(model)


def test_keeping_everything_changes_nothing():
    model = tiny_causal_lm("qwen3")
    expected = _logits(model)
    adapter = LlamaFamilyAdapter(model)

    adapter.keep_hidden_channels(list(reversed(range(64))))  # kept units stay in their original order
    adapter.keep_kv_groups(0, [1, 0])
    adapter.keep_mlp_channels(0, np.arange(96))  # numpy indices, as an argsort yields

    assert torch.equal(_logits(model), expected)


def test_config_follows_the_shrinks():
    model = tiny_causal_lm("llama")
    adapter = LlamaFamilyAdapter(model)

    adapter.keep_kv_groups(0, [0])
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 2)  # maxima over layers
    for layer in range(1, 4):
        adapter.keep_kv_groups(layer, torch.tensor([1]))
    adapter.keep_hidden_channels(range(48))

    config = model.config
    widths = (config.num_attention_heads, config.num_key_value_heads, config.hidden_size, config.head_dim)
    assert widths == (4, 1, 48, 16)


def test_unsupported_architecture_is_refused_naming_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    with pytest.raises(InvalidArgument, match="'gpt2'.*llama, mistral, qwen2, qwen3") as error:
        LlamaFamilyAdapter(gpt2)
    assert error.value.field == "model"


@pytest.mark.parametrize(
    ("operation", "field", "reason"),
    [
        (lambda a: a.keep_kv_groups(4, [0]), "layer", r"\[0, 4\)"),
        (lambda a: a.keep_kv_groups(True, [0]), "layer", "integer"),
        (lambda a: a.keep_kv_groups(0, []), "groups", "at least one"),
        (lambda a: a.keep_kv_groups(0, [0, 2]), "groups", r"\[2\] are outside \[0, 2\)"),
        (lambda a: a.keep_kv_groups(0, [1, 1]), "groups", "repeat"),
        (lambda a: a.keep_mlp_channels(0, [0.5]), "channels", "integers"),
        (lambda a: a.keep_mlp_channels(0, [-1]), "channels", "outside"),
        (lambda a: a.keep_hidden_channels([64]), "channels", r"outside \[0, 64\)"),
    ],
)
def test_bad_shrink_arguments_are_refused_and_leave_the_model_untouched(operation, field, reason):
    model = tiny_causal_lm("llama")
    adapter = LlamaFamilyAdapter(model)
    expected = _logits(model)

    with pytest.raises(InvalidArgument, match=reason) as error:
        operation(adapter)

    assert error.value.field == field
    assert adapter.layer_widths() == [LayerWidths(8, 2, 96)] * 4
    assert torch.equal(_logits(model), expected)

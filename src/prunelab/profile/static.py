"""Figures that need no clock: parameter counts, MACs (ptflops, checked against the
analytic formula) and checkpoint size on disk; for models with exact zeros in their
weights (sparse pruning keeps the dense shapes), the nonzero parameters and the MACs a
kernel that skips zero weights would do.

MACs are those of one forward pass over `batch_size` x `seq_len` tokens, logits at
every position, no KV cache. ptflops' aten backend counts every matmul the pass
dispatches; with eager attention that includes the attention scores and the weighted
sum of values (under SDPA they would hide inside one fused kernel ptflops does not
count).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from ptflops import get_model_complexity_info
from ptflops.flops_counter import FLOPS_BACKEND
from torch import nn
from transformers import PreTrainedModel

from prunelab.models.adapter import LayerWidths, LlamaFamilyAdapter


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters and the widths that determine them."""

    attention: int  # q/k/v/o weights and biases (and Qwen3's q/k norms)
    mlp: int  # gate/up/down
    norms: int  # the layer's two RMSNorms
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.norms


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by part. `total` counts distinct tensors, so tied input and output
    embeddings count once: in `embeddings`, with `lm_head` 0 and `tied_embeddings` set.
    The parts add up to `total`; `nonzero` counts the elements of those tensors that
    are not exactly zero (what a sparse model really keeps)."""

    total: int
    nonzero: int
    embeddings: int
    lm_head: int
    tied_embeddings: bool
    final_norm: int
    layers: list[LayerParams]

    @property
    def attention(self) -> int:
        return sum(layer.attention for layer in self.layers)

    @property
    def mlp(self) -> int:
        return sum(layer.mlp for layer in self.layers)

    @property
    def norms(self) -> int:
        return sum(layer.norms for layer in self.layers) + self.final_norm


@dataclass(frozen=True)
class MacBreakdown:
    """Analytic multiply-accumulates of one forward pass, by where they happen."""

    attention_projections: int  # q, k, v, o (+ their biases)
    attention_matmuls: int  # Q K^T scores and the weighted sum of V
    mlp: int  # gate, up, down
    lm_head: int

    @property
    def total(self) -> int:
        return self.attention_projections + self.attention_matmuls + self.mlp + self.lm_head


def count_parameters(model: PreTrainedModel) -> ParamCounts:
    adapter = LlamaFamilyAdapter(model)
    tied = adapter.tied_embeddings
    layers = [_layer_params(block, widths) for block, widths in zip(adapter.layers, adapter.layer_widths(), strict=False)]
    return ParamCounts(
        total=_numel(model),
        nonzero=adapter.num_nonzero_parameters(),
        embeddings=_numel(model.get_input_embeddings()),
        lm_head=0 if tied else _numel(model.get_output_embeddings()),
        tied_embeddings=tied,
        final_norm=_numel(adapter.decoder.norm),
        layers=layers,
    )


def analytic_macs(model: PreTrainedModel, seq_len: int, batch_size: int = 1) -> MacBreakdown:
    """The MAC count of a forward pass from the layer widths, per token and position:

        per layer   q: h*(nq*d)   k, v: h*(nkv*d) each   o: (nq*d)*h   (+ bias outputs)
                    MLP: 3*h*I
                    attention: nq*T*d for the scores and again for the weighted sum,
                    per query position (eager computes the full T x T matrices, mask or not)
        lm_head     h*V at every position

    with h the hidden size, d the head dim, nq/nkv the layer's query/KV heads, I its
    MLP width, T the sequence length and V the vocabulary; everything times batch size.
    """
    adapter = LlamaFamilyAdapter(model)
    hidden, head_dim = adapter.hidden_size, adapter.head_dim
    projections = matmuls = mlp = 0
    for layer, widths in enumerate(adapter.layer_widths()):
        query_width = widths.num_attention_heads * head_dim
        kv_width = widths.num_key_value_heads * head_dim
        proj = adapter.projections(layer)
        projections += 2 * hidden * query_width + 2 * hidden * kv_width + _bias_outputs(proj.q, proj.k, proj.v, proj.o)
        matmuls += 2 * query_width * seq_len
        mlp += 3 * hidden * widths.intermediate_size + _bias_outputs(proj.gate, proj.up, proj.down)
    lm_head = model.get_output_embeddings()
    vocab_macs = hidden * lm_head.out_features + _bias_outputs(lm_head)
    tokens = batch_size * seq_len
    return MacBreakdown(
        attention_projections=tokens * projections,
        attention_matmuls=tokens * matmuls,
        mlp=tokens * mlp,
        lm_head=tokens * vocab_macs,
    )


def ptflops_macs(model: PreTrainedModel, seq_len: int, batch_size: int = 1) -> int:
    """MACs of the same pass as `analytic_macs`, counted by ptflops' aten backend."""
    input_ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=model.device)
    with _eager_attention(model):
        macs, _ = get_model_complexity_info(
            _HookFreeView(model),
            (seq_len,),
            input_constructor=lambda _shape: {"input_ids": input_ids, "use_cache": False},
            as_strings=False,
            print_per_layer_stat=False,
            backend=FLOPS_BACKEND.ATEN,
        )
    if macs is None:  # ptflops prints the exception and returns None
        raise RuntimeError("ptflops could not count the model's MACs; its traceback is on stdout")
    return int(macs)


def nonzero_macs(model: PreTrainedModel, dense_macs: int, seq_len: int, batch_size: int = 1) -> int:
    """The ideal MAC count of the same pass for a kernel that skips zero weights: the
    dense count less, for every nn.Linear, one MAC per token per exactly-zero weight.
    Nothing runs this way here: dense kernels multiply the zeros too (and PyTorch's
    2:4 kernels reach only part of this saving, on some GPUs). Attention's own matmuls
    and the biases have no weights to skip and stay as counted."""
    zero_weights = sum(int(linear.weight.numel() - torch.count_nonzero(linear.weight))
                       for linear in model.modules() if isinstance(linear, nn.Linear))
    return dense_macs - batch_size * seq_len * zero_weights


def checkpoint_bytes(path: Path) -> int:
    """Bytes of every file in a checkpoint (weights, config, tokenizer), or of the file itself."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _HookFreeView(nn.Module):
    """Runs `model` without registering it as a submodule: ptflops adds forward hooks to
    its argument's children and never removes them, which would leave them on the
    caller's model (and in every later timing)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        object.__setattr__(self, "target", model)

    def forward(self, **inputs):
        return self.target(**inputs)


@contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def _layer_params(block: nn.Module, widths: LayerWidths) -> LayerParams:
    attention, mlp = _numel(block.self_attn), _numel(block.mlp)
    return LayerParams(
        attention=attention,
        mlp=mlp,
        norms=_numel(block) - attention - mlp,
        num_attention_heads=widths.num_attention_heads,
        num_key_value_heads=widths.num_key_value_heads,
        intermediate_size=widths.intermediate_size,
    )


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias_outputs(*linears: nn.Linear) -> int:
    """A bias adds one MAC per output (ptflops counts it so, via aten.addmm)."""
    return sum(linear.out_features for linear in linears if linear.bias is not None)

"""One view of every Llama-family decoder (Llama 1/2/3, TinyLlama, SmolLM2, Mistral,
Qwen2, Qwen3) for the pruner: where the projections are, how wide each layer is, and
in-place structural shrinks that keep the model runnable (forward and cached
generation) after every call.

The families share a layout (q/k/v/o attention with grouped KV heads, gate/up/down
MLP, RMSNorm); Qwen2's q/k/v biases are sliced with their rows and Qwen3's per-head
q_norm/k_norm act on head_dim, which no shrink here changes.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedModel

from prunelab.errors import InvalidArgument
from prunelab.models.modeling_prunelab import FAMILIES, LEGACY_MODEL_TYPE_PREFIX, WIDTH_FIELDS


@dataclass(frozen=True)
class LayerWidths:
    """How wide one decoder layer is; field names match the transformers config keys."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class LayerProjections:
    """The seven linear maps of one decoder layer."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def model_family(model: PreTrainedModel) -> str:
    """The family key of `model` ("llama", "qwen2", ...), also for our per-layer-width
    classes (theirs is the family's, or "prunelab_llama" in older checkpoints);
    InvalidArgument for anything else."""
    model_type = getattr(model.config, "model_type", None) or "<none>"
    family = model_type.removeprefix(LEGACY_MODEL_TYPE_PREFIX)
    if family not in FAMILIES:
        raise InvalidArgument(
            f"unsupported architecture {model_type!r} ({type(model).__name__}): "
            f"supported model types are {', '.join(sorted(FAMILIES))}",
            field="model",
        )
    return family


class LlamaFamilyAdapter:
    """Structure and in-place shrink operations of one Llama-family causal LM.

    After every shrink the model's config is brought up to date: hidden_size, head_dim,
    and the head/KV/MLP counts (their maxima over layers when layers differ; the exact
    per-layer truth is `layer_widths()`, which `save_checkpoint` writes).
    """

    def __init__(self, model: PreTrainedModel):
        self.family = model_family(model)
        self.model = model
        self.decoder = model.get_decoder()
        self.layers: nn.ModuleList = self.decoder.layers

    # ---- structure ----

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    @property
    def tied_embeddings(self) -> bool:
        return self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight

    def projections(self, layer: int) -> LayerProjections:
        block = self.layers[self._layer_index(layer)]
        attn, mlp = block.self_attn, block.mlp
        return LayerProjections(
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.o_proj,
            gate=mlp.gate_proj,
            up=mlp.up_proj,
            down=mlp.down_proj,
        )

    def linears(self, layer: int) -> dict[str, nn.Linear]:
        """The layer's seven linear maps by their short names ("q", ..., "down")."""
        proj = self.projections(layer)
        return {f.name: getattr(proj, f.name) for f in fields(LayerProjections)}

    def layer_widths(self) -> list[LayerWidths]:
        """Widths read from the weights themselves, so they are right after any shrink."""
        widths = []
        for layer in range(self.num_layers):
            proj = self.projections(layer)
            widths.append(
                LayerWidths(
                    num_attention_heads=proj.q.out_features // self.head_dim,
                    num_key_value_heads=proj.k.out_features // self.head_dim,
                    intermediate_size=proj.gate.out_features,
                )
            )
        return widths

    def num_parameters(self) -> int:
        """Distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def num_nonzero_parameters(self) -> int:
        """Nonzero elements of the distinct parameters: what a sparse model really keeps."""
        return sum(int(torch.count_nonzero(p)) for p in self.model.parameters())

    # ---- shrinks ----

    @torch.no_grad()
    def keep_kv_groups(self, layer: int, groups: Sequence[int]) -> None:
        """Keep the listed KV groups of `layer` (a KV head together with the query heads
        that attend through it) and drop the rest. Whole groups keep the query/KV ratio,
        so the attention module's `num_key_value_groups` stays right."""
        layer = self._layer_index(layer)
        widths = self.layer_widths()[layer]
        kept = self._indices("groups", groups, widths.num_key_value_heads)
        group_size = widths.num_attention_heads // widths.num_key_value_heads
        query_heads = expand_units(kept, group_size)
        query_rows = expand_units(query_heads, self.head_dim)
        kv_rows = expand_units(kept, self.head_dim)
        proj = self.projections(layer)
        _keep_outputs(proj.q, query_rows)
        _keep_outputs(proj.k, kv_rows)
        _keep_outputs(proj.v, kv_rows)
        _keep_inputs(proj.o, query_rows)
        self._sync_config()

    @torch.no_grad()
    def keep_mlp_channels(self, layer: int, channels: Sequence[int]) -> None:
        """Keep the listed intermediate channels of `layer`'s MLP."""
        layer = self._layer_index(layer)
        proj = self.projections(layer)
        kept = self._indices("channels", channels, proj.gate.out_features)
        _keep_outputs(proj.gate, kept)
        _keep_outputs(proj.up, kept)
        _keep_inputs(proj.down, kept)
        self.layers[layer].mlp.intermediate_size = len(kept)
        self._sync_config()

    @torch.no_grad()
    def keep_hidden_channels(self, channels: Sequence[int]) -> None:
        """Keep the listed channels of the residual stream everywhere it appears:
        embeddings, every projection reading or writing it, every norm, and lm_head
        (once, when it is tied to the embeddings)."""
        kept = self._indices("channels", channels, self.hidden_size)
        tied = self.tied_embeddings
        embeddings = self.model.get_input_embeddings()
        embeddings.weight = _sliced(embeddings.weight, kept, dim=1)
        embeddings.embedding_dim = len(kept)
        for layer in range(self.num_layers):
            self._keep_layer_hidden_channels(layer, kept)
        _keep_norm(self.decoder.norm, kept)
        lm_head = self.model.get_output_embeddings()
        if tied:
            lm_head.weight = embeddings.weight
            lm_head.in_features = len(kept)
        else:
            _keep_inputs(lm_head, kept)
        self._sync_config()

    def keep_layers(self, layers: Sequence[int]) -> None:
        """Keep the listed decoder layers, in their order, and drop the rest (depth
        pruning). The kept attention modules are renumbered 0..n-1, since the KV cache
        holds one slot per `layer_idx`; the config's layer count and per-layer lists
        (layer_types: sliding or full attention) shrink with them, so the stock
        config describes the model and `from_pretrained` rebuilds it."""
        kept = self._indices("layers", layers, self.num_layers).tolist()
        self.decoder.layers = nn.ModuleList(self.layers[i] for i in kept)
        self.layers = self.decoder.layers
        for new_index, block in enumerate(self.layers):
            block.self_attn.layer_idx = new_index
        config = self.model.config
        config.num_hidden_layers = len(kept)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept]
        self._sync_config()  # per-layer widths (our config classes) follow the kept layers

    def _keep_layer_hidden_channels(self, layer: int, kept: torch.Tensor) -> None:
        block = self.layers[layer]
        proj = self.projections(layer)
        for reader in (proj.q, proj.k, proj.v, proj.gate, proj.up):
            _keep_inputs(reader, kept)
        for writer in (proj.o, proj.down):
            _keep_outputs(writer, kept)
        _keep_norm(block.input_layernorm, kept)
        _keep_norm(block.post_attention_layernorm, kept)
        block.hidden_size = block.mlp.hidden_size = len(kept)

    # ---- helpers ----

    def _sync_config(self) -> None:
        config = self.model.config
        widths = self.layer_widths()
        config.hidden_size = self.hidden_size
        config.head_dim = self.head_dim
        for field in WIDTH_FIELDS:
            setattr(config, field, max(getattr(w, field) for w in widths))
        if getattr(config, "layer_widths", None) is not None:
            config.layer_widths = [w.as_dict() for w in widths]

    def _layer_index(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer must be an integer in [0, {self.num_layers}), got {layer!r}", field="layer")
        return layer

    def _indices(self, field: str, values: Sequence[int], size: int) -> torch.Tensor:
        """Validated, sorted indices to keep: the kept units stay in their original order."""
        values = _integers(field, values)
        if not values:
            raise InvalidArgument(f"{field}: keep at least one of {size}", field=field)
        bad = [v for v in values if not 0 <= v < size]
        if bad:
            raise InvalidArgument(f"{field}: indices {bad} are outside [0, {size})", field=field)
        if len(set(values)) != len(values):
            raise InvalidArgument(f"{field}: indices repeat: {values}", field=field)
        device = self.model.get_input_embeddings().weight.device
        return torch.tensor(sorted(values), dtype=torch.long, device=device)


def _integers(field: str, values: Sequence[int]) -> list[int]:
    """Plain ints from ints, numpy integers or integer tensors (what a pruner's argsort yields)."""
    result = []
    for value in values:
        try:
            if isinstance(value, bool):
                raise TypeError
            result.append(operator.index(value))
        except TypeError:
            raise InvalidArgument(f"{field}: indices must be integers, got {value!r}", field=field) from None
    return result


def expand_units(units: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of every row covered by `units` when each unit spans `width` rows."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def _sliced(param: nn.Parameter, index: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.index_select(dim, index.to(param.device)).clone(), requires_grad=param.requires_grad)


def _keep_outputs(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = _sliced(linear.weight, rows, dim=0)
    if linear.bias is not None:
        linear.bias = _sliced(linear.bias, rows, dim=0)
    linear.out_features = len(rows)


def _keep_inputs(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = _sliced(linear.weight, columns, dim=1)
    linear.in_features = len(columns)


def _keep_norm(norm: nn.Module, channels: torch.Tensor) -> None:
    norm.weight = _sliced(norm.weight, channels, dim=0)

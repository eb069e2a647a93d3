"""Llama-family causal LMs whose decoder layers differ in width.

Structured pruning leaves each layer with its own number of attention heads, KV heads
and MLP channels, which no stock transformers config can describe. A checkpoint with
such layers ships a copy of this file, and its config.json names these classes in
`auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
loads it anywhere transformers is installed. It must therefore import nothing but
transformers and huggingface_hub: never prunelab.

config.json keeps the family's model_type ("llama"), so AutoTokenizer and AutoConfig
without remote code read it as the stock config with no prompt; `layer_widths` marks
it as ours. `layer_widths` holds one dict per decoder layer (keys: WIDTH_FIELDS). The global
num_key_value_heads / intermediate_size are the maxima over the layers (an upper bound
for code that sizes buffers from the global config); num_attention_heads is the
maximum too unless it does not divide hidden_size, then the largest count below it
that does, so that the stock config class accepts the file.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

WIDTH_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
# Per-layer checkpoints written before 2026-11-30 name their model_type "prunelab_<family>".
LEGACY_MODEL_TYPE_PREFIX = "prunelab_"

# model_type -> the stock classes: these families share one decoder layout (q/k/v/o
# attention with GQA, gate/up/down MLP, RMSNorm) and differ only in biases and norms.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def _layer_config(self, layer_idx: int):
    """A copy of the config carrying layer `layer_idx`'s widths, to build that layer from."""
    layer = copy.copy(self)
    for field, value in self.layer_widths[layer_idx].items():
        setattr(layer, field, value)
    return layer


def _validate_layer_widths(self) -> None:
    """Replaces the stock check that hidden_size divides by the head count: head_dim is
    explicit here, and channel pruning makes that check meaningless."""
    if self.layer_widths is None:
        return
    if len(self.layer_widths) != self.num_hidden_layers:
        raise ValueError(f"layer_widths has {len(self.layer_widths)} entries for {self.num_hidden_layers} layers")
    for index, widths in enumerate(self.layer_widths):
        if set(widths) != set(WIDTH_FIELDS) or not all(isinstance(v, int) and v > 0 for v in widths.values()):
            raise ValueError(f"layer_widths[{index}] must map exactly {WIDTH_FIELDS} to positive integers: {widths}")
        if widths["num_attention_heads"] % widths["num_key_value_heads"]:
            raise ValueError(f"layer_widths[{index}]: query heads are not a multiple of KV heads: {widths}")


def _per_layer_classes(family: str, base_config: type, base_model: type) -> tuple[type, type]:
    """The config and model class pair for one family; the same code serves every family."""
    name = "Prunelab" + base_model.__name__.removesuffix("ForCausalLM")

    @strict  # re-collects the validators so ours replaces the stock architecture check
    class Config(base_config):
        # The family's own type: a tokenizer or config loader that meets it (AutoTokenizer
        # reads config.json first) uses the stock class and asks about no remote code;
        # `layer_widths` and `auto_map` say that the model needs ours.
        model_type = family
        layer_widths: list[dict[str, int]] | None = None
        layer_config = _layer_config
        validate_architecture = _validate_layer_widths

    class Model(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            if config.layer_widths is not None:
                self._rebuild_layers_per_width()
                self.post_init()

        def _rebuild_layers_per_width(self) -> None:
            # The stock __init__ built every layer at the global widths (on the meta device
            # under from_pretrained, so this costs nothing there); rebuild each at its own.
            layers = self.model.layers
            layer_class = type(layers[0])
            for layer_idx in range(len(layers)):
                layer = layer_class(self.config.layer_config(layer_idx), layer_idx)
                # Modules read the config at run time only for settings such as
                # `_attn_implementation`: point them at the shared config so that
                # `set_attn_implementation` reaches every layer.
                for module in layer.modules():
                    if getattr(module, "config", None) is not None:
                        module.config = self.config
                layers[layer_idx] = layer

    for cls, suffix in ((Config, "Config"), (Model, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = name + suffix
    return Config, Model


PrunelabLlamaConfig, PrunelabLlamaForCausalLM = _per_layer_classes("llama", *FAMILIES["llama"])
PrunelabMistralConfig, PrunelabMistralForCausalLM = _per_layer_classes("mistral", *FAMILIES["mistral"])
PrunelabQwen2Config, PrunelabQwen2ForCausalLM = _per_layer_classes("qwen2", *FAMILIES["qwen2"])
PrunelabQwen3Config, PrunelabQwen3ForCausalLM = _per_layer_classes("qwen3", *FAMILIES["qwen3"])

# family -> (config class, model class) for per-layer-width checkpoints
PER_LAYER_CLASSES = {
    "llama": (PrunelabLlamaConfig, PrunelabLlamaForCausalLM),
    "mistral": (PrunelabMistralConfig, PrunelabMistralForCausalLM),
    "qwen2": (PrunelabQwen2Config, PrunelabQwen2ForCausalLM),
    "qwen3": (PrunelabQwen3Config, PrunelabQwen3ForCausalLM),
}
